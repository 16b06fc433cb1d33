"""ember.lax control flow: cond/switch, while_loop, fori_loop, scan, map.

Each is checked against a Python/NumPy loop eagerly and under jit, vmap, jvp and grad (grad of
grad where reverse mode applies), with gradients compared to finite differences.
"""

import numpy as np
import pytest
from helpers import numeric_grad

import ember
import ember.numpy as enp
from ember import lax
from ember.transforms.linearize import linearize_flat

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4,))
W = RNG.normal(size=(3, 3)) * 0.5
XS = RNG.normal(size=(5, 3))


# --- cond / switch ---------------------------------------------------------------------------

def branchy(p, x):
    return lax.cond(p, lambda y: enp.sin(y) * 2.0, lambda y: y * y + 1.0, x)


@pytest.mark.parametrize("pred", [True, False])
def test_cond_eager_and_jit(pred):
    expected = np.sin(X) * 2 if pred else X * X + 1
    np.testing.assert_allclose(branchy(pred, X), expected)
    np.testing.assert_allclose(ember.jit(branchy)(pred, X), expected)


def test_cond_is_in_the_jit_graph():
    text = ember.jit(branchy).lower(True, X).as_text()
    assert "cond(" in text and "branches[0]" in text and "branches[1]" in text


def test_cond_integer_predicate_and_pytrees():
    def f(n, tree):
        return lax.cond(n, lambda t: {"a": t[0] + 1.0, "b": t[1]},
                        lambda t: {"a": t[0] - 1.0, "b": t[1] * 2}, tree)

    out = ember.jit(f)(3, (X, 2))
    np.testing.assert_allclose(out["a"], X + 1)
    assert int(out["b"]) == 2
    out = f(0, (X, 2))
    np.testing.assert_allclose(out["a"], X - 1)
    assert int(out["b"]) == 4


def test_switch_clamps_index():
    branches = [lambda x: x + 0.0, lambda x: x * 10.0, lambda x: -x]
    for i, expected in [(0, X), (1, 10 * X), (2, -X), (7, -X), (-3, X)]:
        np.testing.assert_allclose(lax.switch(i, branches, X), expected)
        np.testing.assert_allclose(ember.jit(lambda i, x: lax.switch(i, branches, x))(i, X),
                                   expected)


def test_cond_weak_scalar_branch_takes_other_dtype():
    x = enp.asarray(np.float32(2.0))
    out = lax.cond(False, lambda v: v * v, lambda v: 0.5, x)
    assert out.dtype == np.float32 and float(out) == 0.5


@pytest.mark.parametrize("pred", [0.3, -0.3])
def test_cond_grad_and_grad_of_grad(pred):
    f = lambda a: lax.cond(a > 0, lambda b: enp.sin(b) * b, lambda b: b ** 3, a)
    if pred > 0:
        d1, d2 = np.sin(pred) + pred * np.cos(pred), 2 * np.cos(pred) - pred * np.sin(pred)
    else:
        d1, d2 = 3 * pred ** 2, 6 * pred
    np.testing.assert_allclose(ember.grad(f)(pred), d1)
    np.testing.assert_allclose(ember.grad(ember.grad(f))(pred), d2)
    np.testing.assert_allclose(ember.jit(ember.grad(ember.grad(f)))(pred), d2)


def test_cond_grad_through_closure_over_outer_value():
    # The branch closes over `w`, a value being differentiated (an outer tracer).
    def f(w, x):
        return enp.sum(lax.cond(enp.sum(x) > 0, lambda y: y * w, lambda y: y + w, x))

    for x in (X, -np.abs(X)):
        np.testing.assert_allclose(ember.grad(f)(1.5, x),
                                   numeric_grad(lambda w: f(float(w), x), 1.5), rtol=1e-6)
        np.testing.assert_allclose(ember.grad(f, argnums=1)(1.5, x),
                                   numeric_grad(lambda v: f(1.5, v), x), rtol=1e-6)
        np.testing.assert_allclose(ember.jit(ember.grad(f))(1.5, x),
                                   numeric_grad(lambda w: f(float(w), x), 1.5), rtol=1e-6)


def test_cond_jvp():
    f = lambda x: lax.cond(x[0] > 0, lambda y: enp.exp(y), lambda y: y * 3.0, x)
    _, t = ember.jvp(f, (X,), (np.ones_like(X),))
    expected = np.exp(X) if X[0] > 0 else 3 * np.ones_like(X)
    np.testing.assert_allclose(t, expected)


