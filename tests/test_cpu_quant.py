"""The compiled CPU kernels for quantised weights (``ember/backends/cpu/quant.py``) against the
NumPy reference: every block format, both directions, the direct kernels (few rows) and the
BLAS panels (many), in each vector path the CPU runs (AVX-512, AVX2, portable C); compiled
programs with no NumPy fallback; a tiny packed Llama forward and a QLoRA gradient."""

from __future__ import annotations

import ctypes
import mmap
from unittest import mock

import numpy as np
import pytest
from specs_quantized import random_blocks
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember import nn
from ember.backends.cpu import quant, toolchain
from ember.io.quants import FORMATS, dequantize_rows
from ember.ops.quantized import dequantize, dequantize_p, quant_matmul, quant_matmul_p

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")

RTOL, ATOL = 1e-5, 1e-5  # decision 0014: dequantise-then-multiply up to float32 rounding
DIRECT = (1, 3, quant.DIRECT_ROWS)  # one pass of the direct kernel, as the harness calls it
PANELS = (quant.DIRECT_ROWS + 1, 20)  # the BLAS panels at any row count


def _paths() -> list[int]:
    """The vector paths this CPU can run: portable C always, AVX2 and AVX-512 when present."""
    flags = toolchain.cpu_features()
    return [0] + [256] * ("avx2" in flags and "fma" in flags) + [512] * ("avx512f" in flags)


def _reference(x: np.ndarray, packed: np.ndarray, fmt: str, adjoint: bool) -> np.ndarray:
    w = dequantize_rows(packed, fmt).astype(np.float64)
    return x.astype(np.float64) @ (w if adjoint else w.T)


# --- the kernels themselves, through a small test library per vector path ---------------------

_INCLUDES = "#include <stdint.h>\n#include <string.h>\n#include <math.h>\n#include <omp.h>\n" \
            "#include <cblas.h>\n"
_ARGS = "int64_t N, int64_t K, const float *x, const uint8_t *w, float *y"


def _harness_source(simd: int) -> str:
    """Every format's kernels with ``EMBER_QUANT_SIMD`` forced to ``simd``, and exported
    wrappers ``qmv_<fmt>_<m>(adjoint, ...)``, ``qmm_<fmt>(adjoint, M, ...)``,
    ``rows_<fmt>(rows, K, w, out)``."""
    helpers: dict[str, None] = {}
    wrappers = []
    for fmt in FORMATS:
        for m in (*DIRECT, quant.BLAS_ROWS + 1):
            helpers.update(dict.fromkeys(quant.helpers(fmt, m)))
        for m in DIRECT:
            wrappers.append(f"void qmv_{fmt}_{m}(int adjoint, {_ARGS}) {{ if (adjoint) "
                            f"ember_qmvt_{fmt}_m{m}(N, K, x, w, y); "
                            f"else ember_qmv_{fmt}_m{m}(N, K, x, w, y); }}")
        wrappers.append(f"void qmm_{fmt}(int adjoint, int64_t M, {_ARGS}, int64_t step) {{ "
                        f"ember_qmm_{fmt}(adjoint, M, N, K, x, w, y, step); }}")
        wrappers.append(f"void rows_{fmt}(int64_t rows, int64_t K, const uint8_t *w, "
                        f"float *out) {{ ember_decode_rows_{fmt}(rows, K, w, out); }}")
    return "\n".join([f"#define EMBER_QUANT_SIMD {simd}\n" + _INCLUDES, *helpers, *wrappers])


