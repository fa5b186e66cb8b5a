"""The opt-in `matmul="bsm"` compute path: a layer's independent products as llm_bsm_kernel bundles.

Three bundles per layer, each one parallel call over all cores with the GIL released:
  - q, k, v projections (3 items, one GEMM each against the same normed input);
  - GQA attention: scores ``Q_j K_j^T / sqrt(d)`` and then ``P_j V_j``, one item per (row, KV head),
    the KV head broadcast against its group of query heads instead of ``repeat_interleave``;
    masked softmax in fp32 cast back to the activation dtype, as transformers' eager attention;
  - gate and up projections (2 items).
o_proj and down_proj are single products and stay torch's. A call with fewer than ``MIN_ROWS``
tokens (B * T; decode steps) runs the torch path: bundles of skinny products lose there (an fp32
OpenBLAS sgemm with one row ran 5x slower than MKL's gemv; 3 bf16 projections at 16 rows 1.1x). Autograd goes through the kernel's
``bsm_autograd`` (its backward is one more bundle), so training through this path works.

llm_bsm_kernel is an optional dependency (``pip install llm_lazy_qwen[bsm]``), imported only here
and only when the path is chosen. It computes on CPU tensors only: a part on another device with
``matmul="bsm"`` is refused when it is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

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
        message = "matmul='bsm' needs the optional package llm_bsm_kernel: pip install llm_lazy_qwen[bsm]"
        raise ImportError(message) from e
    return bsm


def check_matmul(matmul: str, device: torch.device) -> None:
    """Validate the `matmul` option up front (and import the kernel when it is 'bsm')."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
    if matmul == "bsm":
        if device.type != "cpu":
            message = f"matmul='bsm' computes on CPU only (llm_bsm_kernel), but device is {device}; use matmul='torch'"
            raise ValueError(message)
        require_bsm()


def _bundle(items: Sequence[tuple], out: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Run a bundle; write into `out` unless autograd needs the outputs (the kernel refuses out= then)."""
    bsm = require_bsm()
    return bsm(items) if out is None else bsm(items, out=out)


def _no_grad(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def worth_it(x: torch.Tensor) -> bool:
    """Whether a layer input (B, T, H) has enough tokens for the bundles to pay off."""
    return x.shape[0] * x.shape[1] >= MIN_ROWS


def plain_linears(*modules: nn.Module) -> bool:
    """True when every module is exactly an nn.Linear (a LoRA-wrapped one computes itself)."""
    return all(type(m) is nn.Linear for m in modules)


def linears(x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` as one bundle: x (..., in) -> each (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    outs = _bundle([(x2, m.weight, 1.0, "nt") for m in layers], None)  # each (N, out)
    result = []
    for m, y in zip(layers, outs):
        if m.bias is not None:
            y = y.add_(m.bias) if _no_grad(x2, m.bias) else y + m.bias
        result.append(y.view(*x.shape[:-1], m.out_features))
    return result


def gqa_attention(
    q: torch.Tensor,  # (B, nH, T, d)
    k: torch.Tensor,  # (B, nKV, K, d)
    v: torch.Tensor,  # (B, nKV, K, d)
    mask: torch.Tensor | None,  # (B or 1, 1, T, K) bool, True = may attend
) -> torch.Tensor:
    """Softmax attention, KV head j serving query heads j*g .. j*g+g-1; returns (B, nH, T, d).

    A mask of None means every key is visible (one query, no padding, no window).
    """
    B, nH, T, d = q.shape
    nKV, K = k.shape[1], k.shape[2]
    g = nH // nKV
    pairs = [(b, j) for b in range(B) for j in range(nKV)]
    heads = [slice(j * g, (j + 1) * g) for j in range(nKV)]
    inference = _no_grad(q, k, v)
    # scores: (g, T, d) @ (K, d)^T per pair, the 2-D K broadcast over the group
    s_items = [(q[b, heads[j]], k[b, j], d**-0.5, "nt") for b, j in pairs]
    if inference:
        scores = q.new_empty(B, nH, T, K)
        _bundle(s_items, [scores[b, heads[j]] for b, j in pairs])
    else:
        scores = torch.stack(_bundle(s_items, None)).view(B, nH, T, K)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, nH, T, K)
    # P@V: (g, T, K) @ (K, d) per pair
    pv_items = [(probs[b, heads[j]], v[b, j], 1.0) for b, j in pairs]
    if inference:
        out = q.new_empty(B, nH, T, d)
        _bundle(pv_items, [out[b, heads[j]] for b, j in pairs])
        return out
    return torch.stack(_bundle(pv_items, None)).view(B, nH, T, d)


def mlp(x: torch.Tensor, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Module) -> torch.Tensor:
    """SwiGLU with gate and up as one bundle: ``down(silu(gate(x)) * up(x))``."""
    gate, up = linears(x, [gate_proj, up_proj])  # (..., inter) each
    return down_proj(F.silu(gate) * up)
