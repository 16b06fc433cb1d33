"""C for the attention primitives: tiled flash-attention kernels, forward and backward.

``attention`` and ``attention_bwd`` (``ember/ops/attention.py``) lower to calls of two C
functions compiled once per machine into a kernel library (``KERNELS``) that programs link;
each equation passes its shapes as a constant ``ember_att`` record, so one compiled body serves
every layer, every shape and every program. The kernels
follow the NumPy reference's algorithm (and so its results, up to the order of float
additions):

- **Tiles, no ``[L, S]`` matrix.** A forward work item is one key/value head's query tile:
  the ``G * BQ`` rows of its ``G`` query heads (grouped-query attention: a key tile is loaded
  once and used by every query head of its group), against key tiles of ``BK``. Its scores
  are kept transposed, ``s[key][row]``, the product of the key tile with the query tile
  transposed once per item: the online softmax's maxima, exponentials, sums and rescaling then
  run down columns, 16 rows to a vector, with no reduction across lanes (a decode step's few
  rows take dot products instead). Items start longest first (causal rows late in the
  sequence), so the threads finish together.
- **One micro-kernel, one exp.** Every product of tiles (``k q^T``, ``p v`` and the
  backward's five) is one register-blocked kernel: with AVX-512, 6 or 8 rows by up to 64
  columns in 24 accumulators (a vectorised loop without it). The exponentials, as costly as
  the products at ``d = 64``, are the fused kernels' polynomial ``ember_expf``, 16 lanes at a
  time, which gives 0 below ``2^-125`` rather than a subnormal (which costs the CPU a slow
  assist per lane).
- **Only visible keys are read.** ``kv_len`` and ``q_offset`` are read when the program runs:
  keys at ``j >= kv_len`` are never loaded (NaN in an unfilled cache cannot leak), and causal
  rows stop at their last visible key.
- **Decode splits the keys.** With fewer work items than twice the threads (one query row per
  head), the keys are split into chunks processed in parallel, each leaving a partial softmax
  state that a second loop merges ("flash decoding"). Without a split the merge is exact.
- **Backward in one sweep over the key tiles**, recomputing each tile's probabilities from
  ``lse`` in row-major tiles of ``BQ_BACK`` rows per head, against the key and value tiles
  transposed once: ``q`` and ``dout`` rows are read where they are (float32). A work item is a
  run of one head's key tiles and owns their ``dk`` and ``dv`` (summed over its group's query
  rows, no atomics); its ``dq`` terms go to a float accumulator per run (``dq`` itself for one
  float32 run), summed in order at the end. With ``batch * heads`` items enough for the
  threads there is one run; otherwise the key tiles are dealt round-robin into a few runs (so
  causal work is balanced), and the order of ``dq``'s sums then depends on the thread count,
  as a decode step's split keys do. Every other result is the same bits on any thread count.

float32, bfloat16 and float16 inputs compute in float32 (half inputs are rounded once when
stored, as the reference's ``astype``); float64 and the gradient of an additive mask run
through the NumPy reference (the rule returns None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ember import dtypes
from ember.backends.cpu.kernels import HELPERS
from ember.backends.cpu.lowerings import Statement
from ember.backends.cpu.toolchain import KernelLibrary
from ember.ir.graph import Eqn
from ember.ops.attention import attention_bwd_p, attention_p

_DTYPE_CODES = {np.dtype(np.float32): "EMBER_ATT_F32", dtypes.bfloat16: "EMBER_ATT_BF16",
                np.dtype(np.float16): "EMBER_ATT_F16"}
_MAX_BATCH_RANK = 8  # the leading axes ember_att records (a mask's strides along each)

# The types a program that calls the kernels needs besides their prototypes.
_TYPES = r"""
/* --- attention kernels (ember/backends/cpu/attention.py), linked from their library --- */
enum { EMBER_ATT_F32, EMBER_ATT_BF16, EMBER_ATT_F16 };

/* One attention problem: q [batch, heads * group, length, dim], k [batch, heads, src, dim],
   v [batch, heads, src, vdim] (the leading axes flattened into batch). */
typedef struct {
    int64_t batch, heads, group, length, src, dim, vdim;
    int dtype, causal, lens_per_batch, offsets_per_batch;
    int mask;                     /* 0: none, 1: boolean, 2: additive in dtype */
    float scale;
    int batch_rank;               /* the leading axes, for the mask's strides along them */
    int64_t batch_shape[8], mask_batch[8], mask_head, mask_row, mask_col;  /* 0: broadcast */
} ember_att;

typedef struct {
    const void *q, *k, *v, *mask, *out, *dout;
    const int32_t *kv_len, *q_offset;
    const float *lse, *dlse;
} ember_att_io;
"""

_DEFINITIONS = r"""
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#define EMBER_ATT_BQ 16          /* query rows per head in a forward tile */
#define EMBER_ATT_BQ_BACK 64     /* and in a backward one (fewer, longer products) */
#define EMBER_ATT_BK 64          /* keys in a tile */
#define EMBER_ATT_FEW_ROWS 8     /* fewer query rows per tile: scores by dot products */
#define EMBER_ATT_SPLIT_MIN 128  /* the fewest keys one split of a decode step reads */
#define EMBER_ATT_PARALLEL_MIN (1 << 16)  /* multiply-adds below which one thread does all */

/* Per-thread scratch for one query tile (R = group * min(BQ, length) rows in the forward,
   BQ_BACK in the backward) and one key tile, in float. The forward keeps a tile's scores
   transposed, s[key][row] with rows padded to ld = R rounded up to 16: its softmax's maxima,
   sums and rescaling then run down columns, 16 rows per vector, with no reduction across
   lanes and no per-row scalar exp. The backward keeps them row-major, s[row][key] (row stride
   BK): it needs no maximum, and its products then take q and dout rows where they are and
   only the key tile transposed. */
typedef struct {
    int64_t ld;                    /* the row stride of the forward's s and qt */
    float *qs, *qt;                /* q rows times scale, and transposed [dim][ld] */
    float *dout;                   /* the backward's dout rows, when not float32 */
    float *shift, *alpha, *sum, *s, *dp, *kt, *vt, *keys, *values, *dk, *dv, *row;
    const float *k_tile, *v_tile;  /* the tile's rows: in keys/values, or float32 operands */
} ember_att_scratch;

