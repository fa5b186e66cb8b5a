"""A whole-model part plus its KV cache behind the two methods llm_sampler's CachedForward calls.

``forward_incremental(input_ids, past_length, attention_mask, logits_to_keep)`` runs only new
tokens; ``crop(length)`` rolls back. A rollback deeper than a sliding-window ring can undo is not
an error here: the ids already seen are replayed into a fresh cache on the next call.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .part import QwenPart


class IncrementalPart:
    """Example::

    from llm_sampler import CachedForward, sample
    fwd = CachedForward(IncrementalPart(load_part("qwen-sep", "f", lazy=True)))
    new_tokens = sample(fwd, prompt_ids, 32, temperature=0)
    """

    def __init__(self, part: QwenPart, extra_window_slots: int = 8) -> None:
        if not (part.spec.begin and part.spec.end):
            raise ValueError(
                f"IncrementalPart needs a part holding 'b' and 'e' (token ids in, logits out); got {str(part.spec)!r}"
            )
        self.part, self.extra_window_slots = part, extra_window_slots
        self.cache: KVCache = part.new_cache(extra_window_slots)
        self._ids: torch.Tensor | None = None  # (B, L) ids the cache covers (kept for replays)
        self._mask: torch.Tensor | None = None  # (B, L) their padding mask
        self._replay: int | None = None  # rebuild the first n positions before the next call

    def crop(self, length: int) -> None:
        if length == 0 or self._ids is None:
            self.cache, self._ids, self._mask, self._replay = (
                self.part.new_cache(self.extra_window_slots),
                None,
                None,
                None,
            )
            return
        try:
            self.cache.crop(length)
        except ValueError:  # the ring overwrote keys we need: replay the prefix next time
            self._replay = length
        self._ids = self._ids[:, :length]
        self._mask = self._mask[:, :length] if self._mask is not None else None

    def forward_incremental(
        self, input_ids: torch.Tensor, past_length: int, attention_mask: torch.Tensor | None, logits_to_keep: int
    ) -> torch.Tensor:
        if self._replay is not None:
            assert self._ids is not None
            self.cache = self.part.new_cache(self.extra_window_slots)
            self.part(self._ids, cache=self.cache, attention_mask=self._mask, logits_to_keep=1)
            self._replay = None
        if past_length != self.cache.seq_len:
            raise ValueError(f"past_length={past_length} but the cache holds {self.cache.seq_len} positions")
        logits = self.part(input_ids, cache=self.cache, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        ids = input_ids if self._ids is None else torch.cat([self._ids, input_ids], dim=1)
        self._ids = ids
        if attention_mask is not None:
            self._mask = attention_mask.bool()
        elif self._mask is not None:
            self._mask = torch.cat([self._mask, torch.ones_like(input_ids, dtype=torch.bool)], dim=1)
        return logits
