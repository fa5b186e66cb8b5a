"""Autograd for a bundle: the forward is one bundle, the backward one bundle of all the VJPs.

For out_i = s_i * A_i @ B_i (transposes are applied before, as views autograd tracks):
    dA_i = s_i * g_i @ B_i^T        dB_i = s_i * A_i^T @ g_i
summed over the batch where an operand broadcast (2-D or batch 1). A broadcast B (GQA's shared K/V)
needs no temporary: sum_h A_h^T g_h = A.reshape(-1, K)^T @ g.reshape(-1, N), one GEMM.
Checked with torch.autograd.gradcheck in float64 through the kernel (dgemm) and the fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .bundle import parse_item
from .bundled import compute

# (operand index, how to reduce the product to the operand's shape)
Slot = tuple[int, str]


def _grad_items(
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    s: float,
    need_a: bool,
    need_b: bool,
    index: int,
) -> tuple[list[tuple], list[Slot]]:
    """The VJP items of one product and where each result goes."""
    items: list[tuple] = []
    slots: list[Slot] = []
    batch = g.shape[0] if g.ndim == 3 else 1
    if need_a:
        items.append((g, b.mT, s))  # (batch, M, K), B broadcast by the kernel
        a_batched = a.ndim == 3 and a.shape[0] == batch
        slots.append((2 * index, "as_is" if a_batched or g.ndim == 2 else "sum"))
    if need_b:
        b_batched = b.ndim == 3 and b.shape[0] == batch
        if b_batched or g.ndim == 2:
            items.append((a.mT, g, s))  # (batch, K, N)
        else:  # B broadcast over a batched A (GQA): fold the batch into M, one GEMM
            assert a.ndim == 3 and a.shape[0] == batch
            k, n = a.shape[-1], g.shape[-1]
            items.append((a.reshape(-1, k).T, g.reshape(-1, n), s))  # (K, N)
        slots.append((2 * index + 1, "as_is"))
    return items, slots


class BundledMatmul(torch.autograd.Function):
    """outputs = [s_i * A_i @ B_i]; inputs are (scales, num_threads, A_0, B_0, A_1, B_1, ...)."""

    @staticmethod
    def forward(
        ctx: Any,
        scales: tuple[float, ...],
        num_threads: int | None,
        *operands: torch.Tensor,
    ):
        ctx.scales, ctx.num_threads = scales, num_threads
        ctx.save_for_backward(*operands)
        items = [(operands[2 * i], operands[2 * i + 1], s) for i, s in enumerate(scales)]
        return tuple(compute(items, num_threads))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor):
        operands = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        items, slots = [], []
        for i, g in enumerate(grads):
            a, b = operands[2 * i], operands[2 * i + 1]
            if g is None or not (needs[2 * i] or needs[2 * i + 1]):
                continue
            more_items, more_slots = _grad_items(a, b, g, ctx.scales[i], needs[2 * i], needs[2 * i + 1], i)
            items += more_items
            slots += more_slots
        results = compute(items, ctx.num_threads)
        out: list[torch.Tensor | None] = [None] * len(operands)
        for (index, reduce), r in zip(slots, results):
            target = operands[index]
            if reduce == "sum":
                r = r.sum(0)
            out[index] = r.reshape(target.shape)
        return (None, None, *out)


def bsm_autograd(items: Sequence[Any], num_threads: int | None = None) -> list[torch.Tensor]:
    """`bsm` for torch tensors that require grad: one Function call for the whole bundle."""
    scales, operands = [], []
    for i, raw in enumerate(items):
        a, b, scale, ta, tb = parse_item(raw, i)
        # A numpy operand is left as is: validation in forward reports it.
        if ta and isinstance(a, torch.Tensor):
            a = a.mT
        if tb and isinstance(b, torch.Tensor):
            b = b.mT
        scales.append(scale)
        operands += [a, b]
    return list(BundledMatmul.apply(tuple(scales), num_threads, *operands))
