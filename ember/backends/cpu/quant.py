"""C for products with quantised weights: ``quant_matmul`` and ``dequantize`` on GGUF blocks.

A packed weight ``W [N, K]`` is ``N`` rows of GGUF blocks (``ember.ops.quantized``); the
kernels here read those bytes as they are, never a float32 copy of the whole matrix:

- **Few rows of activations** (decode; up to ``BLAS_ROWS``): ``W`` is streamed once per
  ``DIRECT_ROWS`` rows. OpenMP splits the output rows across cores in long runs of
  consecutive rows (a product under ``SERIAL_BYTES`` stays on one core: waking another costs
  more than it saves); each block is decoded into vector registers (float32 values equal to the
  reference decoder's) and multiplied into float32 accumulators, a pair per activation row,
  while the bytes ``PREFETCH_BYTES`` ahead are requested. Decode streams every weight byte
  exactly once per token, so the stream must never wait on memory. The adjoint (``g @ W``)
  splits the columns instead, so two threads never add into the same output.
- **Many rows** (prefill, training): ``W`` is cut into pieces along its rows (its block
  columns for the adjoint) that OpenMP's threads take (decision 0016: BLAS is single-threaded);
  a thread decodes panels of its piece into a small float32 buffer (``PANEL_BYTES``, cache
  sized) and hands each to ``cblas_sgemm``. Above ``BLAS_ROWS`` rows BLAS beats re-streaming
  ``W`` (measured).
- ``dequantize`` (the rows an embedding gathers) decodes into its result.

Results: activations stay float32 (decision 0014: no 8-bit activations), the decoded weights
are bitwise the reference's, so the only difference from "dequantise, then multiply" is the
order of the float32 sums. x in other dtypes declines (None), and runs through NumPy.

The C is layered so that every format is written once: a 16-lane vector layer (``ev_*`` for
floats, ``ei_*`` for 32-bit integers) in AVX-512, AVX2 or portable C, picked by
``EMBER_QUANT_SIMD`` (512, 256 or 0; by default the best the compiler targets); one decoder
per format on top of it, mirroring the NumPy decoders of ``ember.io.quants``; and one kernel
template per operation, instantiated per format. A format's kernels, for every row count, are
compiled once per machine into a kernel library (:func:`kernels`) that programs link.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ember.backends.cpu.lowerings import PIECE_ALIGN, Statement, piece_step
from ember.backends.cpu.toolchain import KernelLibrary
from ember.io.quants import FORMATS, BlockFormat
from ember.ir.graph import Eqn
from ember.ops.quantized import dequantize_p, quant_matmul_p

__all__ = ["BLAS_ROWS", "DIRECT_ROWS", "PANEL_BYTES", "PREFETCH_BYTES", "SERIAL_BYTES",
           "helpers"]

# Rows of activations one pass of the direct kernel multiplies (its accumulators stay in
# registers); more rows take several passes, each reading W again (from cache).
DIRECT_ROWS = 8
# Rows of activations above which panels of W go to BLAS instead (measured: at 32 rows the
# two cost the same; BLAS is 1.5x faster at 128).
BLAS_ROWS = 32
# Bytes of the float32 panel of decoded W rows that BLAS multiplies (fits in L2).
PANEL_BYTES = 1 << 20
# How far ahead of the block it decodes the direct kernel asks for W (measured on SmolLM2's
# decode: 2 to 8 KiB ahead are alike; without it the stream waits on memory, 1.3x slower).
PREFETCH_BYTES = 2048
# Bytes of W (times rows of x) below which the direct kernel runs on one thread: waking a
# passive OpenMP thread (decision 0016) costs about 45 us on this project's VM, the time one
# core takes to stream and multiply about this much.
SERIAL_BYTES = 1 << 18

SIMD = r"""
#include <stdlib.h>
#ifndef EMBER_QUANT_SIMD
#  if defined(__AVX512F__)
#    define EMBER_QUANT_SIMD 512
#  elif defined(__AVX2__) && defined(__FMA__)
#    define EMBER_QUANT_SIMD 256
#  else
#    define EMBER_QUANT_SIMD 0
#  endif
#endif
#if EMBER_QUANT_SIMD || defined(__F16C__)
#include <immintrin.h>
#endif

