/* Decode GEMV for int4 linears: y[M, N] = x[M, K] @ dequant(W)^T, accumulated in fp32 (int8: _quant_int8.h,
 * which shares the helpers here).
 *
 * W as llm_sepweight's QUANT_FORMAT.md stores it:
 *   int4: q uint8 [N, K/2] in a layout (below), w[n, k] = (q[n, k] - 8) * s[n, k/g] + z[n, k/g], where the
 *         caller laid s and z out as [2G, N] (fp32 or bf16): row 2j = the scales of group j, 2j+1 its zeros.
 * int4 layouts: "half" (aten_cpu_avx2, BN 32; aten_cpu_avx512, BN 64): bytes [N/BN, K, BN/2], byte j
 * of a (block, k) holds rows (j, j + BN/2) as (low, high) nibble; "pairs" (aten_cpu_default, BN 32):
 * rows (2j, 2j + 1); "rows": q[n, k/2], low nibble = even k.
 *
 * Each kernel has a portable scalar version and an AVX2+FMA one (compiled with a target attribute, so the
 * module itself needs no -march flag), chosen at run time. Work is split over N with OpenMP (static
 * chunks of 32-row units, so each thread streams a contiguous slice of W); x is converted to fp32 once.
 *
 * Packed layouts (half / pairs): one unit is 32 output rows whose nibbles are 16 bytes per k. Per group
 * of g values, acc[row] = sum_k x[k] * q[row, k] (q as float, exact), then with xs = sum_k x[k]
 *   y[row] += s[row, grp] * (acc[row] - 8 xs) + z[row, grp] * xs,
 * which equals sum_k x[k] * ((q - 8) * s + z) up to rounding. "rows": each row's groups in turn, the same.
 */
#ifndef LLM_BSM_KERNEL_QUANT_H
#define LLM_BSM_KERNEL_QUANT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define QK_X86 1
#include <immintrin.h>
#define QK_TARGET __attribute__((target("avx2,fma")))
#define QK_INLINE QK_TARGET static inline __attribute__((always_inline))
#else
#define QK_X86 0
#endif

enum { QK_SCALAR = 0, QK_AVX2 = 1 };
enum { QK_HALF = 0, QK_PAIRS = 1, QK_ROWS = 2 };
#define QK_MCHUNK 8 /* x rows per pass over a unit (the unit's y accumulators live on the stack) */