@pytest.fixture(scope="module", params=_paths(), ids=lambda s: f"simd{s}")
def harness(request):
    return toolchain.build(_harness_source(request.param), toolchain.blas())


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _run(lib, fmt: str, m: int, x: np.ndarray, packed: np.ndarray, adjoint: bool,
         pieces: bool = False) -> np.ndarray:
    """The kernel's result; the panels as one piece, or (``pieces``) cut into the smallest
    pieces ``ember_qmm`` takes: 16 rows of W, or one block column for the adjoint."""
    n, k = packed.shape[0], FORMATS[fmt].row_elements(packed.shape[1])
    y = np.full((m, k if adjoint else n), np.nan, np.float32)
    args = (ctypes.c_int64(n), ctypes.c_int64(k), _ptr(x), _ptr(packed), _ptr(y))
    if m in DIRECT:
        getattr(lib, f"qmv_{fmt}_{m}")(int(adjoint), *args)
    else:
        step = (FORMATS[fmt].block if adjoint else 16) if pieces else (k if adjoint else n)
        getattr(lib, f"qmm_{fmt}")(int(adjoint), ctypes.c_int64(m), *args, ctypes.c_int64(step))
    return y


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_kernels_match_the_reference(harness, fmt):
    block = FORMATS[fmt].block
    rng = np.random.default_rng(1)
    # N odd and not a multiple of anything; K several blocks; a long row for the panels too.
    for n, k in ((37, 3 * block), (5, 2 * block), (300, block)):
        packed = random_blocks(fmt, n, k, seed=n)
        for adjoint in (False, True):
            for m, pieces in (*((m, False) for m in DIRECT), *((m, True) for m in PANELS),
                              (PANELS[0], False)):
                x = rng.standard_normal((m, n if adjoint else k)).astype(np.float32)
                np.testing.assert_allclose(
                    _run(harness, fmt, m, x, packed, adjoint, pieces),
                    _reference(x, packed, fmt, adjoint), rtol=RTOL, atol=ATOL,
                    err_msg=f"{fmt} N={n} K={k} M={m} adjoint={adjoint} pieces={pieces}")


def _before_a_guard_page(packed: np.ndarray) -> tuple[np.ndarray, mmap.mmap]:
    """A copy of ``packed`` whose last byte is followed by a page that may not be touched
    (and the mapping holding both, to keep alive)."""
    page = mmap.PAGESIZE
    size = -(-packed.nbytes // page) * page
    region = mmap.mmap(-1, size + page)
    guard = ctypes.addressof(ctypes.c_char.from_buffer(region)) + size
    libc = ctypes.CDLL(None, use_errno=True)
    no_access = 0  # PROT_NONE, which the mmap module does not name
    assert libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(page), no_access) == 0
    copy = np.frombuffer(region, np.uint8, packed.nbytes, size - packed.nbytes)
    copy[:] = packed.reshape(-1)
    return copy.reshape(packed.shape), region


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_direct_kernels_read_nothing_past_w(harness, fmt):
    """The direct kernels prefetch ``PREFETCH_BYTES`` ahead of the block they decode, past the
    end of W on its last rows: that must never fault (W here ends where a page nobody may read
    begins), and only W's own bytes may reach the result."""
    rng = np.random.default_rng(7)
    n, k = 37, 3 * FORMATS[fmt].block
    packed, region = _before_a_guard_page(random_blocks(fmt, n, k, seed=8))
    for adjoint in (False, True):
        for m in DIRECT:
            x = rng.standard_normal((m, n if adjoint else k)).astype(np.float32)
            np.testing.assert_allclose(_run(harness, fmt, m, x, packed, adjoint),
                                       _reference(x, packed, fmt, adjoint), rtol=RTOL,
                                       atol=ATOL, err_msg=f"{fmt} M={m} adjoint={adjoint}")
    del packed, region


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decoded_rows_are_bitwise_the_reference(harness, fmt):
    packed = random_blocks(fmt, 700, 2 * FORMATS[fmt].block, seed=3)  # enough rows to thread
    k = FORMATS[fmt].row_elements(packed.shape[1])
    out = np.empty((packed.shape[0], k), np.float32)
    rows = getattr(harness, f"rows_{fmt}")
    rows(ctypes.c_int64(packed.shape[0]), ctypes.c_int64(k), _ptr(packed), _ptr(out))
    np.testing.assert_array_equal(out, dequantize_rows(packed, fmt))