/* 16 lanes of float32 (ember_vf) and of int32 (ember_vi): the vector layer every block
   decoder and kernel below is written against. ev_lookup(idx, table): lane l is
   table[idx[l] & 15] (one permute in AVX-512): 4-bit codes become values by looking them up
   in the block's 16 possible values, cheaper than converting and scaling each code. */
#if EMBER_QUANT_SIMD == 512
typedef __m512 ember_vf;
typedef __m512i ember_vi;
static inline ember_vf ev_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void ev_store(float *p, ember_vf v) { _mm512_storeu_ps(p, v); }
static inline ember_vf ev_set1(float a) { return _mm512_set1_ps(a); }
static inline ember_vf ev_add(ember_vf a, ember_vf b) { return _mm512_add_ps(a, b); }
static inline ember_vf ev_sub(ember_vf a, ember_vf b) { return _mm512_sub_ps(a, b); }
static inline ember_vf ev_mul(ember_vf a, ember_vf b) { return _mm512_mul_ps(a, b); }
static inline ember_vf ev_fma(ember_vf a, ember_vf b, ember_vf c) {
    return _mm512_fmadd_ps(a, b, c); }
static inline float ev_sum(ember_vf v) { return _mm512_reduce_add_ps(v); }
static inline ember_vi ei_u8(const uint8_t *p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline ember_vi ei_i8(const uint8_t *p) {
    return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline ember_vi ei_bits(ember_vi v, int shift, int mask) {
    return _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(shift)),
                            _mm512_set1_epi32(mask)); }
static inline ember_vi ei_shl(ember_vi v, int shift) {
    return _mm512_sll_epi32(v, _mm_cvtsi32_si128(shift)); }
static inline ember_vi ei_add(ember_vi a, ember_vi b) { return _mm512_add_epi32(a, b); }
static inline ember_vf ei_float(ember_vi v) { return _mm512_cvtepi32_ps(v); }
static inline ember_vf ev_iota(void) {
    return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
static inline ember_vf ev_lookup(ember_vi idx, ember_vf table) {
    return _mm512_permutexvar_ps(idx, table); }
#elif EMBER_QUANT_SIMD == 256
typedef struct { __m256 lo, hi; } ember_vf;
typedef struct { __m256i lo, hi; } ember_vi;
#define EMBER_PAIR(T, a, b) ((T){a, b})
static inline ember_vf ev_load(const float *p) {
    return EMBER_PAIR(ember_vf, _mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
static inline void ev_store(float *p, ember_vf v) {
    _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
static inline ember_vf ev_set1(float a) {
    return EMBER_PAIR(ember_vf, _mm256_set1_ps(a), _mm256_set1_ps(a)); }
static inline ember_vf ev_add(ember_vf a, ember_vf b) {
    return EMBER_PAIR(ember_vf, _mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)); }
static inline ember_vf ev_sub(ember_vf a, ember_vf b) {
    return EMBER_PAIR(ember_vf, _mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)); }
static inline ember_vf ev_mul(ember_vf a, ember_vf b) {
    return EMBER_PAIR(ember_vf, _mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)); }
static inline ember_vf ev_fma(ember_vf a, ember_vf b, ember_vf c) {
    return EMBER_PAIR(ember_vf, _mm256_fmadd_ps(a.lo, b.lo, c.lo),
                      _mm256_fmadd_ps(a.hi, b.hi, c.hi)); }
static inline float ev_sum(ember_vf v) {
    __m256 s = _mm256_add_ps(v.lo, v.hi);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))); }
static inline ember_vi ei_u8(const uint8_t *p) {
    return EMBER_PAIR(ember_vi, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)),
                      _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))); }
static inline ember_vi ei_i8(const uint8_t *p) {
    return EMBER_PAIR(ember_vi, _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)),
                      _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))); }
static inline ember_vi ei_bits(ember_vi v, int shift, int mask) {
    __m128i s = _mm_cvtsi32_si128(shift); __m256i m = _mm256_set1_epi32(mask);
    return EMBER_PAIR(ember_vi, _mm256_and_si256(_mm256_srl_epi32(v.lo, s), m),
                      _mm256_and_si256(_mm256_srl_epi32(v.hi, s), m)); }
static inline ember_vi ei_shl(ember_vi v, int shift) {
    __m128i s = _mm_cvtsi32_si128(shift);
    return EMBER_PAIR(ember_vi, _mm256_sll_epi32(v.lo, s), _mm256_sll_epi32(v.hi, s)); }
