/* int8 decode GEMV in integers: y[M, N] = x[M, K] @ (q * scale[:, None])^T, q int8 [N, K] row-major
 * (llm_sepweight's QUANT_FORMAT.md: w[n, k] = q[n, k] * scale[n]).
 *
 * x is quantized on the fly to int16, per row and per block of B values along K (B = xblock, a multiple of
 * 16 in [16, 512]; int8_matmul passes INT8_X_BLOCK = 256). In fp32, over a block: inv = 32767 / max|x|,
 * sx = max|x| / 32767, xq = round_half_even(x * inv) in [-32767, 32767]. Then
 *     dot = sum_{k in block} xq[k] * q[n, k]          exact, in int32
 *     acc = fmaf((float) dot, sx, acc)                 the blocks in order, acc starting at 0
 *     y[m, n] = acc * scale[n]                         fp32
 * quant_gemv.int8_matmul_reference is the same arithmetic in torch (the tests' twin, equal bit for bit).
 *
 * int32 cannot overflow: |xq| <= 32767 and |q| <= 128 (int8 holds -128), so |xq * q| <= 4,194,176, and
 * every partial sum of one block (a lane of vpmaddwd's pairs, a horizontal add, the scalar loop) adds at
 * most B <= 512 such products: |sum| <= 512 * 4,194,176 = 2,147,418,112 < 2^31 - 1 = 2,147,483,647.
 * Accumulators are flushed to fp32 at the end of every block, so K itself is unbounded.
 *
 * Error added by the int16 step: each xq is off by at most sx / 2 = max|x_block| / 65534, i.e. x is
 * known to 1/65534 of its block's largest value (bf16 x carries 1/256 of its own value); measured on the
 * outputs in llm_bsm_kernel's README. A block holding NaN or inf gets sx = NaN (its xq = 0): that row of y
 * is NaN, as the non-finite x makes it in fp32. A block with max|x| < 1e-30 counts as zeros.
 *
 * AVX2: 16 weights per instruction, sign-extended to int16 (vpmovsxbw) and multiplied pairwise into int32
 * lanes (vpmaddwd), 4-8 independent chains; a unit is 4 output rows. One x row: one weight row after the
 * other (K <= QK8_ROW_K) or the 4 side by side sharing each load of x; two x rows: side by side, each
 * widened weight serving both. The scalar version computes the same integers and the same fp32 operations
 * in the same order: the two are bit-identical, and so are all thread counts (each output is summed by one
 * thread).
 */
#ifndef LLM_BSM_KERNEL_QUANT_INT8_H
#define LLM_BSM_KERNEL_QUANT_INT8_H

#include <float.h>
#include <math.h>

#include "_quant.h"

#define QK8_XMAX 32767
#ifndef QK8_ROW_K
#define QK8_ROW_K 8192 /* one x row: weight rows one after the other up to this K (x in L1) */
#endif
#define QK8_TINY 1e-30f /* a block whose max|x| is below this counts as zeros (32767 / max stays finite) */

typedef struct {
    int64_t M, N, K, B, nb; /* nb = ceil(K / B) blocks per x row */
    const int8_t *q;        /* [N, K] */
    const float *scales;    /* [N] */
    int16_t *xq;            /* [M, K] */
    float *sx;              /* [nb, M]: block b of x row m at b * M + m */
    float *y;               /* [M, N] */
} qk8_args;