static int qk_have_avx2(void) {
#if QK_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static inline float qk_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline int64_t qk_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* Element i of the scales: fp32 or bf16. */
static inline float qk_sz(const void *sz, int bf16, int64_t i) {
    return bf16 ? qk_bf16(((const uint16_t *)sz)[i]) : ((const float *)sz)[i];
}

/* ------------------------------------------------------------------------------------------ inputs */

typedef struct {
    int64_t M, N, K, g, G; /* G = K / g groups */
    const uint8_t *q;
    const void *sz;   /* [2G, N] (s, z) rows, fp32 or bf16 (sz_bf16) */
    int sz_bf16;
    float *x;         /* [M, K] fp32 */
    float *xsum;      /* int4: [M, G] sums of x per group */
    float *xe, *xo;   /* int4 "rows": [M, K/2] x at even / odd k */
    float *y;         /* [M, N] */
    int layout;
    int64_t bn;
} qk_args;

/* x (fp32 or bf16) into a[..] fp32, plus the per-group sums / even-odd split int4 needs; 0 or -1 (memory). */
static int qk_prepare_x(qk_args *a, const void *x, int x_bf16, int int4) {
    int64_t M = a->M, K = a->K, m, k, j;
    a->x = (float *)malloc((size_t)(M * K) * sizeof(float) + 64);
    a->xsum = NULL;
    a->xe = a->xo = NULL;
    if (a->x == NULL) return -1;
    if (x_bf16) {
        const uint16_t *h = (const uint16_t *)x;
        for (m = 0; m < M * K; m++) a->x[m] = qk_bf16(h[m]);
    } else {
        memcpy(a->x, x, (size_t)(M * K) * sizeof(float));
    }
    if (!int4) return 0;
    a->xsum = (float *)malloc((size_t)(M * a->G) * sizeof(float) + 64);
    if (a->xsum == NULL) return -1;
    for (m = 0; m < M; m++)
        for (j = 0; j < a->G; j++) {
            float s = 0.0f;
            for (k = 0; k < a->g; k++) s += a->x[m * K + j * a->g + k];
            a->xsum[m * a->G + j] = s;
        }
    if (a->layout != QK_ROWS) return 0;
    a->xe = (float *)malloc((size_t)(M * K / 2) * sizeof(float) + 64);
    a->xo = (float *)malloc((size_t)(M * K / 2) * sizeof(float) + 64);
    if (a->xe == NULL || a->xo == NULL) return -1;
    for (m = 0; m < M * K / 2; m++) {
        a->xe[m] = a->x[2 * m];
        a->xo[m] = a->x[2 * m + 1];
    }
    return 0;
}

static void qk_free_x(qk_args *a) {
    free(a->x);
    free(a->xsum);
    free(a->xe);
    free(a->xo);
}

/* --------------------------------------------------------------------------- int4, packed layouts */

/* Unit u: 32 rows. Output slot i < 16 is row rowA + i, slot i >= 16 is row rowB + i - 16. */
typedef struct {
    const uint8_t *base; /* byte 0 of k = 0 */
    int64_t kstride;     /* bytes from one k to the next */
    int64_t rowA, rowB;
} qk_unit;

static inline void qk_unit_of(const qk_args *a, int64_t u, qk_unit *un) {
    int64_t per = a->bn / 32, b = u / per, c = u % per;
    un->base = a->q + b * a->K * (a->bn / 2) + 16 * c;
    un->kstride = a->bn / 2;
    if (a->layout == QK_HALF) {
        un->rowA = b * a->bn + 16 * c;
        un->rowB = b * a->bn + a->bn / 2 + 16 * c;
    } else {
        un->rowA = b * a->bn;
        un->rowB = b * a->bn + 16;
    }
}

static inline int64_t qk_slot_row(const qk_unit *un, int i) { return i < 16 ? un->rowA + i : un->rowB + i - 16; }

static void qk_int4_unit_scalar(const qk_args *a, int64_t u) {
    qk_unit un;
    qk_unit_of(a, u, &un);
    int64_t M = a->M, K = a->K, g = a->g, G = a->G, N = a->N, m0, m, grp, k;
    int i, j, half = a->layout == QK_HALF;
    float yacc[QK_MCHUNK][32], acc[32];
    for (m0 = 0; m0 < M; m0 += QK_MCHUNK) {
        int64_t mc = qk_min(QK_MCHUNK, M - m0);
        memset(yacc, 0, sizeof yacc);
        for (grp = 0; grp < G; grp++) {
            int64_t s0 = 2 * grp * N, z0 = s0 + N; /* element offsets of this group's scales, zeros */
            for (m = 0; m < mc; m++) {
                const float *xm = a->x + (m0 + m) * K + grp * g;
                memset(acc, 0, sizeof acc);
                for (k = 0; k < g; k++) {
                    const uint8_t *p = un.base + (grp * g + k) * un.kstride;
                    float xv = xm[k];
                    for (j = 0; j < 16; j++) {
                        float lo = (float)(p[j] & 15), hi = (float)(p[j] >> 4);
                        acc[half ? j : 2 * j] += xv * lo;
                        acc[half ? 16 + j : 2 * j + 1] += xv * hi;
                    }
                }
                float xs = a->xsum[(m0 + m) * G + grp];
                for (i = 0; i < 32; i++) {
                    int64_t r = qk_slot_row(&un, i);
                    yacc[m][i] += qk_sz(a->sz, a->sz_bf16, s0 + r) * (acc[i] - 8.0f * xs) +
                                  qk_sz(a->sz, a->sz_bf16, z0 + r) * xs;
                }
            }
        }
        for (m = 0; m < mc; m++)
            for (i = 0; i < 32; i++) a->y[(m0 + m) * N + qk_slot_row(&un, i)] = yacc[m][i];
    }
}

#if QK_X86
/* 16 bytes -> 4 x 8 floats: v0 = low nibbles of bytes 0..7, v1 = their high nibbles, v2 / v3 bytes 8..15. */
QK_INLINE void qk_nibbles(const uint8_t *p, __m256 *v0, __m256 *v1, __m256 *v2, __m256 *v3) {
    const __m256i mask = _mm256_set1_epi32(15);
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    *v0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask));
    *v1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    *v2 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask));
    *v3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
}

/* (lanes of rows 0,2,..,14; lanes of rows 1,3,..,15) -> (rows 0..7; rows 8..15) */
QK_INLINE void qk_interleave(__m256 e, __m256 o, __m256 *r0, __m256 *r1) {
    __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o); /* rows 0-3|8-11, 4-7|12-15 */
    *r0 = _mm256_permute2f128_ps(lo, hi, 0x20);
    *r1 = _mm256_permute2f128_ps(lo, hi, 0x31);
}

/* 8 scales from element i: fp32, or bf16 widened (the bits shifted into the high half). */
QK_INLINE __m256 qk_load8(const void *sz, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)sz + i);
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)sz + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* yacc[slots] += s * (acc - 8 xs) + z * xs for one group; acc in qk_nibbles' order (v0..v3). */
QK_INLINE void qk_epilogue(int half, const qk_unit *un, __m256 v0, __m256 v1, __m256 v2, __m256 v3,
                           const void *sz, int bf16, int64_t s0, int64_t z0, float xs, float *yacc) {
    __m256 r0, r1, r2, r3, xv = _mm256_set1_ps(xs), x8 = _mm256_set1_ps(8.0f * xs);
    if (half) {
        r0 = v0, r1 = v2, r2 = v1, r3 = v3;
    } else {
        qk_interleave(v0, v1, &r0, &r1);
        qk_interleave(v2, v3, &r2, &r3);
    }
#define QK_EPI(R, ROW, Y)                                                                                \
    _mm256_storeu_ps(Y, _mm256_fmadd_ps(qk_load8(sz, bf16, s0 + (ROW)), _mm256_sub_ps(R, x8),            \
                                        _mm256_fmadd_ps(qk_load8(sz, bf16, z0 + (ROW)), xv, _mm256_loadu_ps(Y))))
    QK_EPI(r0, un->rowA, yacc);
    QK_EPI(r1, un->rowA + 8, yacc + 8);
    QK_EPI(r2, un->rowB, yacc + 16);
    QK_EPI(r3, un->rowB + 8, yacc + 24);
#undef QK_EPI
}

