"""C for the equations the program generator emits itself: contractions and indexing.

Fused elementwise/reduction groups are rendered as kernels by ``kernels.py``; what is left for
this module is the work that is not a loop nest over one iteration domain: matrix products
(handed to BLAS, with strides instead of copies, cut into pieces that OpenMP's threads take:
``piece_step``, decision 0016), and reads and writes at computed positions
(``dynamic_slice``, ``dynamic_update_slice``, ``gather``, ``scatter``). A float32 product with
few rows of activations against a weight stored as rows (``x @ W.T``, decode) runs in a kernel of
this module instead of BLAS (``GEMV_MIN_ROWS`` to ``GEMV_ROWS``), one with more rows in ember's
packed GEMM on AVX-512 CPUs (``gemm.py``, ``_packed_gemm``). Each rule is registered
on its primitive as ``prim.def_lowering("c", rule)`` and called as ``rule(eqn)``; it returns a
:class:`Statement` or None when this instance is not supported (a dtype without a C rule): the
program then runs that equation through NumPy.

Index semantics follow the primitives' NumPy implementations exactly (starts clamped so the
window fits, gather indices clamped, scatter updates outside the operand dropped), so results
are bitwise those of the reference, except matrix products, whose summation order is BLAS's
or the kernel's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ember.backends.cpu import gemm
from ember.backends.cpu.kernels import c_type
from ember.backends.cpu.toolchain import KernelLibrary
from ember.ir.graph import Eqn
from ember.ops.indexing import gather_p, scatter_p
from ember.ops.linalg import dot_general_p
from ember.ops.structural import dynamic_slice_p, dynamic_update_slice_p


@dataclass(frozen=True)
class Statement:
    """How one equation runs in C.

    ``emit(outs, ins)`` returns the C code, given a ``void *`` C expression for each output
    and input; ``helpers`` are shared C definitions it calls (emitted once per translation
    unit); ``links``: the kernel libraries whose functions it calls (``helpers`` declare them;
    the program links them); ``writes_over`` lists ``(output, input)`` positions where the
    output may be stored over the input when that input dies here (the code then works
    whether or not the two pointers are equal).
    """

    emit: Callable[[Sequence[str], Sequence[str]], str]
    helpers: tuple[str, ...] = ()
    writes_over: tuple[tuple[int, int], ...] = ()
    uses_blas: bool = False
    links: tuple[KernelLibrary, ...] = ()
    # Computes the next ``covers`` equations' outputs as well (``program.lower`` puts them
    # right after this one): ``emit`` gets the outputs, then the inputs, of all of them in turn.
    covers: int = 0


# The dtypes this module does arithmetic in (scatter-add) and reads indices of; everything else
# moves bytes and needs only the item size. Their C names come from ``kernels.c_type``.
_ARITH = frozenset(map(np.dtype, ("float32", "float64", "int32", "int64")))
_INDEX = frozenset(map(np.dtype, ("int8", "int16", "int32", "int64",
                                  "uint8", "uint16", "uint32", "uint64")))
_INT_MAX = 2**31 - 1  # the BLAS interface takes 32-bit sizes


def _strides(shape: Sequence[int]) -> list[int]:
    """Row-major element strides."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def _longs(values: Sequence[int]) -> str:
    return "{" + ", ".join(f"{int(v)}" for v in values) + ("}" if values else "0}")


def _read_index(pointer: str, dtype: np.dtype) -> str:
    return f"(int64_t)*(const {c_type(dtype)} *)({pointer})"


# --- copies of rectangular windows ---------------------------------------------------------

_COPY_BOX = r"""
/* Copy a box of size[] elements between row-major arrays, starting at dst_at[] in dst (of
   shape dst_shape[]) and src_at[] in src; the innermost axis is one memcpy. */
static void ember_copy_box(int rank, const int64_t *size, int64_t item,
                           char *dst, const int64_t *dst_shape, const int64_t *dst_at,
                           const char *src, const int64_t *src_shape, const int64_t *src_at) {
    int64_t total = 1, idx[16] = {0};
    for (int d = 0; d < rank; ++d) total *= size[d];
    if (total == 0) return;
    if (rank == 0) { memcpy(dst, src, item); return; }
    int64_t run = size[rank - 1] * item;
    for (;;) {
        int64_t di = 0, si = 0;
        for (int d = 0; d < rank; ++d) {
            int64_t last = d == rank - 1 ? 0 : idx[d];
            di = di * dst_shape[d] + dst_at[d] + last;
            si = si * src_shape[d] + src_at[d] + last;
        }
        memcpy(dst + di * item, src + si * item, run);
        int d = rank - 2;
        while (d >= 0 && ++idx[d] == size[d]) idx[d--] = 0;
        if (d < 0) return;
    }
}
"""