def test_every_float16_scale_decodes_exactly(harness):
    """All 65536 float16 bit patterns as q8_0 scales with every code 1: the values are the
    scales themselves (subnormals, infinities and NaNs included)."""
    blocks = np.zeros(1 << 16, FORMATS["q8_0"].struct)
    blocks["d"] = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    blocks["qs"] = 1
    packed = blocks.view(np.uint8).reshape(1 << 16, -1)
    out = np.empty((1 << 16, 32), np.float32)
    harness.rows_q8_0(ctypes.c_int64(1 << 16), ctypes.c_int64(32), _ptr(packed), _ptr(out))
    want = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    # assert_array_equal takes NaN as equal to NaN
    np.testing.assert_array_equal(out, np.repeat(want[:, None], 32, axis=1))


# --- compiled programs ------------------------------------------------------------------------

def _products(args):
    """Products of every format and direction at several row counts: x with batch axes."""
    return [quant_matmul(x, w, fmt, adjoint) for x, w, fmt, adjoint in args]


def _product_cases():
    rng = np.random.default_rng(2)
    cases = []
    for i, fmt in enumerate(FORMATS):
        n, k = 13, 2 * FORMATS[fmt].block
        packed = random_blocks(fmt, n, k, seed=i)
        for adjoint in (False, True):
            # 1 row (decode), 6 (one direct pass), 21 (three passes), 35 (BLAS panels)
            for lead in ((), (2, 3), (3, 7), (5, 7)):
                x = rng.standard_normal((*lead, n if adjoint else k)).astype(np.float32)
                cases.append((x, packed, fmt, adjoint))
    return cases


def _compile(fn, *args):
    return ember.jit(fn, backend="cpu").lower(*args).compile()


def _no_numpy():
    """The NumPy implementations of the quantised primitives made unusable."""
    def refuse(*args, **params):
        raise AssertionError("a quantised product ran through NumPy")
    return (mock.patch.dict(quant_matmul_p.impls, {"numpy": refuse}),
            mock.patch.dict(dequantize_p.impls, {"numpy": refuse}))


def test_compiled_products_match_the_numpy_backend_with_no_fallback():
    cases = _product_cases()
    xs, ws = [c[0] for c in cases], [c[1] for c in cases]

    def fn(xs, ws):
        return _products([(x, w, fmt, adj) for x, w, (_, _, fmt, adj) in zip(xs, ws, cases)])

    compiled = _compile(fn, xs, ws)
    text = compiled.as_text()
    for fmt in FORMATS:
        for kernel in (f"ember_qmv_{fmt}_m1", f"ember_qmvt_{fmt}_m1", f"ember_qmv_{fmt}_m6",
                       f"ember_qmvt_{fmt}_m6", f"ember_qmv_{fmt}_m8", f"ember_qmvt_{fmt}_m5",
                       f"ember_qmm_{fmt}(0,", f"ember_qmm_{fmt}(1,"):
            assert kernel + ("" if kernel.endswith(",") else "(") in text, kernel
    refuse_mm, refuse_dq = _no_numpy()
    with refuse_mm, refuse_dq:
        got = compiled(xs, ws)
    want = ember.jit(fn)(xs, ws)
    for (x, w, fmt, adjoint), g, e in zip(cases, got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{fmt} x{list(x.shape)} adjoint={adjoint}")


def test_compiled_dequantize_of_gathered_rows_is_bitwise():
    packed = {fmt: random_blocks(fmt, 9, FORMATS[fmt].block, seed=4) for fmt in FORMATS}
    ids = np.array([[3, 0], [8, 3]], np.int32)

    def fn(packed, ids):
        return [dequantize(packed[fmt][ids], fmt) for fmt in FORMATS]

    compiled = _compile(fn, packed, ids)
    refuse_mm, refuse_dq = _no_numpy()
    with refuse_mm, refuse_dq:
        got = compiled(packed, ids)
    for fmt, g in zip(FORMATS, got, strict=True):
        assert g.shape == (2, 2, FORMATS[fmt].block)
        np.testing.assert_array_equal(np.asarray(g), dequantize_rows(packed[fmt][ids], fmt))


def test_other_dtypes_run_through_numpy():
    packed = random_blocks("q8_0", 4, 32)
    x = np.random.default_rng(5).standard_normal((2, 32))
    compiled = _compile(lambda x, w: quant_matmul(x, w, "q8_0"), x, packed)
    assert "ember_qmv_q8_0" not in compiled.as_text()
    np.testing.assert_allclose(np.asarray(compiled(x, packed)),
                               _reference(x, packed, "q8_0", False), rtol=1e-12)


# --- a packed model -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_packed_llama_forward_and_qlora_grad_match_the_numpy_backend(fmt):
    model = nn.quantize(tiny_model(64, seed=1), fmt, embeddings=True)
    nn.apply_lora(model, rank=4, targets=("q_proj", "down_proj"), key=ember.random.key(0))
    ids = enp.asarray(np.random.default_rng(6).integers(0, 64, (2, 7)))
    one = ids[:1, :1]  # decode-sized: one row through the direct kernels

    def forward(m, ids):
        return m(ids)

    def grad(m, ids):
        return nn.value_and_grad(lambda m, i: m.loss(i))(m, ids)

    for fn, inputs in ((forward, one), (forward, ids), (grad, ids)):
        want = ember.jit(fn)(model, inputs)
        got = ember.jit(fn, backend="cpu")(model, inputs)
        want, got = ember.tree.tree_leaves(want), ember.tree.tree_leaves(got)
        assert len(got) == len(want)
        for g, e in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5)
    text = _compile(grad, model, ids).as_text()
    assert f"ember_qmvt_{fmt}_m" in text and f"ember_decode_rows_{fmt}(" in text