def test_cond_vmap_batched_and_unbatched_predicate():
    preds = np.array([True, False, True, False])
    xs = RNG.normal(size=(4, 3))
    expected = np.where(preds[:, None], np.sin(xs) * 2, xs * xs + 1)
    np.testing.assert_allclose(ember.vmap(branchy)(preds, xs), expected)
    np.testing.assert_allclose(ember.jit(ember.vmap(branchy))(preds, xs), expected)
    np.testing.assert_allclose(ember.vmap(branchy, in_axes=(None, 0))(True, xs),
                               np.sin(xs) * 2)
    idx = np.array([0, 2, 1, 5])
    out = ember.vmap(lambda i, x: lax.switch(i, [lambda v: v, lambda v: 2 * v,
                                                 lambda v: -v], x))(idx, xs)
    np.testing.assert_allclose(out, xs * np.array([1, -1, 2, -1])[:, None])


def test_cond_grad_of_vmap_and_vmap_of_grad():
    preds = np.array([True, False, True, False])
    xs = RNG.normal(size=(4, 3))
    g = ember.grad(lambda x: enp.sum(ember.vmap(branchy)(preds, x)))(xs)
    np.testing.assert_allclose(g, np.where(preds[:, None], 2 * np.cos(xs), 2 * xs))
    g = ember.vmap(ember.grad(lambda p, x: enp.sum(branchy(p, x)), argnums=1))(preds, xs)
    np.testing.assert_allclose(g, np.where(preds[:, None], 2 * np.cos(xs), 2 * xs))


def test_cond_errors_name_branches_and_shapes():
    with pytest.raises(ember.ShapeError, match=r"cond: output 0 has shape \(4,\) in true_fun but "
                                                r"\(2,\) in false_fun"):
        lax.cond(True, lambda x: x, lambda x: x[:2], X)
    with pytest.raises(ember.DTypeError, match="cond: output 0 has different dtypes"):
        lax.cond(True, lambda x: x, lambda x: enp.asarray(x, dtype=np.int32), X)
    with pytest.raises(ember.EmberError, match="true_fun returns a value of structure"):
        lax.cond(True, lambda x: x, lambda x: (x, x), X)
    with pytest.raises(ember.ShapeError, match="predicate must be a scalar"):
        lax.cond(np.array([True, False]), lambda x: x, lambda x: x, X)
    with pytest.raises(ember.DTypeError, match="predicate must be bool or integer"):
        lax.cond(1.5, lambda x: x, lambda x: x, X)


# --- while_loop ------------------------------------------------------------------------------

def collatz_steps(n):
    return lax.while_loop(lambda c: c[0] != 1,
                          lambda c: (lax.cond(c[0] % 2 == 0, lambda m: m // 2,
                                              lambda m: 3 * m + 1, c[0]), c[1] + 1),
                          (n, 0))[1]


def py_collatz(n):
    steps = 0
    while n != 1:
        n, steps = (n // 2 if n % 2 == 0 else 3 * n + 1), steps + 1
    return steps


def test_while_loop_eager_jit_vmap():
    ns = np.array([6, 7, 27, 1])
    for n in ns:
        assert int(collatz_steps(int(n))) == py_collatz(int(n))
        assert int(ember.jit(collatz_steps)(int(n))) == py_collatz(int(n))
    np.testing.assert_array_equal(ember.vmap(collatz_steps)(ns), [py_collatz(int(n)) for n in ns])
    np.testing.assert_array_equal(ember.jit(ember.vmap(collatz_steps))(ns),
                                  [py_collatz(int(n)) for n in ns])


def test_while_loop_vmap_unbatched_predicate():
    f = lambda k, x: lax.while_loop(lambda c: c[0] < k, lambda c: (c[0] + 1, c[1] * 1.5),
                                    (0, x))[1]
    np.testing.assert_allclose(ember.vmap(f, in_axes=(None, 0))(3, X), X * 1.5 ** 3)


def test_while_loop_jvp_and_grad_error():
    f = lambda x: lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, enp.sin(c[1])),
                                 (0, x))[1]
    s, expected = X, np.ones_like(X)
    for _ in range(4):
        s, expected = np.sin(s), expected * np.cos(s)
    _, t = ember.jvp(f, (X,), (np.ones_like(X),))
    np.testing.assert_allclose(t, expected)
    _, t = ember.jit(lambda x, t: ember.jvp(f, (x,), (t,)))(X, np.ones_like(X))
    assert np.all(np.isfinite(np.asarray(t)))
    with pytest.raises(ember.UnsupportedError, match="while_loop.*fori_loop"):
        ember.grad(lambda x: enp.sum(f(x)))(X)


def test_while_loop_errors():
    with pytest.raises(ember.DTypeError, match="while_loop: cond_fun must return a bool"):
        lax.while_loop(lambda c: c, lambda c: c + 1, 1)
    with pytest.raises(ember.ShapeError, match="while_loop: carry leaf 0 has shape"):
        lax.while_loop(lambda c: enp.sum(c) < 3, lambda c: enp.stack([c, c]), X)


