"""GGUF tensors into our storage: Q4_0 / Q4_1 blocks as int4 without rounding, anything else dequantized.

A Q4 block holds 32 values of one row: fp16 ``d`` (+ fp16 ``m`` for Q4_1) and 16 bytes of nibbles,
byte ``j`` holding values ``j`` (low nibble) and ``j + 16`` (high). Our int4 (QUANT_FORMAT.md) is
``w = (q - 8) * s + z`` per group, so with ``g = 32``:

    Q4_0: w = d (q - 8)      ->  s = d, z = 0
    Q4_1: w = d q + m        ->  s = d, z = m + 8 d

with ``s`` and ``z`` in fp32 (fp16 ``d`` and ``m`` are exact there; bf16 would round them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .gguf_reader import GGUFTensor
from .quant import QuantSpec, default_layout, dequantize
from .quant_pack import pack_int4

LOSSLESS_INT4 = {"Q4_0": 18, "Q4_1": 20}  # bytes per block of 32 values
GGUF_GROUP_SIZE = 32
_CHUNK_BYTES = 64 << 20  # dequantize big tensors (an embedding) this many fp32 bytes at a time


def int4_from_q4(t: GGUFTensor, rows: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], QuantSpec]:
    """A Q4_0 / Q4_1 weight as our int4 with group 32, no rounding: ``({"qweight", "scales_and_zeros"}, spec)``.

    ``rows`` re-orders the rows first (llama's Q/K); whole blocks move, so it costs nothing in precision.

    Example::

        tensors, spec = int4_from_q4(open_gguf("m.gguf").tensors["blk.0.ffn_up.weight"])
        w = dequantize(tensors, spec)   # equals gguf.quants.dequantize of the tensor
    """
    n, k = t.shape
    block = LOSSLESS_INT4[t.type_name]
    data = np.asarray(t.data) if rows is None else np.asarray(t.data)[rows.numpy()]
    raw = torch.from_numpy(np.array(data)).view(n, k // GGUF_GROUP_SIZE, block)  # (N, G, block), a copy
    d = raw[..., 0:2].contiguous().view(torch.float16).float()  # (N, G, 1)
    nibbles = raw[..., block - 16 :]  # (N, G, 16)
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).view(n, k)  # (N, K) in 0..15
    if t.type_name == "Q4_0":
        z = torch.zeros_like(d)
    else:
        z = raw[..., 2:4].contiguous().view(torch.float16).float() + 8 * d  # m + 8 d
    spec = QuantSpec("int4", (n, k), GGUF_GROUP_SIZE, default_layout(n))
    assert spec.layout is not None
    return {"qweight": pack_int4(q, spec.layout), "scales_and_zeros": torch.cat([d, z], dim=-1)}, spec


def dequantized(t: GGUFTensor, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Any GGUF tensor in `dtype` (rows re-ordered by `rows`), a chunk of rows at a time."""
    out = torch.empty(t.shape, dtype=dtype)
    if len(t.shape) == 1:
        return out.copy_(t.dequantize())
    step = max(1, _CHUNK_BYTES // (4 * out[0].numel()))
    for a in range(0, t.shape[0], step):
        b = min(t.shape[0], a + step)
        out[a:b] = t.dequantize(slice(a, b) if rows is None else rows[a:b].numpy())
    return out


def requant_error(w: torch.Tensor, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> dict[str, Any]:
    """What storing `w` (the GGUF values, fp32) as `tensors` adds: max |dw| and RMS(dw) / RMS(w)."""
    d = dequantize(tensors, spec, torch.float32) - w
    rel = float(d.pow(2).mean().sqrt() / w.pow(2).mean().sqrt().clamp_min(1e-30))
    return {"max_abs_err": float(d.abs().max()), "rel_rms_err": rel}
