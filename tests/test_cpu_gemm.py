"""ember's packed float32 GEMM (``ember/backends/cpu/gemm.py``, decision 0018): the kernel
itself, called directly, against float64 NumPy in every layout, at edge sizes and with strided
leading dimensions; the same bits on any thread count; then jitted programs against the NumPy
backend, which products take it (``as_text``), and a training step's products."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_cpu_gemv import results_on_threads

import ember
from ember import ops as lax
from ember.backends.cpu import gemm, lowerings, toolchain

pytestmark = pytest.mark.skipif(not (toolchain.available() and gemm.available()),
                                reason="no C compiler or no AVX-512")


@pytest.fixture(scope="module")
def kernel():
    """``ember_sgemm_packed`` from its kernel library, and the OpenMP runtime it runs on."""
    library = ctypes.CDLL(gemm.KERNELS.link().ldflags[0])
    openmp = toolchain.build("#include <omp.h>\n"
                             "void threads(int n) { omp_set_num_threads(n); }\n"
                             "int max_threads(void) { return omp_get_max_threads(); }\n")
    return library.ember_sgemm_packed, openmp


@pytest.fixture(scope="module")
def shared_kernel():
    """``ember_sgemm_packed_shared``: products that share their left operand."""
    return ctypes.CDLL(gemm.KERNELS.link().ldflags[0]).ember_sgemm_packed_shared


def _product(kernel, a: np.ndarray, a_t: bool, b: np.ndarray, b_t: bool, m: int, n: int,
             k: int, ldc: int) -> np.ndarray:
    """``op(a)[:m, :k] @ op(b)[:k, :n]`` by the kernel, ``op`` transposing a stored-transposed
    operand; ``a`` and ``b`` may be wider than needed (a leading dimension beyond the matrix);
    the result is written with row stride ``ldc`` into a NaN-filled buffer, returned whole."""
    a_row, a_col = (1, a.shape[1]) if a_t else (a.shape[1], 1)
    b_row, b_col = (1, b.shape[1]) if b_t else (b.shape[1], 1)
    out = np.full((m, ldc), np.nan, np.float32)
    i64 = ctypes.c_int64
    kernel(i64(m), i64(n), i64(k), ctypes.c_void_p(a.ctypes.data), i64(a_row), i64(a_col),
           ctypes.c_void_p(b.ctypes.data), i64(b_row), i64(b_col),
           ctypes.c_void_p(out.ctypes.data), i64(ldc))
    return out


def _operands(rng, m: int, n: int, k: int, a_t: bool, b_t: bool, pad: int = 0):
    """Stored operands (padded by ``pad`` columns: a leading dimension beyond the matrix) and
    the float64 matrices [m, k] and [k, n] they hold."""
    a = rng.standard_normal((k, m + pad) if a_t else (m, k + pad)).astype(np.float32)
    b = rng.standard_normal((n, k + pad) if b_t else (k, n + pad)).astype(np.float32)
    a64 = (a.T if a_t else a)[:m, :k].astype(np.float64)
    b64 = (b.T if b_t else b)[:k, :n].astype(np.float64)
    return a, b, a64, b64


def _assert_product(actual: np.ndarray, a64: np.ndarray, b64: np.ndarray, what: str) -> None:
    """Within the bound of a float32 sum of K products in sequence, 2 K u (|A| |B|), plus the
    float32 rounding of the float64 reference's inputs (none: they are float32 values)."""
    k = a64.shape[1]
    bound = 2 * max(k, 1) * 2.0**-24 * (np.abs(a64) @ np.abs(b64)) + 1e-30
    err = np.abs(actual.astype(np.float64) - a64 @ b64)
    assert np.all(err <= bound), f"{what}: worst error {float((err / bound).max()):.2f} x bound"


LAYOUTS = [(False, True), (False, False), (True, False), (True, True)]  # (A, B) transposed