/* One group of one unit for x rows m (and m + 1 when two): acc over the group's k, then the epilogue. */
QK_INLINE void qk_int4_group_avx2(const qk_args *a, const qk_unit *un, int64_t grp, int64_t m, const int two,
                                  float *y0, float *y1) {
    int64_t K = a->K, g = a->g, k = 0;
    const float *x0 = a->x + m * K + grp * g, *x1 = x0 + K;
    const uint8_t *p = un->base + grp * g * un->kstride;
    __m256 v0, v1, v2, v3;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0; /* x row m, in qk_nibbles' order */
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;                  /* x row m + 1 */
    if (!two) {
        /* One x row: each 8-byte half of the 16 in turn, two k per step, so that 4 independent FMA
         * chains (low / high nibbles at even / odd k) hide the FMA latency without spilling registers. */
        const __m256i mask = _mm256_set1_epi32(15);
        int h;
        for (h = 0; h < 2; h++) {
            __m256 le = _mm256_setzero_ps(), he = le, lo = le, ho = le;
            const uint8_t *ph = p + 8 * h;
            for (k = 0; k + 1 < g; k += 2, ph += 2 * un->kstride) {
                __m256 xa = _mm256_broadcast_ss(x0 + k), xb = _mm256_broadcast_ss(x0 + k + 1);
                __m256i ba = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)ph));
                __m256i bb = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ph + un->kstride)));
                le = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(ba, mask)), xa, le);
                he = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(ba, 4)), xa, he);
                lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bb, mask)), xb, lo);
                ho = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bb, 4)), xb, ho);
            }
            for (; k < g; k++, ph += un->kstride) {
                __m256 xa = _mm256_broadcast_ss(x0 + k);
                __m256i ba = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)ph));
                le = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(ba, mask)), xa, le);
                he = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(ba, 4)), xa, he);
            }
            if (h == 0)
                a0 = _mm256_add_ps(le, lo), a1 = _mm256_add_ps(he, ho);
            else
                a2 = _mm256_add_ps(le, lo), a3 = _mm256_add_ps(he, ho);
        }
    } else {
        for (; k < g; k++, p += un->kstride) {
            __m256 xa = _mm256_broadcast_ss(x0 + k), xb = _mm256_broadcast_ss(x1 + k);
            qk_nibbles(p, &v0, &v1, &v2, &v3);
            a0 = _mm256_fmadd_ps(v0, xa, a0), a1 = _mm256_fmadd_ps(v1, xa, a1);
            a2 = _mm256_fmadd_ps(v2, xa, a2), a3 = _mm256_fmadd_ps(v3, xa, a3);
            b0 = _mm256_fmadd_ps(v0, xb, b0), b1 = _mm256_fmadd_ps(v1, xb, b1);
            b2 = _mm256_fmadd_ps(v2, xb, b2), b3 = _mm256_fmadd_ps(v3, xb, b3);
        }
    }
    int64_t s0 = 2 * grp * a->N, z0 = s0 + a->N;
    int half = a->layout == QK_HALF;
    qk_epilogue(half, un, a0, a1, a2, a3, a->sz, a->sz_bf16, s0, z0, a->xsum[m * a->G + grp], y0);
    if (two) qk_epilogue(half, un, b0, b1, b2, b3, a->sz, a->sz_bf16, s0, z0, a->xsum[(m + 1) * a->G + grp], y1);
}

QK_TARGET static void qk_int4_unit_avx2(const qk_args *a, int64_t u) {
    qk_unit un;
    qk_unit_of(a, u, &un);
    int64_t M = a->M, N = a->N, m0, m, grp;
    int i;
    float yacc[QK_MCHUNK][32];
    for (m0 = 0; m0 < M; m0 += QK_MCHUNK) {
        int64_t mc = qk_min(QK_MCHUNK, M - m0);
        memset(yacc, 0, sizeof yacc);
        for (grp = 0; grp < a->G; grp++) {
            /* x rows in pairs: the group's 16 * g bytes stay in L1 for the second and later pairs */
            for (m = 0; m + 1 < mc; m += 2) qk_int4_group_avx2(a, &un, grp, m0 + m, 1, yacc[m], yacc[m + 1]);
            if (m < mc) qk_int4_group_avx2(a, &un, grp, m0 + m, 0, yacc[m], NULL);
        }
        for (m = 0; m < mc; m++)
            for (i = 0; i < 32; i++) a->y[(m0 + m) * N + qk_slot_row(&un, i)] = yacc[m][i];
    }
}
#endif

/* ---------------------------------------------------------------------------------- int4, "rows" */

