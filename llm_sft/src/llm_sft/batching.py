"""Length-grouped batches: similar lengths share a batch, so little compute goes to padding.

Padding is on the right (as TRL's collator): ``pad_id`` in ``input_ids``, ``-100`` in ``labels``, 0 in
``attention_mask``. With causal attention a real token never sees the padding after it, and the
loss never sees padding because its labels are -100 (masked by position, never by token id: the
pad id may equal the end token, which must stay in the labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, Example


@dataclass
class Batch:
    """Right-padded tensors of a few examples."""

    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, -100 on prompt and padding
    attention_mask: torch.Tensor  # (B, T) int64, 1 = token, 0 = padding
    position_ids: torch.Tensor  # (B, T) int64, 0..T-1 (padding comes after every real token)

    @property
    def n_targets(self) -> int:
        """Tokens the loss covers: positions whose next token has a label."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Pad examples on the right into one :class:`Batch`.

    Example::

        batch = collate([ds[0], ds[1]], ds.pad_id)
        batch.input_ids.shape          # (2, longest)
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    B, T = len(examples), max(len(e) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    positions = torch.arange(T).expand(B, T).contiguous()
    return Batch(ids, labels, mask, positions)


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    group_by_length: bool = True,
    megabatch_mult: int = 50,
) -> list[list[int]]:
    """Split example indices into batches; a function of ``(seed, epoch)`` only, so a resumed run sees the same order.

    With ``group_by_length`` (transformers' LengthGroupedSampler): shuffle, cut into mega-batches of
    ``megabatch_mult * batch_size``, sort each by length (longest first), cut into batches and
    shuffle the batches. The last batch may be smaller; nothing is dropped.

    Example::

        batch_indices([5, 9, 7, 3], 2, seed=0, epoch=0)     # e.g. [[1, 2], [0, 3]]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    if group_by_length:
        mega = megabatch_mult * batch_size
        order = [i for k in range(0, n, mega) for i in sorted(order[k : k + mega], key=lambda i: -lengths[i])]
    batches = [order[k : k + batch_size] for k in range(0, n, batch_size)]
    if shuffle and group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches
