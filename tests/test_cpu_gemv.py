"""The float32 kernel for products with few rows of activations (``x @ W.T``, the decode of
several sequences) of the compiled CPU backend (``ember/backends/cpu/lowerings.py``): the kernel
itself in each vector path the CPU runs, against float64 NumPy; then jitted programs against the
NumPy backend, which products take it (``as_text``) and which stay with BLAS; last, BLAS products
cut into pieces for OpenMP's threads (decision 0016), the same bits on one thread and two."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
from tiny_models import tiny_model

import ember
from ember import ops as lax
from ember.backends.cpu import lowerings, toolchain

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")

ROWS = range(1, lowerings.GEMV_ROWS + 1)


def _assert_close(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Equal up to float32 summation order: 1e-5 of the largest value."""
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale, err_msg=what)


# --- the kernel itself, through a small test library per vector path -------------------------

def _paths() -> list[int]:
    """The vector paths this CPU can run: portable C always, AVX2 and AVX-512 when present."""
    flags = toolchain.cpu_features()
    return [0] + [256] * ("avx2" in flags and "fma" in flags) + [512] * ("avx512f" in flags)


def _harness_source(simd: int) -> str:
    """``ember_sgemv_m<m>`` for every row count with ``EMBER_QUANT_SIMD`` forced to ``simd``,
    exported as ``gemv_<m>(N, K, x, ldx, w, ldw, y)``."""
    helpers: dict[str, None] = {}
    wrappers = []
    for m in ROWS:
        helpers.update(dict.fromkeys(lowerings._gemv_helpers(m)))
        wrappers.append(f"void gemv_{m}(int64_t N, int64_t K, const float *x, int64_t ldx, "
                        f"const float *w, int64_t ldw, float *y) {{ "
                        f"ember_sgemv_m{m}(N, K, x, ldx, w, ldw, y); }}")
    includes = "#include <stdint.h>\n#include <string.h>\n#include <math.h>\n#include <omp.h>\n"
    return "\n".join([f"#define EMBER_QUANT_SIMD {simd}\n" + includes, *helpers, *wrappers])


@pytest.fixture(scope="module", params=_paths(), ids=lambda s: f"simd{s}")
def harness(request):
    return toolchain.build(_harness_source(request.param))


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


@pytest.mark.parametrize("m", ROWS)
def test_kernel_matches_float64_numpy(harness, m):
    rng = np.random.default_rng(m)
    # N, K odd (tails of the row groups and of the 16 lanes); rows of x and W padded (their
    # strides are not K); one product large enough to run on several threads.
    for n, k in ((37, 19), (5, 33), (1, 3), (1025, 517)):
        assert (n * k >= lowerings.GEMV_THREADED_ELEMENTS) == (n == 1025)
        x = rng.standard_normal((m, k + 3)).astype(np.float32)
        w = rng.standard_normal((n, k + 5)).astype(np.float32)
        y = np.full((m, n), np.nan, np.float32)
        getattr(harness, f"gemv_{m}")(ctypes.c_int64(n), ctypes.c_int64(k), _ptr(x),
                                      ctypes.c_int64(k + 3), _ptr(w), ctypes.c_int64(k + 5),
                                      _ptr(y))
        expected = x[:, :k].astype(np.float64) @ w[:, :k].astype(np.float64).T
        _assert_close(y, expected, f"M={m} N={n} K={k}")


# --- in compiled programs ----------------------------------------------------------------------

def _compiled(f, *args) -> tuple[list[np.ndarray], str]:
    """``f`` jitted on the cpu backend: its results (checked against the NumPy backend) and C."""
    expected = ember.tree.tree_leaves(ember.jit(f)(*args))
    actual = ember.tree.tree_leaves(ember.jit(f, backend="cpu")(*args))
    for a, e in zip(actual, expected, strict=True):
        _assert_close(np.asarray(a), np.asarray(e))
    return actual, ember.jit(f, backend="cpu").lower(*args).compile().as_text()


# (dims, x shape, W shape, rows of x the kernel sees)
LAYOUTS = [
    ((((1,), (1,)), ((), ())), (3, 37), (29, 37), 3),               # x @ W.T: a linear layer
    ((((2,), (1,)), ((), ())), (2, 3, 19), (41, 19), 6),            # leading axes of x merged
    ((((2,), (2,)), ((0,), (0,))), (2, 5, 21), (2, 11, 21), 5),     # batched
    ((((1, 2), (1, 2)), ((), ())), (4, 3, 7), (13, 3, 7), 4),       # two contracted axes
]


@pytest.mark.parametrize("dims,xs,ws,m", LAYOUTS)
def test_layouts_run_in_the_kernel(dims, xs, ws, m):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    _, source = _compiled(lambda a, b: lax.dot_general(a, b, dims[0], dims[1]), x, w)
    assert f"ember_sgemv_m{m}(" in source and "cblas" not in source


@pytest.mark.parametrize("m", ROWS)
def test_every_row_count_matches_the_numpy_backend(m):
    rng = np.random.default_rng(m)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in ((m, 45), (23, 45)))
    _, source = _compiled(lambda a, b: a @ b.T, x, w)
    assert f"ember_sgemv_m{m}(" in source


