"""ember's own float32 matrix product for products with many rows (prefill, training).

BLAS in pieces (``lowerings.piece_step``, decision 0016) packs the operand the pieces share once
per piece: up to 16 times per product. This kernel packs each operand once per call
(decision 0018), in the classic Goto/BLIS shape:

- **Packing.** ``A`` ([M, K], rows or columns contiguous, any leading dimension) is copied into
  panels of ``MR`` rows, each stored k-major (``MR`` values per k), by all threads; ``B`` ([K,
  N], either layout) in runs of up to ``B_PANELS`` panels of ``NR`` columns (k-major, ``NR``
  values per k) by the thread that then uses them, into its own buffer. Row-contiguous
  operands (``x @ W.T``'s ``W``, ``x`` itself) are transposed 16 x 16 in registers. Each
  operand is packed once per call when ``K`` is at most ``KC`` and ``A`` packs into
  ``A_BLOCK_BYTES`` (SmolLM2's products); otherwise ``B`` once per block of ``A``.
- **Micro-kernel.** ``MR`` x ``NR`` = 14 x 32 results in 28 AVX-512 registers: per k two vector
  loads of the ``B`` panel, 14 broadcasts of the ``A`` panel, 28 fused multiply-adds; the k
  loop unrolled by 4.
- **Blocking.** K in equal blocks of at most ``KC`` steps, in order; within one, ``A`` in
  blocks of whole panels; each thread takes an even, contiguous share of ``B``'s panels,
  cut into runs (up to 256 columns of the result), and each ``A`` panel in turn meets every
  panel of a run, so it is read from L2, not L3.
- **Determinism.** Every result element is one chain of fused multiply-adds over k in order
  0 .. K-1, started at zero: a later K block reloads the float32 partial sums from the result
  and continues the chain (the same bits as unbroken). The threads split only the columns,
  never k, so results are the same bits on any thread count.

Products that share their left operand (q, k, v; gate and up) run as one call
(``ember_sgemm_packed_shared``, ``call_shared``; ``program._shared_left_operands`` finds them):
``A`` packed once, the segments' panels dealt to the threads as one column range.

AVX-512 only (``available``; ``lowerings._packed_gemm`` decides which products come
here): other CPUs, float64 and batched products stay on BLAS.
"""

from __future__ import annotations

from ember.backends.cpu import toolchain
from ember.backends.cpu.toolchain import KernelLibrary

# Register tile: 14 rows x 32 columns = 28 zmm accumulators, 2 loads of B, 1 broadcast of A.
# The micro-kernel's k loop, measured (one thread, interleaved with the same kernel unchanged
# in one process, best of 40 calls each, thread CPU time, the machine shared; SmolLM2's shapes
# 512 x {1536, 576, 192} x 576, 512 x 576 x 1536 and 1024 x 576 x 1536): unrolled 2 or 4 steps
# 4-12% faster on every shape (sum of the five 29.2-34.6 ms against 30.8-38.3, over four
# runs; 8 steps no better), kept at 4. Not kept: prefetching B 256, 512 or 1024 floats ahead
# (alone 3-6% faster, with the unrolled loop 1-3% slower than without), prefetching the C tile
# before the k loop (within noise). Two threads could not be measured apart from the other
# processes' load (the same calls took 1x-3x).
MR, NR = 14, 32
# B panels a thread packs at once (a run, up to 8 x 32 columns, at most RUN_BYTES unless one
# panel is larger), then multiplies by each A panel in turn: the A panel is read from L2 up to
# 8 times, not from L3 once per B panel. The contracted axis is cut into equal blocks of at
# most KC steps; A is packed in blocks of A_BLOCK_BYTES (whole panels), each multiplied by all
# of B before the next is packed, so memory stays bounded for a tall A (a vocabulary's
# gradient). Measured against one OpenBLAS call, one thread, SmolLM2's shapes (M x N x K
# 1024 x 576 x {1536, 4096, 49152}): KC 1024 0.96x on all three; 2048 0.93, 0.86, 0.84x; K
# uncut 0.94, 0.77, 0.32x; 256-step blocks with A in 512 KiB blocks 0.86-0.88x.
B_PANELS = 8
RUN_BYTES = 2 << 20
KC = 1024
A_BLOCK_BYTES = 8 << 20
# Multiply-adds below which a product runs on the calling thread alone: waking a passive OpenMP
# thread costs tens of microseconds (as for BLAS pieces, ``lowerings.PIECE_WORK``).
THREADED_WORK = 1 << 21

_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#include <immintrin.h>
#ifndef __AVX512F__
#error "ember's packed GEMM needs AVX-512 (gemm.available checks the CPU first)"
#endif

