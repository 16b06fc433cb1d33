"""Transformations and their compositions: grad/vjp/jvp/linearize/vmap against finite
differences, Python loops and each other, including higher-order derivatives.

Tests taking ``run`` compute the transformed function eagerly, jitted on the NumPy backend and
jitted on the compiled cpu backend, against the same references."""

import numpy as np
import pytest
from helpers import needs_cc, numeric_grad

import ember
import ember.numpy as enp


def loss(w, x):
    return enp.mean((enp.tanh(x @ w) - 1) ** 2)


W = np.random.default_rng(0).normal(size=(4, 2))
X = np.random.default_rng(1).normal(size=(3, 4))


@pytest.fixture(params=[
    pytest.param(lambda f: f, id="eager"),
    pytest.param(lambda f: ember.jit(f, backend="numpy"), id="jit-numpy"),
    pytest.param(lambda f: ember.jit(f, backend="cpu"), id="jit-cpu", marks=needs_cc),
])
def run(request):
    """``run(f)``: ``f`` as the test runs it."""
    return request.param


def test_grad_matches_finite_differences(run):
    g = run(ember.grad(loss))(W, X)
    np.testing.assert_allclose(np.asarray(g), numeric_grad(lambda w: loss(w, X), W), rtol=1e-6,
                               atol=1e-9)


def test_value_and_grad_argnums_and_has_aux(run):
    def f(w, x):
        out = loss(w, x)
        return out, {"scaled": out * 2}

    (value, aux), (gw, gx) = run(ember.value_and_grad(f, argnums=(0, 1), has_aux=True))(W, X)
    np.testing.assert_allclose(float(aux["scaled"]), 2 * float(value))
    np.testing.assert_allclose(np.asarray(gx), numeric_grad(lambda x: loss(W, x), X),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(ember.grad(loss)(W, X)), rtol=1e-12)


def test_grad_over_pytree_params(run):
    params = {"w": W, "b": np.zeros(2)}

    def f(p, x):
        return enp.sum(enp.tanh(x @ p["w"] + p["b"]) ** 2)

    g = run(ember.grad(f))(params, X)
    assert set(g) == {"w", "b"}
    np.testing.assert_allclose(np.asarray(g["b"]),
                               numeric_grad(lambda b: f({"w": W, "b": b}, X), np.zeros(2)),
                               rtol=1e-6, atol=1e-9)


def test_python_control_flow_on_concrete_values_under_grad():
    def f(x):
        if x > 0:  # concrete under eager grad, as in PyTorch
            return x ** 3
        return -x

    assert float(ember.grad(f)(2.0)) == pytest.approx(12.0)
    assert float(ember.grad(f)(-2.0)) == pytest.approx(-1.0)


def test_grad_of_grad_and_jvp_of_grad(run):
    f = lambda x: enp.sin(x) * x ** 2  # noqa: E731
    d2 = ember.grad(ember.grad(f))
    x = 0.7
    expected = -np.sin(x) * x ** 2 + 4 * x * np.cos(x) + 2 * np.sin(x)
    assert float(run(d2)(x)) == pytest.approx(expected, rel=1e-10)
    _, t = run(lambda x: ember.jvp(ember.grad(f), (x,), (1.0,)))(x)
    assert float(t) == pytest.approx(expected, rel=1e-10)
    d3 = run(ember.grad(ember.grad(ember.grad(f))))
    assert float(d3(x)) == pytest.approx(
        numeric_grad(lambda v: d2(float(v)), np.asarray(x), eps=1e-5), rel=1e-5)


def test_jvp_and_vjp_are_adjoint(run):
    rng = np.random.default_rng(2)
    t = rng.normal(size=W.shape)
    ct = 1.7
    f = lambda w: loss(w, X)  # noqa: E731
    _, jv = run(lambda w, t: ember.jvp(f, (w,), (t,)))(W, t)
    (vj,) = run(lambda w, ct: ember.vjp(f, w)[1](ct))(W, ct)
    assert float(jv) * ct == pytest.approx(float(np.sum(np.asarray(vj) * t)), rel=1e-10)


def test_linearize_matches_jvp(run):
    def linearized(w, t):
        out, f_jvp = ember.linearize(lambda w: enp.tanh(X @ w), w)
        return out, f_jvp(t)

    t = np.random.default_rng(7).normal(size=W.shape)
    out, lin = run(linearized)(W, t)
    _, expected = ember.jvp(lambda w: enp.tanh(X @ w), (W,), (t,))
    np.testing.assert_allclose(np.asarray(lin), np.asarray(expected), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out), np.tanh(X @ W), rtol=1e-12)


def test_vmap_matches_loop_with_in_and_out_axes(run):
    xs = np.random.default_rng(3).normal(size=(5, 3, 4))
    out = run(ember.vmap(loss, in_axes=(None, 0)))(W, xs)
    expected = [float(loss(W, x)) for x in xs]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12)
    out2 = run(ember.vmap(lambda x: x @ W, in_axes=1, out_axes=1))(np.moveaxis(xs, 0, 1))
    np.testing.assert_allclose(np.asarray(out2), np.moveaxis(xs @ W, 0, 1), rtol=1e-12)


def test_nested_vmap_and_vmap_of_grad(run):
    a = np.random.default_rng(4).normal(size=(2, 3, 4))
    outer = run(ember.vmap(ember.vmap(lambda v: enp.sum(v * v))))(a)
    np.testing.assert_allclose(np.asarray(outer), (a * a).sum(-1), rtol=1e-12)
    per_example = run(ember.vmap(ember.grad(loss), in_axes=(None, 0)))(W, a)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(per_example[i]),
                                   np.asarray(ember.grad(loss)(W, a[i])), rtol=1e-10)


def test_stop_gradient(run):
    f = lambda x: x * ember.stop_gradient(x)  # noqa: E731
    assert float(run(ember.grad(f))(3.0)) == pytest.approx(3.0)


def test_grad_errors():
    with pytest.raises(ember.ShapeError, match="scalar"):
        ember.grad(lambda x: x * 2)(np.ones(3))
    with pytest.raises(ember.DTypeError, match="floating"):
        ember.grad(lambda x: (x * 2).sum())(np.ones(3, dtype=np.int64))


def test_vmap_errors():
    with pytest.raises(ember.ShapeError, match="different sizes"):
        ember.vmap(lambda a, b: a + b)(np.ones(3), np.ones(4))


def test_grad_through_indexing_and_updates(run):
    def f(x):
        y = x.at[1].set(0.0)
        return enp.sum(y[::2] ** 2) + enp.sum(x[[0, 0, 2]])

    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(np.asarray(run(ember.grad(f))(x)),
                               numeric_grad(lambda v: f(enp.asarray(v)), x), rtol=1e-6)
