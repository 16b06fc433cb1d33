"""``jit`` as a compile boundary under every transformation: the ``call`` primitive.

Every transformation of ``jit(f)`` is compared with the same transformation of ``f`` (and with
finite differences), and the structure is checked: the IR holds ``call`` equations, eager
``grad(jit(f))`` runs one program each way, a function called many times is traced once.
"""

import numpy as np
import pytest
from helpers import numeric_grad

import ember
import ember.numpy as enp
from ember import lax
from ember.backends import get_backend
from ember.core.trace import make_graph
from ember.ir import ArrayType, ClosedGraph
from ember.ir.verify import verify
from ember.transforms.call import call_p, inline_calls

RNG = np.random.default_rng(7)
W1 = RNG.normal(size=(4, 5))
B1 = RNG.normal(size=5)
W2 = RNG.normal(size=(5, 3))
X = RNG.normal(size=(6, 4))


def mlp(w1, b1, w2, x):
    h = enp.tanh(x @ w1 + b1)
    return enp.mean(enp.sin(h @ w2) ** 2)


def mlp_vec(w1, x):
    """A vector-valued layer, for jvp/vjp/vmap/linearize."""
    return enp.tanh(x @ w1) * 2.0


def close(a, b, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def tree_close(a, b, **kw):
    la, ta = ember.tree.tree_flatten(a)
    lb, tb = ember.tree.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        close(x, y, **kw)


def call_names(closed):
    """The ``name`` of every call equation, nested bodies included, in order."""
    names = []
    for eqn in closed.graph.eqns:
        if eqn.prim is call_p:
            names.append(eqn.params["name"])
        for v in eqn.params.values():
            for g in v if isinstance(v, tuple) else (v,):
                if isinstance(g, ClosedGraph):
                    names += call_names(g)
    return names


@pytest.fixture
def eager_prims(monkeypatch):
    """The primitives the default backend runs eagerly, in order (one bind each)."""
    backend = get_backend()
    seen = []
    run = backend.run_primitive

    def record(prim, buffers, params):
        seen.append(prim.name)
        return run(prim, buffers, params)

    monkeypatch.setattr(backend, "run_primitive", record)
    return seen


# --- every transformation of jit(f) equals the same transformation of f ----------------------

def test_grad_of_jit_matches_grad_and_finite_differences():
    args = (W1, B1, W2, X)
    expected = ember.grad(mlp, argnums=(0, 1, 2))(*args)
    got = ember.grad(ember.jit(mlp), argnums=(0, 1, 2))(*args)
    tree_close(got, expected)
    fd = numeric_grad(lambda w: mlp(w, B1, W2, X), W1)
    close(got[0], fd, rtol=1e-6, atol=1e-8)
    tree_close(ember.jit(ember.grad(ember.jit(mlp), argnums=(0, 1, 2)))(*args), expected)


def test_vjp_jvp_linearize_vmap_of_jit():
    f, jf = mlp_vec, ember.jit(mlp_vec)
    t_w, t_x = RNG.normal(size=W1.shape), RNG.normal(size=X.shape)
    tree_close(ember.jvp(jf, (W1, X), (t_w, t_x)), ember.jvp(f, (W1, X), (t_w, t_x)))
    out, lin = ember.linearize(jf, W1, X)
    out_ref, lin_ref = ember.linearize(f, W1, X)
    close(out, out_ref)
    close(lin(t_w, t_x), lin_ref(t_w, t_x))
    ct = RNG.normal(size=(6, 5))
    tree_close(ember.vjp(jf, W1, X)[1](ct), ember.vjp(f, W1, X)[1](ct))
    xs = RNG.normal(size=(3, 6, 4))
    close(ember.vmap(jf, in_axes=(None, 0))(W1, xs), ember.vmap(f, in_axes=(None, 0))(W1, xs))
    ws = RNG.normal(size=(4, 2, 5))
    close(ember.vmap(jf, in_axes=(1, None))(ws, X), ember.vmap(f, in_axes=(1, None))(ws, X))
    # finite differences of the jvp
    eps = 1e-6
    fd = (np.asarray(f(W1 + eps * t_w, X)) - np.asarray(f(W1 - eps * t_w, X))) / (2 * eps)
    close(ember.jvp(jf, (W1, X), (t_w, np.zeros_like(X)))[1], fd, rtol=1e-6, atol=1e-8)


def test_composed_transformations_of_jit():
    jf = ember.jit(mlp)

    def scalar(w1):
        return mlp(w1, B1, W2, X)

    def jscalar(w1):
        return jf(w1, B1, W2, X)

    # second order: the jvp of a transposed call
    v = RNG.normal(size=W1.shape)
    hvp = ember.jvp(ember.grad(jscalar), (W1,), (v,))[1]
    close(hvp, ember.jvp(ember.grad(scalar), (W1,), (v,))[1])
    close(ember.grad(lambda w: enp.sum(ember.grad(jscalar)(w) ** 2))(W1),
          ember.grad(lambda w: enp.sum(ember.grad(scalar)(w) ** 2))(W1))
    # per-example gradients: vmap of a transposed call
    xs = RNG.normal(size=(3, 2, 4))
    per_ex = ember.vmap(ember.grad(jf), in_axes=(None, None, None, 0))(W1, B1, W2, xs)
    close(per_ex, ember.vmap(ember.grad(mlp), in_axes=(None, None, None, 0))(W1, B1, W2, xs))
    close(ember.jit(ember.vmap(ember.grad(jf), in_axes=(None, None, None, 0)))(W1, B1, W2, xs),
          per_ex)


def test_pytrees_static_and_keyword_arguments():
    def layer(params, x, *, act, scale=1.0):
        h = x @ params["w"] + params["b"]
        return enp.sum(act(h) * scale)

    jlayer = ember.jit(layer, static_argnames="act")
    params = {"w": W1, "b": B1}
    for act in (enp.tanh, enp.sin):
        expected = ember.grad(lambda p: layer(p, X, act=act, scale=0.5))(params)
        got = ember.grad(lambda p: jlayer(p, X, act=act, scale=0.5))(params)
        tree_close(got, expected)
    assert jlayer.cache_info()["traces"] == 2

    jstatic = ember.jit(lambda x, n: enp.sum(x ** n), static_argnums=1)
    close(ember.grad(jstatic)(X, 3), np.sum(3 * X ** 2) * 0 + 3 * X ** 2)


def test_multiple_integer_and_passthrough_outputs_and_unused_inputs():
    def f(x, unused, n):
        return {"y": enp.sin(x) * n, "count": enp.sum(x > 0), "same": x, "n": n}

    jf = ember.jit(f)
    x, n = RNG.normal(size=5), RNG.normal(size=5)

    def loss(fn, x, unused, n):
        out = fn(x, unused, n)
        return enp.sum(out["y"] * out["same"]) + enp.sum(out["n"]) * out["count"]

    expected = ember.grad(lambda *a: loss(f, *a), argnums=(0, 1, 2))(x, X, n)
    got = ember.grad(lambda *a: loss(jf, *a), argnums=(0, 1, 2))(x, X, n)
    tree_close(got, expected)
    assert not np.any(np.asarray(got[1]))
    out, tangents = ember.jvp(jf, (x, X, n), (np.ones(5), np.ones_like(X), np.zeros(5)))
    assert np.asarray(out["count"]).dtype.kind == "i"
    close(tangents["same"], np.ones(5))
    close(tangents["y"], np.cos(x) * n)
    batched = ember.vmap(jf, in_axes=(0, None, None))(np.stack([x, -x]), X, n)
    close(batched["count"], [np.sum(x > 0), np.sum(-x > 0)])
    close(batched["n"], np.stack([n, n]))


def test_integer_and_python_scalar_operands():
    w, idx = RNG.normal(size=(4, 3)), np.array([0, 2, 2])
    f = lambda w, idx, s: enp.sum(w[idx] ** 2) * s  # noqa: E731
    jf = ember.jit(f)
    expected = ember.grad(f, argnums=(0, 2))(w, idx, 2.0)
    tree_close(ember.grad(jf, argnums=(0, 2))(w, idx, 2.0), expected)
    tree_close(ember.jit(ember.grad(jf, argnums=(0, 2)))(w, idx, 2.0), expected)
    idxs = np.array([[0, 1, 1], [3, 3, 2]])
    close(ember.vmap(ember.grad(jf), in_axes=(None, 0, None))(w, idxs, 2.0),
          ember.vmap(ember.grad(f), in_axes=(None, 0, None))(w, idxs, 2.0))


def test_nested_jit():
    inner = ember.jit(mlp_vec)
    outer = ember.jit(lambda w, x: enp.sum(ember.jit(inner)(w, x) ** 2))
    ref = lambda w, x: enp.sum(mlp_vec(w, x) ** 2)  # noqa: E731
    close(outer(W1, X), ref(W1, X))
    tree_close(ember.grad(outer, argnums=(0, 1))(W1, X), ember.grad(ref, argnums=(0, 1))(W1, X))
    assert call_names(outer.lower(W1, X).graph) == ["mlp_vec", "mlp_vec"]


# --- inside control flow and checkpoint -------------------------------------------------------

def test_jit_inside_scan_cond_while_and_checkpoint_bodies():
    layer = ember.jit(lambda h, w: enp.tanh(h @ w))
    ws = RNG.normal(size=(3, 4, 4)) * 0.5
    h0 = RNG.normal(size=(2, 4))

    def through_scan(h, ws, fn):
        return enp.sum(lax.scan(lambda c, w: (fn(c, w), None), h, ws)[0])

    def through_cond(h, w, fn):
        return enp.sum(lax.cond(enp.sum(h) > 0, lambda a: fn(a, w), lambda a: -fn(a, w), h))

    def through_checkpoint(h, w, fn):
        return enp.sum(ember.checkpoint(lambda a: fn(fn(a, w), w))(h))

    plain = lambda h, w: enp.tanh(h @ w)  # noqa: E731
    for wrap, w in ((through_scan, ws), (through_cond, ws[0]), (through_checkpoint, ws[0])):
        expected = ember.grad(lambda h, w: wrap(h, w, plain), argnums=(0, 1))(h0, w)
        for run in (lambda h, w: wrap(h, w, layer), ember.jit(lambda h, w: wrap(h, w, layer))):
            close(run(h0, w), wrap(h0, w, plain))
            tree_close(ember.grad(run, argnums=(0, 1))(h0, w), expected)
        graph = ember.jit(lambda h, w: wrap(h, w, layer)).lower(h0, w).graph
        assert "<lambda>" in call_names(graph)
        graph = ember.jit(ember.grad(lambda h, w: wrap(h, w, layer))).lower(h0, w).graph
        assert "transpose(jvp(<lambda>))" in call_names(graph)

    def count_up(h, w):
        return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, layer(c[1], w)),
                              (0, h))[1]

    expected = h0
    for _ in range(3):
        expected = np.tanh(expected @ ws[0])
    close(count_up(h0, ws[0]), expected)
    close(ember.jit(count_up)(h0, ws[0]), expected)
    t = RNG.normal(size=h0.shape)
    close(ember.jvp(count_up, (h0, ws[0]), (t, np.zeros((4, 4))))[1],
          ember.jvp(lambda h: lax.while_loop(
              lambda c: c[0] < 3, lambda c: (c[0] + 1, plain(c[1], ws[0])), (0, h))[1],
              (h0,), (t,))[1])