# (M, N, K): whole tiles, tails of the 14 x 32 tile and of the 16-lane packing, primes, K = 1,
# K across several 256-step blocks with a short last one, M across several L2 blocks of A,
# N across several runs of B panels, K so large that a run holds fewer panels, A larger
# than one packed block (gemm.A_BLOCK_BYTES), K cut into blocks (gemm.KC).
SIZES = [(28, 64, 32), (1, 1, 1), (13, 31, 17), (15, 33, 1), (29, 47, 61), (97, 16, 5),
         (14, 32, 257), (37, 100, 700), (160, 96, 1031), (1200, 40, 130), (9, 70, 2),
         (20, 600, 40), (16, 200, 5000), (2100, 40, 1024),
         (30, 40, 4500)]


@pytest.mark.parametrize("a_t,b_t", LAYOUTS, ids=lambda t: "T" if t else "N")
def test_kernel_matches_float64_numpy(kernel, a_t, b_t):
    call, _ = kernel
    assert 2100 * 1024 * 4 > gemm.A_BLOCK_BYTES
    rng = np.random.default_rng(1)
    for m, n, k in SIZES:
        for pad in (0, 3):
            a, b, a64, b64 = _operands(rng, m, n, k, a_t, b_t, pad)
            out = _product(call, a, a_t, b, b_t, m, n, k, ldc=n + pad)
            what = f"M={m} N={n} K={k} pad={pad} A{'T' if a_t else 'N'} B{'T' if b_t else 'N'}"
            _assert_product(out[:, :n], a64, b64, what)
            assert np.isnan(out[:, n:]).all(), f"{what}: wrote past N"


# One product per layout, each with enough work to run on several threads, and one whose
# threads' shares are uneven and cut into several runs of B panels (35 panels: 17 and 18 on two
# threads, 11, 12, 12 on three; runs of at most gemm.B_PANELS).
THREADED = [(200, 600, 300), (97, 129, 513), (64, 256, 256), (300, 70, 112), (60, 1100, 200)]


def test_kernel_is_the_same_bits_on_any_thread_count(kernel):
    call, openmp = kernel
    assert all(m * n * k >= gemm.THREADED_WORK for m, n, k in THREADED)
    cases = [(a_t, b_t, m, n, k, *_operands(np.random.default_rng(m), m, n, k, a_t, b_t))
             for (a_t, b_t), (m, n, k) in zip(LAYOUTS * 2, THREADED)]
    before = openmp.max_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            openmp.threads(threads)
            results[threads] = [_product(call, a, a_t, b, b_t, m, n, k, ldc=n)
                                for a_t, b_t, m, n, k, a, b, _, _ in cases]
    finally:
        openmp.threads(before)
    for case, one in zip(cases, results[1], strict=True):
        _assert_product(one, *case[-2:], f"M, N, K = {case[2:5]}")
    for threads in (2, 3):
        for one, many in zip(results[1], results[threads], strict=True):
            np.testing.assert_array_equal(one.view(np.uint32), many.view(np.uint32))


def _shared_products(call, a: np.ndarray, a_t: bool, m: int, k: int,
                     segments: list[tuple[np.ndarray, bool, int]]) -> list[np.ndarray]:
    """``op(a)[:m, :k] @ op(b)[:k, :n]`` for each segment (b, b stored transposed, n) in one
    call, each result in a NaN-filled buffer 3 columns wider than n (its own row stride)."""
    i64, ptr, count = ctypes.c_int64, ctypes.c_void_p, len(segments)
    outs = [np.full((m, n + 3), np.nan, np.float32) for _, _, n in segments]
    a_row, a_col = (1, a.shape[1]) if a_t else (a.shape[1], 1)
    strides = [(1, b.shape[1]) if b_t else (b.shape[1], 1) for b, b_t, _ in segments]
    call(i64(m), i64(k), ptr(a.ctypes.data), i64(a_row), i64(a_col), ctypes.c_int(count),
         (ptr * count)(*(b.ctypes.data for b, _, _ in segments)),
         (i64 * count)(*(n for _, _, n in segments)), (i64 * count)(*(r for r, _ in strides)),
         (i64 * count)(*(c for _, c in strides)), (ptr * count)(*(o.ctypes.data for o in outs)),
         (i64 * count)(*(o.shape[1] for o in outs)))
    return outs


