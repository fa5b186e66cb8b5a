"""Decode GEMV for quantized linears: ``y = x @ dequant(W).T`` for a few rows of x, int4 or int8 weights.

W is stored as llm_sepweight's QUANT_FORMAT.md says (this module does not import llm_sepweight):

- int8: ``qweight`` int8 ``[N, K]``, ``scales`` ``[N]``: ``w[n, k] = qweight[n, k] * scales[n]``;
- int4: ``qweight`` uint8 ``[N, K/2]`` in a layout (``aten_cpu_avx2``, ``aten_cpu_avx512``,
  ``aten_cpu_default``, ``rows``), ``scales_and_zeros`` ``[N, K/g, 2]``:
  ``w[n, k] = (q[n, k] - 8) * sz[n, k//g, 0] + sz[n, k//g, 1]``.

x is fp32 or bf16 ``[M, K]``; y ``[M, N]`` comes back in x's dtype. int4 accumulates in fp32; int8 quantizes
x to int16 per block of :data:`INT8_X_BLOCK` values and sums in int32 (:func:`int8_matmul_reference` is that
arithmetic in torch). The loops are C (``_quant.h``, ``_quant_int8.h``): an AVX2 version and a portable scalar
one, chosen at run time (``isa``), split over output rows with OpenMP with the GIL released. They are made for
decode (M of 1 to 8): every row of x reads W again from L1/L2, so their cost grows with M where a GEMM's does not.

int4 scales are read as ``[2 K/g, N]`` (the scales and zeros of group j in rows 2j, 2j + 1; fp32 or bf16, no
bigger than the stored tensor): :func:`prepare_int4_scales` makes that once; passing the stored
``[N, K/g, 2]`` prepares it per call.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from . import blas

if TYPE_CHECKING:  # torch is imported by the functions that take tensors: it is an optional dependency
    import torch

Isa = Literal["auto", "avx2", "scalar"]
# layout -> (rows per block BN, code in _quant.h: 0 "half" (byte j = rows j, j + BN/2), 1 "pairs", 2 "rows")
LAYOUTS: dict[str, tuple[int, int]] = {
    "aten_cpu_avx512": (64, 0),
    "aten_cpu_avx2": (32, 0),
    "aten_cpu_default": (32, 1),
    "rows": (1, 2),
}
_ISA_CODES = {"scalar": 0, "avx2": 1}
# int8: x values per int16 scale along K (a multiple of 16, at most 512: the int32 bound in _quant_int8.h)
INT8_X_BLOCK = 256
_INT16_MAX = 32767
_INT8_X_TINY = 1e-30  # a block of x whose max |x| is below this counts as zeros
ISA_ENV = "LLM_BSM_KERNEL_ISA"  # "scalar" forces the portable loops (tests, or a CPU that misreports AVX2)


@functools.cache
def _ext() -> ModuleType | None:
    """The compiled module if it has the quantized GEMV (no warning: callers probe with quant_gemv_isa)."""
    if os.environ.get("LLM_BSM_KERNEL_NO_EXT"):
        return None
    blas._preload_torch_openmp()
    try:
        kernel = importlib.import_module("llm_bsm_kernel._kernel")
    except ImportError:
        return None
    return kernel if hasattr(kernel, "int4_gemv") else None


@functools.cache
def _have_avx2() -> bool:
    kernel = _ext()
    return bool(kernel is not None and kernel.quant_have_avx2())


def quant_gemv_isa(isa: Isa = "auto") -> str | None:
    """Which loops :func:`int4_matmul` / :func:`int8_matmul` run for `isa`: "avx2", "scalar", or None
    when the compiled extension is missing (then they raise). "auto" takes ``$LLM_BSM_KERNEL_ISA`` if set,
    else AVX2 where the CPU has AVX2 and FMA.

    Example:
        >>> quant_gemv_isa()
        'avx2'
    """
    kernel = _ext()
    if kernel is None:
        return None
    if isa == "auto":
        isa = os.environ.get(ISA_ENV, "") or "auto"  # type: ignore[assignment]
        if isa not in ("auto", *_ISA_CODES):
            raise ValueError(f"${ISA_ENV}={isa!r}: use one of {sorted(_ISA_CODES)} (or unset it)")
    if isa == "auto":
        return "avx2" if _have_avx2() else "scalar"
    if isa not in _ISA_CODES:
        raise ValueError(f"isa must be 'auto', 'avx2' or 'scalar', got {isa!r}")
    if isa == "avx2" and not _have_avx2():
        raise RuntimeError("isa='avx2': this CPU (or OS) lacks AVX2/FMA; use isa='auto' or 'scalar'")
    return isa


def prepare_int4_scales(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The stored ``[N, K/g, 2]`` scales and zeros as the int4 loops read them: ``[2 K/g, N]``, row ``2j``
    the scales of group j, row ``2j + 1`` its zeros; bf16 stays bf16 (exact), other dtypes become fp32.
    Cache it per weight.

    Example:
        >>> sz = prepare_int4_scales(scales_and_zeros)  # once per weight
        >>> y = int4_matmul(x, qweight, sz, 64, "aten_cpu_avx2")
    """
    import torch

    if not isinstance(scales_and_zeros, torch.Tensor):
        raise TypeError(f"scales_and_zeros must be a torch.Tensor, got {type(scales_and_zeros).__name__}")
    if scales_and_zeros.dim() != 3 or scales_and_zeros.shape[2] != 2 or not scales_and_zeros.is_floating_point():
        message = f"scales_and_zeros must be a float [N, K/g, 2] tensor, got {scales_and_zeros.dtype} {list(scales_and_zeros.shape)}"
        raise ValueError(message)
    dtype = torch.bfloat16 if scales_and_zeros.dtype == torch.bfloat16 else torch.float32
    N = scales_and_zeros.shape[0]
    # (N, G, 2) -> (N, 2G) -> (2G, N): the same bytes as a (G, 2, N) permute, a 2-D transpose copy 1.4-1.7x faster
    # here; it runs once per call where the scales tensor is new each forward (a lazy / memory_budget part)
    return scales_and_zeros.to(dtype).reshape(N, 2 * scales_and_zeros.shape[1]).t().contiguous()


