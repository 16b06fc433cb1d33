"""C for the attention primitives: tiled flash-attention kernels, forward and backward.

``attention`` and ``attention_bwd`` (``ember/ops/attention.py``) lower to calls of two C
functions compiled once per machine into a kernel library (``KERNELS``) that programs link;
each equation passes its shapes as a constant ``ember_att`` record, so one compiled body serves
every layer, every shape and every program. The kernels
follow the NumPy reference's algorithm (and so its results, up to the order of float
additions):

- **Tiles, no ``[L, S]`` matrix.** A work item is one key/value head's query tile: the
  ``G * BQ`` rows of its ``G`` query heads (grouped-query attention: a key tile is loaded once
  and used by every query head of its group). Keys come in tiles of ``BK``, converted to float
  and transposed so the dot products run along keys, in the forward once per call into an
  array every query tile reads (a decode step's few rows read them untransposed); the scores
  of one tile live in per-thread scratch. An online softmax keeps
  each row's running maximum, sum and output. Every product of tiles (``q k^T``, ``p v`` and
  the backward's four) is one register-blocked micro-kernel: AVX-512 FMA where the CPU has it
  (``__AVX512F__``), a vectorised loop otherwise.
- **Only visible keys are read.** ``kv_len`` and ``q_offset`` are read when the program runs:
  keys at ``j >= kv_len`` are never loaded (NaN in an unfilled cache cannot leak), and causal
  rows stop at their last visible key.
- **Decode splits the keys.** With fewer work items than twice the threads (one query row per
  head), the keys are split into chunks processed in parallel, each leaving a partial softmax
  state that a second loop merges ("flash decoding"). Without a split the merge is exact.
- **Backward in one sweep over the key tiles**, recomputing each tile's probabilities from
  ``lse``: a work item is a run of one head's key tiles and owns their ``dk`` and ``dv`` (summed
  over its group's query rows, no atomics); its ``dq`` terms go to a float accumulator per run,
  summed in order at the end. With ``batch * heads`` items enough for the threads there is one
  run; otherwise the key tiles are dealt round-robin into a few runs (so causal work is
  balanced), and the order of ``dq``'s sums then depends on the thread count.

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
#define EMBER_ATT_BQ 32          /* query rows per head in a tile */
#define EMBER_ATT_BK 64          /* keys in a tile */
#define EMBER_ATT_FEW_ROWS 8     /* fewer query rows per tile: no transposed key tiles */
#define EMBER_ATT_SPLIT_MIN 128  /* the fewest keys one split of a decode step reads */
#define EMBER_ATT_PARALLEL_MIN (1 << 16)  /* multiply-adds below which one thread does all */

/* Per-thread scratch: a query tile (rows = group * min(BQ, length)) and a key tile, in float. */
typedef struct {
    float *qs, *dout, *lse, *delta, *s, *dp, *kt, *vt, *keys, *values, *dk, *dv, *row;
    const float *k_tile, *v_tile;  /* the tile's rows: in keys/values, or float32 operands */
    const float *k_cols;           /* the key tile transposed (kt or a shared copy), or NULL */
} ember_att_scratch;

static int64_t ember_att_min(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t ember_att_max(int64_t a, int64_t b) { return a > b ? a : b; }

static float *ember_att_scratch_new(const ember_att *p, ember_att_scratch *w) {
    const int64_t rows = p->group * ember_att_min(EMBER_ATT_BQ, p->length), bk = EMBER_ATT_BK;
    const int64_t wide = ember_att_max(p->dim, p->vdim);
    const int64_t sizes[] = {rows * p->dim, rows * p->vdim, rows, rows, rows * bk, rows * bk,
                             p->dim * bk, p->vdim * bk, bk * p->dim, bk * p->vdim,
                             bk * p->dim, bk * p->vdim, 2 * wide};
    float **slots[] = {&w->qs, &w->dout, &w->lse, &w->delta, &w->s, &w->dp, &w->kt, &w->vt,
                       &w->keys, &w->values, &w->dk, &w->dv, &w->row};
    const int count = sizeof sizes / sizeof sizes[0];
    int64_t total = 0;
    for (int i = 0; i < count; ++i) total += (sizes[i] + 15) & ~(int64_t)15;  /* 64-byte slots */
    float *block = (float *)aligned_alloc(64, (size_t)total * sizeof(float));
    float *at = block;
    for (int i = 0; i < count; ++i) { *slots[i] = at; at += (sizes[i] + 15) & ~(int64_t)15; }
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

/* Whether dot products with a key tile go through its transpose: worth it when many query
   rows share each key (prefill, training); a decode step's few rows read the keys row by
   row. Returns `cols` or NULL. */
static float *ember_att_transposed(const ember_att *p, float *cols) {
    return p->group * ember_att_min(EMBER_ATT_BQ, p->length) >= EMBER_ATT_FEW_ROWS ? cols : NULL;
}

/* Rows [j0, j0 + n) of head h of k or v ([batch, heads, src, width]) in float, row-major:
   the operand itself when it is float32, else converted into `buffer`; and, unless `cols` is
   NULL, transposed into `cols` [width][BK] (zero past n), so that dot products with the tile
   run along its keys. Returns the row-major rows. */
static const float *ember_att_key_tile(const ember_att *p, const void *x, int64_t width,
                                       int64_t b, int64_t h, int64_t j0, int64_t n,
                                       float *buffer, float *restrict cols) {
    const int64_t at = ((b * p->heads + h) * p->src + j0) * width;
    const float *rows = buffer;
    if (p->dtype == EMBER_ATT_F32)
        rows = (const float *)x + at;
    else
        ember_att_load(buffer, x, at, n * width, p->dtype, 1.0f);
    for (int64_t c = 0; cols && c < width; ++c) {
        float *restrict col = cols + c * EMBER_ATT_BK;
        for (int64_t j = 0; j < n; ++j) col[j] = rows[j * width + c];
        for (int64_t j = n; j < EMBER_ATT_BK; ++j) col[j] = 0.0f;
    }
    return rows;
}

/* The query-side rows of a tile: rows [i0, i0 + nrow) of every query head of key/value head
   h, row r being head r / nrow. Loads q times scale and, for the backward, dout, lse (0 for
   -inf) and delta. */
static void ember_att_query_tile(const ember_att *p, const ember_att_io *io, const float *delta,
                                 int64_t b, int64_t h, int64_t i0, int64_t nrow,
                                 ember_att_scratch *w, int backward) {
    for (int64_t g = 0; g < p->group; ++g) {
        const int64_t head_row = (b * p->heads * p->group + h * p->group + g) * p->length + i0;
        const int64_t r = g * nrow;
        ember_att_load(w->qs + r * p->dim, io->q, head_row * p->dim, nrow * p->dim, p->dtype,
                       p->scale);
        if (!backward) continue;
        ember_att_load(w->dout + r * p->vdim, io->dout, head_row * p->vdim, nrow * p->vdim,
                       p->dtype, 1.0f);
        for (int64_t i = 0; i < nrow; ++i) {
            const float lse = io->lse[head_row + i];
            w->lse[r + i] = isinf(lse) ? 0.0f : lse;  /* a row that sees nothing: p = 0 */
            w->delta[r + i] = delta[head_row + i];
        }
    }
}

/* c[r][j] += sum_k a[r][k] b[k][j] for r < rows, j < cols, k < depth: every product of a tile
   (scores q k^T against a transposed key tile, p v, ds k, and p^T dout, ds^T q, with a read
   through its strides a[r * ars + k * acs]). b and c are row-major, read along j. */
#if defined(__AVX512F__)
#include <immintrin.h>
/* nr (1 or 4) rows by 64 columns, held in 4 * nr registers across the whole depth. */
static inline __attribute__((always_inline)) void ember_att_block(
        const int nr, int64_t depth, const float *a, int64_t ars, int64_t acs,
        const float *b, int64_t ldb, float *c, int64_t ldc, const __mmask16 *m) {
    __m512 acc[4][4];
    for (int i = 0; i < nr; ++i)
        for (int t = 0; t < 4; ++t) acc[i][t] = _mm512_maskz_loadu_ps(m[t], c + i * ldc + 16 * t);
    for (int64_t k = 0; k < depth; ++k) {
        __m512 bk[4];
        for (int t = 0; t < 4; ++t) bk[t] = _mm512_maskz_loadu_ps(m[t], b + k * ldb + 16 * t);
        for (int i = 0; i < nr; ++i) {
            const __m512 x = _mm512_set1_ps(a[i * ars + k * acs]);
            for (int t = 0; t < 4; ++t) acc[i][t] = _mm512_fmadd_ps(x, bk[t], acc[i][t]);
        }
    }
    for (int i = 0; i < nr; ++i)
        for (int t = 0; t < 4; ++t) _mm512_mask_storeu_ps(c + i * ldc + 16 * t, m[t], acc[i][t]);
}

static void ember_att_gemm(int64_t rows, int64_t cols, int64_t depth, const float *a,
                           int64_t ars, int64_t acs, const float *b, int64_t ldb, float *c,
                           int64_t ldc) {
    for (int64_t j0 = 0; j0 < cols; j0 += 64) {
        __mmask16 m[4];
        for (int t = 0; t < 4; ++t) {
            const int64_t left = cols - j0 - 16 * t;
            m[t] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        }
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4)
            ember_att_block(4, depth, a + r * ars, ars, acs, b + j0, ldb, c + r * ldc + j0, ldc, m);
        for (; r < rows; ++r)
            ember_att_block(1, depth, a + r * ars, ars, acs, b + j0, ldb, c + r * ldc + j0, ldc, m);
    }
}
#else
static void ember_att_gemm(int64_t rows, int64_t cols, int64_t depth, const float *a,
                           int64_t ars, int64_t acs, const float *b, int64_t ldb, float *c,
                           int64_t ldc) {
    for (int64_t r = 0; r < rows; ++r) {
        float *restrict cr = c + r * ldc;
        for (int64_t k = 0; k < depth; ++k) {
            const float x = a[r * ars + k * acs];
            const float *restrict bk = b + k * ldb;
            #pragma omp simd
            for (int64_t j = 0; j < cols; ++j) cr[j] += x * bk[j];
        }
    }
}
#endif

/* s[r][j] = a[r] . key j of the tile (n keys, row-major in `keys`; kt: the tile transposed,
   zero past its keys, or NULL). */
static void ember_att_dots(int64_t rows, int64_t n, int64_t depth, const float *a,
                           const float *keys, const float *bt, float *s) {
    if (!bt) {
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < n; ++j) {
                const float *restrict ar = a + r * depth, *restrict kj = keys + j * depth;
                float sum = 0.0f;
                #pragma omp simd reduction(+:sum)
                for (int64_t c = 0; c < depth; ++c) sum += ar[c] * kj[c];
                s[r * EMBER_ATT_BK + j] = sum;
            }
        return;
    }
    memset(s, 0, (size_t)(rows * EMBER_ATT_BK) * sizeof(float));
    ember_att_gemm(rows, EMBER_ATT_BK, depth, a, depth, 1, bt, EMBER_ATT_BK, s, EMBER_ATT_BK);
}

/* The scores of a tile, keys [j0, j0 + n): qs . k, plus an additive mask, -inf where the
   query may not see the key (causal, boolean mask). Keys past kv_len are not in the tile. */
static void ember_att_scores(const ember_att *p, const ember_att_io *io, int64_t b, int64_t h,
                             int64_t i0, int64_t nrow, int64_t j0, int64_t n,
                             ember_att_scratch *w) {
    const int64_t rows = p->group * nrow, offset = ember_att_offset(p, io, b);
    ember_att_dots(rows, n, p->dim, w->qs, w->k_tile, w->k_cols, w->s);
    for (int64_t r = 0; r < rows; ++r) {
        float *restrict s = w->s + r * EMBER_ATT_BK;
        const int64_t i = i0 + r % nrow;
        if (p->mask) {
            const int64_t at = ember_att_mask_at(p, b, h * p->group + r / nrow, i)
                               + j0 * p->mask_col;
            if (p->mask == 1) {
                const uint8_t *m = (const uint8_t *)io->mask + at;
                for (int64_t j = 0; j < n; ++j) if (!m[j * p->mask_col]) s[j] = -INFINITY;
            } else {
                for (int64_t j = 0; j < n; ++j) {
                    float add;
                    ember_att_load(&add, io->mask, at + j * p->mask_col, 1, p->dtype, 1.0f);
                    s[j] += add;
                }
            }
        }
        if (p->causal)  /* keys after the row's position: j0 + j > offset + i */
            for (int64_t j = ember_att_max(offset + i - j0 + 1, 0); j < n; ++j) s[j] = -INFINITY;
    }
}

/* Where the transposed key tile starting at key j0 of head h of batch b is in the array
   ember_att_key_columns fills: tiles of [dim][BK] floats, in key order per (batch, head). */
static int64_t ember_att_column_tile(const ember_att *p, int64_t b, int64_t h, int64_t j0) {
    const int64_t tiles = (p->src + EMBER_ATT_BK - 1) / EMBER_ATT_BK;
    return ((b * p->heads + h) * tiles + j0 / EMBER_ATT_BK) * p->dim * EMBER_ATT_BK;
}

/* The online softmax of one work item over keys [k0, k1): the state (m, l, acc) of its
   rows, acc unnormalised, each row's maximum m (-inf before any visible key) and sum l.
   `cols`: every key tile of the problem transposed (ember_att_key_columns), or NULL for
   few rows, which read the keys as they are. */
static void ember_att_forward_part(const ember_att *p, const ember_att_io *io, int64_t b,
                                   int64_t h, int64_t i0, int64_t nrow, int64_t k0, int64_t k1,
                                   float *state, int64_t capacity, const float *cols,
                                   ember_att_scratch *w) {
    const int64_t rows = p->group * nrow;
    float *m = state, *l = state + capacity, *acc = state + 2 * capacity;
    for (int64_t r = 0; r < rows; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
    memset(acc, 0, (size_t)(rows * p->vdim) * sizeof(float));
    if (k0 >= k1) return;
    ember_att_query_tile(p, io, NULL, b, h, i0, nrow, w, 0);
    for (int64_t j0 = k0; j0 < k1; j0 += EMBER_ATT_BK) {
        const int64_t n = ember_att_min(EMBER_ATT_BK, k1 - j0);
        if (cols) {
            w->k_cols = cols + ember_att_column_tile(p, b, h, j0);
        } else {
            w->k_tile = ember_att_key_tile(p, io->k, p->dim, b, h, j0, n, w->keys, NULL);
            w->k_cols = NULL;
        }
        w->v_tile = ember_att_key_tile(p, io->v, p->vdim, b, h, j0, n, w->values, NULL);
        ember_att_scores(p, io, b, h, i0, nrow, j0, n, w);
        for (int64_t r = 0; r < rows; ++r) {
            float *restrict s = w->s + r * EMBER_ATT_BK;
            float top = m[r], sum = 0.0f;
            #pragma omp simd reduction(max:top)
            for (int64_t j = 0; j < n; ++j) top = s[j] > top ? s[j] : top;
            const float shift = isinf(top) ? 0.0f : top;  /* no visible key yet: p = 0 */
            #pragma omp simd reduction(+:sum)
            for (int64_t j = 0; j < n; ++j) { s[j] = expf(s[j] - shift); sum += s[j]; }
            const float rescale = expf(m[r] - shift);  /* 0 while m is -inf */
            if (rescale != 1.0f)
                for (int64_t e = 0; e < p->vdim; ++e) acc[r * p->vdim + e] *= rescale;
            l[r] = l[r] * rescale + sum;
            m[r] = top;
        }
        ember_att_gemm(rows, p->vdim, n, w->s, EMBER_ATT_BK, 1, w->v_tile, p->vdim, acc,
                       p->vdim);  /* acc += p v */
    }
}

/* Every visible key tile transposed into `cols` (zero past kv_len), once per call, shared by
   the query tiles of the forward: each query tile would otherwise transpose every key tile
   it reads again (a sixth of a prefill's attention). Run by every thread of a parallel
   region (ends with its barrier). */
static void ember_att_key_columns(const ember_att *p, const ember_att_io *io, float *cols,
                                  ember_att_scratch *w) {
    const int64_t tiles = (p->src + EMBER_ATT_BK - 1) / EMBER_ATT_BK;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < p->batch * p->heads * tiles; ++t) {
        const int64_t b = t / (p->heads * tiles), h = t / tiles % p->heads;
        const int64_t j0 = t % tiles * EMBER_ATT_BK;
        const int64_t n = ember_att_min(EMBER_ATT_BK, ember_att_end(p, io, b, p->length) - j0);
        if (n > 0)
            ember_att_key_tile(p, io->k, p->dim, b, h, j0, n, w->keys,
                               cols + ember_att_column_tile(p, b, h, j0));
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
        for (int64_t e = 0; e < p->vdim; ++e) row[e] = 0.0f;
        for (int64_t s = 0; s < splits; ++s) {
            const float *state = first + s * stride;
            const float weight = expf(state[r] - shift);
            if (weight == 0.0f) continue;
            total += state[capacity + r] * weight;
            const float *acc = state + 2 * capacity + r * p->vdim;
            for (int64_t e = 0; e < p->vdim; ++e) row[e] += acc[e] * weight;
        }
        const int64_t at = (b * p->heads * p->group + h * p->group + r / nrow) * p->length
                           + i0 + r % nrow;
        if (total > 0.0f) {
            for (int64_t e = 0; e < p->vdim; ++e) row[e] /= total;
            lse[at] = shift + logf(total);
        } else {  /* a row that sees no key: zeros, lse -inf */
            lse[at] = -INFINITY;
        }
        ember_att_store(out, at * p->vdim, row, p->vdim, p->dtype);
    }
}

/* out, lse of attention: work items (batch, key/value head, query tile), each split into
   chunks of keys when there are too few items to keep the threads busy; the chunks' states
   are merged per row. */
void ember_attention_forward(const ember_att *p, const ember_att_io *io, void *out,
                             float *lse) {
    const int64_t bq = ember_att_min(EMBER_ATT_BQ, p->length);
    const int64_t tiles = (p->length + bq - 1) / bq, items = p->batch * p->heads * tiles;
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
    float *states = (float *)malloc((size_t)(items * splits * stride) * sizeof(float));
    /* Many rows per tile: the key tiles transposed once, shared (a multiple of 64 bytes). */
    const int64_t key_tiles = (p->src + EMBER_ATT_BK - 1) / EMBER_ATT_BK;
    float *cols = NULL;
    if (ember_att_transposed(p, states) && key_tiles > 0)
        cols = (float *)aligned_alloc(64, (size_t)(p->batch * p->heads * key_tiles * p->dim
                                                   * EMBER_ATT_BK) * sizeof(float));
    #pragma omp parallel if (work > EMBER_ATT_PARALLEL_MIN)
    {
        ember_att_scratch w;
        float *block = ember_att_scratch_new(p, &w);
        if (cols) ember_att_key_columns(p, io, cols, &w);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < items * splits; ++t) {
            const int64_t item = t / splits, k0 = t % splits * chunk;
            const int64_t b = item / (p->heads * tiles), h = item / tiles % p->heads;
            const int64_t i0 = item % tiles * bq, nrow = ember_att_min(bq, p->length - i0);
            const int64_t k1 = ember_att_min(k0 + chunk, ember_att_end(p, io, b, i0 + nrow));
            ember_att_forward_part(p, io, b, h, i0, nrow, k0, k1, states + t * stride,
                                   capacity, cols, &w);
        }
        #pragma omp for
        for (int64_t item = 0; item < items; ++item) {
            const int64_t b = item / (p->heads * tiles), h = item / tiles % p->heads;
            const int64_t i0 = item % tiles * bq, nrow = ember_att_min(bq, p->length - i0);
            ember_att_merge(p, states + item * splits * stride, splits, stride, capacity, b, h,
                            i0, nrow, w.row, out, lse);
        }
        free(block);
    }
    free(states);
    free(cols);
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

/* A tile's probabilities p = exp(s - lse), in place of the scores, and the gradients of its
   scores ds = p (dout v^T - delta), in place of dp (flash attention's backward: p is
   recomputed from lse, never stored). */
static void ember_att_backward_tile(const ember_att *p, const ember_att_io *io, int64_t b,
                                    int64_t h, int64_t i0, int64_t nrow, int64_t j0,
                                    int64_t n, ember_att_scratch *w) {
    const int64_t rows = p->group * nrow;
    ember_att_scores(p, io, b, h, i0, nrow, j0, n, w);
    ember_att_dots(rows, n, p->vdim, w->dout, w->v_tile, ember_att_transposed(p, w->vt), w->dp);
    for (int64_t r = 0; r < rows; ++r) {
        float *restrict s = w->s + r * EMBER_ATT_BK, *restrict dp = w->dp + r * EMBER_ATT_BK;
        const float lse = w->lse[r], delta = w->delta[r];
        #pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
            const float pj = expf(s[j] - lse);
            s[j] = pj;
            dp[j] = pj > 0.0f ? pj * (dp[j] - delta) : 0.0f;
        }
    }
}

/* The gradients from keys [j0, j0 + BK) of head h: their dk and dv, summed over every query
   row that sees them (zero past kv_len), and, when dq_acc is not NULL, those rows' dq terms
   from these keys (added to dq_acc, float, [batch, heads * group, length, dim], unscaled). */
static void ember_att_key_grads(const ember_att *p, const ember_att_io *io, const float *delta,
                                int64_t b, int64_t h, int64_t j0, void *dk, void *dv,
                                float *dq_acc, ember_att_scratch *w) {
    const int64_t n = ember_att_max(0, ember_att_min(EMBER_ATT_BK,
                                                     ember_att_kv_len(p, io, b) - j0));
    const int64_t width = ember_att_min(EMBER_ATT_BK, p->src - j0);
    const int64_t bq = ember_att_min(EMBER_ATT_BQ, p->length);
    memset(w->dk, 0, (size_t)(width * p->dim) * sizeof(float));
    memset(w->dv, 0, (size_t)(width * p->vdim) * sizeof(float));
    if (n > 0) {
        w->k_tile = ember_att_key_tile(p, io->k, p->dim, b, h, j0, n, w->keys,
                                       ember_att_transposed(p, w->kt));
        w->k_cols = ember_att_transposed(p, w->kt);
        w->v_tile = ember_att_key_tile(p, io->v, p->vdim, b, h, j0, n, w->values,
                                       ember_att_transposed(p, w->vt));
        /* Causal: rows before the tile's first key's position see none of it. */
        const int64_t first = p->causal ? ember_att_max(0, j0 - ember_att_offset(p, io, b)) : 0;
        for (int64_t i0 = first / bq * bq; i0 < p->length; i0 += bq) {
            const int64_t nrow = ember_att_min(bq, p->length - i0);
            ember_att_query_tile(p, io, delta, b, h, i0, nrow, w, 1);
            ember_att_backward_tile(p, io, b, h, i0, nrow, j0, n, w);
            const int64_t rows = p->group * nrow;  /* dv += p^T dout, dk += ds^T (q scale) */
            ember_att_gemm(n, p->vdim, rows, w->s, 1, EMBER_ATT_BK, w->dout, p->vdim, w->dv,
                           p->vdim);
            ember_att_gemm(n, p->dim, rows, w->dp, 1, EMBER_ATT_BK, w->qs, p->dim, w->dk, p->dim);
            for (int64_t g = 0; dq_acc && g < p->group; ++g) {  /* dq += ds k, head by head */
                const int64_t head_row = (b * p->heads * p->group + h * p->group + g)
                                         * p->length + i0;
                ember_att_gemm(nrow, p->dim, n, w->dp + g * nrow * EMBER_ATT_BK, EMBER_ATT_BK,
                               1, w->k_tile, p->dim, dq_acc + head_row * p->dim, p->dim);
            }
        }
    }
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
    float *delta = (float *)malloc((size_t)rows * sizeof(float));
    float *partial = dq ? (float *)calloc((size_t)(runs * rows * p->dim), sizeof(float)) : NULL;
    #pragma omp parallel if (work > EMBER_ATT_PARALLEL_MIN)
    {
        ember_att_scratch w;
        float *block = ember_att_scratch_new(p, &w);
        #pragma omp for
        for (int64_t r = 0; r < rows; ++r) delta[r] = ember_att_delta(p, io, r, w.row);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < pairs * runs; ++t) {
            const int64_t run = t % runs, b = t / (p->heads * runs), h = t / runs % p->heads;
            for (int64_t tile = run; tile < key_tiles; tile += runs)
                ember_att_key_grads(p, io, delta, b, h, tile * EMBER_ATT_BK, dk, dv,
                                    partial ? partial + run * rows * p->dim : NULL, &w);
        }
        if (dq) {
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
    free(partial);
    free(delta);
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