def test_jit_inside_and_around_custom_vjp():
    jsin = ember.jit(enp.sin)

    @ember.custom_vjp
    def f(x):
        return jsin(x)

    f.defvjp(lambda x: (jsin(x), x), lambda x, g: (g * ember.jit(enp.cos)(x) * 2,))
    x = np.linspace(0, 1, 4)
    expected = 2 * np.cos(x)  # the custom rule doubles the true gradient
    for g in (ember.grad(lambda x: enp.sum(f(x))), ember.grad(lambda x: enp.sum(ember.jit(f)(x))),
              ember.jit(ember.grad(lambda x: enp.sum(ember.jit(f)(x)))),
              ember.vmap(ember.grad(lambda x: ember.jit(f)(x)))):
        close(g(x), expected)


# --- structure: calls in the IR, one program each way, one trace -------------------------------

def test_ir_of_jit_grad_jit_shows_calls():
    def layer(w1, b1, w2, x):
        return mlp(w1, b1, w2, x)

    text = ember.jit(ember.grad(ember.jit(layer))).lower(W1, B1, W2, X).as_text()
    assert "call[name=jvp(layer)]" in text
    assert "call[name=transpose(jvp(layer))]" in text
    assert "dot_general" in text  # the bodies are printed indented under their call
    graph = ember.jit(ember.grad(ember.jit(layer))).lower(W1, B1, W2, X).graph
    assert [e.prim for e in graph.graph.eqns if e.prim.name != "call"] == []
    verify(graph)


