"""Choosing the default backend: ``set_default_backend`` and ``EMBER_BACKEND``; ``jit`` without
``backend=`` follows the default at each call, with the backend in its cache key."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember.backends import default_backend, get_backend, set_default_backend
from ember.backends.cpu import toolchain
from ember.errors import EmberError
from ember.models import generate as gen


def f(x, w):
    return enp.tanh(x @ w).sum(axis=0)


X = np.random.default_rng(0).standard_normal((4, 3))
W = np.random.default_rng(1).standard_normal((3, 2))


def test_unknown_name_is_refused_and_the_default_kept(recording_backend):
    before = default_backend().name
    with pytest.raises(EmberError, match=r"unknown backend 'nope'; available: .*'cpu'.*'numpy'"):
        set_default_backend("nope")
    assert default_backend().name == before


def test_jitted_function_follows_a_later_default_with_one_entry_per_backend(recording_backend):
    set_default_backend("numpy")
    jf = ember.jit(f)  # made before the switch, as a module-level function is
    np.testing.assert_allclose(np.asarray(jf(X, W)), np.tanh(X @ W).sum(0))
    assert recording_backend.compiled == []
    set_default_backend(recording_backend.name)
    out = jf(X, W)
    np.testing.assert_allclose(np.asarray(out), np.tanh(X @ W).sum(0))
    assert len(recording_backend.compiled) == 1 and out._backend is recording_backend
    info = jf.cache_info()
    assert info["traces"] == 2 and info["entries"] == 2
    assert info["last_retrace_reason"] == f"backend changed: numpy -> {recording_backend.name}"
    set_default_backend("numpy")
    jf(X, W)  # the numpy entry is still there: a hit, nothing compiled
    assert jf.cache_info()["traces"] == 2 and jf.cache_info()["hits"] == 1
    assert len(recording_backend.compiled) == 1
    assert jf.lower(X, W).backend == "numpy"


def test_explicit_backend_ignores_the_default(recording_backend):
    set_default_backend(recording_backend.name)
    jf = ember.jit(f, backend="numpy")
    np.testing.assert_allclose(np.asarray(jf(X, W)), np.tanh(X @ W).sum(0))
    assert recording_backend.compiled == [] and jf.lower(X, W).backend == "numpy"
    assert jf.cache_info()["traces"] == 1


def test_new_arrays_and_eager_results_live_on_the_default(recording_backend):
    set_default_backend(recording_backend.name)
    a = enp.asarray(X)
    assert a._backend is recording_backend
    assert (a + 1)._backend is recording_backend


def test_grad_of_jit_under_a_new_default(recording_backend):
    jf = ember.jit(lambda x, w: f(x, w).sum())
    g0 = ember.grad(jf, argnums=1)(X, W)
    set_default_backend(recording_backend.name)
    g1 = ember.jit(ember.grad(jf, argnums=1))(X, W)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g0), X.T @ (1 - np.tanh(X @ W) ** 2))
    assert recording_backend.compiled  # the outer program ran on the new default


def test_generate_steps_defined_at_module_level_follow_the_default(recording_backend):
    model = tiny_model(40)
    prompts = [[3, 5, 7, 9]]
    # A penalty, so that greedy decoding runs the sampling step (plain greedy skips it).
    sampling = gen.SamplingConfig(repetition_penalty=1.3)
    want = gen.generate_ids(model, prompts, max_new_tokens=4, sampling=sampling)
    set_default_backend(recording_backend.name)
    got = gen.generate_ids(model, prompts, max_new_tokens=4, sampling=sampling)
    assert got == want
    for step in (gen._extend, gen._sample):
        assert any(key.backend == recording_backend.name for key in step._cache), step._name


def _run(code: str, backend: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBER_BACKEND": backend}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def test_environment_variable_sets_the_initial_default():
    """``cpu`` runs with or without a C compiler (without one, on NumPy after a warning)."""
    code = ("import numpy as np, ember, ember.numpy as enp\n"
            "from ember.backends import default_backend\n"
            "jf = ember.jit(lambda x: x * 2)\n"
            "print(default_backend().name, float(jf(np.ones(2)).sum()),"
            " jf.lower(np.ones(2)).backend)\n")
    done = _run(code, "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cpu", "4.0", "cpu"]
    done = _run(code, "bogus")
    assert done.returncode != 0
    assert ("unknown backend 'bogus' (the default, from the EMBER_BACKEND environment "
            "variable)") in done.stderr


@pytest.mark.skipif(not toolchain.available(), reason="no C compiler")
def test_default_cpu_compiles_to_c_and_matches_numpy(recording_backend):
    want = ember.jit(f, backend="numpy")(X, W)
    set_default_backend("cpu")
    jf = ember.jit(f)
    np.testing.assert_allclose(np.asarray(jf(X, W)), np.asarray(want), rtol=1e-12)
    text = jf.lower(X, W).compile().as_text()
    assert text.startswith("#include") and "cblas_dgemm" in text  # C, the product by BLAS
    assert get_backend().name == "cpu"
