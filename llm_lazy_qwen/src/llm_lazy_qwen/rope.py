"""Rotary position embedding exactly as transformers' Qwen2/Qwen3 (rotate_half layout, fp32 angles).

Dimension i pairs with i + d/2 (not interleaved pairs as in Meta/gpt-fast code).
"""

from __future__ import annotations

import torch


def inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    # (head_dim/2,) fp32
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def cos_sin(position_ids: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, head_dim) in `dtype`, computed in fp32 from integer positions (B, T)."""
    freqs = position_ids[..., None].float() * inv.to(position_ids.device)  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, d); cos/sin: (B, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
    return x * cos + rotate_half(x) * sin