def test_eager_grad_of_jit_runs_one_program_each_way(eager_prims):
    g = ember.grad(ember.jit(mlp), argnums=(0, 2))
    expected = ember.grad(mlp, argnums=(0, 2))(W1, B1, W2, X)
    eager_prims.clear()
    tree_close(g(W1, B1, W2, X), expected)
    # anything else would be grad's own (the seed cotangent), never the function's operations
    assert eager_prims.count("call") == 2
    assert set(eager_prims) <= {"call", "broadcast_in_dim", "convert"}
    eager_prims.clear()
    ember.vmap(ember.jit(mlp_vec), in_axes=(None, 0))(W1, np.stack([X, X]))
    assert eager_prims == ["call"]
    eager_prims.clear()
    ember.jvp(ember.jit(mlp_vec), (W1, X), (W1, X))
    assert eager_prims == ["call"]


def test_eager_grad_of_jit_compiles_once(monkeypatch):
    backend = get_backend()
    compiled = []
    compile_ = backend.compile

    def counting(closed, *a, **k):
        compiled.append(closed)
        return compile_(closed, *a, **k)

    monkeypatch.setattr(backend, "compile", counting)
    jf = ember.jit(mlp)
    g = ember.grad(jf)
    g(W1, B1, W2, X)
    assert len(compiled) == 2  # the forward and the backward program
    for _ in range(3):
        g(W1, B1, W2, X)
    assert len(compiled) == 2
    assert jf.cache_info()["traces"] == 1


