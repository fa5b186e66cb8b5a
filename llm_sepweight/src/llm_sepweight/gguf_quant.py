"""GGUF tensors into our storage: Q4_0 / Q4_1 / Q4_K blocks as int4 without rounding, anything else dequantized.

Our int4 (QUANT_FORMAT.md) is ``w = (q - 8) * s + z`` per group of ``g`` inputs, ``q`` in 0..15.
The 4-bit GGUF types are exactly that with ``g = 32``:

    Q4_0 (32 values: fp16 d, 16 bytes of nibbles)   w = d (q - 8)        ->  s = d,      z = 0
    Q4_1 (32 values: fp16 d, m, 16 bytes)           w = d q + m          ->  s = d,      z = m + 8 d
    Q4_K (256 values: fp16 d, dmin, 12 bytes of     w = d sc q - dmin mn ->  s = d sc,   z = 8 s - dmin mn
          6-bit sub-block scales sc / mins mn, 128 bytes)

with ``s`` and ``z`` in fp32 (fp16 times a 6-bit integer is exact there; bf16 would round them).
In a 32-value block byte ``j`` holds values ``j`` (low nibble) and ``j + 16``; in a Q4_K block each
32 bytes hold two sub-blocks of 32 (low nibbles, then high).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .gguf_reader import GGUFTensor
from .quant import QuantSpec, default_layout, dequantize
from .quant_pack import pack_int4

LOSSLESS_INT4 = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}  # bytes per block (32, 32 and 256 values)
GGUF_GROUP_SIZE = 32
_CHUNK_BYTES = 64 << 20  # dequantize big tensors (an embedding) this many fp32 bytes at a time


def int4_from_q4(t: GGUFTensor, rows: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], QuantSpec]:
    """A Q4_0 / Q4_1 / Q4_K weight as our int4 with group 32, no rounding: ``({"qweight", "scales_and_zeros"}, spec)``.

    ``rows`` re-orders the rows first (llama's Q/K); whole blocks move, so it costs nothing in precision.

    Example::

        tensors, spec = int4_from_q4(open_gguf("m.gguf").tensors["blk.0.ffn_up.weight"])
        w = dequantize(tensors, spec)   # equals gguf.quants.dequantize of the tensor
    """
    n, k = t.shape
    block = LOSSLESS_INT4[t.type_name]
    data = np.asarray(t.data) if rows is None else np.asarray(t.data)[rows.numpy()]
    raw = torch.from_numpy(np.array(data)).view(n, -1, block)  # (N, blocks, block bytes), a copy
    q, sz = _q4_k(raw) if t.type_name == "Q4_K" else _q4_32(raw, t.type_name)
    spec = QuantSpec("int4", (n, k), GGUF_GROUP_SIZE, default_layout(n))
    assert spec.layout is not None
    return {
        "qweight": pack_int4(q.view(n, k), spec.layout),
        "scales_and_zeros": sz.view(n, k // GGUF_GROUP_SIZE, 2),
    }, spec


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).float()


def _q4_32(raw: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1: (q (N, G, 32), sz (N, G, 2))."""
    d = _fp16(raw[..., 0:2])  # (N, G, 1)
    nibbles = raw[..., -16:]  # (N, G, 16)
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)  # (N, G, 32)
    z = torch.zeros_like(d) if kind == "Q4_0" else _fp16(raw[..., 2:4]) + 8 * d  # m + 8 d
    return q, torch.cat([d, z], dim=-1)


def _q4_k(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K: (q (N, B, 256), sz (N, B, 8, 2)); the 6-bit unpacking of gguf's ``Q4_K.get_scale_min``."""
    n, b, _ = raw.shape
    d, dmin = _fp16(raw[..., 0:2]), _fp16(raw[..., 2:4])  # (N, B, 1)
    lo, hi, mix = raw[..., 4:16].reshape(n, b, 3, 4).unbind(2)  # (N, B, 4) each
    sc = torch.cat([lo & 63, (mix & 15) | ((lo >> 2) & 48)], dim=-1).float()  # (N, B, 8)
    mn = torch.cat([hi & 63, (mix >> 4) | ((hi >> 2) & 48)], dim=-1).float()
    s = d * sc
    z = 8 * s - dmin * mn  # w = s q - dmin mn = (q - 8) s + z
    qs = raw[..., 16:].reshape(n, b, 4, 1, 32)  # 4 x 32 bytes, each two sub-blocks
    q = torch.cat([qs & 15, qs >> 4], dim=3)  # (N, B, 4, 2, 32): sub-blocks in order
    return q, torch.stack([s, z], dim=-1)


def dequantized(t: GGUFTensor, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Any GGUF tensor in `dtype` (rows re-ordered by `rows`), a chunk of rows at a time."""
    out = torch.empty(t.shape, dtype=dtype)
    if len(t.shape) == 1:  # norms, biases (a llama q/k bias is permuted like its weight's rows)
        return out.copy_(t.dequantize() if rows is None else t.dequantize()[rows])
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
