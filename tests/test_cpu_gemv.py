"""The float32 kernel for products with few rows of activations (``x @ W.T``, the decode of
several sequences) of the compiled CPU backend (``ember/backends/cpu/lowerings.py``): the kernel
itself in each vector path the CPU runs, against float64 NumPy; then jitted programs against the
NumPy backend, which products take it (``as_text``) and which stay with BLAS."""

from __future__ import annotations

import ctypes

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


@pytest.fixture
def every_row_count(monkeypatch):
    """One row in the kernel too (by default it goes to BLAS's sgemv)."""
    monkeypatch.setattr(lowerings, "GEMV_MIN_ROWS", 1)


# (dims, x shape, W shape, rows of x the kernel sees)
LAYOUTS = [
    ((((1,), (1,)), ((), ())), (3, 37), (29, 37), 3),               # x @ W.T: a linear layer
    ((((2,), (1,)), ((), ())), (2, 3, 19), (41, 19), 6),            # leading axes of x merged
    ((((2,), (2,)), ((0,), (0,))), (2, 5, 21), (2, 11, 21), 5),     # batched
    ((((1, 2), (1, 2)), ((), ())), (4, 3, 7), (13, 3, 7), 4),       # two contracted axes
]


@pytest.mark.parametrize("dims,xs,ws,m", LAYOUTS)
def test_layouts_run_in_the_kernel(every_row_count, dims, xs, ws, m):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    _, source = _compiled(lambda a, b: lax.dot_general(a, b, dims[0], dims[1]), x, w)
    assert f"ember_sgemv_m{m}(" in source and "cblas" not in source


@pytest.mark.parametrize("m", ROWS)
def test_every_row_count_matches_the_numpy_backend(every_row_count, m):
    rng = np.random.default_rng(m)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in ((m, 45), (23, 45)))
    _, source = _compiled(lambda a, b: a @ b.T, x, w)
    assert f"ember_sgemv_m{m}(" in source


@pytest.mark.parametrize("xs,ws,f,why", [
    ((1, 16), (9, 16), lambda a, b: a @ b.T, "one row: sgemv"),
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
