"""QuantLinear: a frozen int8 / int4 linear layer stored as llm_sepweight's QUANT_FORMAT.md; equals dequantize + F.linear.

``y = x @ W.T + b`` with ``W`` held as packed integers plus scales, computed one of two ways (the same
result within rounding; tests compare both with ``llm_sepweight.dequantize`` + ``F.linear``):

- **kernel** (CPU, at most :func:`kernel_max_rows` rows: decode; bf16 activations, fp32 / fp16 for one
  row only, where torch's kernels have no fast path): ``aten._weight_int8pack_mm`` /
  ``aten._weight_int4pack_mm_for_cpu``, which read the integers as stored (int4: only in this CPU's
  layout, :func:`llm_sepweight.int4_layout`).
- **bsm GEMV** (with the optional ``[bsm]`` extra, llm_bsm_kernel): its int4 / int8 decode loops (AVX2)
  take every product of at most :func:`bsm_max_rows` rows they can compute (any int4 layout, fp32 or
  bf16 activations), before either path above; see :func:`bsm_max_rows` for the rule. Its int8 loop
  quantizes x to int16 on the fly (per 256 values; ~1e-4 of the output's scale, its own twin is
  ``llm_bsm_kernel.int8_matmul_reference``; SmolLM2-135M perplexity unchanged: +0.329% vs +0.333%).
- **dequantize** (more rows: prefill; and wherever no kernel fits: the ``rows`` layout, another CPU's
  layout, CUDA, a torch without the ops): W into a per-thread reused buffer, then the ordinary GEMM,
  in fp32 on CPUs without native bf16 matmul (AVX2 / AVX512 without BF16: there bf16 GEMM ran 4x
  slower than fp32 at 256 rows; benchmarks/bench_quant_kernels.py).

Backward (LoRA training on top): ``grad_x = grad @ W``, W dequantized again; the integers are frozen.
Kernels take scales in the activation dtype and int4's as ``[K/g, N, 2]``: that prepared copy is
made once per scales tensor and cached while the tensor lives (resident weights: once; streamed
ones: once per forward, dying with the tensor).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from llm_sepweight import QuantSpec, int4_layout, pack_int4, unpack_int4

Scheme = Literal["int8", "int4"]
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows up to which the int kernels beat dequantize + GEMM (benchmarks/bench_quant_kernels.py, README).
# bf16 activations, AMD EPYC AVX2, 2 cores: the kernels won up to 64 rows, lost at 256 (7B shapes).
# CPUs with AMX-BF16: from the notes' Intel box (kernels 2.4x faster than AMX bf16 GEMM at 1 row,
# 5-7x slower at 64): decode-sized calls only. fp32 / fp16 activations: torch's kernels ran 5-20x
# slower than with bf16 (no vectorised path here): one row only, dequantize + GEMM from 2 rows (6x faster at 16).
_MAX_ROWS_NATIVE_BF16 = 8
_MAX_ROWS_OTHER = 128
_MAX_ROWS_NOT_BF16 = 1
# llm_bsm_kernel's GEMV (AVX2 loops, fp32 FMA) against torch's kernels, 3584 x 3584, one core, AMD EPYC AVX2
# (benchmarks/bench_quant_gemv.py, BENCHMARKS.md): faster at every row count up to 64 (int4 1.4-1.6x, int8
# 1.2-1.5x with bf16 x; 20-70x with fp32 x), and faster than dequantize + GEMM up to 64 (int8: 28 vs 31 ms
# at 64). Its cost grows linearly with the rows, a GEMM's does not: decode and short prompts only.
# Since the int8 loop went to int16 x int8 -> int32: 1.3-2.5x torch's int8 at one row (2.5x but down_proj),
# 1.25-1.45x at four.
_BSM_MAX_ROWS = 32


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16); else bf16 GEMM is emulated."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def kernel_max_rows(dtype: torch.dtype = torch.bfloat16) -> int:
    """Rows (batch x tokens) up to which a quantized linear takes the int kernel on this CPU, for activations in `dtype`."""
    if dtype != torch.bfloat16:
        return _MAX_ROWS_NOT_BF16
    return _MAX_ROWS_NATIVE_BF16 if native_bf16() else _MAX_ROWS_OTHER


@functools.cache
def _bsm() -> Any:
    """llm_bsm_kernel when installed with its compiled AVX2 GEMV loops, else None (an optional extra)."""
    try:
        import llm_bsm_kernel as bk
    except ImportError:
        return None
    gemv_isa = getattr(bk, "quant_gemv_isa", None)
    return bk if gemv_isa is not None and gemv_isa() == "avx2" else None


def bsm_max_rows(dtype: torch.dtype = torch.bfloat16) -> int:
    """Rows up to which a quantized linear takes llm_bsm_kernel's GEMV on this CPU for activations in
    `dtype`; 0 where it does not (not installed, no AVX2, fp16, or bf16 on a CPU with native bf16).

    The rule: fp32 everywhere (torch's int kernels have no vectorised fp32 path: 20-70x slower here);
    bf16 only where bf16 is emulated (AVX2, AVX512 without BF16), as torch's kernels use AMX / AVX512-BF16.
    """
    if _bsm() is None or dtype not in (torch.float32, torch.bfloat16):
        return 0
    if dtype == torch.bfloat16 and native_bf16():
        return 0
    return _BSM_MAX_ROWS


def _use_bsm(x2: torch.Tensor, qweight: torch.Tensor) -> bool:
    """The one place that decides: llm_bsm_kernel's GEMV computes this (M, K) product."""
    return (
        x2.shape[0] <= bsm_max_rows(x2.dtype)
        and x2.device.type == "cpu"
        and qweight.device.type == "cpu"
        and qweight.is_contiguous()
    )


# ----------------------------------------------------------------------------------- dequantize
_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, reused by every call of this thread."""
    bufs: dict[tuple[torch.dtype, torch.device], torch.Tensor] = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = bufs[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def dequantize_into(
    qweight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """W ``[N, K]`` in `dtype` from the stored integers and scales (QUANT_FORMAT.md), written into `out` if given."""
    N = qweight.shape[0]
    K = qweight.shape[1] * (2 if spec.scheme == "int4" else 1)
    w = torch.empty(N, K, dtype=dtype, device=qweight.device) if out is None else out.view(N, K)
    # convert, then scale in place: a mixed-dtype torch.mul(int, float, out=) ran 6x slower here
    if spec.scheme == "int8":
        return w.copy_(qweight).mul_(scales.to(dtype)[:, None])  # (N, K) * (N, 1)
    assert spec.group_size is not None and spec.layout is not None
    g = spec.group_size
    _unpack_into(w, qweight, spec.layout)  # (N, K) values 0..15
    sz = scales.float()  # (N, K/g, 2)
    scale, offset = sz[..., :1].to(dtype), (sz[..., 1:] - 8 * sz[..., :1]).to(dtype)
    wg = w.view(N, K // g, g)
    return wg.mul_(scale).add_(offset).view(N, K)  # (q - 8) * scale + zero = q * scale + (zero - 8 scale)


# Byte geometry of QUANT_FORMAT.md's int4 layouts: (BN, byte j of a (block, k) holds rows (j, j + BN/2) "half"
# or (2j, 2j + 1) "pairs"). Unpacking straight into the float buffer is 2-3x faster here than
# llm_sepweight.unpack_int4 + a copy; the tests check the two agree for every layout.
_GEOMETRY = {"aten_cpu_avx512": (64, "half"), "aten_cpu_avx2": (32, "half"), "aten_cpu_default": (32, "pairs")}


def _unpack_into(w: torch.Tensor, packed: torch.Tensor, layout: str) -> None:
    """``w[:] = unpack_int4(packed, layout)`` (w float [N, K], packed uint8 [N, K/2]), one pass per nibble."""
    N, half = packed.shape
    lo, hi = packed & 15, packed >> 4
    if layout == "rows":  # low nibble = even k
        wv = w.view(N, half, 2)
        wv[..., 0].copy_(lo)
        wv[..., 1].copy_(hi)
        return
    if layout not in _GEOMETRY:
        w.copy_(unpack_int4(packed, layout))  # raises the clear error for an unknown layout
        return
    bn, pairing = _GEOMETRY[layout]
    lo, hi = (t.view(N // bn, 2 * half, bn // 2).transpose(1, 2) for t in (lo, hi))  # (N/BN, BN/2, K)
    if pairing == "half":
        wv = w.view(N // bn, 2, bn // 2, 2 * half)  # rows j and j + BN/2 of each block
        wv[:, 0].copy_(lo)
        wv[:, 1].copy_(hi)
    else:
        wv = w.view(N // bn, bn // 2, 2, 2 * half)  # rows 2j and 2j + 1
        wv[:, :, 0].copy_(lo)
        wv[:, :, 1].copy_(hi)


def repack_int4(qweight: torch.Tensor, layout: str, to: str) -> torch.Tensor:
    """int4 ``qweight`` ``[N, K/2]`` packed in `layout` (e.g. another CPU's) re-packed in layout `to`."""
    return pack_int4(unpack_int4(qweight, layout), to)


def repacked(
    tensors: dict[str, torch.Tensor], stored: dict[str, QuantSpec], root: nn.Module
) -> dict[str, torch.Tensor]:
    """`tensors` with each int4 ``qweight`` re-packed into the layout its module (in `root`) computes with."""
    for name, spec in stored.items():
        mod = root.get_submodule(name)
        want = getattr(getattr(mod, "base_layer", mod), "spec", None)
        key = f"{name}.qweight" if name else "qweight"
        if spec.scheme == "int4" and want is not None and want.layout != spec.layout and key in tensors:
            tensors[key] = repack_int4(tensors[key], str(spec.layout), str(want.layout))
    return tensors


# ----------------------------------------------------------------------------------- kernels
_prepared: WeakIdKeyDictionary = WeakIdKeyDictionary()
_prepared_lock = threading.Lock()


def _kernel_scales(scales: torch.Tensor, spec: QuantSpec, dtype: torch.dtype | str) -> torch.Tensor:
    """Scales as the kernel takes them, cached per tensor: torch's (`dtype` = x's dtype; int4 transposed
    to ``[K/g, N, 2]``) or llm_bsm_kernel's (`dtype` = "bsm": fp32; int4 ``prepare_int4_scales``)."""
    with _prepared_lock:
        per_dtype = _prepared.get(scales)
        if per_dtype is not None and dtype in per_dtype:
            return per_dtype[dtype]
    if dtype == "bsm":
        out = scales.float().contiguous() if spec.scheme == "int8" else _bsm().prepare_int4_scales(scales)
    elif spec.scheme == "int8":
        out = scales.to(dtype).contiguous()  # (N,)
    else:
        out = scales.to(dtype).transpose(0, 1).contiguous()  # (N, K/g, 2) -> (K/g, N, 2)
    if out.untyped_storage().data_ptr() == scales.untyped_storage().data_ptr():
        return out  # nothing was made (and a cached view would keep the key, e.g. a streamed mapping, alive)
    with _prepared_lock:
        _prepared.setdefault(scales, {})[dtype] = out
    return out


def _has_kernel(scheme: str) -> bool:
    name = "_weight_int8pack_mm" if scheme == "int8" else "_weight_int4pack_mm_for_cpu"
    return hasattr(torch.ops.aten, name)


def kernel_fits(x: torch.Tensor, qweight: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether torch's CPU kernel can compute this product (not: whether it is the faster one)."""
    if x.device.type != "cpu" or qweight.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return False
    if not _has_kernel(spec.scheme):
        return False
    return spec.scheme == "int8" or spec.layout == _this_layout()


@functools.cache
def _this_layout() -> str:
    return int4_layout()  # asks torch for the CPU capability: once, not per product


def _bsm_matmul(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(M, K) @ W.T through llm_bsm_kernel's GEMV; (M, N) in x's dtype."""
    s = _kernel_scales(scales, spec, "bsm")
    if spec.scheme == "int8":
        out: torch.Tensor = _bsm().int8_matmul(x2, qweight, s)
    else:
        out = _bsm().int4_matmul(x2, qweight, s, spec.group_size, spec.layout)
    return out


def _kernel(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The int kernel for few rows: llm_bsm_kernel's where :func:`_use_bsm` says so, else torch's."""
    if _use_bsm(x2, qweight):
        return _bsm_matmul(x2, qweight, scales, spec)
    s = _kernel_scales(scales, spec, x2.dtype)
    if spec.scheme == "int8":
        return torch.ops.aten._weight_int8pack_mm(x2, qweight, s)  # (M, K) x (N, K) -> (M, N)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, qweight, spec.group_size, s)


def _gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 for half-precision GEMMs on CPUs that only emulate them."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not native_bf16():
        return torch.float32
    return dtype


def scratch_bytes(largest_weight: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
    """Bytes of the per-thread dequantize buffer that prefill (or backward) keeps for a part whose largest
    quantized linear has `largest_weight` = N * K elements, computing in `dtype` (for memory plans)."""
    return largest_weight * _gemm_dtype(dtype, torch.device(device)).itemsize


def _dequant_matmul(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(M, K) @ W.T through W dequantized into this thread's buffer; (M, N) in x's dtype."""
    dt = _gemm_dtype(x2.dtype, x2.device)
    N = qweight.shape[0]
    K = x2.shape[1]
    w = dequantize_into(qweight, scales, spec, dt, _scratch(N * K, dt, x2.device))  # (N, K)
    return F.linear(x2.to(dt), w).to(x2.dtype)


def _forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    if x2.shape[0] <= kernel_max_rows(x2.dtype) and kernel_fits(x2, qweight, spec):
        y = _kernel(x2, qweight, scales, spec)  # llm_bsm_kernel's or torch's
    elif _use_bsm(x2, qweight):  # where torch's kernel is not taken (fp32 past one row, another layout)
        y = _bsm_matmul(x2, qweight, scales, spec)
    else:
        y = _dequant_matmul(x2, qweight, scales, spec)
    if bias is not None:
        y = y.add_(bias.to(y.dtype))
    return y.view(*x.shape[:-1], qweight.shape[0])  # (..., N)


class _QuantLinearFn(torch.autograd.Function):
    """Autograd through a frozen quantized weight: grad_x = grad @ W, grad_b = sum of grad."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        spec: QuantSpec,
    ) -> torch.Tensor:
        ctx.save_for_backward(qweight, scales)
        ctx.spec = spec
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _forward(x, qweight, scales, bias, spec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qweight, scales = ctx.saved_tensors
        gx = grad_input(grad, qweight, scales, ctx.spec) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, qweight.shape[0]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return gx, gb, None, None, None


def grad_input(grad: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``grad @ W`` for a quantized W of ``spec.shape`` (N, K): (..., N) -> (..., K), in grad's dtype, W
    dequantized into this thread's buffer (a QuantLinear's backward, and each slab's of a SlabLinear)."""
    N, K = spec.shape
    dt = _gemm_dtype(grad.dtype, grad.device)
    w = dequantize_into(qweight, scales, spec, dt, _scratch(N * K, dt, grad.device))  # (N, K)
    return (grad.reshape(-1, N).to(dt) @ w).to(grad.dtype).view(*grad.shape[:-1], K)  # (..., K)


def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the quantized W (``qweight`` + ``scales`` / ``scales_and_zeros``); x (..., K)."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        out: torch.Tensor = _QuantLinearFn.apply(x, bias, qweight, scales, spec)  # type: ignore[no-untyped-call]
        return out
    return _forward(x, qweight, scales, bias, spec)


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized: ``qweight`` + ``scales`` (int8) or
    ``qweight`` + ``scales_and_zeros`` (int4), plus an optional ``bias``, as in a quantized sepweight folder.

    Built on the meta device (placeholders) and given its tensors by ``llm_lazy_qwen.weights.assign``;
    ``dtype`` is the scales' and bias' dtype. The input's dtype is the compute dtype.

    Example::

        lin = QuantLinear(128, 64, bias=False, scheme="int8")
        lin.qweight, lin.scales = ...                     # from llm_sepweight.quantize_int8(w)
        y = lin(torch.randn(3, 128))                      # == F.linear(x, dequantized w)
    """

    is_frozen_linear = True  # QUANT_FORMAT.md: LoRA (llm_lora_mmap) may wrap it and calls forward(x)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: Scheme,
        group_size: int | None = None,
        layout: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        int4 = scheme == "int4"
        self.spec = QuantSpec(
            scheme, (out_features, in_features), group_size if int4 else None, layout if int4 else None
        )
        N, K = out_features, in_features

        def frozen(*shape: int, dt: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dt, device=device), requires_grad=False)

        if scheme == "int8":
            self.qweight = frozen(N, K, dt=torch.int8)
            self.scales = frozen(N, dt=dtype)
        else:
            assert group_size is not None
            self.qweight = frozen(N, K // 2, dt=torch.uint8)
            self.scales_and_zeros = frozen(N, K // group_size, 2, dt=dtype)
        self.bias = frozen(N, dt=dtype) if bias else None

    @property
    def scheme(self) -> Scheme:
        return self.spec.scheme

    def scale_tensor(self) -> torch.Tensor:
        return self.scales if self.spec.scheme == "int8" else self.scales_and_zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return quant_linear(x, self.qweight, self.scale_tensor(), self.bias, self.spec)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` as a new dense tensor (default dtype: the scales')."""
        s = self.scale_tensor()
        return dequantize_into(self.qweight, s, self.spec, dtype or s.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.spec.group_size}, layout={self.spec.layout}" if self.spec.scheme == "int4" else ""
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, {self.spec.scheme}{g}"
