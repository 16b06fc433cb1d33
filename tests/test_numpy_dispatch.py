"""NumPy's own functions on Ember arrays (``__array_function__`` / ``__array_ufunc__``).

Functions Ember has run in Ember and return Ember arrays, eagerly and under transformations;
others run in NumPy on host copies (eagerly) or raise naming the function (under a
transformation); ``out=`` never writes into an Ember array.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

import ember
import ember.numpy as enp

X = np.arange(1.0, 7.0).reshape(2, 3)

FUNCTIONS = [
    (np.sum, {}), (np.sum, {"axis": 0}), (np.mean, {"axis": 1, "keepdims": True}),
    (np.max, {}), (np.min, {"axis": 0}), (np.std, {}), (np.var, {"ddof": 1}), (np.prod, {}),
    (np.transpose, {}), (np.cumsum, {"axis": 1}), (np.argmax, {}), (np.ravel, {}),
    (np.reshape, {"shape": (3, 2)}), (np.clip, {"a_min": 2.0, "a_max": 4.0}),
    (np.sort, {"axis": 0}), (np.linalg.norm, {}), (np.exp, {}), (np.sqrt, {}),
    (np.abs, {}), (np.matmul, None), (np.add, None), (np.maximum, None),
]


@pytest.mark.parametrize("fn,kwargs", FUNCTIONS, ids=lambda v: getattr(v, "__name__", ""))
def test_numpy_functions_run_in_ember_and_return_ember_arrays(fn, kwargs):
    x = enp.asarray(X)
    if kwargs is None:  # binary
        other = X.T if fn is np.matmul else X
        got, want = fn(x, enp.asarray(other)), fn(X, other)
    else:
        got, want = fn(x, **kwargs), fn(X, **kwargs)
    assert isinstance(got, ember.Array)
    assert_close(got, want)


def test_they_stay_in_the_trace_under_jit_grad_and_vmap():
    def loss(w):
        return np.sum(np.tanh(np.matmul(w, np.transpose(w))))

    w = enp.asarray(X)
    assert_close(ember.jit(loss)(w), loss(X))
    g = ember.grad(loss)(w)
    eps = 1e-6
    fd = np.zeros_like(X)
    for idx in np.ndindex(X.shape):
        d = np.zeros_like(X)
        d[idx] = eps
        fd[idx] = (loss(X + d) - loss(X - d)) / (2 * eps)
    assert_close(g, fd, rtol=1e-6, atol=1e-8)
    rows = ember.vmap(lambda r: np.sum(np.exp(r)))(w)
    assert_close(rows, np.exp(X).sum(axis=1))
    assert "reduce_sum" in ember.jit(loss).lower(w).as_text()


def test_ufunc_methods_map_to_ember_reductions():
    x = enp.asarray(X)
    assert_close(np.add.reduce(x), np.add.reduce(X))
    assert_close(np.multiply.reduce(x, axis=1), np.multiply.reduce(X, axis=1))
    assert_close(np.maximum.reduce(x, axis=None), np.maximum.reduce(X, axis=None))
    assert_close(np.add.accumulate(x), np.add.accumulate(X))
    assert_close(np.multiply.outer(x[0], x[1]), np.multiply.outer(X[0], X[1]))
    assert isinstance(np.add.reduce(x), ember.Array)


def test_numpy_operands_on_the_left_give_ember_results():
    out = np.ones(3) + enp.arange(3.0)
    assert isinstance(out, ember.Array)
    assert_close(out, np.ones(3) + np.arange(3.0))
    assert_close(np.arange(3.0) * enp.full(3, 2.0), np.arange(3.0) * 2)


def test_functions_ember_lacks_run_in_numpy_eagerly_and_refuse_tracing():
    x = enp.asarray(X)
    got = np.percentile(x, 40)
    assert isinstance(got, np.floating) and got == np.percentile(X, 40)
    assert np.array_equal(np.gradient(x, axis=1), np.gradient(X, axis=1))
    with pytest.raises(ember.TracerError, match=r"numpy\.percentile is not in ember\.numpy") as e:
        ember.jit(lambda a: np.percentile(a, 40))(x)
    assert "test_numpy_dispatch.py" in str(e.value)


def test_out_fills_numpy_arrays_and_refuses_ember_arrays():
    x = enp.asarray(X)
    host = np.zeros((2, 3))
    assert np.add(x, x, out=host) is host
    np.testing.assert_array_equal(host, 2 * X)
    acc = np.zeros(3)
    acc += enp.ones(3)
    np.testing.assert_array_equal(acc, 1)
    with pytest.raises(ember.EmberError, match="out= cannot be an ember array"):
        np.add(x, x, out=enp.zeros((2, 3)))
    with pytest.raises(ember.EmberError, match="in place"):
        np.add.at(x, [0], 1.0)
    host = np.zeros(3)
    np.add.at(host, [0, 0, 2], enp.ones(3))  # into a NumPy array: NumPy's own semantics
    np.testing.assert_array_equal(host, [2, 0, 1])


def test_arguments_ember_does_not_take_are_named_not_dropped():
    with pytest.raises(ember.EmberError, match=r"numpy\.mean: .*does not take.*where"):
        np.mean(enp.asarray(X), where=X > 2)


def test_masked_ufuncs_follow_numpy():
    x = enp.asarray(X)
    out = np.zeros((2, 3))
    mask = X > 3
    np.add(x, 1.0, out=out, where=mask)
    np.testing.assert_array_equal(out, np.where(mask, X + 1, 0))