# Left operands shared by segments of both layouts: q, k, v (18 + 6 + 6 panels), gate and up,
# tails of a panel, a segment of one column, and products too small to run on several threads.
SHARED = [(130, 96, (576, 192, 192)), (61, 200, (700, 700)), (29, 33, (47, 1, 64, 90)),
          (9, 16, (33, 20))]


@pytest.mark.parametrize("a_t", [False, True], ids=["AN", "AT"])
def test_shared_left_operand_is_the_same_bits_as_separate_products(kernel, shared_kernel, a_t):
    call, openmp = kernel
    rng = np.random.default_rng(6)
    before = openmp.max_threads()
    try:
        for m, k, ns in SHARED:
            a, _, a64, _ = _operands(rng, m, 1, k, a_t, False)
            segments = []
            for i, n in enumerate(ns):
                _, b, _, b64 = _operands(rng, m, n, k, a_t, i % 2 == 0)
                segments.append((b, i % 2 == 0, n, b64))
            for threads in (1, 2, 3):
                openmp.threads(threads)
                outs = _shared_products(shared_kernel, a, a_t, m, k,
                                        [s[:3] for s in segments])
                for (b, b_t, n, b64), out in zip(segments, outs, strict=True):
                    what = f"M={m} K={k} N={n} of {ns} on {threads} threads"
                    alone = _product(call, a, a_t, b, b_t, m, n, k, ldc=n)
                    np.testing.assert_array_equal(out[:, :n].view(np.uint32),
                                                  alone.view(np.uint32), err_msg=what)
                    _assert_product(out[:, :n], a64, b64, what)
                    assert np.isnan(out[:, n:]).all(), f"{what}: wrote past N"
    finally:
        openmp.threads(before)


# --- in compiled programs ----------------------------------------------------------------------

def _products(x, w, v, g, y):
    """Products in every layout and shape class the lowering sees; which ones the packed
    kernel takes is in ``_PACKED``."""
    return (x @ w.T,                                     # a linear layer: W stored as rows
            x @ v,                                       # W stored as columns
            g.T @ x,                                     # a weight's gradient: x stored as rows
            x.T @ g,                                     # both stored transposed
            lax.dot_general(y, w, ((2,), (1,)), ((), ())),   # leading axes of y merged
            x[:5] @ w.T,                                 # few rows: the GEMV kernel
            x @ v[:, :7],                                # few columns: BLAS
            lax.dot_general(y, y, ((2,), (2,)), ((0,), (0,))),  # batched: BLAS
            x.astype(np.float64) @ v.astype(np.float64))  # float64: BLAS


_PACKED = 5  # the first five products of ``_products``


def test_jitted_products_match_the_numpy_backend():
    rng = np.random.default_rng(3)
    x, w, v, g = (rng.standard_normal(s).astype(np.float32)
                  for s in ((37, 45), (50, 45), (45, 33), (37, 29)))
    y = rng.standard_normal((3, 19, 45)).astype(np.float32)
    compiled = ember.jit(_products, backend="cpu").lower(x, w, v, g, y).compile()
    source = compiled.as_text()
    # x @ w.T and x @ v share x: one call; the other three alone (and the prototypes).
    assert source.count("ember_sgemm_packed_shared(") == 2
    assert source.count("ember_sgemm_packed(") == _PACKED - 2 + 1
    assert "ember_sgemv_m5(" in source and "cblas_sgemm" in source and "cblas_dgemm" in source
    expected = ember.jit(_products, backend="numpy")(x, w, v, g, y)
    for i, (a, e) in enumerate(zip(compiled(x, w, v, g, y), expected, strict=True)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, i
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=f"product {i}")


