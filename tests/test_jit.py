"""jit: same results as eager, explicit cache key, retrace counting, static args, donation,
printable IR, and clear errors for Python control flow on traced values."""

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember.ir.verify import verify


def f(x, y):
    return enp.tanh(x @ y).sum(axis=0) * 2.0


def test_jit_matches_eager_and_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    eager = f(enp.asarray(x), enp.asarray(y))
    compiled = ember.jit(f)(x, y)
    expected = (np.tanh(x @ y).sum(axis=0) * 2.0)
    np.testing.assert_allclose(np.asarray(eager), expected, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(compiled), expected, rtol=1e-12)
    assert compiled.dtype == np.float64 and compiled.shape == (5,)


def test_no_retrace_on_same_shapes_one_per_new_shape():
    jf = ember.jit(f)
    for _ in range(3):
        jf(np.ones((3, 4)), np.ones((4, 5)))
    assert jf.trace_count == 1
    jf(np.ones((2, 4)), np.ones((4, 5)))
    assert jf.trace_count == 2
    jf(np.ones((2, 4), np.float32), np.ones((4, 5), np.float32))
    assert jf.trace_count == 3
    jf(np.ones((3, 4)), np.ones((4, 5)))
    info = jf.cache_info()
    assert info["traces"] == 3 and info["hits"] == 3
    assert "changed type" in info["last_retrace_reason"]


def test_cached_lowerings_are_the_signatures_called_oldest_first():
    jf = ember.jit(f)
    small, wide = (np.ones((3, 4)), np.ones((4, 5))), (np.ones((3, 4)), np.ones((4, 7)))
    jf(*small)
    jf(*wide)
    jf(*small)
    lowered = jf.cached_lowerings()
    assert len(lowered) == 2 and "f64[4,5]" in lowered[0].as_text()
    assert "f64[4,7]" in lowered[1].as_text()
    np.testing.assert_allclose(np.asarray(lowered[1].compile()(*wide)), np.asarray(jf(*wide)))


def test_weak_python_scalar_argument_keeps_dtype():
    jf = ember.jit(lambda x, s: x * s)
    out = jf(np.ones(3, np.float32), 2.0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(out), [2, 2, 2])
    jf(np.ones(3, np.float32), 3.0)
    assert jf.trace_count == 1  # the value of a traced scalar is not part of the key


def test_static_argnums_and_argnames():
    def g(x, n, *, mode="sum"):
        out = x
        for _ in range(n):  # Python loop over a static value
            out = out * 2
        return out.sum() if mode == "sum" else out.max()

    jg = ember.jit(g, static_argnums=1, static_argnames="mode")
    x = np.arange(4.0)
    assert float(jg(x, 3)) == float((x * 8).sum())
    assert float(jg(x, 3, mode="max")) == 24.0
    assert float(jg(x, 2)) == float((x * 4).sum())
    assert jg.trace_count == 3
    by_position = ember.jit(lambda x, mode: x.sum() if mode == "sum" else x.max(),
                            static_argnames="mode")
    assert float(by_position(x, "max")) == 3.0
    jg(x, 3)
    assert jg.trace_count == 3


def test_pytree_arguments_and_outputs():
    @ember.jit
    def h(params, batch):
        return {"y": batch["x"] @ params[0] + params[1], "n": batch["x"].shape[0]}

    params = (np.ones((2, 3)), np.zeros(3))
    out = h(params, {"x": np.ones((4, 2))})
    np.testing.assert_array_equal(np.asarray(out["y"]), np.full((4, 3), 2.0))
    assert int(out["n"]) == 4


def test_lower_prints_ir():
    text = ember.jit(f).lower(np.ones((3, 4), np.float32), np.ones((4, 5), np.float32)).as_text()
    assert "dot_general" in text and "tanh" in text and "reduce_sum" in text
    assert "f32[3,4]" in text and "-> (f32[5])" in text