static inline ember_vi ei_add(ember_vi a, ember_vi b) {
    return EMBER_PAIR(ember_vi, _mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)); }
static inline ember_vf ei_float(ember_vi v) {
    return EMBER_PAIR(ember_vf, _mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)); }
static inline ember_vf ev_iota(void) {
    return EMBER_PAIR(ember_vf, _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                      _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15)); }
static inline __m256 ember_lookup8(__m256i idx, ember_vf t) {  /* bit 3 picks the half */
    __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx),
                            _mm256_permutevar8x32_ps(t.hi, idx), high); }
static inline ember_vf ev_lookup(ember_vi idx, ember_vf table) {
    return EMBER_PAIR(ember_vf, ember_lookup8(idx.lo, table), ember_lookup8(idx.hi, table)); }
#elif EMBER_QUANT_SIMD == 0
typedef struct { float f[16]; } ember_vf;
typedef struct { int32_t i[16]; } ember_vi;
#define EMBER_LANES(T, expr) { T r; for (int l = 0; l < 16; ++l) r.expr; return r; }
static inline ember_vf ev_load(const float *p) EMBER_LANES(ember_vf, f[l] = p[l])
static inline void ev_store(float *p, ember_vf v) { memcpy(p, v.f, sizeof v.f); }
static inline ember_vf ev_set1(float a) EMBER_LANES(ember_vf, f[l] = a)
static inline ember_vf ev_add(ember_vf a, ember_vf b) EMBER_LANES(ember_vf, f[l] = a.f[l] + b.f[l])
static inline ember_vf ev_sub(ember_vf a, ember_vf b) EMBER_LANES(ember_vf, f[l] = a.f[l] - b.f[l])
static inline ember_vf ev_mul(ember_vf a, ember_vf b) EMBER_LANES(ember_vf, f[l] = a.f[l] * b.f[l])
static inline ember_vf ev_fma(ember_vf a, ember_vf b, ember_vf c)
    EMBER_LANES(ember_vf, f[l] = fmaf(a.f[l], b.f[l], c.f[l]))
static inline float ev_sum(ember_vf v) {
    float s = 0.0f; for (int l = 0; l < 16; ++l) s += v.f[l]; return s; }
static inline ember_vi ei_u8(const uint8_t *p) EMBER_LANES(ember_vi, i[l] = p[l])
static inline ember_vi ei_i8(const uint8_t *p) EMBER_LANES(ember_vi, i[l] = (int8_t)p[l])
static inline ember_vi ei_bits(ember_vi v, int shift, int mask)
    EMBER_LANES(ember_vi, i[l] = (v.i[l] >> shift) & mask)
static inline ember_vi ei_shl(ember_vi v, int shift) EMBER_LANES(ember_vi, i[l] = v.i[l] << shift)
static inline ember_vi ei_add(ember_vi a, ember_vi b) EMBER_LANES(ember_vi, i[l] = a.i[l] + b.i[l])
static inline ember_vf ei_float(ember_vi v) EMBER_LANES(ember_vf, f[l] = (float)v.i[l])
static inline ember_vf ev_iota(void) EMBER_LANES(ember_vf, f[l] = (float)l)
static inline ember_vf ev_lookup(ember_vi idx, ember_vf table)
    EMBER_LANES(ember_vf, f[l] = table.f[idx.i[l] & 15])
#else
#error "EMBER_QUANT_SIMD must be 512, 256 or 0"
#endif

/* Ask the cache for the line `ahead` bytes past p. A prefetch never faults, so it may run
   past the end of W (the address is computed as an integer, never as a pointer out of W). */
static inline void ember_prefetch(const uint8_t *p, int64_t ahead) {
    __builtin_prefetch((const void *)((uintptr_t)p + (uintptr_t)ahead)); }