def _check_x(x: object, K: int, fn: str) -> torch.Tensor:
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{fn}: x has dtype {x.dtype}; supported: torch.float32, torch.bfloat16")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{fn}: x must be [M, K] with K={K} (the weight's in_features), got {list(x.shape)}")
    return x


def _check_out_dtype(out_dtype: torch.dtype | None, x: torch.Tensor, fn: str) -> torch.dtype:
    import torch

    if out_dtype is None:
        return x.dtype
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{fn}: out_dtype must be None, torch.float32 or torch.bfloat16, got {out_dtype}")
    return out_dtype


def _check_common(tensors: dict[str, torch.Tensor], fn: str) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"{fn}: {name} is on {t.device}; these loops run on the CPU")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} {list(t.shape)} is not contiguous; pass {name}.contiguous()")


def _run_args(isa: Isa, num_threads: int | None, fn: str) -> tuple[ModuleType, int, int]:
    code = quant_gemv_isa(isa)
    kernel = _ext()
    if code is None or kernel is None:
        raise RuntimeError(f"{fn}: llm_bsm_kernel's compiled extension is not available (reinstall with a C compiler)")
    threads = kernel.max_threads() if num_threads is None else num_threads
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{fn}: num_threads must be a positive int or None, got {num_threads!r}")
    return kernel, _ISA_CODES[code], threads


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    layout: str,
    *,
    isa: Isa = "auto",
    num_threads: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for an int4 W (QUANT_FORMAT.md): x ``[M, K]`` fp32 / bf16, qweight uint8 ``[N, K/2]`` in
    `layout`, scales the stored ``[N, K/g, 2]`` or :func:`prepare_int4_scales`' ``[2 K/g, N]``; ``[M, N]`` in
    `out_dtype` (default: x's dtype; fp32 keeps the accumulator's precision for bf16 x).

    Example:
        >>> y = int4_matmul(x, qweight, prepare_int4_scales(sz), 64, "aten_cpu_avx2")  # (M, N)
    """
    import torch

    fn = "int4_matmul"
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: unknown int4 layout {layout!r}; use one of {sorted(LAYOUTS)}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        got = f"{qweight.dtype} {list(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"{fn}: qweight must be a uint8 [N, K/2] tensor, got {got}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    bn, code = LAYOUTS[layout]
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2 or K % group_size:
        raise ValueError(f"{fn}: group_size {group_size!r} must be a positive even divisor of K={K}")
    if N % bn:
        raise ValueError(f"{fn}: N={N} rows are not a multiple of {bn}, which layout {layout!r} needs")
    x = _check_x(x, K, fn)
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"{fn}: scales must be a torch.Tensor, got {type(scales).__name__}")
    G = K // group_size
    if scales.dim() == 3:
        if tuple(scales.shape) != (N, G, 2):
            raise ValueError(f"{fn}: scales_and_zeros must be [N, K/g, 2] = {[N, G, 2]}, got {list(scales.shape)}")
        scales = prepare_int4_scales(scales)
    elif tuple(scales.shape) != (2 * G, N) or scales.dtype not in (torch.float32, torch.bfloat16):
        message = (
            f"{fn}: scales must be the stored [N, K/g, 2] = {[N, G, 2]} or prepare_int4_scales' fp32 / bf16 "
            f"[2K/g, N] = {[2 * G, N]}, got {scales.dtype} {list(scales.shape)}"
        )
        raise ValueError(message)
    _check_common({"x": x, "qweight": qweight, "scales": scales}, fn)
    out_dtype = _check_out_dtype(out_dtype, x, fn)
    kernel, isa_code, threads = _run_args(isa, num_threads, fn)
    M = x.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        kernel.int4_gemv(
            isa_code, code, bn, M, N, K, group_size, x.data_ptr(), int(x.dtype == torch.bfloat16),
            qweight.data_ptr(), scales.data_ptr(), int(scales.dtype == torch.bfloat16), y.data_ptr(), threads,
        )  # fmt: skip
    return y.to(out_dtype)


def _check_int8(x: object, qweight: object, scales: object, fn: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        got = f"{qweight.dtype} {list(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"{fn}: qweight must be an int8 [N, K] tensor, got {got}")
    N, K = qweight.shape
    x = _check_x(x, K, fn)
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or tuple(scales.shape) != (N,):
        got = f"{scales.dtype} {list(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"{fn}: scales must be a float [N] = [{N}] tensor, got {got}")
    return x, qweight, scales


def int8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    isa: Isa = "auto",
    num_threads: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for an int8 W (QUANT_FORMAT.md): x ``[M, K]`` fp32 / bf16, qweight int8 ``[N, K]``,
    scales ``[N]`` (any float dtype); ``[M, N]`` in `out_dtype` (default: x's dtype).

    x is quantized to int16 on the fly (per row and block of :data:`INT8_X_BLOCK` values along K: x known
    to 1/65534 of its block's largest value) and the products are summed exactly in int32. The result is
    the same bits on every ISA and thread count and equals :func:`int8_matmul_reference` (bit for bit in
    the tests; its float64 emulation of an fma could differ in the last bit in rare ties).
    Error vs the fp32 product of x and the dequantized W, as max |error| / RMS of the output row: 1.4e-4 on
    random x and W (K=4096; 4e-4 in a row with a 60-sigma outlier), at most 4e-3 on SmolLM2-135M's linears
    with their own activations (median relative error 7e-5); its perplexity +0.329% over bf16, against
    +0.333% through dequantize + fp32 GEMM (README).

    Example:
        >>> y = int8_matmul(x, qweight, scales)  # (M, N)
    """
    import torch

    fn = "int8_matmul"
    x, qweight, scales = _check_int8(x, qweight, scales, fn)
    _check_common({"x": x, "qweight": qweight, "scales": scales}, fn)
    out_dtype = _check_out_dtype(out_dtype, x, fn)
    s32 = scales.float()
    kernel, isa_code, threads = _run_args(isa, num_threads, fn)
    M, (N, K) = x.shape[0], qweight.shape
    y = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        kernel.int8_gemv(
            isa_code, M, N, K, x.data_ptr(), int(x.dtype == torch.bfloat16), qweight.data_ptr(),
            s32.data_ptr(), y.data_ptr(), threads, INT8_X_BLOCK,
        )  # fmt: skip
    return y.to(out_dtype)