static int64_t ember_att_min(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t ember_att_max(int64_t a, int64_t b) { return a > b ? a : b; }

/* Whether a tile has so few query rows (a decode step) that the forward's scores are dot
   products along the head dimension rather than a product with the transposed query tile. */
static int ember_att_few(const ember_att *p) {
    return p->group * ember_att_min(EMBER_ATT_BQ, p->length) < EMBER_ATT_FEW_ROWS;
}

static float *ember_att_scratch_new(const ember_att *p, ember_att_scratch *w) {
    const int64_t rows = p->group * ember_att_min(EMBER_ATT_BQ, p->length), bk = EMBER_ATT_BK;
    const int64_t back = p->group * ember_att_min(EMBER_ATT_BQ_BACK, p->length);
    const int64_t ld = (rows + 15) & ~(int64_t)15, tile = bk * ember_att_max(ld, back);
    const int64_t sizes[] = {ember_att_max(rows, back) * p->dim, p->dim * ld, back * p->vdim, ld,
                             ld, ld, tile, tile, p->dim * bk, p->vdim * bk, bk * p->dim,
                             bk * p->vdim,
                             bk * p->dim, bk * p->vdim, 2 * ember_att_max(p->dim, p->vdim)};
    float **slots[] = {&w->qs, &w->qt, &w->dout, &w->shift, &w->alpha, &w->sum, &w->s, &w->dp,
                       &w->kt, &w->vt, &w->keys, &w->values, &w->dk, &w->dv, &w->row};
    const int count = sizeof sizes / sizeof sizes[0];
    int64_t total = 0;
    for (int i = 0; i < count; ++i) total += (sizes[i] + 15) & ~(int64_t)15;  /* 64-byte slots */
    float *block = (float *)aligned_alloc(64, (size_t)total * sizeof(float));
    float *at = block;
    for (int i = 0; i < count; ++i) { *slots[i] = at; at += (sizes[i] + 15) & ~(int64_t)15; }
    w->ld = ld;
    return block;
}

/* n elements of x from element `at`, in float, times mul. */
static void ember_att_load(float *restrict dst, const void *x, int64_t at, int64_t n, int dtype,
                           float mul) {
    if (dtype == EMBER_ATT_F32) {
        const float *src = (const float *)x + at;
        for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mul;
    } else if (dtype == EMBER_ATT_BF16) {
        const uint16_t *src = (const uint16_t *)x + at;
        for (int64_t i = 0; i < n; ++i) dst[i] = ember_bf16_to_f32(src[i]) * mul;
    } else {
        const _Float16 *src = (const _Float16 *)x + at;
        for (int64_t i = 0; i < n; ++i) dst[i] = (float)src[i] * mul;
    }
}

/* n floats into x from element `at`, rounded once to its dtype. */
static void ember_att_store(void *x, int64_t at, const float *restrict src, int64_t n,
                            int dtype) {
    if (dtype == EMBER_ATT_F32) {
        memcpy((float *)x + at, src, (size_t)n * sizeof(float));
    } else if (dtype == EMBER_ATT_BF16) {
        uint16_t *dst = (uint16_t *)x + at;
        for (int64_t i = 0; i < n; ++i) dst[i] = ember_f32_to_bf16(src[i]);
    } else {
        _Float16 *dst = (_Float16 *)x + at;
        for (int64_t i = 0; i < n; ++i) dst[i] = (_Float16)src[i];
    }
}

static int64_t ember_att_kv_len(const ember_att *p, const ember_att_io *io, int64_t b) {
    const int64_t n = io->kv_len[p->lens_per_batch ? b : 0];
    return n < 0 ? 0 : n > p->src ? p->src : n;
}

static int64_t ember_att_offset(const ember_att *p, const ember_att_io *io, int64_t b) {
    return io->q_offset[p->offsets_per_batch ? b : 0];
}

/* The keys that query rows [0, i1) of batch b may see: [0, end). */
static int64_t ember_att_end(const ember_att *p, const ember_att_io *io, int64_t b, int64_t i1) {
    const int64_t filled = ember_att_kv_len(p, io, b);
    if (!p->causal) return filled;
    return ember_att_min(filled, ember_att_max(ember_att_offset(p, io, b) + i1, 0));
}

/* Element offset of the mask value of (batch b, query head hq, row i, key 0). */
static int64_t ember_att_mask_at(const ember_att *p, int64_t b, int64_t hq, int64_t i) {
    int64_t at = hq * p->mask_head + i * p->mask_row;
    for (int d = p->batch_rank - 1; d >= 0; --d) {
        at += (b % p->batch_shape[d]) * p->mask_batch[d];
        b /= p->batch_shape[d];
    }
    return at;
}

/* Rows [at, at + n) of x ([rows, width], its leading axes flattened) in float, row-major:
   the operand itself when it is float32, else converted into `buffer`. */
static const float *ember_att_rows(const ember_att *p, const void *x, int64_t width, int64_t at,
                                   int64_t n, float *buffer) {
    if (p->dtype == EMBER_ATT_F32) return (const float *)x + at * width;
    ember_att_load(buffer, x, at * width, n * width, p->dtype, 1.0f);
    return buffer;
}

/* Rows [j0, j0 + n) of head h of k or v ([batch, heads, src, width]). */
static const float *ember_att_key_tile(const ember_att *p, const void *x, int64_t width,
                                       int64_t b, int64_t h, int64_t j0, int64_t n,
                                       float *buffer) {
    return ember_att_rows(p, x, width, (b * p->heads + h) * p->src + j0, n, buffer);
}

/* x [rows][width] times mul, transposed into xt [width][ld]. With AVX-512, in blocks of 16 x
   16 held in registers: four rounds of exchanging the off-diagonal halves, quarters, eighths
   and sixteenths (64 two-source permutes; element by element it was a tenth of the
   forward). */
#if defined(__AVX512F__)
static void ember_att_transpose(const float *restrict x, int64_t rows, int64_t width,
                                float *restrict xt, int64_t ld, float mul) {
    __m512i lo[4], hi[4];  /* per round: the lanes of row i and of row i + half */
    for (int round = 0, half = 8; round < 4; ++round, half /= 2) {
        int32_t l[16], h[16];
        for (int e = 0; e < 16; ++e) {
            const int base = e / (2 * half) * 2 * half, within = e % (2 * half);
            l[e] = within < half ? base + within : 16 + base + within - half;
            h[e] = within < half ? base + within + half : 16 + base + within;
        }
        lo[round] = _mm512_loadu_si512(l);
        hi[round] = _mm512_loadu_si512(h);
    }
    const __m512 by = _mm512_set1_ps(mul);
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c0 = 0; c0 < width; c0 += 16) {
            const int64_t nc = ember_att_min(16, width - c0), nr = ember_att_min(16, rows - r0);
            const __mmask16 cm = (__mmask16)((1u << nc) - 1), rm = (__mmask16)((1u << nr) - 1);
            __m512 v[16];
            #pragma GCC unroll 16
            for (int i = 0; i < 16; ++i)
                v[i] = _mm512_mul_ps(_mm512_maskz_loadu_ps(i < nr ? cm : 0,
                                                           x + (r0 + i) * width + c0), by);
            #pragma GCC unroll 4
            for (int round = 0; round < 4; ++round) {
                const int half = 8 >> round;
                #pragma GCC unroll 16
                for (int i = 0; i < 16; ++i) {
                    if (i & half) continue;
                    const __m512 a = v[i], b = v[i + half];
                    v[i] = _mm512_permutex2var_ps(a, lo[round], b);
                    v[i + half] = _mm512_permutex2var_ps(a, hi[round], b);
                }
            }
            #pragma GCC unroll 16
            for (int i = 0; i < 16; ++i)
                if (i < nc) _mm512_mask_storeu_ps(xt + (c0 + i) * ld + r0, rm, v[i]);
        }
}
#else
static void ember_att_transpose(const float *restrict x, int64_t rows, int64_t width,
                                float *restrict xt, int64_t ld, float mul) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < width; ++c) xt[c * ld + r] = x[r * width + c] * mul;
}
#endif

