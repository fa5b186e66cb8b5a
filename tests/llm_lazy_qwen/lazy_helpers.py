"""Shared by llm_lazy_qwen's tests: the fp32 tolerance against transformers, seeded token ids, greedy decoding."""

from __future__ import annotations

import torch

from llm_lazy_qwen import QwenPart

FP32 = {"atol": 1e-4, "rtol": 1e-4}


def token_ids(batch: int = 2, seq: int = 13, seed: int = 0) -> torch.Tensor:
    """(batch, seq) ids inside the test models' 384-token vocabulary, the same for the same seed."""
    return torch.randint(0, 384, (batch, seq), generator=torch.Generator().manual_seed(seed))


def decode(part: QwenPart, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill ``ids`` (B, T), then ``steps`` greedy tokens on a cache of its own: the logits of every call,
    concatenated (B, T + steps, vocab)."""
    cache = part.new_cache()
    logits = [part(ids, cache=cache)]
    for _ in range(steps):
        logits.append(part(logits[-1][:, -1:].argmax(-1), cache=cache))
    return torch.cat(logits, dim=1)