enum { MR = $MR, NR = $NR, B_PANELS = $B_PANELS, RUN_BYTES = $RUN_BYTES,
       A_BLOCK_BYTES = $A_BLOCK_BYTES, KC = $KC, THREADED_WORK = $THREADED };

/* 16 x 16 transpose in registers: lane j of v[i] becomes lane i of v[j]. */
static inline __attribute__((always_inline)) void ember_gemm_transpose16(__m512 v[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
        for (int j = 0; j < 2; ++j) {
            __m512d lo = _mm512_castps_pd(t[i + j]), hi = _mm512_castps_pd(t[i + j + 2]);
            v[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
            v[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
        }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; ++j) {
            t[i + j] = _mm512_shuffle_f32x4(v[i + j], v[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_f32x4(v[i + j], v[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; ++j) {
        v[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        v[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

/* The first n lanes (0 .. 16). */
static inline __mmask16 ember_gemm_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

/* dst[k * width + i] = src[i * ld + k] for i < n (n <= 16), k < K; lanes `keep` of each
   16-wide store are written (zeros for n <= i): rows of src become columns. */
static void ember_gemm_pack_transposed(int64_t n, int64_t K, const float *src, int64_t ld,
                                       float *dst, int64_t width, __mmask16 keep) {
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const __mmask16 valid = ember_gemm_lanes(K - k0);
        __m512 v[16];
        for (int i = 0; i < 16; ++i)
            v[i] = i < n ? _mm512_maskz_loadu_ps(valid, src + i * ld + k0) : _mm512_setzero_ps();
        ember_gemm_transpose16(v);
        const int64_t steps = K - k0 < 16 ? K - k0 : 16;
        for (int64_t j = 0; j < steps; ++j)
            _mm512_mask_storeu_ps(dst + (k0 + j) * width, keep, v[j]);
    }
}

/* One panel of `width` (MR or NR) lanes: dst[k * width + i] = src[i * si + k * sk] for i < n,
   zero for n <= i < width. One of si, sk is 1 (lowerings._matrix's layouts). */
static void ember_gemm_pack(int64_t n, int64_t K, const float *src, int64_t si, int64_t sk,
                            float *dst, int64_t width) {
    if (sk == 1) {          /* each i a contiguous row over k: transposed 16 x 16 */
        for (int64_t c = 0; c < width; c += 16)
            ember_gemm_pack_transposed(n - c, K, src + c * si, si, dst + c, width,
                                       ember_gemm_lanes(width - c));
    } else {                /* si == 1, each k a contiguous row over i: copied */
        for (int64_t k = 0; k < K; ++k)
            for (int64_t c = 0; c < width; c += 16)
                _mm512_mask_storeu_ps(dst + k * width + c, ember_gemm_lanes(width - c),
                                      _mm512_maskz_loadu_ps(ember_gemm_lanes(n - c),
                                                            src + k * sk + c));
    }
}

/* C[rows, cols] (rows <= MR, cols <= NR) = (go_on ? C : 0) + a-panel x b-panel over K steps:
   each element one chain of fused multiply-adds in k order, from zero; go_on continues the
   chain of an earlier block of k (its float32 sums reloaded: the same bits as unbroken). */
static inline __attribute__((always_inline)) void ember_gemm_tile(
        int64_t K, const float *a, const float *b, float *c, int64_t ldc, int rows, int cols,
        int go_on) {
    const __mmask16 m0 = ember_gemm_lanes(cols), m1 = ember_gemm_lanes(cols - 16);
    __m512 acc[MR][2];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
        acc[r][0] = go_on && r < rows ? _mm512_maskz_loadu_ps(m0, c + r * ldc)
                                      : _mm512_setzero_ps();
        acc[r][1] = go_on && r < rows ? _mm512_maskz_loadu_ps(m1, c + r * ldc + 16)
                                      : _mm512_setzero_ps();
    }
    /* Unrolled 4 steps: the loop's own instructions (counter, two pointers, branch) are a
       tenth of its 28 FMAs' 14 cycles (measured: the comment by MR in gemm.py). */
#pragma GCC unroll 4
    for (int64_t k = 0; k < K; ++k) {
        const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
            const __m512 ar = _mm512_set1_ps(a[r]);
            acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
        }
        a += MR;
        b += NR;
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
        if (r < rows) {
            _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
            _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
        }
}

/* One run: B's panels j0 .. j1 (k steps k0 .. k0 + steps) packed into `run`, then multiplied
   by each packed A panel p0 .. p1 in turn: an A panel stays in L1/L2 while the run's B panels
   stream past it (L2). */
static void ember_gemm_run(int64_t M, int64_t N, int64_t k0, int64_t steps, int64_t kc,
                           const float *a_block, int64_t p0, int64_t p1, const float *B,
                           int64_t b_row, int64_t b_col, int64_t j0, int64_t j1, float *run,
                           float *C, int64_t ldc) {
    for (int64_t j = j0; j < j1; ++j) {
        const int64_t cols = N - j * NR < NR ? N - j * NR : NR;
        ember_gemm_pack(cols, steps, B + j * NR * b_col + k0 * b_row, b_col, b_row,
                        run + (j - j0) * NR * kc, NR);
    }
    for (int64_t i = p0; i < p1; ++i) {
        const int rows = M - i * MR < MR ? (int)(M - i * MR) : MR;
        for (int64_t j = j0; j < j1; ++j)
            ember_gemm_tile(steps, a_block + (i - p0) * MR * kc, run + (j - j0) * NR * kc,
                            C + i * MR * ldc + j * NR, ldc, rows,
                            N - j * NR < NR ? (int)(N - j * NR) : NR, k0 > 0);
    }
}

/* Products that share their left operand (q, k and v of one x; an MLP's gate and up):
   C_s[M, N_s] (row stride ldc_s) = A[M, K] B_s[K, N_s] for s < count. Element (i, k) of A at
   A[i * a_row + k * a_col], (k, j) of B_s at B_s[k * b_row_s + j * b_col_s]; a_row or a_col
   is 1, and b_row_s or b_col_s. A is packed once for all; the segments' panels, in order, are
   one column range dealt evenly to the threads (6 panels of k next to 18 of q balance where
   alone they would not). Every element's bits are those of its product alone. */
void ember_sgemm_packed_shared(int64_t M, int64_t K, const float *A, int64_t a_row,
                               int64_t a_col, int count, const float *const *B,
                               const int64_t *N, const int64_t *b_row, const int64_t *b_col,
                               float *const *C, const int64_t *ldc) {
    int64_t b_panels = 0, columns = 0;
    for (int s = 0; s < count; ++s) {
        b_panels += (N[s] + NR - 1) / NR;
        columns += N[s];
    }
    const int64_t a_panels = (M + MR - 1) / MR;
    /* K in equal blocks of at most KC steps, in order (one block up to KC). */
    const int64_t k_blocks = (K + KC - 1) / KC, kc = (K + k_blocks - 1) / k_blocks;
    /* A's packed block: at most A_BLOCK_BYTES of whole panels (at least one). */
    const int64_t fit_a = A_BLOCK_BYTES / (MR * kc * (int64_t)sizeof(float));
    const int64_t block = fit_a < 1 ? 1 : fit_a < a_panels ? fit_a : a_panels;
    /* Each thread a contiguous share of the panels (sizes differing by at most one); its part
       of each segment cut into runs of even sizes, at most run_panels each (RUN_BYTES, at
       least one panel). Dealt up front, not taken in turn: runs of 4, 5, 4, 5 panels taken
       dynamically left two threads 8 and 10 of N = 576's 18. Which thread sums an element
       never changes its bits. */
    const int threads = M * columns * K >= THREADED_WORK ? omp_get_max_threads() : 1;
    const int64_t fit_b = RUN_BYTES / (NR * kc * (int64_t)sizeof(float));
    const int64_t run_panels = fit_b < 1 ? 1 : fit_b > B_PANELS ? B_PANELS : fit_b;
    /* One allocation: A's block, then each thread's run (both parts multiples of 16 floats,
       so every panel starts 64-byte aligned). */
    const size_t a_floats = ((size_t)block * MR * kc + 15) / 16 * 16;
    const size_t run_floats = (size_t)run_panels * NR * kc;
    float *scratch = aligned_alloc(64, (a_floats + threads * run_floats) * sizeof(float));
    if (!scratch) {
        fprintf(stderr, "ember: out of memory for a %lld x %lld x %lld product's packed "
                "operands\n", (long long)M, (long long)columns, (long long)K);
        abort();
    }
    #pragma omp parallel num_threads(threads)
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t steps = K - k0 < kc ? K - k0 : kc;
        for (int64_t p0 = 0; p0 < a_panels; p0 += block) {
            const int64_t p1 = p0 + block < a_panels ? p0 + block : a_panels;
            #pragma omp for schedule(static)
            for (int64_t p = p0; p < p1; ++p) {
                const int64_t rows = M - p * MR < MR ? M - p * MR : MR;
                ember_gemm_pack(rows, steps, A + p * MR * a_row + k0 * a_col, a_row, a_col,
                                scratch + (p - p0) * MR * kc, MR);
            }
            float *run = scratch + a_floats + omp_get_thread_num() * run_floats;
            #pragma omp for schedule(static)
            for (int64_t share = 0; share < threads; ++share) {
                const int64_t g0 = share * b_panels / threads;
                const int64_t g1 = (share + 1) * b_panels / threads;
                /* Segment s holds panels first .. first + its own of the whole range. */
                for (int64_t s = 0, first = 0; s < count && first < g1;
                     first += (N[s] + NR - 1) / NR, ++s) {
                    const int64_t last = first + (N[s] + NR - 1) / NR;
                    const int64_t lo = g0 > first ? g0 - first : 0;
                    const int64_t size = (g1 < last ? g1 - first : last - first) - lo;
                    if (size <= 0)
                        continue;
                    const int64_t runs = (size + run_panels - 1) / run_panels;
                    for (int64_t r = 0; r < runs; ++r)
                        ember_gemm_run(M, N[s], k0, steps, kc, scratch, p0, p1, B[s],
                                       b_row[s], b_col[s], lo + r * size / runs,
                                       lo + (r + 1) * size / runs, run, C[s], ldc[s]);
                }
            }  /* the implied barrier: A's next block may overwrite this one */
        }
    }
    free(scratch);
}

/* C[M, N] (row stride ldc) = A[M, K] B[K, N]: one product, a segment of its own. */
void ember_sgemm_packed(int64_t M, int64_t N, int64_t K, const float *A, int64_t a_row,
                        int64_t a_col, const float *B, int64_t b_row, int64_t b_col, float *C,
                        int64_t ldc) {
    ember_sgemm_packed_shared(M, K, A, a_row, a_col, 1, &B, &N, &b_row, &b_col, &C, &ldc);
}
"""

# Built once per machine (decision 0017); programs declare ``ember_sgemm_packed`` and link it.
KERNELS = KernelLibrary(
    _SOURCE.replace("$MR", str(MR)).replace("$NR", str(NR)).replace("$B_PANELS", str(B_PANELS))
    .replace("$RUN_BYTES", str(RUN_BYTES)).replace("$A_BLOCK_BYTES", str(A_BLOCK_BYTES))
    .replace("$KC", str(KC)).replace("$THREADED", str(THREADED_WORK)))


def available() -> bool:
    """Whether this CPU runs the kernel (AVX-512; the library is built with -march=native)."""
    return "avx512f" in toolchain.cpu_features().split()


def call(m: int, n: int, k: int, a: tuple[bool, int], b: tuple[bool, int],
         lhs: str, rhs: str, out: str) -> str:
    """C calling the kernel for ``out[m, n] = lhs[m, k] @ rhs[k, n]``, each operand given as
    ``lowerings._matrix`` describes it: (stored transposed, leading dimension)."""
    (ta, lda), (tb, ldb) = a, b
    a_row, a_col = (1, lda) if ta else (lda, 1)
    b_row, b_col = (1, ldb) if tb else (ldb, 1)
    return (f"ember_sgemm_packed({m}, {n}, {k}, (const float *){lhs}, {a_row}, {a_col}, "
            f"(const float *){rhs}, {b_row}, {b_col}, (float *){out}, {max(1, n)});")


def call_shared(m: int, k: int, a: tuple[bool, int], lhs: str,
                products: list[tuple[int, tuple[bool, int], str, str]]) -> str:
    """C calling the kernel once for products that share ``lhs[m, k]``: each ``(n, b's layout,
    rhs, out)`` computes ``out[m, n] = lhs @ rhs[k, n]`` (the same bits as alone)."""
    ta, lda = a
    a_row, a_col = (1, lda) if ta else (lda, 1)

    def array(ctype: str, values: list) -> str:
        return f"({ctype}[]){{{', '.join(map(str, values))}}}"
    b_rows = [1 if tb else ldb for _, (tb, ldb), _, _ in products]
    b_cols = [ldb if tb else 1 for _, (tb, ldb), _, _ in products]
    columns = [n for n, _, _, _ in products]
    return (f"ember_sgemm_packed_shared({m}, {k}, (const float *){lhs}, {a_row}, {a_col}, "
            f"{len(products)}, {array('const float *const', [r for _, _, r, _ in products])}, "
            f"{array('const int64_t', columns)}, {array('const int64_t', b_rows)}, "
            f"{array('const int64_t', b_cols)}, "
            f"{array('float *const', [f'(float *){o}' for _, _, _, o in products])}, "
            f"{array('const int64_t', [max(1, n) for n in columns])});")