def test_passes_cse_dce_and_folding():
    def g(x):
        a = enp.sin(x) + enp.sin(x)  # CSE: one sin
        unused = enp.exp(x)  # noqa: F841  DCE
        c = enp.asarray(2.0) * enp.asarray(3.0)  # folded into a literal
        return a * c

    lowered = ember.jit(g).lower(np.ones(3))
    text = lowered.as_text()
    assert text.count("sin(") == 1
    assert "exp" not in text
    assert "6.0" in text
    verify(lowered.graph)
    np.testing.assert_allclose(np.asarray(ember.jit(g)(np.ones(3))), 12 * np.sin(1.0))


def test_python_if_on_traced_value_names_line_and_suggests_cond():
    def g(x):
        if x.sum() > 0:  # the offending line
            return x
        return -x

    with pytest.raises(ember.TracerError) as err:
        ember.jit(g)(np.ones(3))
    msg = str(err.value)
    assert "test_jit.py" in msg and "if x.sum() > 0" in msg
    assert "cond" in msg and "static_argnums" in msg


def test_shape_error_under_jit_names_op_and_line():
    with pytest.raises(ember.ShapeError) as err:
        ember.jit(lambda a, b: a @ b)(np.ones((2, 3)), np.ones((2, 3)))
    assert "matmul" in str(err.value) and "test_jit.py" in str(err.value)


def test_donated_argument_cannot_be_reused():
    step = ember.jit(lambda x: x + 1, donate_argnums=0)
    x = enp.ones(3)
    y = step(x)
    np.testing.assert_array_equal(np.asarray(y), [2, 2, 2])
    with pytest.raises(ember.EmberError, match="donated"):
        x + 1


def test_nested_jit_and_closure_constants():
    w = enp.asarray(np.arange(3.0))
    inner = ember.jit(lambda x: x * w)
    outer = ember.jit(lambda x: inner(x) + 1)
    np.testing.assert_array_equal(np.asarray(outer(np.ones(3))), [1, 2, 3])


def test_escaped_tracer_is_reported():
    leaked = []

    @ember.jit
    def g(x):
        leaked.append(x)
        return x

    g(np.ones(2))
    with pytest.raises(ember.TracerError, match="escaped"):
        enp.sin(leaked[0])


def test_jit_of_grad_and_grad_of_jit_agree():
    def loss(w, x):
        return enp.mean((enp.tanh(x @ w) - 1) ** 2)

    w, x = np.ones((4, 2)) * 0.3, np.linspace(0, 1, 12).reshape(3, 4)
    g1 = ember.jit(ember.grad(loss))(w, x)
    g2 = ember.grad(ember.jit(loss))(w, x)
    g3 = ember.grad(loss)(w, x)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g3), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g3), rtol=1e-12)


def test_setitem_under_jit_rebinds():
    @ember.jit
    def g(x):
        x[0] = 5.0
        x[1:] += 1.0
        return x

    src = enp.zeros(3)
    out = g(src)
    np.testing.assert_array_equal(np.asarray(out), [5, 1, 1])
    np.testing.assert_array_equal(np.asarray(src), [0, 0, 0])


def test_programs_reuse_dead_buffers_but_never_inputs_constants_or_views():
    """Elementwise steps may write into a buffer that dies there; arguments, captured
    constants and buffers still seen through a view must keep their values."""
    import ember.numpy as enp

    rng = np.random.default_rng(0)
    xn, cn = rng.random((4, 5)), rng.random((4, 5))
    x, c = enp.asarray(xn.copy()), enp.asarray(cn.copy())

    def f(x):
        a = x * 2.0                 # x dies here: it is the caller's, so it must not be reused
        b = a + c                   # a dies here: reusable; c is a captured constant
        v = b.reshape(20)           # a view of b keeps b alive
        d = b * 3.0                 # b's last direct use, but v still sees it
        return d + 1.0, v[:3] + 0.0, enp.tanh(d) - a.sum()

    want = f(enp.asarray(xn))
    got = ember.jit(f)(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(x), xn)
    np.testing.assert_array_equal(np.asarray(c), cn)