def int8_matmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """:func:`int8_matmul`'s arithmetic in plain torch (its twin in the tests; no extension needed, slow).

    Per row of x and block of :data:`INT8_X_BLOCK` values along K: ``sx = max|x| / 32767`` and
    ``xq = round(x * (32767 / max|x|))`` (fp32, half to even; a block with NaN / inf: ``sx`` NaN and xq 0, one
    with max |x| < 1e-30: zeros);
    ``dot`` = the exact integer product of the block's xq and qweight; ``acc += float32(dot) * sx`` block
    by block (an fma, emulated in float64); ``y = acc * scales`` in fp32.

    Example:
        >>> torch.testing.assert_close(int8_matmul(x, q, s), int8_matmul_reference(x, q, s))
    """
    import torch

    x, qweight, scales = _check_int8(x, qweight, scales, "int8_matmul_reference")
    (M, K), N, B = x.shape, qweight.shape[0], INT8_X_BLOCK
    nb = -(-K // B)
    xb = torch.zeros(M, nb * B)
    xb[:, :K] = x.float()
    xb = xb.view(M, nb, B)  # (M, nb, B)
    amax = xb.abs().amax(-1)  # (M, nb); NaN where a block holds NaN
    finite = torch.isfinite(amax)
    used = finite & (amax >= _INT8_X_TINY)
    top = torch.full_like(amax, _INT16_MAX)  # (tensor / tensor: `32767 / amax` is reciprocal * 32767 in torch)
    inv = torch.where(used, top / amax, torch.zeros_like(amax))  # fp32 division, as the C loops
    xq = torch.where(used[..., None], xb * inv[..., None], torch.zeros_like(xb))
    xq = xq.round_().clamp_(-_INT16_MAX, _INT16_MAX)  # (M, nb, B), half to even as vcvtps2dq / rintf
    sx = torch.where(used, amax / top, torch.zeros_like(amax))
    sx = torch.where(finite, sx, torch.full_like(amax, float("nan")))  # (M, nb)
    wb = torch.zeros(N, nb * B, dtype=torch.float64)
    wb[:, :K] = qweight.double()
    # (M, N, nb): the blocks' exact integer dot products (< 2^31, exact in float64), rounded to fp32 once
    dot = torch.einsum("mbk,nbk->mnb", xq.double(), wb.view(N, nb, B)).float()
    acc = torch.zeros(M, N)
    for b in range(nb):  # fmaf(dot, sx, acc): the product is exact in float64, the sum rounded (twice, rarely apart)
        acc = (dot[:, :, b].double() * sx[:, b, None].double() + acc.double()).float()
    return (acc * scales.float()).to(_check_out_dtype(out_dtype, x, "int8_matmul_reference"))