/* The forward's query rows of a tile: rows [i0, i0 + nrow) of every query head of key/value
   head h, row r being head r / nrow, times scale; and, unless they are few, transposed. */
static void ember_att_query_tile(const ember_att *p, const ember_att_io *io, int64_t b,
                                 int64_t h, int64_t i0, int64_t nrow, ember_att_scratch *w) {
    const int few = ember_att_few(p);
    for (int64_t g = 0; g < p->group; ++g) {
        const int64_t head_row = (b * p->heads * p->group + h * p->group + g) * p->length + i0;
        float *qs = w->qs + g * nrow * p->dim;
        if (few || p->dtype != EMBER_ATT_F32)
            ember_att_load(qs, io->q, head_row * p->dim, nrow * p->dim, p->dtype, p->scale);
        if (!few)  /* float32: transposed straight from the operand */
            ember_att_transpose(p->dtype == EMBER_ATT_F32
                                ? (const float *)io->q + head_row * p->dim : qs, nrow, p->dim,
                                w->qt + g * nrow, w->ld,
                                p->dtype == EMBER_ATT_F32 ? p->scale : 1.0f);
    }
}

/* x[j][r] = exp(x[j][r] - shift[r]) for j < n, r < rows (row stride ld), and, unless `sum` is
   NULL, sum[r] = the sum over j (the forward's columns); x[j] = exp(x[j] - shift) for j < n
   (a row of a decode step or of the backward), returning their sum; top[r] = max(top[r],
   x[j][r] for j < n), NaN ignored. The softmax's exponentials cost as much as a tile's
   products: they are the fused kernels' ember_expf (kernels.py's helpers), 16 lanes at a
   time; it returns 0 below e^-86.6 without computing a subnormal (which makes the CPU take a
   slow assist: it doubled the cost of causal tiles full of -inf). NaN stays NaN. */
static void ember_att_exp_rows(float *x, int64_t n, int64_t ld, int64_t rows,
                               const float *shift, float *sum) {
    int64_t r0 = 0;
    for (; r0 + 16 <= rows; r0 += 16) {  /* 16 rows down all columns: one vector each */
        float total[16] = {0};
        for (int64_t j = 0; j < n; ++j) {
            float *restrict at = x + j * ld + r0;
            #pragma omp simd simdlen(16)
            for (int64_t r = 0; r < 16; ++r) {
                at[r] = ember_expf(at[r] - shift[r0 + r]);
                total[r] += at[r];
            }
        }
        for (int64_t r = 0; sum && r < 16; ++r) sum[r0 + r] = total[r];
    }
    for (int64_t r = r0; sum && r < rows; ++r) sum[r] = 0.0f;
    for (int64_t j = 0; r0 < rows && j < n; ++j) {  /* the last rows */
        float *restrict xj = x + j * ld;
        #pragma omp simd simdlen(16)
        for (int64_t r = r0; r < rows; ++r) xj[r] = ember_expf(xj[r] - shift[r]);
        for (int64_t r = r0; sum && r < rows; ++r) sum[r] += xj[r];
    }
}

static float ember_att_exp_row(float *x, int64_t n, float shift) {
    float total = 0.0f;
    #pragma omp simd simdlen(16) reduction(+:total)
    for (int64_t j = 0; j < n; ++j) { x[j] = ember_expf(x[j] - shift); total += x[j]; }
    return total;
}

#if defined(__AVX512F__)
static void ember_att_column_max(const float *x, int64_t n, int64_t ld, int64_t rows,
                                 float *top) {
    for (int64_t r = 0; r < rows; r += 16) {
        const __mmask16 m = rows - r >= 16 ? (__mmask16)0xFFFF
                                           : (__mmask16)((1u << (rows - r)) - 1);
        __m512 t = _mm512_maskz_loadu_ps(m, top + r);
        for (int64_t j = 0; j < n; ++j)  /* max returns t when the score is NaN */
            t = _mm512_max_ps(_mm512_maskz_loadu_ps(m, x + j * ld + r), t);
        _mm512_mask_storeu_ps(top + r, m, t);
    }
}
#else
static void ember_att_column_max(const float *x, int64_t n, int64_t ld, int64_t rows,
                                 float *top) {
    for (int64_t j = 0; j < n; ++j) {
        const float *restrict xj = x + j * ld;
        #pragma omp simd
        for (int64_t r = 0; r < rows; ++r) top[r] = xj[r] > top[r] ? xj[r] : top[r];
    }
}
#endif