static inline float qk8_x(const void *x, int x_bf16, int64_t i) {
    return x_bf16 ? qk_bf16(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* Block [k0, k1) of x: its scale (0 for a block below QK8_TINY, NaN for one with NaN / inf) and 32767 / max|x|. */
static inline float qk8_block_scale(float amax, int finite, float *inv) {
    *inv = 0.0f;
    if (!finite) return NAN;
    if (!(amax >= QK8_TINY)) return 0.0f;
    *inv = (float)QK8_XMAX / amax;
    return amax / (float)QK8_XMAX;
}

/* x (fp32 or bf16) -> xq, sx as the header says, one block of one row at a time; scalar. */
static void qk8_prepare_scalar(qk8_args *a, const void *x, int x_bf16) {
    int64_t K = a->K, m, b, k;
    for (m = 0; m < a->M; m++)
        for (b = 0; b < a->nb; b++) {
            int64_t k0 = m * K + b * a->B, k1 = m * K + qk_min(b * a->B + a->B, K);
            float amax = 0.0f, inv;
            int finite = 1;
            for (k = k0; k < k1; k++) {
                float v = fabsf(qk8_x(x, x_bf16, k));
                if (!(v <= FLT_MAX)) finite = 0; /* inf or NaN */
                else if (v > amax) amax = v;
            }
            a->sx[b * a->M + m] = qk8_block_scale(amax, finite, &inv);
            if (inv == 0.0f) { /* zeros, tiny or non-finite: xq = 0 (x * 0 would be NaN for inf) */
                memset(a->xq + k0, 0, (size_t)(k1 - k0) * sizeof(int16_t));
                continue;
            }
            for (k = k0; k < k1; k++) { /* rintf: half to even, as torch.round; |t| <= 32767 (+ rounding) */
                float t = rintf(qk8_x(x, x_bf16, k) * inv);
                a->xq[k] = (int16_t)(t > QK8_XMAX ? QK8_XMAX : t < -QK8_XMAX ? -QK8_XMAX : t);
            }
        }
}

#if QK_X86
/* 8 values of x from element i as fp32. */
QK_INLINE __m256 qk8_load8(const void *x, int x_bf16, int64_t i) {
    if (!x_bf16) return _mm256_loadu_ps((const float *)x + i);
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* The same as qk8_prepare_scalar, bit for bit (vcvtps2dq rounds half to even), 8 values at a time. */
QK_TARGET static void qk8_prepare_avx2(qk8_args *a, const void *x, int x_bf16) {
    int64_t K = a->K, m, b, k;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
    const __m256i hi = _mm256_set1_epi32(QK8_XMAX), lo = _mm256_set1_epi32(-QK8_XMAX);
    for (m = 0; m < a->M; m++)
        for (b = 0; b < a->nb; b++) {
            int64_t k0 = m * K + b * a->B, k1 = m * K + qk_min(b * a->B + a->B, K), kv = k0 + ((k1 - k0) & ~(int64_t)7);
            __m256 vmax = _mm256_setzero_ps(), bad = vmax;
            for (k = k0; k < kv; k += 8) {
                __m256 v = _mm256_and_ps(qk8_load8(x, x_bf16, k), absmask);
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, big, _CMP_NLE_UQ)); /* inf or NaN */
                vmax = _mm256_max_ps(vmax, v);
            }
            float lanes[8], amax = 0.0f, inv;
            int finite = _mm256_movemask_ps(bad) == 0, i;
            _mm256_storeu_ps(lanes, vmax);
            for (i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
            for (k = kv; k < k1; k++) {
                float v = fabsf(qk8_x(x, x_bf16, k));
                if (!(v <= FLT_MAX)) finite = 0;
                else if (v > amax) amax = v;
            }
            a->sx[b * a->M + m] = qk8_block_scale(amax, finite, &inv);
            if (inv == 0.0f) {
                memset(a->xq + k0, 0, (size_t)(k1 - k0) * sizeof(int16_t));
                continue;
            }
            __m256 vinv = _mm256_set1_ps(inv);
            for (k = k0; k < kv; k += 8) {
                __m256i t = _mm256_cvtps_epi32(_mm256_mul_ps(qk8_load8(x, x_bf16, k), vinv));
                t = _mm256_max_epi32(_mm256_min_epi32(t, hi), lo);
                _mm_storeu_si128((__m128i *)(a->xq + k),
                                 _mm_packs_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
            }
            for (k = kv; k < k1; k++) {
                float t = rintf(qk8_x(x, x_bf16, k) * inv);
                a->xq[k] = (int16_t)(t > QK8_XMAX ? QK8_XMAX : t < -QK8_XMAX ? -QK8_XMAX : t);
            }
        }
}
#endif

/* Rows 4u .. 4u + 3 that exist. */
static void qk8_unit_scalar(const qk8_args *a, int64_t u) {
    int64_t K = a->K, B = a->B, m, b, k, r;
    for (r = 4 * u; r < qk_min(4 * u + 4, a->N); r++) {
        const int8_t *w = a->q + r * K;
        for (m = 0; m < a->M; m++) {
            const int16_t *xm = a->xq + m * K;
            float acc = 0.0f;
            for (b = 0; b < a->nb; b++) {
                int32_t dot = 0;
                for (k = b * B; k < qk_min(b * B + B, K); k++) dot += (int32_t)xm[k] * (int32_t)w[k];
                acc = fmaf((float)dot, a->sx[b * a->M + m], acc);
            }
            a->y[m * a->N + r] = acc * a->scales[r];
        }
    }
}

#if QK_X86
/* The 4 sums of c0..c3's lanes, as lanes 0..3. */
QK_INLINE __m128i qk8_hsum4(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(c0, c1), _mm256_hadd_epi32(c2, c3)); /* per 128-bit half */
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

#define QK8_W16(P) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(P)))
#define QK8_X16(P) _mm256_loadu_si256((const __m256i *)(P))
#define QK8_MADD(ACC, V, X) ACC = _mm256_add_epi32(ACC, _mm256_madd_epi16(V, X))

/* sum_k x[k] * w[k] over [k0, k1) for one weight row and one x row; exact (header). */
QK_INLINE int32_t qk8_dot_row(const int16_t *x, const int8_t *w, int64_t k0, int64_t k1) {
    int64_t k = k0;
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
    for (; k + 64 <= k1; k += 64) {
        QK8_MADD(c0, QK8_W16(w + k), QK8_X16(x + k)), QK8_MADD(c1, QK8_W16(w + k + 16), QK8_X16(x + k + 16));
        QK8_MADD(c2, QK8_W16(w + k + 32), QK8_X16(x + k + 32)), QK8_MADD(c3, QK8_W16(w + k + 48), QK8_X16(x + k + 48));
    }
    for (; k + 16 <= k1; k += 16) QK8_MADD(c0, QK8_W16(w + k), QK8_X16(x + k));
    __m256i c = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    int32_t t = _mm_cvtsi128_si32(h);
    for (; k < k1; k++) t += (int32_t)x[k] * (int32_t)w[k]; /* the K % 16 tail of the last block */
    return t;
}

/* The same for 4 weight rows w[0..3] (lanes 0..3) and one x row, each load of x serving the 4 rows. */
QK_INLINE __m128i qk8_dot4(const int16_t *x, const int8_t *const *w, int64_t k0, int64_t k1) {
    int64_t k = k0;
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, e0 = c0, e1 = c0, e2 = c0, e3 = c0;
    for (; k + 32 <= k1; k += 32) { /* two steps of 16: 8 independent chains */
        __m256i xa = QK8_X16(x + k), xb = QK8_X16(x + k + 16);
        QK8_MADD(c0, QK8_W16(w[0] + k), xa), QK8_MADD(e0, QK8_W16(w[0] + k + 16), xb);
        QK8_MADD(c1, QK8_W16(w[1] + k), xa), QK8_MADD(e1, QK8_W16(w[1] + k + 16), xb);
        QK8_MADD(c2, QK8_W16(w[2] + k), xa), QK8_MADD(e2, QK8_W16(w[2] + k + 16), xb);
        QK8_MADD(c3, QK8_W16(w[3] + k), xa), QK8_MADD(e3, QK8_W16(w[3] + k + 16), xb);
    }
    for (; k + 16 <= k1; k += 16) {
        __m256i xa = QK8_X16(x + k);
        QK8_MADD(c0, QK8_W16(w[0] + k), xa), QK8_MADD(c1, QK8_W16(w[1] + k), xa);
        QK8_MADD(c2, QK8_W16(w[2] + k), xa), QK8_MADD(c3, QK8_W16(w[3] + k), xa);
    }
    __m128i s = qk8_hsum4(_mm256_add_epi32(c0, e0), _mm256_add_epi32(c1, e1), _mm256_add_epi32(c2, e2),
                          _mm256_add_epi32(c3, e3));
    if (k < k1) {
        int32_t t[4] = {0, 0, 0, 0};
        int r;
        for (; k < k1; k++)
            for (r = 0; r < 4; r++) t[r] += (int32_t)x[k] * (int32_t)w[r][k];
        s = _mm_add_epi32(s, _mm_loadu_si128((const __m128i *)t));
    }
    return s;
}

/* The same for 4 weight rows and two x rows (x, x + K): each widened weight serves both. */
QK_INLINE void qk8_dot4x2(const int16_t *x, int64_t K, const int8_t *const *w, int64_t k0, int64_t k1, __m128i *s0,
                          __m128i *s1) {
    int64_t k = k0;
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, d0 = c0, d1 = c0, d2 = c0, d3 = c0, v;
    for (; k + 16 <= k1; k += 16) {
        __m256i xa = QK8_X16(x + k), xb = QK8_X16(x + K + k);
        v = QK8_W16(w[0] + k), QK8_MADD(c0, v, xa), QK8_MADD(d0, v, xb);
        v = QK8_W16(w[1] + k), QK8_MADD(c1, v, xa), QK8_MADD(d1, v, xb);
        v = QK8_W16(w[2] + k), QK8_MADD(c2, v, xa), QK8_MADD(d2, v, xb);
        v = QK8_W16(w[3] + k), QK8_MADD(c3, v, xa), QK8_MADD(d3, v, xb);
    }
    *s0 = qk8_hsum4(c0, c1, c2, c3);
    *s1 = qk8_hsum4(d0, d1, d2, d3);
    if (k < k1) {
        int32_t t[2][4] = {{0}};
        int r;
        for (; k < k1; k++)
            for (r = 0; r < 4; r++) {
                t[0][r] += (int32_t)x[k] * (int32_t)w[r][k];
                t[1][r] += (int32_t)x[K + k] * (int32_t)w[r][k];
            }
        *s0 = _mm_add_epi32(*s0, _mm_loadu_si128((const __m128i *)t[0]));
        *s1 = _mm_add_epi32(*s1, _mm_loadu_si128((const __m128i *)t[1]));
    }
}
#undef QK8_W16
#undef QK8_X16
#undef QK8_MADD

/* Rows 4u .. 4u + 3 (clamped to N - 1: a short last unit computes the last row again and drops it).
 * Read order matters more than instructions here (1 thread, 7B shapes, weights from memory): one weight row
 * after the other (the unit's 4 K bytes in one run) took half the time of 4 rows read side by side when x
 * fits in L1 (K <= QK8_ROW_K); above, x from L2 made that slower than the side-by-side read (down_proj). */
QK_TARGET static void qk8_unit_avx2(const qk8_args *a, int64_t u) {
    int64_t N = a->N, K = a->K, B = a->B, nb = a->nb, M = a->M, n0 = 4 * u, m, b;
    const int8_t *w[4];
    int r;
    float out[2][4];
    for (r = 0; r < 4; r++) w[r] = a->q + qk_min(n0 + r, N - 1) * K;
    for (m = 0; m < M; m += 2) {
        const int16_t *x = a->xq + m * K;
        const float *sx = a->sx + m; /* block b: sx[b * M], x row m + 1: sx[b * M + 1] */
        int two = m + 1 < M;
        __m128 acc0 = _mm_setzero_ps(), acc1 = acc0;
        if (two) {
            for (b = 0; b < nb; b++) {
                __m128i s0, s1;
                qk8_dot4x2(x, K, w, b * B, qk_min(b * B + B, K), &s0, &s1);
                acc0 = _mm_fmadd_ps(_mm_cvtepi32_ps(s0), _mm_set1_ps(sx[b * M]), acc0);
                acc1 = _mm_fmadd_ps(_mm_cvtepi32_ps(s1), _mm_set1_ps(sx[b * M + 1]), acc1);
            }
        } else if (K <= QK8_ROW_K) {
            for (r = 0; r < 4; r++) {
                __m128 acc = _mm_setzero_ps(); /* lane 0 */
                for (b = 0; b < nb; b++) {
                    __m128 d = _mm_cvtsi32_ss(acc, qk8_dot_row(x, w[r], b * B, qk_min(b * B + B, K)));
                    acc = _mm_fmadd_ss(d, _mm_set_ss(sx[b * M]), acc);
                }
                out[0][r] = _mm_cvtss_f32(acc);
            }
            acc0 = _mm_loadu_ps(out[0]);
        } else {
            for (b = 0; b < nb; b++)
                acc0 = _mm_fmadd_ps(_mm_cvtepi32_ps(qk8_dot4(x, w, b * B, qk_min(b * B + B, K))), _mm_set1_ps(sx[b * M]),
                                    acc0);
        }
        _mm_storeu_ps(out[0], acc0);
        _mm_storeu_ps(out[1], acc1);
        for (r = 0; r < 4 && n0 + r < N; r++) {
            a->y[m * N + n0 + r] = out[0][r] * a->scales[n0 + r];
            if (two) a->y[(m + 1) * N + n0 + r] = out[1][r] * a->scales[n0 + r];
        }
    }
}
#endif

/* y = x @ (q * scales[:, None])^T for int8 W [N, K]; 0, or -1 when memory ran out. Called without the GIL. */
static int qk_int8(int isa, int64_t M, int64_t N, int64_t K, const void *x, int x_bf16, const int8_t *q,
                   const float *scales, float *y, int nthreads, int64_t xblock) {
    qk8_args a = {0};
    a.M = M, a.N = N, a.K = K, a.B = xblock, a.nb = (K + xblock - 1) / xblock;
    a.q = q, a.scales = scales, a.y = y;
    a.xq = (int16_t *)malloc((size_t)(M * K) * sizeof(int16_t) + 64);
    a.sx = (float *)malloc((size_t)(M * a.nb) * sizeof(float) + 64);
    int err = a.xq == NULL || a.sx == NULL ? -1 : 0;
#if QK_X86
    if (err == 0 && isa == QK_AVX2) qk8_prepare_avx2(&a, x, x_bf16);
    else
#endif
    if (err == 0) qk8_prepare_scalar(&a, x, x_bf16);
    int64_t units = (N + 3) / 4, u;
    (void)nthreads;
    if (err == 0) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && units > 1)
        for (u = 0; u < units; u++) {
#if QK_X86
            if (isa == QK_AVX2) {
                qk8_unit_avx2(&a, u);
                continue;
            }
#endif
            qk8_unit_scalar(&a, u);
        }
    }
    free(a.xq);
    free(a.sx);
    return err;
}

#endif