def test_layer_called_many_times_is_traced_once():
    layer = ember.jit(lambda h, w: enp.tanh(h @ w))
    ws = [RNG.normal(size=(4, 4)) * 0.5 for _ in range(6)]

    def net(h, ws):
        for w in ws:
            h = layer(h, w)
        return enp.sum(h)

    jnet = ember.jit(net)
    out = jnet(X, ws)
    info = layer.cache_info()
    assert info["traces"] == 1 and info["hits"] == 5
    close(out, net(X, ws))
    graph = jnet.lower(X, ws).graph
    bodies = {id(e.params["body"]) for e in graph.graph.eqns if e.prim is call_p}
    assert len(bodies) == 1  # one body, shared by the six calls
    tree_close(ember.grad(jnet, argnums=(0, 1))(X, ws),
               ember.grad(net, argnums=(0, 1))(X, ws))
    assert layer.cache_info()["traces"] == 1


def test_call_body_runs_on_the_backend_of_the_enclosing_program(recording_backend):
    backend = recording_backend
    inner = ember.jit(mlp_vec)
    outer = ember.jit(lambda w, x: enp.sum(inner(w, x)), backend=backend.name)
    close(outer(W1, X), np.sum(np.tanh(X @ W1) * 2))
    body = next(e.params["body"] for e in outer.lower(W1, X).graph.graph.eqns
                if e.prim is call_p)
    assert len(backend.compiled) == 2 and body.cache.get(backend.name) is not None
    outer(W1, X)
    assert len(backend.compiled) == 2  # both programs are reused


def test_retraces_under_transformations_are_counted():
    jf = ember.jit(lambda x: enp.sum(enp.sin(x)))
    ember.grad(jf)(np.ones(3))
    ember.grad(jf)(np.ones(3))
    assert jf.cache_info()["traces"] == 1 and jf.cache_info()["hits"] == 1
    ember.grad(jf)(np.ones(4))
    assert jf.cache_info()["traces"] == 2
    assert "changed type" in jf.cache_info()["last_retrace_reason"]


def test_closure_over_a_traced_value():
    """A function capturing a value of the enclosing transformation gets it as an operand (and
    is traced again at the next call: the captured value is gone once that trace ends)."""
    def outer(w, x):
        jf = inner_for(w)
        return enp.sum(jf(x) ** 2)

    cache = {}

    def inner_for(w):
        if "f" not in cache:
            cache["f"] = ember.jit(lambda x: enp.sin(x @ cache["w"]))
        cache["w"] = w
        return cache["f"]

    ref = lambda w, x: enp.sum(enp.sin(x @ w) ** 2)  # noqa: E731
    for _ in range(2):
        tree_close(ember.grad(outer, argnums=(0, 1))(W1, X),
                   ember.grad(ref, argnums=(0, 1))(W1, X))
    info = cache["f"].cache_info()
    assert info["traces"] == 2 and "closes over" in info["last_retrace_reason"]


def test_donation_is_ignored_inside_another_jit():
    step = ember.jit(lambda x: x * 2, donate_argnums=0)
    x = enp.asarray(np.arange(3.0))
    out = ember.jit(lambda x: step(x) + x)(x)
    close(out, [0, 3, 6])
    close(x, [0, 1, 2])  # still usable: nothing was donated


# --- the global random key -------------------------------------------------------------------

def noisy(x):
    return x * ember.random.randn(*x.shape)