/* c[r][j] (+)= sum_k a[r][k] b[k][j] for r < rows, j < cols, k < depth (`add`: onto c, first
   times rescale[r] unless rescale is NULL, else into it): every product of a tile (the
   transposed scores k q^T, p v, dp^T = v dout^T, p^T dout, ds^T q, ds k), a read through its
   strides a[r * ars + k * acs]. b and c are row-major, read along j. The sum over k runs in
   order for every element, whatever the blocking: the same bits on any thread count. */
#if defined(__AVX512F__)
/* nr rows by 16 * nv columns, held in nr * nv registers across the whole depth; nr and nv are
   constants at each call, so each shape is its own fully unrolled loop. */
static inline __attribute__((always_inline)) void ember_att_block(
        const int nr, const int nv, int64_t depth, const float *a, int64_t ars, int64_t acs,
        const float *b, int64_t ldb, float *c, int64_t ldc, const __mmask16 *m, int add,
        const float *rescale) {
    __m512 acc[8][4];
    for (int i = 0; i < nr; ++i)
        for (int t = 0; t < nv; ++t) {
            acc[i][t] = add ? _mm512_maskz_loadu_ps(m[t], c + i * ldc + 16 * t)
                            : _mm512_setzero_ps();
            if (add && rescale) acc[i][t] = _mm512_mul_ps(acc[i][t], _mm512_set1_ps(rescale[i]));
        }
    for (int64_t k = 0; k < depth; ++k) {
        __m512 bk[4];
        for (int t = 0; t < nv; ++t) bk[t] = _mm512_maskz_loadu_ps(m[t], b + k * ldb + 16 * t);
        for (int i = 0; i < nr; ++i) {
            const __m512 x = _mm512_set1_ps(a[i * ars + k * acs]);
            for (int t = 0; t < nv; ++t) acc[i][t] = _mm512_fmadd_ps(x, bk[t], acc[i][t]);
        }
    }
    for (int i = 0; i < nr; ++i)
        for (int t = 0; t < nv; ++t) _mm512_mask_storeu_ps(c + i * ldc + 16 * t, m[t], acc[i][t]);
}

/* Rows in blocks of nr (6, or 8 when the columns take at most 3 registers: 24 accumulators
   either way), then the rest one by one. */
#define EMBER_ATT_ROWS(nv)                                                                   \
    do {                                                                                     \
        int64_t r = 0;                                                                       \
        for (; r + (nv < 4 ? 8 : 6) <= rows; r += (nv < 4 ? 8 : 6))                          \
            ember_att_block(nv < 4 ? 8 : 6, nv, depth, a + r * ars, ars, acs, b + j0, ldb,   \
                            c + r * ldc + j0, ldc, m, add, rescale ? rescale + r : NULL);    \
        for (; r + 2 <= rows; r += 2)                                                        \
            ember_att_block(2, nv, depth, a + r * ars, ars, acs, b + j0, ldb,                \
                            c + r * ldc + j0, ldc, m, add, rescale ? rescale + r : NULL);    \
        for (; r < rows; ++r)                                                                \
            ember_att_block(1, nv, depth, a + r * ars, ars, acs, b + j0, ldb,                \
                            c + r * ldc + j0, ldc, m, add, rescale ? rescale + r : NULL);    \
    } while (0)

static void ember_att_gemm(int64_t rows, int64_t cols, int64_t depth, const float *a,
                           int64_t ars, int64_t acs, const float *b, int64_t ldb, float *c,
                           int64_t ldc, int add, const float *rescale) {
    for (int64_t j0 = 0; j0 < cols; j0 += 64) {
        __mmask16 m[4];
        for (int t = 0; t < 4; ++t) {
            const int64_t left = cols - j0 - 16 * t;
            m[t] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        }
        switch (ember_att_min(4, (cols - j0 + 15) / 16)) {
        case 4: EMBER_ATT_ROWS(4); break;
        case 3: EMBER_ATT_ROWS(3); break;
        case 2: EMBER_ATT_ROWS(2); break;
        default: EMBER_ATT_ROWS(1); break;
        }
    }
}
#undef EMBER_ATT_ROWS
#else
static void ember_att_gemm(int64_t rows, int64_t cols, int64_t depth, const float *a,
                           int64_t ars, int64_t acs, const float *b, int64_t ldb, float *c,
                           int64_t ldc, int add, const float *rescale) {
    for (int64_t r = 0; r < rows; ++r) {
        float *restrict cr = c + r * ldc;
        if (!add) memset(cr, 0, (size_t)cols * sizeof(float));
        for (int64_t j = 0; add && rescale && j < cols; ++j) cr[j] *= rescale[r];
        for (int64_t k = 0; k < depth; ++k) {
            const float x = a[r * ars + k * acs];
            const float *restrict bk = b + k * ldb;
            #pragma omp simd
            for (int64_t j = 0; j < cols; ++j) cr[j] += x * bk[j];
        }
    }
}
#endif

/* Masks a tile of scores, keys [j0, j0 + n) of rows [i0, i0 + nrow) of each query head of
   key/value head h (row r of the tile: head r / nrow), the score of row r and key j at
   s[r * rs + j * js]: an additive mask added, -inf where the query may not see the key
   (causal, boolean mask). Keys past kv_len are not in the tile. */
