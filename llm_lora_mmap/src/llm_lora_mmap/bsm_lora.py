"""The opt-in `matmul="bsm"` path of LoraLinear: base and LoRA-A products as one llm_bsm_kernel bundle.

    base, h = bsm([(x, W, 1, "nt"), (dropout(x), A, 1, "nt")])    # (N, out), (N, r): one parallel call
    y = base + b + (h @ B^T) * scaling                               # B's product is tiny: torch

When W has the activations' dtype, autograd goes through the kernel's ``bsm_autograd`` (backward:
one bundle of dX, dX_lora, dA). A frozen W stored in another dtype (bf16 on disk, fp32 compute) goes
through ``_CastBundle``, which keeps the stored W for backward and casts it again there, never the
cast copy, as ``frozen_linear`` does on the torch path.

Inputs with fewer than ``MIN_ROWS`` rows (decode steps) take the torch path: there a one-row fp32
OpenBLAS sgemm ran 5x slower than MKL's gemv, and a bundle of two skinny products saves nothing.

llm_bsm_kernel is an optional dependency (``pip install llm_lora_mmap[bsm]``), imported only when
the path is chosen. It computes on CPU tensors only: a CUDA input is refused with a clear error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch

from .errors import LoraError

Matmul = Literal["torch", "bsm"]
MATMULS = ("torch", "bsm")
Bundle = Callable[..., list[torch.Tensor]]
# fp32 break-even of a q/k/v bundle (896 -> 896/128/128) on 2 cores: 64 rows 0.96, 16 rows 1.18
MIN_ROWS = 64


@functools.cache
def require_bsm() -> Bundle:
    """llm_bsm_kernel's ``bsm``, or an ImportError that says how to install it."""
    try:
        from llm_bsm_kernel import bsm
    except ImportError as e:
        message = "matmul='bsm' needs the optional package llm_bsm_kernel: pip install llm_lora_mmap[bsm]"
        raise ImportError(message) from e
    return bsm


def check_matmul(matmul: str) -> None:
    """Validate the `matmul` option up front (and import the kernel when it is 'bsm')."""
    if matmul not in MATMULS:
        raise LoraError(f"matmul must be one of {MATMULS}, got {matmul!r}")
    if matmul == "bsm":
        require_bsm()


class _CastBundle(torch.autograd.Function):
    """``(x W^T, xd A^T)`` for a frozen W in another dtype: saves the stored W, re-casts it in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        xd: torch.Tensor,
        weight: torch.Tensor,
        a: torch.Tensor,
    ):
        # keep the stored (e.g. mmapped bf16) W for backward, never the cast copy
        ctx.save_for_backward(xd, weight, a)
        items = [(x, weight.to(x.dtype), 1.0, "nt"), (xd, a, 1.0, "nt")]
        base, h = require_bsm()(items)  # (N, out), (N, r)
        return base, h

    @staticmethod
    def backward(ctx: Any, g_base: torch.Tensor, g_h: torch.Tensor):
        xd, weight, a = ctx.saved_tensors
        need_x, need_xd, _, need_a = ctx.needs_input_grad
        items: list[tuple] = []
        slots: list[int] = []
        if need_x:
            w = weight.to(g_base.dtype)  # cast again, for this bundle only
            items.append((g_base, w, 1.0, "nn"))  # (N, out) @ (out, in)
            slots.append(0)
        if need_xd:
            items.append((g_h, a, 1.0, "nn"))  # (N, r) @ (r, in)
            slots.append(1)
        if need_a:
            items.append((g_h, xd, 1.0, "tn"))  # (r, N) @ (N, in)
            slots.append(3)
        grads: list[torch.Tensor | None] = [None] * 4
        for slot, g in zip(slots, require_bsm()(items) if items else []):
            grads[slot] = g
        return tuple(grads)


def worth_it(x: torch.Tensor, in_features: int) -> bool:
    """Whether an input (..., in) has enough rows for the bundle to pay off."""
    return x.numel() >= MIN_ROWS * in_features


def base_and_lora_a(
    x: torch.Tensor,  # (N, in)
    xd: torch.Tensor,  # (N, in): dropout(x) in the adapter's dtype
    weight: torch.Tensor,  # (out, in), frozen
    a: torch.Tensor,  # (r, in)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ W^T, xd @ A^T)`` as one bundle, in x's and A's dtypes."""
    if not (x.is_cpu and weight.is_cpu and a.is_cpu):
        message = (
            f"LoraLinear(matmul='bsm') computes on CPU only (llm_bsm_kernel), but got tensors on "
            f"{x.device} / {weight.device}; set matmul='torch' (apply_lora(..., matmul='torch'))"
        )
        raise LoraError(message)
    if weight.dtype == x.dtype:
        base, h = require_bsm()([(x, weight, 1.0, "nt"), (xd, a, 1.0, "nt")])
        return base, h
    base, h = _CastBundle.apply(x, xd, weight, a)  # type: ignore[no-untyped-call]
    return base, h