# --- fori_loop -------------------------------------------------------------------------------

def test_fori_loop_static_bounds_is_a_differentiable_scan():
    f = lambda a: lax.fori_loop(1, 4, lambda i, v: v * a + i, 1.0)  # a^3 + a^2 + 2a + 3
    np.testing.assert_allclose(f(2.0), 19.0)
    np.testing.assert_allclose(ember.jit(f)(2.0), 19.0)
    assert "scan[" in ember.jit(f).lower(2.0).as_text()
    np.testing.assert_allclose(ember.grad(f)(2.0), 3 * 4 + 2 * 2 + 2)
    np.testing.assert_allclose(ember.grad(ember.grad(f))(2.0), 6 * 2 + 2)
    np.testing.assert_allclose(lax.fori_loop(5, 2, lambda i, v: v + 1.0, 0.0), 0.0)


def test_fori_loop_traced_bounds_is_a_while():
    f = ember.jit(lambda n, x: lax.fori_loop(0, n, lambda i, v: v + i * x, 0.0))
    np.testing.assert_allclose(f(5, 2.0), 20.0)
    assert "while[" in ember.jit(lambda n, x: lax.fori_loop(0, n, lambda i, v: v + x, 0.0)
                                 ).lower(5, 2.0).as_text()


# --- scan ------------------------------------------------------------------------------------

def rnn(w, h0, xs):
    def step(h, x):
        h = enp.tanh(w @ h + x)
        return h, enp.sum(h * h)
    return lax.scan(step, h0, xs)


def np_rnn(w, h0, xs):
    h, ys = h0, []
    for x in xs:
        h = np.tanh(w @ h + x)
        ys.append(np.sum(h * h))
    return h, np.array(ys)


def test_scan_matches_python_loop_eager_and_jit():
    h0 = np.zeros(3)
    for run in (rnn, ember.jit(rnn)):
        h, ys = run(W, h0, XS)
        eh, eys = np_rnn(W, h0, XS)
        np.testing.assert_allclose(h, eh)
        np.testing.assert_allclose(ys, eys)


def test_scan_reverse_pytrees_length_and_no_ys():
    carry, ys = lax.scan(lambda c, x: ((c[0] + x["a"], c[1] * 2), x["a"] * c[1]),
                         (0.0, 1.0), {"a": np.arange(4.0)}, reverse=True)
    # reverse: visits 3, 2, 1, 0; ys aligned with xs.
    np.testing.assert_allclose(carry[0], 6.0)
    np.testing.assert_allclose(carry[1], 16.0)
    np.testing.assert_allclose(ys, [0 * 8, 1 * 4, 2 * 2, 3 * 1])
    carry, ys = lax.scan(lambda c, _: (c + 1, None), 0, None, length=5)
    assert int(carry) == 5 and ys is None
    np.testing.assert_allclose(lax.map(lambda x: x * 2, XS), XS * 2)
    carry, ys = lax.scan(lambda c, x: (c, x), 0.0, np.zeros((0, 2)))
    assert ys.shape == (0, 2)


def test_scan_vmap():
    xs_b = RNG.normal(size=(2, 5, 3))
    h0_b = RNG.normal(size=(2, 3))
    h, ys = ember.vmap(rnn, in_axes=(None, 0, 0))(W, h0_b, xs_b)
    for b in range(2):
        eh, eys = np_rnn(W, h0_b[b], xs_b[b])
        np.testing.assert_allclose(h[b], eh)
        np.testing.assert_allclose(ys[b], eys)
    # batched xs on another axis, unbatched init (the carry becomes batched).
    h, _ = ember.vmap(rnn, in_axes=(None, None, 1))(W, np.zeros(3), xs_b.transpose(1, 0, 2))
    np.testing.assert_allclose(h[1], np_rnn(W, np.zeros(3), xs_b[1])[0])


def test_scan_grad_matches_finite_differences():
    h0 = RNG.normal(size=3)
    loss = lambda w, h0, xs: enp.sum(rnn(w, h0, xs)[1]) + enp.sum(rnn(w, h0, xs)[0])
    np_loss = lambda w, h0, xs: np.sum(np_rnn(w, h0, xs)[1]) + np.sum(np_rnn(w, h0, xs)[0])
    gw, gh, gx = ember.grad(loss, argnums=(0, 1, 2))(W, h0, XS)
    np.testing.assert_allclose(gw, numeric_grad(lambda w: np_loss(w, h0, XS), W), rtol=1e-5)
    np.testing.assert_allclose(gh, numeric_grad(lambda h: np_loss(W, h, XS), h0), rtol=1e-5)
    np.testing.assert_allclose(gx, numeric_grad(lambda x: np_loss(W, h0, x), XS), rtol=1e-5)
    gw2 = ember.jit(ember.grad(loss))(W, h0, XS)
    np.testing.assert_allclose(gw2, gw, rtol=1e-10)


