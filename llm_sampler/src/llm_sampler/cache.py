"""KV reuse behind the plain `forward_func(input_ids) -> logits` contract.

`CachedForward` wraps any model that follows `IncrementalModel`. It remembers the ids (and padding mask) its
cache covers, finds the longest common prefix with each new input, crops the cache there and runs only the
suffix, llama.cpp-style prompt caching. So generation is O(n) instead of O(n^2), scoring several
continuations computes the prompt once, and speculative decoding's rollback is a crop. Logits are never
cached: at least the `logits_to_keep` last positions are always recomputed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from llm_sampler.validation import check_count, check_logits


@runtime_checkable
class IncrementalModel(Protocol):
    """A model with a KV cache that can run a suffix and roll back. Implement these two methods.

    Positions are absolute indices into the (left-padded) sequence; the cache holds positions `0..length-1`.
    """

    def forward_incremental(
        self,
        input_ids: Tensor,
        past_length: int,
        attention_mask: Tensor | None,
        logits_to_keep: int,
    ) -> Tensor:
        """Run `input_ids` `(B, T_new)` at positions `past_length .. past_length + T_new - 1` and append them.

        `past_length` always equals the cached length (it is passed so implementations can assert it).
        `attention_mask` is None (no padding) or `(B, past_length + T_new)` of 0/1 with zeros on the left;
        RoPE positions are then `cumsum(mask) - 1`. Return logits `(B, logits_to_keep, V)` of the last
        `logits_to_keep <= T_new` positions.
        """
        ...

    def crop(self, length: int) -> None:
        """Drop cached positions `>= length`. `crop(0)` empties the cache; the next call may change batch size."""
        ...


class CachedForward:
    """A `forward_func` that reuses a KV cache across calls; its logits equal the uncached model's.

    Call it as `cached(input_ids, attention_mask=None, logits_to_keep=1)`; it returns the last `logits_to_keep`
    positions, `(B, logits_to_keep, V)`. The sampler and scorer pass these keywords themselves. A change of batch
    size, device, padding layout of the common prefix or grad mode restarts from an empty cache.

    Example:
        >>> cached = CachedForward(TransformersIncremental(model))
        >>> new = sample(cached, prompt, 64, temperature=0)  # one token per step after the prompt
        >>> cached.tokens_run  # positions the model actually ran
    """

    def __init__(self, model: IncrementalModel) -> None:
        if not isinstance(model, IncrementalModel):
            msg = f"model must implement forward_incremental(...) and crop(length), got {type(model).__name__}"
            raise TypeError(msg)
        self.model = model
        self.tokens_run = 0  # sequence positions run through the model, summed over calls (not times B)
        self._ids: Tensor | None = None  # (B, L) ids the cache covers
        self._mask: Tensor | None = None  # (B, L) their padding mask, None for none
        # whether the cached tensors were made in inference mode
        self._inference = False

    @property
    def cached_length(self) -> int:
        return 0 if self._ids is None else self._ids.shape[1]

    def reset(self) -> None:
        """Empty the cache."""
        self.model.crop(0)
        self._ids = None
        self._mask = None

    def _common_prefix(self, input_ids: Tensor, attention_mask: Tensor | None) -> int:
        old_ids, old_mask = self._ids, self._mask
        if (
            old_ids is None
            or old_ids.shape[0] != input_ids.shape[0]
            or old_ids.device != input_ids.device
            or self._inference != (not torch.is_grad_enabled())
        ):
            return 0
        n = min(old_ids.shape[1], input_ids.shape[1])
        if n == old_ids.shape[1] and torch.equal(old_ids, input_ids[:, :n]):
            # The common case: the input extends what is cached, with the same padding.
            if old_mask is None and attention_mask is None:
                return n
            if old_mask is not None and attention_mask is not None and torch.equal(old_mask, attention_mask[:, :n]):
                return n
        same = (old_ids[:, :n] == input_ids[:, :n]).all(dim=0)  # (n,)
        if old_mask is not None or attention_mask is not None:
            ones = torch.ones_like(input_ids[:, :n])
            old = old_mask[:, :n] if old_mask is not None else ones
            new = attention_mask[:, :n] if attention_mask is not None else ones
            same &= (old == new).all(dim=0)
        return int(same.long().cumprod(dim=0).sum())

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        logits_to_keep: int = 1,
    ) -> Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            msg = f"input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}"
            raise ValueError(msg)
        batch, length = input_ids.shape
        check_count("logits_to_keep", logits_to_keep, 1)
        if logits_to_keep > length:
            msg = f"logits_to_keep must be <= the input length {length}, got {logits_to_keep}"
            raise ValueError(msg)
        if attention_mask is not None:
            # canonical form: int64 0/1, or None when nothing is padded
            attention_mask = None if bool(attention_mask.all()) else attention_mask.long()
        # Always run at least logits_to_keep positions: their logits are not stored.
        reuse = min(self._common_prefix(input_ids, attention_mask), length - logits_to_keep)
        # Without autograd the model runs in inference mode (about 5-10% faster on small models). A cache
        # made in one mode is never extended in the other (reuse is 0 then): inference tensors cannot be
        # updated in place or saved for backward outside inference mode.
        inference = not torch.is_grad_enabled()
        try:
            with torch.inference_mode(inference):
                if reuse == 0:
                    self.model.crop(0)
                elif reuse < self.cached_length:
                    self.model.crop(reuse)
                logits = self.model.forward_incremental(input_ids[:, reuse:], reuse, attention_mask, logits_to_keep)
        except BaseException:
            self.reset()  # the cache may be half-updated; never reuse it
            raise
        self.tokens_run += length - reuse
        self._ids = input_ids.clone()
        self._mask = None if attention_mask is None else attention_mask.clone()
        self._inference = inference
        logits = check_logits(logits, batch, logits_to_keep, logits_to_keep, "forward_incremental")
        return logits.clone() if inference else logits  # callers get a normal tensor
