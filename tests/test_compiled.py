"""``jit(f).lower(...).compile()``: a ``Compiled`` called as the function is, showing its
program (the graph on the NumPy backend, the C on the cpu backend) and its memory report."""

from __future__ import annotations

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember.backends.cpu import toolchain
from ember.errors import EmberError, UnsupportedError

needs_cc = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")


def layer(params, x):
    return {"y": enp.tanh(x @ params["w"] + params["b"]), "norm": (x * x).sum()}


@pytest.fixture
def args():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((8, 5)).astype(np.float32),
              "b": rng.standard_normal(5).astype(np.float32)}
    return params, rng.standard_normal((4, 8)).astype(np.float32)


def expected(params, x):
    return {"y": np.tanh(x @ params["w"] + params["b"]), "norm": (x * x).sum()}


def check(out, params, x):
    want = expected(params, x)
    assert set(out) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(out[k]), want[k], rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpu", marks=needs_cc)])
def test_compiled_is_called_as_the_function(backend, args):
    compiled = ember.jit(layer, backend=backend).lower(*args).compile()
    check(compiled(*args), *args)
    params, x = args
    check(compiled(params, 2 * x), params, 2 * x)  # same signature, new values
    with pytest.raises(EmberError, match="compiled function called with structure"):
        compiled(params["w"], x)


def test_numpy_program_shows_its_graph_and_has_no_memory_report(args):
    lowered = ember.jit(layer, backend="numpy").lower(*args)
    compiled = lowered.compile()
    assert compiled.as_text() == lowered.as_text()
    assert "dot_general" in compiled.as_text() and "tanh" in compiled.as_text()
    with pytest.raises(UnsupportedError, match="'numpy' backend .* no memory report"):
        compiled.memory_analysis()


@needs_cc
def test_cpu_program_shows_its_c_and_reports_its_memory(args):
    params, x = args
    compiled = ember.jit(layer, backend="cpu").lower(params, x).compile()
    text = compiled.as_text()
    assert text.startswith("#include") and "void ember_" in text  # C functions
    assert "cblas_sgemm" in text  # the product calls BLAS
    assert text == compiled.program.as_text()
    report = compiled.memory_analysis()
    assert report.argument_bytes == params["w"].nbytes + params["b"].nbytes + x.nbytes
    assert report.output_bytes == 4 * 5 * 4 + 4  # y (f32[4,5]) and norm (f32[])
    assert report.alias_bytes == 0
    assert report.temp_lower_bound <= report.temp_bytes
    assert report.peak_bytes == report.temp_bytes + report.argument_bytes + report.output_bytes
    assert "peak" in str(report)


@needs_cc
def test_cpu_memory_report_counts_donated_outputs_as_aliases():
    cache = np.zeros((16, 8), np.float32)
    row = np.ones((1, 8), np.float32)

    def write(cache, row):
        return cache.at[3:4].set(row * 2.0)

    compiled = ember.jit(write, backend="cpu", donate_argnums=0).lower(cache, row).compile()
    report = compiled.memory_analysis()
    assert report.alias_bytes == cache.nbytes
    assert report.output_bytes == 0
    out = compiled(enp.array(cache), row)
    want = cache.copy()
    want[3] = 2.0
    np.testing.assert_array_equal(np.asarray(out), want)


def test_cpu_without_a_compiler_shows_the_graph_and_says_there_is_no_report(monkeypatch,
                                                                           tmp_path, args):
    monkeypatch.setenv("EMBER_CC", str(tmp_path / "nonexistent"))
    lowered = ember.jit(layer, backend="cpu").lower(*args)
    with pytest.warns(UserWarning, match="no C compiler"):
        monkeypatch.setattr(ember.backends.get_backend("cpu"), "_warned", False)
        compiled = lowered.compile()
    check(compiled(*args), *args)
    assert compiled.as_text() == lowered.as_text()
    with pytest.raises(UnsupportedError, match="'cpu' backend .* no memory report"):
        compiled.memory_analysis()