static void ember_att_mask(const ember_att *p, const ember_att_io *io, int64_t b, int64_t h,
                           int64_t i0, int64_t nrow, int64_t j0, int64_t n, float *s,
                           int64_t rs, int64_t js) {
    const int64_t offset = ember_att_offset(p, io, b);
    const int by_row = p->mask || (p->causal && js == 1);
    for (int64_t r = 0; by_row && r < p->group * nrow; ++r) {
        float *restrict sr = s + r * rs;
        const int64_t i = i0 + r % nrow;
        if (p->mask) {
            const int64_t at = ember_att_mask_at(p, b, h * p->group + r / nrow, i)
                               + j0 * p->mask_col;
            if (p->mask == 1) {
                const uint8_t *m = (const uint8_t *)io->mask + at;
                for (int64_t j = 0; j < n; ++j) if (!m[j * p->mask_col]) sr[j * js] = -INFINITY;
            } else {
                for (int64_t j = 0; j < n; ++j) {
                    float add;
                    ember_att_load(&add, io->mask, at + j * p->mask_col, 1, p->dtype, 1.0f);
                    sr[j * js] += add;
                }
            }
        }
        if (p->causal && js == 1)  /* keys after the row's position: j0 + j > offset + i */
            for (int64_t j = ember_att_max(offset + i - j0 + 1, 0); j < n; ++j) sr[j] = -INFINITY;
    }
    /* Transposed: the rows a key is hidden from are, per query head, the first ones. */
    for (int64_t j = 0; p->causal && js != 1 && j < n; ++j)
        for (int64_t g = 0; g < p->group; ++g) {
            float *restrict sj = s + j * js + g * nrow * rs;
            const int64_t hidden = ember_att_min(nrow, ember_att_max(0, j0 + j - offset - i0));
            for (int64_t i = 0; i < hidden; ++i) sj[i * rs] = -INFINITY;
        }
}

/* The forward's scores of a tile, keys [j0, j0 + n), masked: transposed (s[j][r], the key
   tile times the transposed query tile) or, for a decode step's few rows, row-major (s[r][j],
   row stride BK, dot products along the head dimension: 16 lanes of a row would hold a few
   rows). */
static void ember_att_scores(const ember_att *p, const ember_att_io *io, int64_t b, int64_t h,
                             int64_t i0, int64_t nrow, int64_t j0, int64_t n,
                             ember_att_scratch *w) {
    const int64_t rows = p->group * nrow, d = p->dim;
    if (!ember_att_few(p)) {
        ember_att_gemm(n, rows, d, w->k_tile, d, 1, w->qt, w->ld, w->s, w->ld, 0, NULL);
        ember_att_mask(p, io, b, h, i0, nrow, j0, n, w->s, 1, w->ld);
        return;
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < n; ++j) {
            const float *restrict qr = w->qs + r * d, *restrict kj = w->k_tile + j * d;
            float sum = 0.0f;
            #pragma omp simd reduction(+:sum)
            for (int64_t c = 0; c < d; ++c) sum += qr[c] * kj[c];
            w->s[r * EMBER_ATT_BK + j] = sum;
        }
    ember_att_mask(p, io, b, h, i0, nrow, j0, n, w->s, EMBER_ATT_BK, 1);
}

/* The online softmax of one work item over keys [k0, k1): the state (m, l, acc) of its
   rows, acc unnormalised, each row's maximum m (-inf before any visible key) and sum l. Per
   key tile: the new maxima down the columns of the transposed scores (along the rows of a
   decode step's), p = exp(s - max), acc = acc exp(m_old - max) + p v. */
