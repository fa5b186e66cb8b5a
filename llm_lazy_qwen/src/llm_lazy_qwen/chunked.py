"""A forward longer than a memory budget's ``max_tokens``, run as consecutive chunks through the KV cache.

Under ``load_part(..., memory_budget=..., max_tokens=n)`` the plan makes room for the activations of a
forward of n tokens per row. A longer forward with a cache runs here as chunks of at most n tokens, each
a whole forward (prepare, every layer, finish) that the next one continues through the cache: the result
equals the one-shot forward (the logits of the kept positions, or the hidden states, concatenated), with
one exception, dynamic RoPE past the model's original context, whose scaling follows the length seen so far.
Each chunk streams the weights that are not resident again: prefill takes longer, in exchange for memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .head import LogitsToKeep, select_positions
from .inputs import check_input, masks, positions
from .kv_cache import KVCache

if TYPE_CHECKING:
    from .part import QwenPart


def kept_positions(T: int, keep: LogitsToKeep) -> torch.Tensor:
    """The positions (in output order) whose logits a forward of T tokens returns for `keep`."""
    if isinstance(keep, torch.Tensor) and keep.dim() != 1:
        raise ValueError(
            f"a forward longer than max_tokens takes logits_to_keep as an int, a slice or a 1-D tensor of "
            f"positions; got a tensor of shape {tuple(keep.shape)}"
        )
    return select_positions(torch.arange(T)[None], keep)[0]  # (n,)


def forward_in_chunks(
    part: QwenPart,
    x: torch.Tensor,  # (B, T) ids or (B, T, H) hidden states
    chunk: int,
    cache: KVCache,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: LogitsToKeep = None,
) -> torch.Tensor:
    """``part(x, cache=cache, ...)`` as chunks of at most `chunk` tokens per row; equals the one-shot forward.

    Everything is checked before the first chunk runs. A chunk that fails rolls the cache back to where
    the call began (as a failed one-shot call), where the sliding-window ring still allows it.

    Example::

        logits = forward_in_chunks(part, ids, 512, part.new_cache(), logits_to_keep=1)   # (B, 1, V)
    """
    B, T = check_input(x, part.config, part.spec.begin, part.layer_ids)
    start = cache.start_call(part.layer_ids, B)
    new_mask, _ = masks(attention_mask, cache, B, T, start, x.device)
    # RoPE positions of the whole call (as one call counts them), handed to each chunk
    pos, _ = positions(position_ids, cache, new_mask, B, T, start, x.device, part.config)
    wanted = kept_positions(T, logits_to_keep) if part.spec.end else None
    kept = torch.unique(wanted) if wanted is not None else None  # sorted: the chunks give them in this order
    outs: list[torch.Tensor] = []
    try:
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            m = new_mask[:, c0:c1] if new_mask is not None else None
            h, step = part.prepare(x[:, c0:c1], position_ids=pos[:, c0:c1], attention_mask=m, cache=cache)
            for i in part.layer_ids:
                h = part.run_layer(i, h, step)
            # a chunk with no kept position reads no head (finish gives (B, 0, V))
            local = kept[(kept >= c0) & (kept < c1)] - c0 if kept is not None else None
            outs.append(part.finish(h, step, local))
    except BaseException as e:
        _roll_back(cache, start, e)
        raise
    out = torch.cat(outs, dim=1)  # (B, kept or T, V or H)
    if kept is None or torch.equal(kept, wanted):
        return out
    return out[:, torch.searchsorted(kept, wanted)]  # the caller's order, repeats included


def _roll_back(cache: KVCache, start: int, error: BaseException) -> None:
    """Forget the chunks of a failed call, as if it had never run (where the ring still holds the keys)."""
    done = cache.seq_len - start
    try:
        cache.crop(start)
    except ValueError:  # none done: the next call says so (KVCache's roll-back of a failed call)
        if done:
            error.add_note(
                f"the KV cache keeps the first {done} tokens of this call: its sliding-window layers overwrote "
                "the keys needed to forget them; continue from there, or start over with cache.crop(0)"
            )