/* The float16 scale stored at p, as float32 (exact). */
static inline float ember_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__) && EMBER_QUANT_SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | man << 13;            /* inf, NaN */
    else if (exp) bits = sign | (exp + 112) << 23 | man << 13;        /* normal */
    else if (!man) bits = sign;                                        /* zero */
    else {                                                             /* subnormal */
        uint32_t shifts = 0;
        while (!(man & 0x400)) { man <<= 1; ++shifts; }
        bits = sign | (113 - shifts) << 23 | (man & 0x3FF) << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* The two float16 values at p (4 bytes), each broadcast to a vector. */
static inline void ev_halves(const uint8_t *p, ember_vf *a, ember_vf *b) {
#if EMBER_QUANT_SIMD == 512
    int32_t pair;
    memcpy(&pair, p, 4);  /* one broadcast load, one conversion, two in-lane copies */
    __m512 both = _mm512_cvtph_ps(_mm256_set1_epi32(pair));
    *a = _mm512_moveldup_ps(both);
    *b = _mm512_movehdup_ps(both);
#else
    *a = ev_set1(ember_half(p));
    *b = ev_set1(ember_half(p + 2));
#endif
}
"""

# One decoder per format: ``ember_decode_<fmt>(block, w)`` writes the block's ``block / 16``
# vectors of float32 values, computed as the NumPy decoder of ``ember.io.quants`` computes them
# (same operations in the same order), so they are bitwise the reference's.
DECODERS = {
    "q8_0": r"""
/* q8_0: d (f16), 32 int8 codes; value = d * q. */
static inline void ember_decode_q8_0(const uint8_t *b, ember_vf *w) {
    ember_vf d, unused;
    ev_halves(b, &d, &unused);
    w[0] = ev_mul(d, ei_float(ei_i8(b + 2)));
    w[1] = ev_mul(d, ei_float(ei_i8(b + 18)));
}
""",
    "q4_0": r"""
/* q4_0: d (f16), 16 bytes: elements 0..15 in the low nibbles, 16..31 in the high ones;
   value = d * (q - 8), looked up among the block's 16 values. */
static inline void ember_decode_q4_0(const uint8_t *b, ember_vf *w) {
    ember_vf d, unused;
    ev_halves(b, &d, &unused);
    ember_vf values = ev_mul(d, ev_sub(ev_iota(), ev_set1(8.0f)));
    ember_vi q = ei_u8(b + 2);
    w[0] = ev_lookup(q, values);
    w[1] = ev_lookup(ei_bits(q, 4, 15), values);
}
""",
    "q4_1": r"""
/* q4_1: d, m (f16), 16 bytes of nibbles as q4_0; value = d * q + m, looked up. */
static inline void ember_decode_q4_1(const uint8_t *b, ember_vf *w) {
    ember_vf d, m;
    ev_halves(b, &d, &m);
    ember_vf values = ev_add(ev_mul(d, ev_iota()), m);
    ember_vi q = ei_u8(b + 4);
    w[0] = ev_lookup(q, values);
    w[1] = ev_lookup(ei_bits(q, 4, 15), values);
}
""",
    "q4_k": r"""
/* q4_k: d, dmin (f16), 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles.
   Sub-block s (32 elements) has value = (d * scale_s) * q - (dmin * min_s); the 32 bytes of
   group g hold sub-block 2g in their low nibbles and 2g + 1 in their high ones. */
static inline void ember_decode_q4_k(const uint8_t *b, ember_vf *w) {
    float d = ember_half(b), dmin = ember_half(b + 2);
    const uint8_t *s = b + 4, *qs = b + 16;
    for (int sub = 0; sub < 8; ++sub) {
        int j = sub & 3, sc, mn;
        if (sub < 4) { sc = s[j] & 63; mn = s[j + 4] & 63; }
        else {
            sc = (s[j + 8] & 0x0F) | (s[j] >> 6) << 4;
            mn = (s[j + 8] >> 4) | (s[j + 4] >> 6) << 4;
        }
        ember_vf values = ev_sub(ev_mul(ev_set1(d * (float)sc), ev_iota()),
                                 ev_set1(dmin * (float)mn));
        const uint8_t *group = qs + (sub >> 1) * 32;
        int shift = (sub & 1) * 4;
        for (int h = 0; h < 2; ++h)
            w[2 * sub + h] = ev_lookup(ei_bits(ei_u8(group + 16 * h), shift, 15), values);
    }
}
""",
    "q6_k": r"""
/* q6_k: 128 bytes ql (low 4 bits), 64 bytes qh (top 2 bits), 16 int8 scales, d (f16).
   Two halves of 128 elements, each four runs r of 32: element l of run r takes the low (r < 2)
   or high nibble of ql byte (r & 1) * 32 + l and bits 2r, 2r + 1 of qh byte l; value =
   (d * scale) * (q - 32), one scale per 16 elements. */
static inline void ember_decode_q6_k(const uint8_t *b, ember_vf *w) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    float d = ember_half(b + 208);
    ember_vf bias = ev_set1(32.0f);
    for (int half = 0; half < 2; ++half)
        for (int r = 0; r < 4; ++r)
            for (int t = 0; t < 2; ++t) {
                ember_vi lo = ei_bits(ei_u8(ql + half * 64 + (r & 1) * 32 + 16 * t),
                                      (r >> 1) * 4, 15);
                ember_vi hi = ei_bits(ei_u8(qh + half * 32 + 16 * t), 2 * r, 3);
                ember_vf q = ev_sub(ei_float(ei_add(lo, ei_shl(hi, 4))), bias);
                int v = half * 8 + r * 2 + t;
                w[v] = ev_mul(ev_set1(d * (float)scales[v]), q);
            }
}
""",
}

# The kernels, one instance per format: $F is the format, $B its block elements, $BB its
# block bytes, $V = $B / 16 vectors per block.
_DIRECT = r"""
/* y[m, n] = sum_k x[m, k] W[n, k] for the $M rows of x: W ($F rows) is read once, each block
   decoded into registers and multiplied into a pair of accumulators per row of x. */