def test_scan_grad_of_grad_and_reverse():
    xs = np.arange(1.0, 4.0)
    for reverse in (False, True):
        f = lambda a, r=reverse: lax.scan(lambda c, x: (c * enp.sin(x * a), c), 1.0, xs,
                                          reverse=r)[0]
        np_f = lambda a: np.prod(np.sin(xs * a))
        np.testing.assert_allclose(ember.grad(f)(0.7), numeric_grad(np_f, 0.7), rtol=1e-6)
        d2 = (np_f(0.7 + 1e-4) - 2 * np_f(0.7) + np_f(0.7 - 1e-4)) / 1e-8
        np.testing.assert_allclose(ember.grad(ember.grad(f))(0.7), d2, rtol=1e-5)


def test_nested_cond_in_scan_with_grad():
    def f(a, xs):
        def step(c, x):
            c = lax.cond(x > 0, lambda v: v * a + x, lambda v: enp.sin(v) - x, c)
            return c, c * c
        c, ys = lax.scan(step, 0.5, xs)
        return c + enp.sum(ys)

    def np_f(a, xs):
        c, total = 0.5, 0.0
        for x in xs:
            c = c * a + x if x > 0 else np.sin(c) - x
            total += c * c
        return c + total

    xs = RNG.normal(size=6)
    np.testing.assert_allclose(f(0.9, xs), np_f(0.9, xs))
    np.testing.assert_allclose(ember.jit(f)(0.9, xs), np_f(0.9, xs))
    np.testing.assert_allclose(ember.grad(f)(0.9, xs), numeric_grad(lambda a: np_f(a, xs), 0.9),
                               rtol=1e-6)
    np.testing.assert_allclose(ember.grad(f, argnums=1)(0.9, xs),
                               numeric_grad(lambda v: np_f(0.9, v), xs), rtol=1e-5)
    np.testing.assert_allclose(ember.jit(ember.grad(f))(0.9, xs),
                               numeric_grad(lambda a: np_f(a, xs), 0.9), rtol=1e-6)
    gv = ember.vmap(ember.grad(f), in_axes=(0, None))(np.array([0.9, 1.1]), xs)
    np.testing.assert_allclose(gv[1], numeric_grad(lambda a: np_f(a, xs), 1.1), rtol=1e-6)


def test_scan_loop_invariant_residuals_are_not_stacked():
    # The weight is needed by the tangent map but is the same every step: it must be kept
    # once, not once per iteration; only tanh' (one value per step) is stacked.
    step = lambda h, x: (enp.tanh(W @ h + x), None)
    _, lin = linearize_flat(lambda h: [lax.scan(step, h, XS)[0]], [np.zeros(3)])
    shapes = sorted(tuple(np.shape(c)) for c in lin.consts)
    assert (3, 3) in shapes
    assert sum(1 for s in shapes if s[:1] == (5,)) == 1


def test_scan_errors():
    with pytest.raises(ember.DTypeError, match="scan: carry leaf 0 has dtype int64"):
        lax.scan(lambda c, x: (c * 1.5, x), np.int64(1), XS)
    with pytest.raises(ember.ShapeError, match="scan: xs leaves and length disagree"):
        lax.scan(lambda c, x: (c, x), 0.0, (XS, X))
    with pytest.raises(ember.EmberError, match="scan: the body must return a pair"):
        lax.scan(lambda c, x: c, 0.0, XS)
    with pytest.raises(ember.EmberError, match="scan: pass length="):
        lax.scan(lambda c, x: (c, x), 0.0, None)


# --- lax re-exports --------------------------------------------------------------------------

def test_lax_primitive_wrappers():
    a = RNG.normal(size=(2, 3, 4))
    b = RNG.normal(size=(2, 4, 5))
    np.testing.assert_allclose(lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,)))), a @ b)
    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_allclose(lax.dynamic_index_in_dim(x, 1, axis=1), x[:, 1:2])
    np.testing.assert_allclose(lax.dynamic_index_in_dim(x, 2, keepdims=False), x[2])
    assert lax.convert_element_type(x, np.int32).dtype == np.int32
    f = ember.jit(lambda x, i: lax.dynamic_update_slice(x, lax.dynamic_slice(x, (i, 0), (1, 4)),
                                                        (0, 0)))
    np.testing.assert_allclose(f(x, 2)[0], x[2])