def _clamped_starts(starts: Sequence[str], dtypes_: Sequence[np.dtype], limits: Sequence[int]
                    ) -> str:
    """C initialiser of the starts clamped to ``[0, limit]`` (the primitives' rule)."""
    parts = []
    for s, dt, hi in zip(starts, dtypes_, limits):
        v = _read_index(s, dt)
        parts.append(f"{v} < 0 ? 0 : {v} > {hi} ? {hi} : {v}")
    return "{" + ", ".join(parts) + "}" if parts else "{0}"


def _box_ok(eqn: Eqn) -> bool:
    return (eqn.outputs[0].aval.ndim <= 16
            and all(a.aval.dtype in _INDEX for a in eqn.inputs[2 if _is_dus(eqn) else 1:]))


def _is_dus(eqn: Eqn) -> bool:
    return eqn.prim is dynamic_update_slice_p


def _dynamic_slice(eqn: Eqn) -> Statement | None:
    if not _box_ok(eqn):
        return None
    x = eqn.inputs[0].aval
    sizes = eqn.params["sizes"]
    starts_t = [a.aval.dtype for a in eqn.inputs[1:]]

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        starts = _clamped_starts(ins[1:], starts_t, [n - k for n, k in zip(x.shape, sizes)])
        return (f"{{ const int64_t size[] = {_longs(sizes)}, shape[] = {_longs(x.shape)}, "
                f"zero[16] = {{0}};\n  const int64_t at[] = {starts};\n"
                f"  ember_copy_box({x.ndim}, size, {x.dtype.itemsize}, (char *){outs[0]}, size,"
                f" zero, (const char *){ins[0]}, shape, at); }}")
    return Statement(emit, (_COPY_BOX,))


def _copy_unless_same(out: str, x: str, nbytes: int) -> str:
    """The operand's data into the result, skipped when the plan stored one over the other."""
    return f"if ({out} != {x}) memcpy({out}, {x}, {nbytes});"


def _dynamic_update_slice(eqn: Eqn) -> Statement | None:
    if not _box_ok(eqn):
        return None
    x, u = eqn.inputs[0].aval, eqn.inputs[1].aval
    starts_t = [a.aval.dtype for a in eqn.inputs[2:]]
    nbytes = x.size * x.dtype.itemsize

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        starts = _clamped_starts(ins[2:], starts_t, [n - k for n, k in zip(x.shape, u.shape)])
        return (f"{{ {_copy_unless_same(outs[0], ins[0], nbytes)}\n"
                f"  const int64_t size[] = {_longs(u.shape)}, shape[] = {_longs(x.shape)}, "
                f"zero[16] = {{0}};\n  const int64_t at[] = {starts};\n"
                f"  ember_copy_box({x.ndim}, size, {x.dtype.itemsize}, (char *){outs[0]}, shape,"
                f" at, (const char *){ins[1]}, size, zero); }}")
    return Statement(emit, (_COPY_BOX,), writes_over=((0, 0),))


# --- gather and scatter ----------------------------------------------------------------------

def _index_loop(eqn: Eqn, body: Callable[[str], str], clamp: bool) -> Callable[..., str]:
    """Code looping over the index vectors of a gather/scatter: ``off`` is the element offset
    of the selected block in the operand; out-of-range components are clamped (gather) or
    skip the vector (scatter)."""
    operand, indices = eqn.inputs[0].aval, eqn.inputs[1].aval
    k = indices.shape[-1]
    count = indices.size // k if k else int(np.prod(indices.shape[:-1], dtype=np.int64))
    strides = _strides(operand.shape)
    ctype = c_type(indices.dtype)

    def emit(idx: str) -> str:
        lines = [f"for (int64_t b = 0; b < {count}; ++b) {{", "    int64_t off = 0;"]
        for j in range(k):
            n = operand.shape[j]
            lines.append(f"    {{ int64_t i = (int64_t)(({ctype} const *)({idx}))[b * {k} + {j}];")
            if clamp:
                lines.append(f"      i = i < 0 ? 0 : i > {n - 1} ? {n - 1} : i;")
            else:
                lines.append(f"      if (i < 0 || i >= {n}) continue;")
            lines.append(f"      off += i * {strides[j] if j < len(strides) else 1}; }}")
        lines.append("    " + body("b"))
        lines.append("}")
        return "\n  ".join(lines)
    return emit