void ember_qmv_$F_m$M(int64_t N, int64_t K, const float *x, const uint8_t *w, float *y) {
    const int64_t blocks = K / $B;
    /* Guided chunks: each thread starts on a long run of consecutive rows (half of them,
       then half of the rest...), one stream that prefetching keeps ahead of, and the shrinking
       chunks at the end still let a thread that lost its core on a busy machine leave its
       rows to the others instead of holding up the whole product. */
    #pragma omp parallel for schedule(guided) if (N * blocks * $BB * $M >= $SERIAL)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *row = w + n * blocks * $BB;
        ember_vf acc[$M][2];
        for (int m = 0; m < $M; ++m) acc[m][0] = acc[m][1] = ev_set1(0.0f);
        for (int64_t b = 0; b < blocks; ++b) {
            ember_vf v[$V];
            ember_prefetch(row + b * $BB, $PREFETCH);
            ember_decode_$F(row + b * $BB, v);
            for (int m = 0; m < $M; ++m)
                for (int j = 0; j < $V; ++j)
                    acc[m][j & 1] = ev_fma(v[j], ev_load(x + m * K + b * $B + 16 * j),
                                           acc[m][j & 1]);
        }
        for (int m = 0; m < $M; ++m) y[m * N + n] = ev_sum(ev_add(acc[m][0], acc[m][1]));
    }
}

/* y[m, k] = sum_n g[m, n] W[n, k] for the $M rows of g: each thread owns a run of block
   columns and walks the rows of W over it, adding into its own part of y. */
void ember_qmvt_$F_m$M(int64_t N, int64_t K, const float *g, const uint8_t *w,
                       float *y) {
    const int64_t blocks = K / $B;
    memset(y, 0, sizeof(float) * $M * K);
    #pragma omp parallel
    {
        int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
        for (int64_t n = 0; n < N; ++n) {
            const uint8_t *row = w + n * blocks * $BB;
            ember_vf scale[$M];
            for (int m = 0; m < $M; ++m) scale[m] = ev_set1(g[m * N + n]);
            for (int64_t b = b0; b < b1; ++b) {
                ember_vf v[$V];
                ember_decode_$F(row + b * $BB, v);
                for (int m = 0; m < $M; ++m)
                    for (int j = 0; j < $V; ++j) {
                        float *out = y + m * K + b * $B + 16 * j;
                        ev_store(out, ev_fma(scale[m], v[j], ev_load(out)));
                    }
            }
        }
    }
}
"""

_ROWS = r"""
/* Decode blocks b0 .. b1 of `rows` packed $F rows (K values each) into float32 rows of
   (b1 - b0) * $B values: a panel of whole rows, or of the columns one piece of an adjoint
   product owns. */
static void ember_decode_blocks_$F(int64_t rows, int64_t K, int64_t b0, int64_t b1,
                                   const uint8_t *w, float *out) {
    const int64_t blocks = K / $B, width = (b1 - b0) * $B;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = b0; b < b1; ++b) {
            ember_vf v[$V];
            ember_decode_$F(w + (r * blocks + b) * $BB, v);
            for (int j = 0; j < $V; ++j) ev_store(out + r * width + (b - b0) * $B + 16 * j, v[j]);
        }
}