def _products_on_one_and_two_threads(cases):
    """The products of ``cases`` (x, packed W, format, adjoint) compiled as one program and run
    with 1 and with 2 threads: (results on 1, results on 2, the program's C)."""
    from test_cpu_gemv import results_on_threads

    xs, ws = [c[0] for c in cases], [c[1] for c in cases]

    def fn(xs, ws):
        return _products([(x, w, fmt, adj) for x, w, (_, _, fmt, adj) in zip(xs, ws, cases)])

    one, source = results_on_threads(fn, (xs, ws), 1)
    two, _ = results_on_threads(fn, (xs, ws), 2)
    return one, two, source


def test_direct_kernels_on_threads_give_the_bits_of_one_thread():
    """Above ``SERIAL_BYTES`` of W the direct kernels share W's rows among the threads (below,
    one thread runs them all): every row's sum is still made by one thread in one order."""
    rng = np.random.default_rng(13)
    cases = []
    for i, fmt in enumerate(FORMATS):
        k = 2 * FORMATS[fmt].block
        n = quant.SERIAL_BYTES // FORMATS[fmt].row_bytes(k) + 5  # W just over the threshold
        packed = random_blocks(fmt, n, k, seed=30 + i)
        for m in (1, 3):
            cases.append((rng.standard_normal((m, k)).astype(np.float32), packed, fmt, False))
    one, two, source = _products_on_one_and_two_threads(cases)
    assert source.count("ember_qmv_") >= 2 * len(FORMATS)
    for (x, w, fmt, _), a, b in zip(cases, one, two, strict=True):
        assert w.nbytes * len(x) >= quant.SERIAL_BYTES
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), f"{fmt} M={len(x)}")
        np.testing.assert_allclose(a, _reference(x, w, fmt, False), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{fmt} M={len(x)}")


def test_panels_are_cut_into_pieces_with_the_same_bits_on_one_and_two_threads():
    rng = np.random.default_rng(12)
    m, n, k = quant.BLAS_ROWS + 8, 256, 512
    cases = []
    for i, fmt in enumerate(FORMATS):
        packed = random_blocks(fmt, n, k, seed=20 + i)
        for adjoint in (False, True):
            assert quant.panel_step(fmt, adjoint, m, n, k) < (k if adjoint else n)  # pieces
            x = rng.standard_normal((m, n if adjoint else k)).astype(np.float32)
            cases.append((x, packed, fmt, adjoint))
    one, two, source = _products_on_one_and_two_threads(cases)
    assert source.count("ember_qmm_") >= 2 * len(FORMATS)
    for (x, w, fmt, adjoint), a, b in zip(cases, one, two, strict=True):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), f"{fmt} {adjoint}")
        want = _reference(x, w, fmt, adjoint)  # sums of 256 or 512 terms: scaled tolerance
        np.testing.assert_allclose(a, want, rtol=0, atol=ATOL * np.abs(want).max())
