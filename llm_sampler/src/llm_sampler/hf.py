"""Adapters for transformers causal LMs (duck-typed: transformers is never imported here).

Both pass `position_ids = cumsum(attention_mask) - 1` (0 on padding), as transformers' generate does, so
left-padded rows see the same positions as unpadded ones. Put the model in eval mode yourself.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from llm_sampler.forward import ForwardFunc


def _positions(attention_mask: Tensor | None, past_length: int, length: int, device: torch.device) -> Tensor:
    if attention_mask is None:
        positions = torch.arange(past_length, past_length + length, device=device)
        return positions[None]  # (1, T_new)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, past + T_new)
    return positions[:, past_length:]


def transformers_forward(model: Any) -> ForwardFunc:
    """Uncached `forward_func` for a transformers causal LM that handles left padding and `logits_to_keep`.

    Example:
        >>> forward = transformers_forward(AutoModelForCausalLM.from_pretrained(name).eval())
        >>> new = sample(forward, ids, 20, attention_mask=mask, temperature=0)
    """

    def forward(input_ids: Tensor, attention_mask: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        positions = _positions(attention_mask, 0, input_ids.shape[1], input_ids.device)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=logits_to_keep,  # transformers: 0 means every position
        )
        logits: Tensor = out.logits  # (B, T or logits_to_keep, V)
        return logits

    return forward


def _cache_argument(model: Any) -> str:
    """The name `model.forward` takes its KV cache by: `cache` from transformers 5.x (which deprecates
    `past_key_values`), `past_key_values` before (4.53+); the output field has the same name."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: the name every version still accepts
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


class TransformersIncremental:
    """`IncrementalModel` for a transformers causal LM, keeping its `DynamicCache` between calls.

    Needs a model whose cache supports `crop` (full-attention layers, e.g. Qwen2 without sliding window).
    The cache goes in and out as `cache` on transformers 5.x and as `past_key_values` on 4.x (4.53+),
    whichever the model's `forward` declares.

    Example:
        >>> cached = CachedForward(TransformersIncremental(model))
        >>> logits = cached(ids, logits_to_keep=ids.shape[1])  # equals model(ids).logits
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cache: Any = None  # transformers Cache, created by the first forward
        self._length = 0
        self._cache_name = _cache_argument(model)

    def forward_incremental(
        self,
        input_ids: Tensor,
        past_length: int,
        attention_mask: Tensor | None,
        logits_to_keep: int,
    ) -> Tensor:
        assert past_length == self._length, (past_length, self._length)
        positions = _positions(attention_mask, past_length, input_ids.shape[1], input_ids.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_name: self._cache},
        )
        self._cache = out[self._cache_name]
        self._length += input_ids.shape[1]
        logits: Tensor = out.logits  # (B, logits_to_keep, V)
        return logits

    def crop(self, length: int) -> None:
        if length == 0:
            self._cache = None
        elif length < self._length:
            # transformers 5 crops by a negative count; 4.x accepts that too.
            self._cache.crop(length - self._length)
        self._length = min(length, self._length)