def _gather(eqn: Eqn) -> Statement | None:
    operand, indices = eqn.inputs[0].aval, eqn.inputs[1].aval
    if indices.dtype not in _INDEX:
        return None
    k = indices.shape[-1]
    item = operand.dtype.itemsize
    block = math.prod(operand.shape[k:]) * item

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        loop = _index_loop(eqn, lambda b: f"memcpy((char *){outs[0]} + {b} * {block}, "
                           f"(const char *){ins[0]} + off * {item}, {block});", clamp=True)
        return "{ " + loop(ins[1]) + " }"
    return Statement(emit)


def _scatter(eqn: Eqn) -> Statement | None:
    operand, indices = eqn.inputs[0].aval, eqn.inputs[1].aval
    mode = eqn.params["mode"]
    if indices.dtype not in _INDEX or mode not in ("set", "add"):
        return None
    if mode == "add" and operand.dtype not in _ARITH:
        return None
    k = indices.shape[-1]
    n = math.prod(operand.shape[k:])
    item = operand.dtype.itemsize
    nbytes = operand.size * item

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        if mode == "set":
            body = lambda b: (f"memcpy((char *){outs[0]} + off * {item}, "  # noqa: E731
                              f"(const char *){ins[2]} + {b} * {n * item}, {n * item});")
        else:
            t = c_type(operand.dtype)
            body = lambda b: (f"for (int64_t e = 0; e < {n}; ++e) "  # noqa: E731
                              f"(({t} *){outs[0]})[off + e] += "
                              f"((const {t} *){ins[2]})[{b} * {n} + e];")
        loop = _index_loop(eqn, body, clamp=False)
        return f"{{ {_copy_unless_same(outs[0], ins[0], nbytes)}\n  {loop(ins[1])} }}"
    return Statement(emit, writes_over=((0, 0),))


# --- matrix products -------------------------------------------------------------------------

def _group(shape: Sequence[int], strides: Sequence[int], axes: Sequence[int]
           ) -> tuple[int, int | None] | None:
    """Axes ``axes`` (in that order) merged into one: (size, element stride), the stride None
    when the size is at most 1; None when they are not evenly spaced in memory."""
    kept = [a for a in axes if shape[a] != 1]
    size = math.prod(shape[a] for a in axes)
    if size <= 1 or not kept:
        return size, None
    for a, b in zip(kept, kept[1:]):
        if strides[a] != strides[b] * shape[b]:
            return None
    return size, strides[kept[-1]]


def _matrix(rows: tuple[int, int | None], cols: tuple[int, int | None]
            ) -> tuple[bool, int] | None:
    """A row-major BLAS operand for a [rows, cols] matrix with these strides: (transposed,
    leading dimension), or None when neither layout fits."""
    (r, sr), (c, sc) = rows, cols
    if sc in (None, 1) and (sr is None or sr >= max(1, c)):
        return False, sr if sr is not None else max(1, c)
    if sr in (None, 1) and (sc is None or sc >= max(1, r)):
        return True, sc if sc is not None else max(1, r)
    return None


_BLAS = {np.dtype(np.float32): ("s", "float", "f"), np.dtype(np.float64): ("d", "double", "")}

# --- one thread pool: BLAS products cut into pieces for OpenMP's threads --------------------
# OpenBLAS runs single-threaded (``ember_init``): a second pool of threads, spinning between its
# calls, would fight OpenMP's for the cores. A product with enough work is cut into pieces
# along the larger of its result's rows and columns, and OpenMP's threads take the pieces, each
# one single-threaded BLAS call. The pieces depend on the shape only, never on the thread
# count, and the contracted axis is never cut, so every element is summed by the same call on
# 1 thread or 16: results are the same bits whatever ``EMBER_NUM_THREADS`` is.