static void ember_att_forward_part(const ember_att *p, const ember_att_io *io, int64_t b,
                                   int64_t h, int64_t i0, int64_t nrow, int64_t k0, int64_t k1,
                                   float *state, int64_t capacity, ember_att_scratch *w) {
    const int64_t rows = p->group * nrow, ld = w->ld;
    const int few = ember_att_few(p);
    float *restrict m = state, *restrict l = state + capacity, *acc = state + 2 * capacity;
    float *restrict shift = w->shift, *restrict alpha = w->alpha, *restrict sum = w->sum;
    for (int64_t r = 0; r < rows; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
    memset(acc, 0, (size_t)(rows * p->vdim) * sizeof(float));
    if (k0 >= k1) return;
    ember_att_query_tile(p, io, b, h, i0, nrow, w);
    for (int64_t j0 = k0; j0 < k1; j0 += EMBER_ATT_BK) {
        const int64_t n = ember_att_min(EMBER_ATT_BK, k1 - j0);
        w->k_tile = ember_att_key_tile(p, io->k, p->dim, b, h, j0, n, w->keys);
        w->v_tile = ember_att_key_tile(p, io->v, p->vdim, b, h, j0, n, w->values);
        ember_att_scores(p, io, b, h, i0, nrow, j0, n, w);
        for (int64_t r = 0; r < rows; ++r) alpha[r] = m[r];  /* the new maxima, in alpha */
        if (few) {
            for (int64_t r = 0; r < rows; ++r) {
                const float *restrict sr = w->s + r * EMBER_ATT_BK;
                float top = alpha[r];
                #pragma omp simd reduction(max:top)
                for (int64_t j = 0; j < n; ++j) top = sr[j] > top ? sr[j] : top;
                alpha[r] = top;
            }
        } else {
            ember_att_column_max(w->s, n, ld, rows, alpha);
        }
        for (int64_t r = 0; r < rows; ++r) {
            shift[r] = isinf(alpha[r]) ? 0.0f : alpha[r];  /* no visible key yet: p = 0 */
            const float top = alpha[r];
            alpha[r] = m[r];
            m[r] = top;
        }
        if (few)
            for (int64_t r = 0; r < rows; ++r)
                sum[r] = ember_att_exp_row(w->s + r * EMBER_ATT_BK, n, shift[r]);
        else
            ember_att_exp_rows(w->s, n, ld, rows, shift, sum);
        ember_att_exp_rows(alpha, 1, ld, rows, shift, NULL);  /* 0 while m was -inf */
        for (int64_t r = 0; r < rows; ++r) l[r] = l[r] * alpha[r] + sum[r];
        ember_att_gemm(rows, p->vdim, n, w->s, few ? EMBER_ATT_BK : 1, few ? 1 : ld, w->v_tile,
                       p->vdim, acc, p->vdim, 1, alpha);  /* acc = acc alpha + p v */
    }
}

/* out and lse of one work item's rows from the states its splits left (exact without a
   split: the one state's weight is 1). */
static void ember_att_merge(const ember_att *p, const float *first, int64_t splits,
                            int64_t stride, int64_t capacity, int64_t b, int64_t h, int64_t i0,
                            int64_t nrow, float *row, void *out, float *lse) {
    for (int64_t r = 0; r < p->group * nrow; ++r) {
        float top = -INFINITY, total = 0.0f;
        for (int64_t s = 0; s < splits; ++s)
            if (first[s * stride + r] > top) top = first[s * stride + r];
        const float shift = isinf(top) ? 0.0f : top;
        const float *sum = row;  /* sum over the states of acc exp(m - shift) */
        if (splits == 1) {  /* the one weight is 1 (or m = -inf and l = 0) */
            total = first[capacity + r];
            sum = first + 2 * capacity + r * p->vdim;
        } else {
            for (int64_t e = 0; e < p->vdim; ++e) row[e] = 0.0f;
            for (int64_t s = 0; s < splits; ++s) {
                const float *state = first + s * stride;
                const float weight = ember_expf(state[r] - shift);
                if (weight == 0.0f) continue;
                total += state[capacity + r] * weight;
                const float *acc = state + 2 * capacity + r * p->vdim;
                for (int64_t e = 0; e < p->vdim; ++e) row[e] += acc[e] * weight;
            }
        }
        const int64_t at = (b * p->heads * p->group + h * p->group + r / nrow) * p->length
                           + i0 + r % nrow;
        if (total > 0.0f) {
            const float inverse = 1.0f / total;
            for (int64_t e = 0; e < p->vdim; ++e) row[e] = sum[e] * inverse;
            lse[at] = shift + logf(total);
        } else {  /* a row that sees no key: zeros, lse -inf */
            for (int64_t e = 0; e < p->vdim; ++e) row[e] = 0.0f;
            lse[at] = -INFINITY;
        }
        ember_att_store(out, at * p->vdim, row, p->vdim, p->dtype);
    }
}

/* out, lse of attention: work items (batch, key/value head, query tile), each split into
   chunks of keys when there are too few items to keep the threads busy; the chunks' states
   are merged per row. Without a split an item's state stays in its thread and is written out
   at once. Threads take the items with the most keys first (causal rows late in the
   sequence), so that the last items to start are short. */
void ember_attention_forward(const ember_att *p, const ember_att_io *io, void *out,
                             float *lse) {
    const int64_t bq = ember_att_min(EMBER_ATT_BQ, p->length);
    const int64_t tiles = (p->length + bq - 1) / bq, pairs = p->batch * p->heads;
    const int64_t items = pairs * tiles;
    const int64_t capacity = p->group * bq, stride = capacity * (2 + p->vdim);
    int64_t longest = 0;
    for (int64_t b = 0; b < p->batch; ++b)
        longest = ember_att_max(longest, ember_att_end(p, io, b, p->length));
    const int64_t threads = omp_get_max_threads();
    int64_t splits = 1;
    if (items < 2 * threads && longest > EMBER_ATT_SPLIT_MIN)
        splits = ember_att_min((2 * threads + items - 1) / items,
                               (longest + EMBER_ATT_SPLIT_MIN - 1) / EMBER_ATT_SPLIT_MIN);
    int64_t chunk = (longest + splits - 1) / splits;
    chunk = ember_att_max(EMBER_ATT_BK, (chunk + EMBER_ATT_BK - 1) / EMBER_ATT_BK * EMBER_ATT_BK);
    const int64_t work = p->batch * p->heads * p->group * p->length * longest
                         * (p->dim + p->vdim);
    float *states = splits > 1 ? (float *)malloc((size_t)(items * splits * stride)
                                                 * sizeof(float)) : NULL;
    #pragma omp parallel if (work > EMBER_ATT_PARALLEL_MIN)
    {
        ember_att_scratch w;
        float *block = ember_att_scratch_new(p, &w);
        float *own = states ? NULL : (float *)malloc((size_t)stride * sizeof(float));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < items * splits; ++t) {
            /* t runs over the last query tiles of every (batch, head) first */
            const int64_t tile = tiles - 1 - t / splits / pairs, pair = t / splits % pairs;
            const int64_t item = pair * tiles + tile, k0 = t % splits * chunk;
            const int64_t b = pair / p->heads, h = pair % p->heads;
            const int64_t i0 = tile * bq, nrow = ember_att_min(bq, p->length - i0);
            const int64_t k1 = ember_att_min(k0 + chunk, ember_att_end(p, io, b, i0 + nrow));
            float *state = states ? states + (item * splits + t % splits) * stride : own;
            ember_att_forward_part(p, io, b, h, i0, nrow, k0, k1, state, capacity, &w);
            if (!states)
                ember_att_merge(p, own, 1, stride, capacity, b, h, i0, nrow, w.row, out, lse);
        }
        if (states) {  /* the splits' states merged */
            #pragma omp for
            for (int64_t item = 0; item < items; ++item) {
                const int64_t b = item / (p->heads * tiles), h = item / tiles % p->heads;
                const int64_t i0 = item % tiles * bq, nrow = ember_att_min(bq, p->length - i0);
                ember_att_merge(p, states + item * splits * stride, splits, stride, capacity, b, h,
                                i0, nrow, w.row, out, lse);
            }
        }
        free(own);
        free(block);
    }
    free(states);
}

/* delta = rowsum(dout * out) - dlse of query row r: the part of its scores' gradients that
   does not depend on the key. `row` holds 2 * vdim floats. */
static float ember_att_delta(const ember_att *p, const ember_att_io *io, int64_t r, float *row) {
    float *dout = row, *out = row + p->vdim, sum = 0.0f;
    ember_att_load(dout, io->dout, r * p->vdim, p->vdim, p->dtype, 1.0f);
    ember_att_load(out, io->out, r * p->vdim, p->vdim, p->dtype, 1.0f);
    #pragma omp simd reduction(+:sum)
    for (int64_t e = 0; e < p->vdim; ++e) sum += dout[e] * out[e];
    return sum - io->dlse[r];
}

/* The gradients from keys [j0, j0 + BK) of head h: their dk and dv, summed over every query
   row that sees them (zero past kv_len), and, when dq_acc is not NULL, those rows' dq terms
   from these keys (added to dq_acc, float, [batch, heads * group, length, dim], unscaled).
   Per query tile and head, in row-major tiles: the scores s = q (scale k)^T and dp = dout v^T
   against the key tile transposed once, p = exp(s - lse) in place of s, ds = p (dp - delta)
   in place of dp (flash attention's backward: p is recomputed from lse, never stored), then
   dv += p^T dout, dk += ds^T q, dq += ds k. `stats`: each row's delta, then its lse (0 for a
   row that sees nothing, so that its p is 0). */