@pytest.mark.parametrize("xs,ws,f,why", [
    ((1, 16), (16, 9), lambda a, b: a @ b, "one row, W stored as columns: sgemv"),
    ((lowerings.GEMV_ROWS + 1, 16), (9, 16), lambda a, b: a @ b.T, "many rows: sgemm"),
    ((3, 16), (16, 9), lambda a, b: a @ b, "W stored as columns"),
    ((16, 3), (9, 16), lambda a, b: a.T @ b.T, "x stored as columns"),
])
def test_other_products_stay_with_blas(xs, ws, f, why):
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    _, source = _compiled(f, x, w)
    assert "ember_sgemv" not in source and "cblas" in source, why


def test_float64_stays_with_blas():
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((3, 16)), rng.standard_normal((9, 16))
    _, source = _compiled(lambda a, b: a @ b.T, x, w)
    assert "ember_sgemv" not in source and "cblas_dgemm" in source


def test_decode_of_four_sequences_runs_its_products_in_the_kernel():
    from ember.models.llama import KVCache

    model = tiny_model(vocab_size=64, seed=3)
    cache = KVCache.allocate(model.config, 4, 16)
    ids = np.array([[5], [9], [2], [7]])
    (logits, *_), source = _compiled(
        lambda mdl, c, i: mdl(i, cache=c, cache_pos=2), model, cache, ids)
    assert logits.shape == (4, 1, 64)
    assert "ember_sgemv_m4(" in source and "cblas" not in source  # every product, the head too


# --- one thread pool: products cut into pieces for OpenMP's threads ---------------------------

@pytest.mark.parametrize("extent,work", [(64, 4 << 20), (1000, 1 << 40), (7, 1 << 30),
                                         (256, 3 << 20), (49152, 28 << 20), (100, 1 << 20)])
def test_pieces_cover_the_axis_in_aligned_power_of_two_counts(extent, work):
    step = lowerings.piece_step(extent, work)
    pieces = -(-extent // step)
    assert 0 < step <= extent and pieces <= lowerings.MAX_PIECES
    if work < 2 * lowerings.PIECE_WORK or extent <= lowerings.PIECE_ALIGN:
        assert pieces == 1
    else:
        assert step % lowerings.PIECE_ALIGN == 0 and pieces >= 2
        assert work // pieces >= lowerings.PIECE_WORK
        if extent % (lowerings.MAX_PIECES * lowerings.PIECE_ALIGN) == 0:
            assert pieces & (pieces - 1) == 0  # even shares for 2, 4, 8... threads


_THREADS = "int threads(void) { return omp_get_max_threads(); }"


def results_on_threads(fn, args, threads: int) -> tuple[list[np.ndarray], str]:
    """``fn(*args)`` compiled for the cpu backend with ``EMBER_NUM_THREADS=threads`` (a program
    sets its thread count when it is built), run once: its results and its C."""
    old = os.environ.get("EMBER_NUM_THREADS")
    os.environ["EMBER_NUM_THREADS"] = str(threads)
    try:
        compiled = ember.jit(fn, backend="cpu").lower(*args).compile()
        assert toolchain.build("#include <omp.h>\n" + _THREADS).threads() == threads
        results = [np.asarray(r) for r in ember.tree.tree_leaves(compiled(*args))]
        return results, compiled.as_text()
    finally:
        if old is None:
            del os.environ["EMBER_NUM_THREADS"]
        else:
            os.environ["EMBER_NUM_THREADS"] = old


@pytest.mark.parametrize("f,xs,ws,dtype", [
    # float64: float32 products with many rows run in the packed kernel (test_cpu_gemm.py)
    (lambda a, b: a @ b, (64, 256), (256, 256), np.float64),        # cut along columns
    (lambda a, b: a @ b.T, (600, 96), (70, 96), np.float64),        # along rows
    (lambda a, b: a.T @ b, (300, 130), (300, 500), np.float64),     # x stored as columns
    (lambda a, b: a @ b, (6, 4, 64, 32), (6, 4, 32, 300), np.float32),  # batched
    (lambda a, b: a @ b, (1, 2000), (2000, 1500), np.float32),      # one row: sgemv pieces
])
def test_split_products_are_the_same_bits_on_one_and_two_threads(f, xs, ws, dtype):
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    (one,), source = results_on_threads(f, (x, w), 1)
    (two,), _ = results_on_threads(f, (x, w), 2)
    assert "#pragma omp parallel for" in source and "gemm_piece(" in source
    assert "scipy_openblas_set_num_threads(1)" in source
    np.testing.assert_array_equal(one.view(np.uint8), two.view(np.uint8))
    _assert_close(one, f(x.astype(np.float64), w.astype(np.float64)))


def test_few_row_kernel_is_the_same_bits_on_one_and_two_threads():
    rng = np.random.default_rng(11)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in ((3, 576), (1536, 576)))
    assert w.size >= lowerings.GEMV_THREADED_ELEMENTS
    (one,), source = results_on_threads(lambda a, b: a @ b.T, (x, w), 1)
    (two,), _ = results_on_threads(lambda a, b: a @ b.T, (x, w), 2)
    assert "ember_sgemv_m3(" in source
    np.testing.assert_array_equal(one.view(np.uint8), two.view(np.uint8))