def test_hidden_random_key_under_an_outer_jit():
    jnoisy = ember.jit(noisy)
    step = ember.jit(lambda x: jnoisy(x) + jnoisy(x))
    x = np.ones(4)
    ember.random.seed(3)
    eager = [noisy(x) + noisy(x) for _ in range(2)]
    ember.random.seed(3)
    compiled = [step(x) for _ in range(2)]
    close(compiled[0], eager[0])
    close(compiled[1], eager[1])
    assert not np.allclose(np.asarray(compiled[0]), np.asarray(compiled[1]))


def test_hidden_random_key_under_grad():
    jnoisy = ember.jit(noisy)

    def loss(fn, x):
        return enp.sum(fn(x) ** 2)

    x = RNG.normal(size=4)
    for outer in (lambda f: f, ember.jit):
        ember.random.seed(5)
        expected = [ember.grad(lambda x: loss(noisy, x))(x) for _ in range(2)]
        after_eager = ember.random.randn(2)
        ember.random.seed(5)
        g = outer(ember.grad(lambda x: loss(jnoisy, x)))
        got = [g(x) for _ in range(2)]
        close(got[0], expected[0])
        close(got[1], expected[1])
        close(ember.random.randn(2), after_eager)  # the key was advanced, not leaked


def test_hidden_random_key_inside_a_scan_body_is_refused_as_without_jit():
    jnoisy = ember.jit(noisy)
    for fn in (noisy, jnoisy):
        with pytest.raises(ember.TracerError, match="global state"):
            lax.scan(lambda c, x: (c + fn(x), None), np.zeros(2), np.ones((3, 2)))


# --- inline_calls and the shape rule -----------------------------------------------------------

def test_inline_calls_flattens_every_level():
    layer = ember.jit(lambda h, w: enp.tanh(h @ w) + 1.5)
    twice = ember.jit(lambda h, w: layer(layer(h, w), w))
    ws = RNG.normal(size=(2, 4, 4)) * 0.5

    def net(h, ws):
        h = twice(h, ws[0])
        return lax.scan(lambda c, w: (layer(c, w), None), h, ws)[0]

    closed = ember.jit(net).lower(X, ws).graph
    assert call_names(closed) == ["<lambda>", "<lambda>", "<lambda>", "<lambda>"]
    flat = inline_calls(closed)
    assert call_names(flat) == []
    verify(flat)
    expected = np.asarray(net(X, ws))
    close(get_backend("numpy").compile(flat)(X, ws)[0], expected)
    close(get_backend("numpy").compile(closed)(X, ws)[0], expected)
    # derived bodies (jvp, transpose) with constants of their own, and pass-through outputs
    closed = ember.jit(ember.grad(ember.jit(mlp), argnums=(0, 3))).lower(W1, B1, W2, X).graph
    flat = inline_calls(closed)
    assert call_names(flat) == []
    verify(flat)
    tree_close(get_backend("numpy").compile(flat)(W1, B1, W2, X),
               list(ember.grad(mlp, argnums=(0, 3))(W1, B1, W2, X)))
    # a body that closes over a constant (calls bound directly; jit hoists constants itself)
    c = enp.asarray(np.arange(3.0) + 1)
    f64 = ArrayType((3,), np.dtype("float64"))
    body = make_graph(lambda x: [x * c], [f64])
    assert len(body.consts) == 1
    closed = make_graph(lambda x: call_p.bind(call_p.bind(x, body=body, name="f")[0],
                                              body=body, name="f"), [f64])
    flat = inline_calls(closed)
    assert call_names(flat) == [] and len(flat.consts) == 2
    verify(flat)
    close(get_backend("numpy").compile(flat)(np.ones(3))[0], (np.arange(3.0) + 1) ** 2)
    graph_without_calls = ember.jit(lambda x: x + 1).lower(X).graph
    assert inline_calls(graph_without_calls) is graph_without_calls


def test_call_checks_its_operands():
    body = make_graph(lambda x: [enp.sin(x)], [ArrayType((3,), np.dtype("float64"))])
    close(call_p.bind(np.ones(3), body=body, name="f")[0], np.sin(np.ones(3)))
    with pytest.raises(ember.ShapeError, match=r"call\[name=f\].*shape \(4,\)"):
        call_p.bind(np.ones(4), body=body, name="f")
    with pytest.raises(ember.DTypeError, match=r"call\[name=f\].*float32"):
        call_p.bind(np.ones(3, np.float32), body=body, name="f")
    with pytest.raises(ember.ShapeError, match="2 operands"):
        call_p.bind(np.ones(3), np.ones(3), body=body, name="f")