static void ember_att_key_grads(const ember_att *p, const ember_att_io *io, const float *stats,
                                int64_t b, int64_t h, int64_t j0, void *dk, void *dv,
                                float *dq_acc, ember_att_scratch *w) {
    const int64_t n = ember_att_max(0, ember_att_min(EMBER_ATT_BK,
                                                     ember_att_kv_len(p, io, b) - j0));
    const int64_t width = ember_att_min(EMBER_ATT_BK, p->src - j0), bk = EMBER_ATT_BK;
    const int64_t bq = ember_att_min(EMBER_ATT_BQ_BACK, p->length);
    const int64_t all = p->batch * p->heads * p->group * p->length;
    memset(w->dk, 0, (size_t)(width * p->dim) * sizeof(float));
    memset(w->dv, 0, (size_t)(width * p->vdim) * sizeof(float));
    if (n > 0) {
        w->k_tile = ember_att_key_tile(p, io->k, p->dim, b, h, j0, n, w->keys);
        w->v_tile = ember_att_key_tile(p, io->v, p->vdim, b, h, j0, n, w->values);
        ember_att_transpose(w->k_tile, n, p->dim, w->kt, bk, p->scale);
        ember_att_transpose(w->v_tile, n, p->vdim, w->vt, bk, 1.0f);
        /* Causal: rows before the tile's first key's position see none of it. */
        const int64_t first = p->causal ? ember_att_max(0, j0 - ember_att_offset(p, io, b)) : 0;
        for (int64_t i0 = first / bq * bq; i0 < p->length; i0 += bq) {
            const int64_t nrow = ember_att_min(bq, p->length - i0);
            const int64_t row0 = (b * p->heads * p->group + h * p->group) * p->length + i0;
            for (int64_t g = 0; g < p->group; ++g) {  /* scores and dp, head by head */
                const int64_t at = row0 + g * p->length;
                const float *q = ember_att_rows(p, io->q, p->dim, at, nrow,
                                                w->qs + g * nrow * p->dim);
                const float *dout = ember_att_rows(p, io->dout, p->vdim, at, nrow,
                                                   w->dout + g * nrow * p->vdim);
                ember_att_gemm(nrow, n, p->dim, q, p->dim, 1, w->kt, bk,
                               w->s + g * nrow * bk, bk, 0, NULL);
                ember_att_gemm(nrow, n, p->vdim, dout, p->vdim, 1, w->vt, bk,
                               w->dp + g * nrow * bk, bk, 0, NULL);
            }
            ember_att_mask(p, io, b, h, i0, nrow, j0, n, w->s, bk, 1);
            for (int64_t r = 0; r < p->group * nrow; ++r) {
                const int64_t at = row0 + r / nrow * p->length + r % nrow;
                const float delta = stats[at];
                float *restrict s = w->s + r * bk, *restrict dp = w->dp + r * bk;
                ember_att_exp_row(s, n, stats[all + at]);
                #pragma omp simd
                for (int64_t j = 0; j < n; ++j) dp[j] = s[j] > 0.0f ? s[j] * (dp[j] - delta) : 0.0f;
            }
            for (int64_t g = 0; g < p->group; ++g) {  /* the products with ds and p */
                const int64_t at = row0 + g * p->length;
                const float *q = p->dtype == EMBER_ATT_F32 ? (const float *)io->q + at * p->dim
                                                          : w->qs + g * nrow * p->dim;
                const float *dout = p->dtype == EMBER_ATT_F32
                                    ? (const float *)io->dout + at * p->vdim
                                    : w->dout + g * nrow * p->vdim;
                const float *pg = w->s + g * nrow * bk, *ds = w->dp + g * nrow * bk;
                ember_att_gemm(n, p->vdim, nrow, pg, 1, bk, dout, p->vdim, w->dv, p->vdim, 1,
                               NULL);
                ember_att_gemm(n, p->dim, nrow, ds, 1, bk, q, p->dim, w->dk, p->dim, 1, NULL);
                if (dq_acc)
                    ember_att_gemm(nrow, p->dim, n, ds, bk, 1, w->k_tile, p->dim,
                                   dq_acc + at * p->dim, p->dim, 1, NULL);
            }
        }
    }
    for (int64_t e = 0; e < width * p->dim; ++e) w->dk[e] *= p->scale;  /* q was unscaled */
    const int64_t row = (b * p->heads + h) * p->src + j0;
    if (dk) ember_att_store(dk, row * p->dim, w->dk, width * p->dim, p->dtype);
    if (dv) ember_att_store(dv, row * p->vdim, w->dv, width * p->vdim, p->dtype);
}

/* dq, dk, dv of attention (a null pointer: that gradient is not wanted), in one sweep over
   the key tiles. A work item is a run of one head's key tiles (every runs-th tile, so that
   causal work is balanced) and owns their dk and dv; its dq terms go to a float accumulator
   of its run, and the runs' accumulators are summed, in order, at the end. There are as few
   runs as keep the threads busy (one when batch * heads suffices). */
