# Decode GEMV for quantized linears (included by _kernel.pyx): thin entry points over `_quant.h` (int4) and
# `_quant_int8.h`, which hold the loops (scalar and AVX2, chosen at run time) and their OpenMP split over output rows.
# `quant_gemv.py` validates every argument and passes data pointers; only xblock (the int32 bound) is checked here.

cdef extern from "_quant.h" nogil:
    int qk_have_avx2()
    int qk_int4(int isa, int layout, int64_t bn, int64_t M, int64_t N, int64_t K, int64_t g, const void *x,
                int x_bf16, const unsigned char *q, const void *sz, int sz_bf16, float *y, int nthreads)

cdef extern from "_quant_int8.h" nogil:
    int qk_int8(int isa, int64_t M, int64_t N, int64_t K, const void *x, int x_bf16, const signed char *q,
                const float *scales, float *y, int nthreads, int64_t xblock)


def quant_have_avx2() -> bool:
    """True when this CPU (and OS) runs the AVX2+FMA loops."""
    return bool(qk_have_avx2())


def int4_gemv(int isa, int layout, int64_t bn, int64_t M, int64_t N, int64_t K, int64_t g, size_t x,
              int x_bf16, size_t q, size_t sz, int sz_bf16, size_t y, int nthreads) -> None:
    """y[M, N] (fp32) = x[M, K] @ dequant(q)^T; sz is the prepared [2K/g, N] (fp32 or bf16); GIL released."""
    cdef int err
    with nogil:
        err = qk_int4(isa, layout, bn, M, N, K, g, <const void *>x, x_bf16, <const unsigned char *>q,
                      <const void *>sz, sz_bf16, <float *>y, nthreads)
    if err != 0:
        raise MemoryError("int4_gemv: could not allocate the fp32 copy of x")


def int8_gemv(int isa, int64_t M, int64_t N, int64_t K, size_t x, int x_bf16, size_t q, size_t scales,
              size_t y, int nthreads, int64_t xblock) -> None:
    """y[M, N] (fp32) = x[M, K] @ (q * scales[:, None])^T, x quantized to int16 per block of `xblock`
    (a multiple of 16 in [16, 512]: the int32 bound of `_quant_int8.h`); GIL released."""
    cdef int err
    if xblock < 16 or xblock > 512 or xblock % 16:
        raise ValueError(f"int8_gemv: xblock={xblock} must be a multiple of 16 in [16, 512]")
    with nogil:
        err = qk_int8(isa, M, N, K, <const void *>x, x_bf16, <const signed char *>q, <const float *>scales,
                      <float *>y, nthreads, xblock)
    if err != 0:
        raise MemoryError("int8_gemv: could not allocate the int16 copy of x")