/* Decode `rows` packed $F rows into float32 rows of K values (dequantize), rows across threads. */
void ember_decode_rows_$F(int64_t rows, int64_t K, const uint8_t *w, float *out) {
    const int64_t row_bytes = K / $B * $BB;
    #pragma omp parallel for schedule(static) if (rows * K >= 32768)
    for (int64_t r = 0; r < rows; ++r)
        ember_decode_blocks_$F(1, K, 0, K / $B, w + r * row_bytes, out + r * K);
}
"""

_PANELS = r"""
/* Many rows of x: W is cut into pieces (rows of W, the columns of y; or, for the adjoint, block
   columns of W, the columns of y too), which OpenMP's threads take. A thread decodes panels of
   its piece ($PANEL bytes, so they stay in cache, rows from K alone) into its own buffer and
   multiplies each by single-threaded BLAS. Not adjoint: y[:, n0:n0+P] = x @ panel^T. Adjoint:
   y[:, piece] += g[:, n0:n0+P] @ panel, in the same order on any number of threads. */
void ember_qmm_$F(int adjoint, int64_t M, int64_t N, int64_t K, const float *x,
                  const uint8_t *w, float *y, int64_t step) {
    int64_t P = $PANEL / (K * (int64_t)sizeof(float));
    P = P < 16 ? 16 : P > N ? N : P;
    const int64_t row_bytes = K / $B * $BB, extent = adjoint ? K : N;
    const int64_t pieces = (extent + step - 1) / step;
    #pragma omp parallel if (pieces > 1)
    {
        float *panel = aligned_alloc(64, (size_t)(P * K * sizeof(float) + 63) / 64 * 64);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < pieces; ++p) {
            const int64_t lo = p * step, hi = lo + step < extent ? lo + step : extent;
            if (adjoint)
                for (int64_t n0 = 0; n0 < N; n0 += P) {
                    const int64_t rows = N - n0 < P ? N - n0 : P, width = hi - lo;
                    ember_decode_blocks_$F(rows, K, lo / $B, hi / $B, w + n0 * row_bytes,
                                           panel);
                    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, width,
                                      rows, 1.0f, x + n0, N, panel, width, n0 ? 1.0f : 0.0f,
                                      y + lo, K);
                }
            else
                for (int64_t n0 = lo; n0 < hi; n0 += P) {
                    const int64_t rows = hi - n0 < P ? hi - n0 : P;
                    ember_decode_blocks_$F(rows, K, 0, K / $B, w + n0 * row_bytes, panel);
                    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, rows, K,
                                      1.0f, x, K, panel, K, 0.0f, y + n0, N);
                }
        }
        free(panel);
    }
}
"""


def _instance(template: str, fmt: BlockFormat, m: int = 0) -> str:
    """``template`` for format ``fmt`` (and ``m`` rows of activations)."""
    subs = {"$PANEL": str(PANEL_BYTES), "$PREFETCH": str(PREFETCH_BYTES),
            "$SERIAL": str(SERIAL_BYTES), "$BB": str(fmt.block_bytes), "$B": str(fmt.block),
            "$V": str(fmt.block // 16), "$M": str(m), "$F": fmt.name}
    for key, value in subs.items():  # "$BB" before "$B"
        template = template.replace(key, value)
    return template


def helpers(fmt: str, m: int) -> tuple[str, ...]:
    """The C definitions, in order, of the kernels for format ``fmt`` and ``m`` rows of
    activations: ``ember_qmv_<fmt>_m<r>`` and ``ember_qmvt_<fmt>_m<r>`` (the direct kernels
    for ``r`` rows: ``DIRECT_ROWS`` and the remainder) up to ``BLAS_ROWS`` rows, else
    ``ember_qmm_<fmt>``, which calls BLAS; always ``ember_decode_rows_<fmt>``."""
    f = FORMATS[fmt]
    if m > BLAS_ROWS:
        return (*_decode_rows(fmt), _instance(_PANELS, f))
    passes = [DIRECT_ROWS] * (m >= DIRECT_ROWS) + [m % DIRECT_ROWS] * bool(m % DIRECT_ROWS)
    return (*_decode_rows(fmt), *(_instance(_DIRECT, f, r) for r in passes))


def _decode_rows(fmt: str) -> tuple[str, ...]:
    """The C definitions up to ``ember_decode_rows_<fmt>``."""
    return SIMD, DECODERS[fmt], _instance(_ROWS, FORMATS[fmt])


# The C library headers the kernels use (BLAS's for the panels).
_INCLUDES = ("#include <stdint.h>\n#include <string.h>\n#include <math.h>\n#include <omp.h>\n"
             "#include <cblas.h>\n")


@functools.cache
def kernels(fmt: str) -> KernelLibrary:
    """Every kernel of format ``fmt``, for any row count, as a library compiled once per
    machine: the direct kernels for 1 to ``DIRECT_ROWS`` rows (each still specialised to its
    row count, so its accumulators stay in registers), the BLAS panels and the decoder."""
    rows = (*range(1, DIRECT_ROWS + 1), BLAS_ROWS + 1)
    definitions = dict.fromkeys(c for m in rows for c in helpers(fmt, m))
    return KernelLibrary(_INCLUDES + "\n".join(definitions), uses_blas=True)


def _calls(fmt: str, emit: Callable[[Sequence[str], Sequence[str]], str]) -> Statement:
    """A statement that calls the kernels of ``fmt`` (declared in the program, linked)."""
    return Statement(emit, (kernels(fmt).prototypes,), links=(kernels(fmt),))


def panel_step(fmt: str, adjoint: bool, m: int, n: int, k: int) -> int:
    """Rows of W (block columns' values, for the adjoint) per piece of ``ember_qmm_<fmt>``:
    pieces as BLAS products have (``lowerings.piece_step``), always along W, so no two threads
    decode the same blocks; an adjoint piece is whole blocks."""
    if adjoint:
        return piece_step(k, m * n * k, math.lcm(FORMATS[fmt].block, PIECE_ALIGN))
    return piece_step(n, m * n * k)


def _zeros(eqn: Eqn) -> Statement:
    nbytes = eqn.outputs[0].aval.size * eqn.outputs[0].aval.dtype.itemsize
    return Statement(lambda outs, ins: f"memset({outs[0]}, 0, {nbytes}); /* nothing to sum */")


def _quant_matmul(eqn: Eqn) -> Statement | None:
    x, w = eqn.inputs[0].aval, eqn.inputs[1].aval
    fmt, adjoint = eqn.params["format"], eqn.params["adjoint"]
    if x.dtype != np.float32 or fmt not in DECODERS:
        return None
    n, k = w.shape[0], FORMATS[fmt].row_elements(w.shape[1])
    m = math.prod(x.shape[:-1])
    if (n if adjoint else k) == 0:
        return _zeros(eqn)
    if m > BLAS_ROWS:
        step = panel_step(fmt, adjoint, m, n, k)

        def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
            return (f"ember_qmm_{fmt}({int(adjoint)}, {m}, {n}, {k}, (const float *){ins[0]}, "
                    f"(const uint8_t *){ins[1]}, (float *){outs[0]}, {step});")
        return replace(_calls(fmt, emit), uses_blas=True)
    kernel = f"ember_qmv{'t' if adjoint else ''}_{fmt}_m"
    inner, outer = (n, k) if adjoint else (k, n)
    full, rest = divmod(m, DIRECT_ROWS)

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        x, w, y = f"(const float *){ins[0]}", f"(const uint8_t *){ins[1]}", f"(float *){outs[0]}"
        passes = []
        if full:
            passes.append(f"for (int64_t c = 0; c < {full}; ++c) {kernel}{DIRECT_ROWS}("
                          f"{n}, {k}, {x} + c * {DIRECT_ROWS * inner}, {w}, "
                          f"{y} + c * {DIRECT_ROWS * outer});")
        if rest:
            at = full * DIRECT_ROWS
            passes.append(f"{kernel}{rest}({n}, {k}, {x} + {at * inner}, {w}, {y} + {at * outer});")
        return "{ " + " ".join(passes) + " }"
    return _calls(fmt, emit)


def _dequantize(eqn: Eqn) -> Statement | None:
    w = eqn.inputs[0].aval
    fmt = eqn.params["format"]
    if fmt not in DECODERS:
        return None
    rows, k = math.prod(w.shape[:-1]), FORMATS[fmt].row_elements(w.shape[-1])

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        return (f"ember_decode_rows_{fmt}({rows}, {k}, (const uint8_t *){ins[0]}, "
                f"(float *){outs[0]});")
    return _calls(fmt, emit)


quant_matmul_p.def_lowering("c", _quant_matmul)
dequantize_p.def_lowering("c", _dequantize)