void ember_attention_backward(const ember_att *p, const ember_att_io *io, void *dq,
                              void *dk, void *dv) {
    const int64_t key_tiles = (p->src + EMBER_ATT_BK - 1) / EMBER_ATT_BK;
    const int64_t pairs = p->batch * p->heads, rows = pairs * p->group * p->length;
    const int64_t threads = omp_get_max_threads();
    const int64_t runs = dq ? ember_att_max(1, ember_att_min(key_tiles,
                                                             (2 * threads + pairs - 1) / pairs))
                            : ember_att_max(1, key_tiles);
    const int64_t work = rows * p->src * (p->dim + p->vdim);
    float *stats = (float *)malloc((size_t)(2 * rows) * sizeof(float));
    /* One run into a float32 dq: its terms add up in dq itself. */
    const int in_place = dq && runs == 1 && p->dtype == EMBER_ATT_F32;
    float *partial = in_place ? (float *)dq
                     : dq ? (float *)calloc((size_t)(runs * rows * p->dim), sizeof(float)) : NULL;
    #pragma omp parallel if (work > EMBER_ATT_PARALLEL_MIN)
    {
        ember_att_scratch w;
        float *block = ember_att_scratch_new(p, &w);
        #pragma omp for
        for (int64_t r = 0; r < rows; ++r) {
            stats[r] = ember_att_delta(p, io, r, w.row);
            stats[rows + r] = isinf(io->lse[r]) ? 0.0f : io->lse[r];
            if (in_place) memset(partial + r * p->dim, 0, (size_t)p->dim * sizeof(float));
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < pairs * runs; ++t) {
            const int64_t run = t % runs, b = t / (p->heads * runs), h = t / runs % p->heads;
            for (int64_t tile = run; tile < key_tiles; tile += runs)
                ember_att_key_grads(p, io, stats, b, h, tile * EMBER_ATT_BK, dk, dv,
                                    partial ? partial + run * rows * p->dim : NULL, &w);
        }
        if (in_place) {
            #pragma omp for
            for (int64_t e = 0; e < rows * p->dim; ++e) partial[e] *= p->scale;
        } else if (dq) {
            #pragma omp for
            for (int64_t r = 0; r < rows; ++r) {  /* dq: the runs' sums, in order, times scale */
                float *sum = w.row;
                for (int64_t e = 0; e < p->dim; ++e) sum[e] = 0.0f;
                for (int64_t run = 0; run < runs; ++run) {
                    const float *x = partial + (run * rows + r) * p->dim;
                    for (int64_t e = 0; e < p->dim; ++e) sum[e] += x[e];
                }
                for (int64_t e = 0; e < p->dim; ++e) sum[e] *= p->scale;
                ember_att_store(dq, r * p->dim, sum, p->dim, p->dtype);
            }
        }
        free(block);
    }
    if (!in_place) free(partial);
    free(stats);
}
"""

# The kernels, compiled once per machine (decision 0017); programs declare and link them.
KERNELS = KernelLibrary(HELPERS + _TYPES + _DEFINITIONS)


def _strides(shape: Sequence[int]) -> list[int]:
    """Row-major element strides, 0 along axes of size 1 (they broadcast)."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step if n != 1 else 0)
        step *= n
    return out[::-1]


def _c_array(values: Sequence[int]) -> str:
    return "{" + ", ".join(str(int(v)) for v in values) + ("}" if values else "0}")


def _problem(eqn: Eqn) -> str | None:
    """The ``ember_att`` record of an attention equation (C initialiser), or None when the
    kernels do not cover it."""
    q, k, v, kv_len, q_offset = (a.aval for a in eqn.inputs[:5])
    code = _DTYPE_CODES.get(np.dtype(q.dtype))
    batch = q.shape[:-3]
    if code is None or len(batch) > _MAX_BATCH_RANK:
        return None
    hq, length, dim = q.shape[-3:]
    heads, src = k.shape[-3:-1]
    fields = {"batch": math.prod(batch), "heads": heads, "group": hq // heads,
              "length": length, "src": src, "dim": dim, "vdim": v.shape[-1], "dtype": code,
              "causal": int(eqn.params["causal"]), "lens_per_batch": int(kv_len.ndim > 0),
              "offsets_per_batch": int(q_offset.ndim > 0), "mask": 0,
              # q is scaled in float32, as the reference's float32 array times a Python float.
              "scale": float(np.float32(eqn.params["scale"])).hex() + "f",
              "batch_rank": len(batch), "batch_shape": _c_array(batch)}
    if eqn.params["has_mask"]:
        mask = eqn.inputs[5].aval
        strides = _strides(mask.shape)
        fields.update(mask=1 if mask.dtype == np.bool_ else 2,
                      mask_batch=_c_array(strides[:-3]), mask_head=strides[-3],
                      mask_row=strides[-2], mask_col=strides[-1])
    return "{" + ", ".join(f".{name} = {value}" for name, value in fields.items()) + "}"


def _io(eqn: Eqn, ins: Sequence[str], residuals: bool) -> str:
    """The ``ember_att_io`` initialiser of the operands (``residuals``: out, lse, dout, dlse
    follow the mask, as in ``attention_bwd``)."""
    has_mask = eqn.params["has_mask"]
    fields = {"q": ins[0], "k": ins[1], "v": ins[2], "kv_len": f"(const int32_t *){ins[3]}",
              "q_offset": f"(const int32_t *){ins[4]}", "mask": ins[5] if has_mask else "NULL"}
    if residuals:
        out, lse, dout, dlse = ins[5 + has_mask:]
        fields.update(out=out, lse=f"(const float *){lse}", dout=dout,
                      dlse=f"(const float *){dlse}")
    return "{" + ", ".join(f".{name} = {value}" for name, value in fields.items()) + "}"


def _call(problem: str, io: str, call: str) -> str:
    return (f"{{ static const ember_att problem = {problem};\n"
            f"  const ember_att_io io = {io};\n  {call}; }}")


def _attention(eqn: Eqn) -> Statement | None:
    problem = _problem(eqn)
    if problem is None:
        return None

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        return _call(problem, _io(eqn, ins, residuals=False),
                     f"ember_attention_forward(&problem, &io, {outs[0]}, (float *){outs[1]})")
    return Statement(emit, (_TYPES, KERNELS.prototypes), links=(KERNELS,))


def _attention_bwd(eqn: Eqn) -> Statement | None:
    problem = _problem(eqn)
    which = eqn.params["which"]
    if problem is None or (len(which) > 3 and which[3]):  # a mask's gradient: NumPy's
        return None

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        grads = iter(outs)
        dq, dk, dv = (next(grads) if w else "NULL" for w in which[:3])
        return _call(problem, _io(eqn, ins, residuals=True),
                     f"ember_attention_backward(&problem, &io, {dq}, {dk}, {dv})")
    return Statement(emit, (_TYPES, KERNELS.prototypes), links=(KERNELS,))


attention_p.def_lowering("c", _attention)
attention_bwd_p.def_lowering("c", _attention_bwd)
