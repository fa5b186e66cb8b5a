"""Shared by llm_lazy_qwen's tests: the fp32 tolerance against transformers and seeded token ids."""

from __future__ import annotations

import torch

FP32 = {"atol": 1e-4, "rtol": 1e-4}


def token_ids(batch: int = 2, seq: int = 13, seed: int = 0) -> torch.Tensor:
    """(batch, seq) ids inside the test models' 384-token vocabulary, the same for the same seed."""
    return torch.randint(0, 384, (batch, seq), generator=torch.Generator().manual_seed(seed))