def test_products_the_kernel_does_not_take():
    """The predicate in one place: batched, float64, few rows or columns."""
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert lowerings._packed_gemm(f32, 512, 576, 576, [])
    assert lowerings._packed_gemm(f32, lowerings.GEMV_ROWS + 1, 16, 1, [1])
    assert not lowerings._packed_gemm(f64, 512, 576, 576, [])
    assert not lowerings._packed_gemm(f32, 512, 576, 576, [2])
    assert not lowerings._packed_gemm(f32, lowerings.GEMV_ROWS, 576, 576, [])
    assert not lowerings._packed_gemm(f32, 512, lowerings.GEMM_MIN_COLUMNS - 1, 576, [])
    assert lowerings._packed_gemm(f32, 49152, 576, 1024, [])  # a tied head's gradient
    assert lowerings._packed_gemm(f32, 1024, 576, 49152, [])  # its input's gradient


def test_jitted_products_are_the_same_bits_on_one_and_two_threads():
    rng = np.random.default_rng(4)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in ((300, 576), (200, 576)))
    f = lambda a, b: (a @ b.T, a.T @ a)  # noqa: E731
    one, source = results_on_threads(f, (x, w), 1)
    two, _ = results_on_threads(f, (x, w), 2)
    assert source.count("ember_sgemm_packed(") == 3
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_training_step_gradients_match_the_numpy_backend():
    """An MLP's loss and gradients: the forward and both backward layouts (dX = g W,
    dW = g^T x) in the kernel, against the NumPy backend."""
    rng = np.random.default_rng(5)
    params = {"w1": rng.standard_normal((96, 40)).astype(np.float32) * 0.1,
              "w2": rng.standard_normal((24, 96)).astype(np.float32) * 0.1}
    x = rng.standard_normal((64, 40)).astype(np.float32)

    def loss(p, x):
        h = ember.numpy.tanh(x @ p["w1"].T)
        return ((h @ p["w2"].T) ** 2).mean()

    step = ember.value_and_grad(loss)
    compiled = ember.jit(step, backend="cpu").lower(params, x).compile()
    assert compiled.as_text().count("ember_sgemm_packed(") >= 5
    value, grads = compiled(params, x)
    ref_value, ref_grads = ember.jit(step, backend="numpy")(params, x)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(ref_grads[name]),
                                   rtol=1e-4, atol=1e-6, err_msg=name)


def _attention_inputs(x, wq, wk, wv, wg, wu, scale):
    """q, k, v of one x with elementwise work between them (as a rotary embedding puts it);
    an MLP's gate and up of another; a product of x by a computed right operand (not a
    weight: not grouped)."""
    h = ember.numpy.tanh(x)
    q = (h @ wq.T) * scale
    k = (h @ wk.T) * scale
    v = h @ wv.T
    g = x @ wg.T
    u = x @ wu.T
    return q, k, v, ember.numpy.tanh(g) * u, h @ (wq * scale).T


def test_products_sharing_their_left_operand_run_as_one_call():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((70, 48)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) for s in ((48, 48), (16, 48), (16, 48),
                                                               (100, 48), (100, 48))]
    args = (x, *ws, np.float32(0.5))
    one, source = results_on_threads(_attention_inputs, args, 1)
    two, _ = results_on_threads(_attention_inputs, args, 2)
    assert source.count("ember_sgemm_packed_shared(") == 3  # q k v, gate up; the prototype
    assert source.count("ember_sgemm_packed(") == 2  # h @ (wq * scale).T alone; the prototype
    # The same bits as each product in a program of its own (ember_sgemm_packed alone).
    h = np.asarray(ember.jit(ember.numpy.tanh, backend="cpu")(x))
    alone = [np.asarray(ember.jit(lambda a, b: a @ b.T, backend="cpu")(a, w))
             for a, w in ((h, ws[0]), (h, ws[1]), (h, ws[2]))]
    for got, want, scale in zip(one[:3], alone, (0.5, 0.5, 1.0), strict=True):
        want = want * np.float32(scale)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    expected = ember.jit(_attention_inputs, backend="numpy")(*args)
    for i, (a, e) in enumerate(zip(one, expected, strict=True)):
        np.testing.assert_allclose(a, np.asarray(e), rtol=1e-5, atol=1e-5, err_msg=str(i))