# Multiply-adds of one piece: a product with less than two pieces' work is one call on the
# calling thread. Measured on 2 idle cores with passive OpenMP threads, per jit call of one
# product: 64 x 256 x 256 (4 M) 1.3x faster on two threads, 128 x 576 x 576 1.2x; 1 M products
# (64 x 64 x 256, 64 x 256 x 64) gain nothing, waking a thread costs what the second core saves.
PIECE_WORK = 1 << 20
# At most this many pieces (a power of two, so 2, 4, 8 or 16 threads share them evenly): each
# piece packs again the operand it shares with the others, so fewer, larger pieces cost less.
MAX_PIECES = 16
# Pieces start at multiples of this many rows or columns: whole register tiles of OpenBLAS's
# kernels (16 x 4 floats on AVX-512) and whole 64-byte lines of the result.
PIECE_ALIGN = 16


def piece_step(extent: int, work: int, align: int = PIECE_ALIGN) -> int:
    """Rows (or columns) per piece when a product of ``work`` multiply-adds is cut along an
    axis of ``extent``: a multiple of ``align``, or ``extent`` itself (one piece)."""
    wanted = min(MAX_PIECES, work // PIECE_WORK, -(-extent // align))
    if wanted < 2:
        return extent
    pieces = 1 << (wanted.bit_length() - 1)
    return min(extent, -(-extent // (pieces * align)) * align)


_PIECE = r"""
/* One piece of C = op(A) op(B) (+ beta C), a row-major [M, N] result: rows (by_rows) or columns
   lo .. lo + step of it, in one single-threaded BLAS call; one row of A is a matrix-vector
   product. The caller runs the pieces on OpenMP's threads. */
static void ember_$Pgemm_piece(int ta, int tb, int by_rows, int64_t lo, int64_t step,
                               int64_t M, int64_t N, int64_t K, const $T *A, int64_t lda,
                               const $T *B, int64_t ldb, $T beta, $T *C, int64_t ldc) {
    const int64_t extent = by_rows ? M : N, size = extent - lo < step ? extent - lo : step;
    if (by_rows) { A += ta ? lo : lo * lda; C += lo * ldc; M = size; }
    else { B += tb ? lo * ldb : lo; C += lo; N = size; }
    if (M == 1)
        scipy_cblas_$Pgemv(CblasRowMajor, tb ? CblasNoTrans : CblasTrans, tb ? N : K,
                           tb ? K : N, 1, B, ldb, A, ta ? lda : 1, beta, C, 1);
    else
        scipy_cblas_$Pgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
                           tb ? CblasTrans : CblasNoTrans, M, N, K, 1, A, lda, B, ldb, beta,
                           C, ldc);
}
"""


def blas_piece_helper(dtype: np.dtype) -> str:
    """The C of ``ember_<s|d>gemm_piece`` (for ``uses_blas`` statements)."""
    prefix, ctype, _ = _BLAS[np.dtype(dtype)]
    return _PIECE.replace("$P", prefix).replace("$T", ctype)


def parallel_pieces(tasks: int) -> str:
    """The OpenMP line before a loop over ``tasks`` pieces (none for one): threads take pieces
    as they finish, so a thread that loses its core to another process delays only its own."""
    return "#pragma omp parallel for schedule(dynamic, 1)\n  " if tasks > 1 else ""


# Rows of float32 activations for which ``x @ W.T`` runs in the kernel below, not in BLAS:
# GEMV_MIN_ROWS to GEMV_ROWS. Measured on SmolLM2's shapes (576..49152 x 576..1536, 1 and 2
# threads, W streamed from memory): at 2 to 8 rows BLAS (sgemm) reads W at 5-8 GB/s, the
# kernel at 8-15 (it reads W once). One row alone streams W as fast in BLAS's sgemv as here
# (12 GB/s a core); it takes the kernel too, for the threshold below: sgemv pieces are cut by
# multiply-adds, as compute-bound products are, which leaves SmolLM2's 1536 x 576 products of a
# decode step on one thread (decode on 2 shared cores, back to back: 17.1 and 19.5 tok/s with
# the kernel, 14.2 and 12.9 with sgemv pieces).
GEMV_MIN_ROWS = 1
GEMV_ROWS = 8
# Elements of W below which the kernel runs on one thread. OpenMP threads that spin between
# parallel regions (``toolchain._openmp_wait_policy``, on idle cores) wake at once, and a second
# core pays from 64K elements: SmolLM2 decode, its 576 x 576 and 192 x 576 products on two
# threads instead of one, 29.3 and 30.8 -> 34.7 and 35.1 tok/s (2 idle cores, back to back).
# Threads that wait passively take tens of microseconds to wake, more than a 1 MB product gains
# (576 x 576 runs as fast on one thread as on two): the kernel reads the policy when it runs.
GEMV_THREADED_ELEMENTS = 1 << 16
GEMV_THREADED_ELEMENTS_PASSIVE = 1 << 19

_GEMV_THREADS = r"""
/* Elements of W from which a few-row product is split across threads: fewer when OpenMP's
   threads spin between regions than when they sleep (OMP_WAIT_POLICY=passive), read once. */
static int64_t ember_gemv_threaded_min(void) {
    static int64_t min = -1;
    if (min < 0) {
        const char *policy = getenv("OMP_WAIT_POLICY");
        min = policy && (policy[0] == 'p' || policy[0] == 'P') ? $PASSIVE : $SPIN;
    }
    return min;
}
"""

_GEMV = r"""
/* y[m, n] = sum_k x[m, k] w[n, k] for $M rows of x (row stride ldx) and N rows of W (row
   stride ldw); y is [$M, N]. Rows of W go in groups of $R, each group read once, straight
   through, into $M x $R accumulators; each thread takes one contiguous run of groups (static
   schedule), so it streams one range of memory. Bound by memory bandwidth: W is read once. */
static inline __attribute__((always_inline)) void ember_sgemv_rows_m$M(
        int rows, int64_t K, const float *x, int64_t ldx, const float *w, int64_t ldw,
        float *y, int64_t N) {
    const int64_t K16 = K / 16 * 16;
    ember_vf acc[$M][$R];
    for (int m = 0; m < $M; ++m)
        for (int r = 0; r < rows; ++r) acc[m][r] = ev_set1(0.0f);
    for (int64_t k = 0; k < K16; k += 16) {
        ember_vf wv[$R];
        for (int r = 0; r < rows; ++r) wv[r] = ev_load(w + r * ldw + k);
        for (int m = 0; m < $M; ++m) {
            ember_vf xv = ev_load(x + m * ldx + k);
            for (int r = 0; r < rows; ++r) acc[m][r] = ev_fma(wv[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < $M; ++m)
        for (int r = 0; r < rows; ++r) {
            float s = ev_sum(acc[m][r]);
            for (int64_t k = K16; k < K; ++k) s += x[m * ldx + k] * w[r * ldw + k];
            y[m * N + r] = s;
        }
}

static void ember_sgemv_m$M(int64_t N, int64_t K, const float *x, int64_t ldx, const float *w,
                            int64_t ldw, float *y) {
    const int64_t groups = N / $R;
    #pragma omp parallel for schedule(static) if (N * K >= ember_gemv_threaded_min())
    for (int64_t g = 0; g < groups; ++g)
        ember_sgemv_rows_m$M($R, K, x, ldx, w + g * $R * ldw, ldw, y + g * $R, N);
    for (int64_t n = groups * $R; n < N; ++n)  /* the last N % $R rows, one at a time */
        ember_sgemv_rows_m$M(1, K, x, ldx, w + n * ldw, ldw, y + n, N);
}
"""


def _gemv_helpers(m: int) -> tuple[str, ...]:
    """The C of ``ember_sgemv_m<m>``, on the 16-lane vector layer of the quantised kernels
    (AVX-512, AVX2 or portable C, by ``EMBER_QUANT_SIMD``). Imported here, not at the top:
    ``quant`` imports :class:`Statement` from this module."""
    from ember.backends.cpu.quant import SIMD

    # Accumulators in registers: m x r of them, plus r rows of W and a row of x (of 32).
    group = 8 if m == 1 else 4 if m <= 4 else 2
    kernel = _GEMV.replace("$M", str(m)).replace("$R", str(group))
    threads = _GEMV_THREADS.replace("$SPIN", str(GEMV_THREADED_ELEMENTS)).replace(
        "$PASSIVE", str(GEMV_THREADED_ELEMENTS_PASSIVE))
    return SIMD, threads, kernel


# Products that run in ember's packed kernel (``gemm.py``, decision 0018) instead of BLAS pieces:
# float32 on an AVX-512 CPU, more rows than the few-row kernel takes, no batch axes, and columns
# at least half a register tile (the kernel computes whole tiles of 32).
GEMM_MIN_COLUMNS = gemm.NR // 2


def _packed_gemm(dtype: np.dtype, m: int, n: int, k: int, batch: Sequence[int]) -> bool:
    """Whether a [m, k] x [k, n] product runs in ``ember_sgemm_packed``."""
    return (dtype == np.float32 and math.prod(batch) == 1 and m > GEMV_ROWS
            and n >= GEMM_MIN_COLUMNS and gemm.available())


def _gemv(dtype: np.dtype, m: int, a: tuple[bool, int], b: tuple[bool, int]) -> bool:
    """Few float32 rows against W stored as rows ([n, k], k contiguous in both): the GEMV
    kernel of this module."""
    return dtype == np.float32 and GEMV_MIN_ROWS <= m <= GEMV_ROWS and not a[0] and b[0]


def _free(ndim: int, contract: Sequence[int], batch: Sequence[int]) -> list[int]:
    return [i for i in range(ndim) if i not in contract and i not in batch]


def _matrices(eqn: Eqn) -> tuple | None:
    """A product's operands as matrices: (m, k, n) as (size, stride), the row-major layouts
    ``a`` and ``b`` of ``_matrix``, the operands' strides and batch axes; None when they are
    not evenly spaced or too large for 32-bit BLAS sizes."""
    lhs, rhs = eqn.inputs[0].aval, eqn.inputs[1].aval
    (lc, rc), (lb, rb) = eqn.params["dims"]
    ls, rs = _strides(lhs.shape), _strides(rhs.shape)
    lf, rf = _free(lhs.ndim, lc, lb), _free(rhs.ndim, rc, rb)
    m, k, n = _group(lhs.shape, ls, lf), _group(lhs.shape, ls, lc), _group(rhs.shape, rs, rf)
    k_rhs = _group(rhs.shape, rs, rc)
    if None in (m, k, n, k_rhs):
        return None
    a, b = _matrix(m, k), _matrix(k_rhs, n)
    if a is None or b is None or max(m[0], n[0], k[0], a[1], b[1]) > _INT_MAX:
        return None
    return m, k, n, a, b, ls, rs, lb, rb


def packed_product(eqn: Eqn) -> tuple[int, int, int, tuple[bool, int], tuple[bool, int]] | None:
    """(m, n, k, A's layout, B's layout) of a ``dot_general`` that runs in the packed kernel
    (``_dot_general``'s choice), None for any other equation."""
    if eqn.prim is not dot_general_p or eqn.inputs[0].aval.dtype != np.float32:
        return None
    if eqn.inputs[0].aval.size == 0 or eqn.inputs[1].aval.size == 0:
        return None
    matrices = _matrices(eqn)
    if matrices is None:
        return None
    m, k, n, a, b, *_ = matrices
    batch = [eqn.inputs[0].aval.shape[i] for i in eqn.params["dims"][1][0]]
    f32 = np.dtype(np.float32)
    if _gemv(f32, m[0], a, b) or not _packed_gemm(f32, m[0], n[0], k[0], batch):
        return None
    return m[0], n[0], k[0], a, b


def shared_products(eqns: Sequence[Eqn]) -> Statement:
    """One statement for packed products that read the same left operand, ``eqns`` in order
    (it covers all but the first)."""
    products = [packed_product(eqn) for eqn in eqns]
    m, _, k, a, _ = products[0]

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        return gemm.call_shared(m, k, a, ins[0], [(n, b, rhs, out) for (_, n, _, _, b), rhs, out
                                                  in zip(products, ins[1::2], outs, strict=True)])
    return Statement(emit, (gemm.KERNELS.prototypes,), links=(gemm.KERNELS,),
                     covers=len(eqns) - 1)


def _dot_general(eqn: Eqn) -> Statement | None:
    lhs, rhs = eqn.inputs[0].aval, eqn.inputs[1].aval
    if lhs.dtype not in _BLAS:
        return None
    out_bytes = eqn.outputs[0].aval.size * lhs.dtype.itemsize
    if out_bytes == 0 or lhs.size == 0 or rhs.size == 0:  # nothing to sum: zeros
        return Statement(lambda outs, ins: f"memset({outs[0]}, 0, {out_bytes});")
    matrices = _matrices(eqn)
    if matrices is None:
        return None
    m, k, n, a, b, ls, rs, lb, rb = matrices
    prefix, ctype, _ = _BLAS[lhs.dtype]
    batch = [lhs.shape[i] for i in lb]
    out_block = m[0] * n[0]
    if _gemv(lhs.dtype, m[0], a, b):
        return _gemv_statement(m[0], n[0], k[0], a[1], b[1], out_block, batch, ls, rs, lb, rb)
    if _packed_gemm(lhs.dtype, m[0], n[0], k[0], batch):
        return Statement(lambda outs, ins: gemm.call(m[0], n[0], k[0], a, b, ins[0], ins[1],
                                                     outs[0]),
                         (gemm.KERNELS.prototypes,), links=(gemm.KERNELS,))
    count = math.prod(batch)
    by_rows = m[0] > n[0]
    extent = m[0] if by_rows else n[0]
    step = piece_step(extent, count * m[0] * n[0] * k[0])
    pieces = -(-extent // step)
    tasks = count * pieces

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        a_off, b_off = _batch_offsets("nb", batch, ls, lb), _batch_offsets("nb", batch, rs, rb)
        return (f"{{ const {ctype} *A = (const {ctype} *){ins[0]}, *B = (const {ctype} *){ins[1]};"
                f"\n  {ctype} *C = ({ctype} *){outs[0]};\n  {parallel_pieces(tasks)}"
                f"for (int64_t t = 0; t < {tasks}; ++t) {{\n"
                f"    const int64_t nb = t / {pieces}, lo = t % {pieces} * {step};\n"
                f"    ember_{prefix}gemm_piece({int(a[0])}, {int(b[0])}, {int(by_rows)}, lo, "
                f"{step}, {m[0]}, {n[0]}, {k[0]}, A + {a_off}, {a[1]}, B + {b_off}, {b[1]}, 0, "
                f"C + nb * {out_block}, {max(1, n[0])});\n  }} }}")
    return Statement(emit, (blas_piece_helper(lhs.dtype),), uses_blas=True)


def _batch_offsets(flat: str, batch: Sequence[int], strides: Sequence[int],
                   axes: Sequence[int]) -> str:
    """C expression: the element offset of batch element ``flat`` (row-major over ``batch``)
    in an operand with these strides, its batch axes being ``axes``."""
    terms, inner = ["0"], 1
    for size, axis in reversed(list(zip(batch, axes))):
        if size > 1:
            terms.append(f"({flat} / {inner} % {size}) * {strides[axis]}")
        inner *= size
    return " + ".join(terms)


def _gemv_statement(m: int, n: int, k: int, lda: int, ldb: int, out_block: int,
                    batch: Sequence[int], ls: Sequence[int], rs: Sequence[int],
                    lb: Sequence[int], rb: Sequence[int]) -> Statement:
    """``ember_sgemv_m<m>`` on each batch element in turn (the kernel splits W's rows)."""
    count = math.prod(batch)

    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        a_off, b_off = _batch_offsets("nb", batch, ls, lb), _batch_offsets("nb", batch, rs, rb)
        return (f"{{ const float *A = (const float *){ins[0]}, *B = (const float *){ins[1]};\n"
                f"  float *C = (float *){outs[0]};\n"
                f"  for (int64_t nb = 0; nb < {count}; ++nb) ember_sgemv_m{m}({n}, {k}, "
                f"A + {a_off}, {lda}, B + {b_off}, {ldb}, C + nb * {out_block}); }}")
    return Statement(emit, _gemv_helpers(m))


dot_general_p.def_lowering("c", _dot_general)
dynamic_slice_p.def_lowering("c", _dynamic_slice)
dynamic_update_slice_p.def_lowering("c", _dynamic_update_slice)
gather_p.def_lowering("c", _gather)
scatter_p.def_lowering("c", _scatter)