static void qk_int4_row_scalar(const qk_args *a, int64_t n) {
    int64_t K = a->K, g = a->g, G = a->G, N = a->N, m, grp, k;
    const uint8_t *row = a->q + n * (K / 2);
    for (m = 0; m < a->M; m++) {
        const float *xm = a->x + m * K;
        float total = 0.0f;
        for (grp = 0; grp < G; grp++) {
            float acc = 0.0f;
            for (k = grp * g; k < grp * g + g; k += 2) {
                uint8_t b = row[k / 2];
                acc += xm[k] * (float)(b & 15) + xm[k + 1] * (float)(b >> 4);
            }
            float xs = a->xsum[m * G + grp];
            total += qk_sz(a->sz, a->sz_bf16, 2 * grp * N + n) * (acc - 8.0f * xs) +
                     qk_sz(a->sz, a->sz_bf16, (2 * grp + 1) * N + n) * xs;
        }
        a->y[m * N + n] = total;
    }
}

#if QK_X86
QK_INLINE float qk_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

QK_TARGET static void qk_int4_row_avx2(const qk_args *a, int64_t n) {
    int64_t K = a->K, g = a->g, G = a->G, N = a->N, h = K / 2, m, grp, k;
    const uint8_t *row = a->q + n * h;
    const __m256i mask = _mm256_set1_epi32(15);
    for (m = 0; m < a->M; m++) {
        const float *xe = a->xe + m * h, *xo = a->xo + m * h, *xm = a->x + m * K;
        __m256 total = _mm256_setzero_ps();
        float offset = 0.0f;
        for (grp = 0; grp < G; grp++) {
            __m256 acc = _mm256_setzero_ps();
            float tail = 0.0f;
            int64_t j = grp * g / 2, end = j + g / 2; /* bytes of this group */
            for (; j + 8 <= end; j += 8) {            /* 8 bytes = 16 values: low nibbles even k */
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, mask)), _mm256_loadu_ps(xe + j), acc);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), _mm256_loadu_ps(xo + j), acc);
            }
            for (k = 2 * j; k < grp * g + g; k += 2)
                tail += xm[k] * (float)(row[k / 2] & 15) + xm[k + 1] * (float)(row[k / 2] >> 4);
            float sc = qk_sz(a->sz, a->sz_bf16, 2 * grp * N + n), xs = a->xsum[m * G + grp];
            total = _mm256_fmadd_ps(acc, _mm256_set1_ps(sc), total);
            offset += sc * (tail - 8.0f * xs) + qk_sz(a->sz, a->sz_bf16, (2 * grp + 1) * N + n) * xs;
        }
        a->y[m * N + n] = qk_hsum(total) + offset;
    }
}
#endif

/* ------------------------------------------------------------------------------------ drivers */

/* y = x @ dequant(W)^T for int4 W; returns 0, or -1 when memory ran out. Called without the GIL. */
static int qk_int4(int isa, int layout, int64_t bn, int64_t M, int64_t N, int64_t K, int64_t g, const void *x,
                   int x_bf16, const uint8_t *q, const void *sz, int sz_bf16, float *y, int nthreads) {
    qk_args a = {0};
    a.M = M, a.N = N, a.K = K, a.g = g, a.G = K / g, a.q = q, a.sz = sz, a.sz_bf16 = sz_bf16, a.y = y;
    a.layout = layout, a.bn = bn;
    if (qk_prepare_x(&a, x, x_bf16, 1) != 0) {
        qk_free_x(&a);
        return -1;
    }
    int64_t units = layout == QK_ROWS ? N : N / 32, u;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && units > 1)
    for (u = 0; u < units; u++) {
#if QK_X86
        if (isa == QK_AVX2) {
            if (layout == QK_ROWS)
                qk_int4_row_avx2(&a, u);
            else
                qk_int4_unit_avx2(&a, u);
            continue;
        }
#endif
        if (layout == QK_ROWS)
            qk_int4_row_scalar(&a, u);
        else
            qk_int4_unit_scalar(&a, u);
    }
    qk_free_x(&a);
    return 0;
}

#endif
