"""Canonical param keys, passes that recurse into bodies, the verifier, and bodies that run on
the backend that runs the program around them."""

import dataclasses

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember import dtypes, lax
from ember.backends.numpy_backend import NumpyBackend
from ember.core.trace import make_graph
from ember.ir.graph import ClosedGraph, Eqn, Graph, Var
from ember.ir.params import bodies, param_key
from ember.ir.passes import cse, dce, fold_constants, optimize
from ember.ir.types import ArrayType
from ember.ir.verify import VerifyError, verify
from ember.ops import elementwise as ew

RNG = np.random.default_rng(3)
X = RNG.normal(size=(3,))
XS = RNG.normal(size=(4, 3))
W = RNG.normal(size=(3, 3)) * 0.5
F64 = ArrayType((3,), np.dtype(np.float64))


def lowered(fn, *args):
    return ember.jit(fn).lower(*args).graph


def eqns_named(closed, name):
    """Equations of primitive ``name`` in a graph and, recursively, in its bodies."""
    found = []
    for eqn in closed.graph.eqns:
        if eqn.prim.name == name:
            found.append(eqn)
        for _, body in bodies(eqn):
            found += eqns_named(body, name)
    return found


def step(h, x):
    return enp.tanh(W @ h + x), enp.sum(h)


# --- param keys ------------------------------------------------------------------------------

def test_the_same_function_traced_twice_has_one_key_and_other_functions_another():
    f = lambda x: [enp.sin(x) * 2.0 + x]  # noqa: E731
    a, b = make_graph(f, [F64]), make_graph(f, [F64])
    assert a is not b and a.graph.invars[0].id != b.graph.invars[0].id
    assert param_key(a) == param_key(b) and hash(param_key(a)) == hash(param_key(b))
    assert param_key(a) != param_key(make_graph(lambda x: [enp.sin(x) * 3.0 + x], [F64]))
    assert param_key(a) != param_key(make_graph(lambda x: [enp.cos(x) * 2.0 + x], [F64]))
    f32 = ArrayType((3,), np.dtype(np.float32))
    assert param_key(a) != param_key(make_graph(f, [f32]))
    # Equal structure with operands swapped is another computation.
    sub = make_graph(lambda x, y: [x - y], [F64, F64])
    assert param_key(sub) != param_key(make_graph(lambda x, y: [y - x], [F64, F64]))


_KEY_IN_A_NEW_PROCESS = """
import hashlib, numpy as np, ember, ember.numpy as enp
from ember import lax
from ember.ir.params import param_key
W = np.arange(9.0).reshape(3, 3)
step = lambda h, x: (enp.tanh(W @ h + x), enp.sum(h))
f = ember.checkpoint(lambda h, xs: lax.scan(step, h, xs)[0],
                     policy=ember.checkpoint_policies.dots_saveable)
graph = ember.jit(ember.grad(lambda h, xs: enp.sum(f(h, xs)))).lower(np.ones(3),
                                                                   np.ones((4, 3))).graph
print(hashlib.sha256(repr(param_key(graph)).encode()).hexdigest())
"""


def test_keys_are_the_same_in_every_process():
    import subprocess
    import sys

    keys = {subprocess.run([sys.executable, "-c", _KEY_IN_A_NEW_PROCESS], capture_output=True,
                           text=True, check=True).stdout for _ in range(2)}
    assert len(keys) == 1 and len(keys.pop().strip()) == 64


def test_constants_are_keyed_by_content_small_and_large():
    for n in (3, 1000):  # bytes inline, and a digest of them
        c1, c2 = np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64)
        other = c1.copy()
        other[-1] += 1
        g = lambda c: make_graph(lambda x: [x + enp.sum(c)], [F64])  # noqa: E731
        assert param_key(g(c1)) == param_key(g(c2))
        assert param_key(g(c1)) != param_key(g(other))
        assert param_key(g(c1)) != param_key(g(c1.astype(np.float32)))


def test_plain_params_are_canonical():
    assert param_key({"axes": (0, 1), "dtype": np.dtype("float32")}) == \
        param_key({"dtype": np.dtype(np.float32), "axes": [0, 1]})
    # A param of another type is another computation, even when Python calls them equal.
    keys = {param_key(1), param_key(1.0), param_key(True), param_key(np.float32(1.0))}
    assert len(keys) == 4
    assert param_key(float("nan")) == param_key(float("nan"))
    assert param_key(np.float32(2.0)) != param_key(np.array([2.0], np.float32))
    assert param_key(0.0) != param_key(-0.0)
    assert param_key(np.dtype(dtypes.bfloat16)) != param_key(np.dtype(np.float16))
    assert param_key(ArrayType((2,), np.dtype(np.float32), weak=True)) != \
        param_key(ArrayType((2,), np.dtype(np.float32)))

    @dataclasses.dataclass(frozen=True)
    class Spec:
        name: str
        size: int

    assert param_key(Spec("a", 1)) == param_key(Spec("a", 1)) != param_key(Spec("a", 2))


def test_values_without_content_have_no_key():
    class ByIdentity:
        pass

    for bad in (lambda x: x, np.sin, ByIdentity(), {"f": print}):
        with pytest.raises(TypeError):
            param_key(bad)


def test_every_param_of_a_traced_program_has_a_key():
    ckpt = ember.checkpoint(step, policy=ember.checkpoint_policies.dots_saveable)

    @ember.custom_vjp
    def clip(x):
        return x

    clip.defvjp(lambda x: (x, None), lambda _, g: (enp.clip(g, -1.0, 1.0),))

    def loss(h, xs):
        h, ys = lax.scan(ckpt, h, xs)
        h = lax.cond(enp.sum(h) > 0, enp.sin, enp.cos, clip(h))
        return enp.sum(h) + enp.sum(ys)

    graph = ember.jit(ember.value_and_grad(loss)).lower(X, XS).graph
    names = set()

    def walk(closed):
        for eqn in closed.graph.eqns:
            param_key(eqn.params)  # raises if any param has no canonical key
            names.add(eqn.prim.name)
            for _, body in bodies(eqn):
                walk(body)

    walk(graph)
    assert {"scan", "remat", "cond"} <= names
    (call,) = eqns_named(lowered(clip, X), "custom_vjp_call")
    again = eqns_named(lowered(clip, X), "custom_vjp_call")[0]
    assert param_key(call.params) == param_key(again.params)


# --- CSE -------------------------------------------------------------------------------------

def test_cse_merges_bodies_traced_separately_and_keeps_different_ones():
    def same(h, xs):
        a = lax.scan(step, h, xs)[0]
        b = lax.scan(step, h, xs)[0]  # traced again: a new graph of the same structure
        return a + b

    def different(h, xs):
        a = lax.scan(step, h, xs)[0]
        b = lax.scan(lambda c, x: (enp.tanh(W @ c - x), enp.sum(c)), h, xs)[0]
        return a + b

    g = lowered(same, X, XS)
    assert len(eqns_named(g, "scan")) == 1
    np.testing.assert_allclose(ember.jit(same)(X, XS), 2 * lax.scan(step, X, XS)[0])
    assert len(eqns_named(lowered(different, X, XS), "scan")) == 2
    conds = lambda x: lax.cond(x[0] > 0, enp.sin, enp.cos, x) * \
        lax.cond(x[0] > 0, enp.sin, enp.cos, x)  # noqa: E731
    assert len(eqns_named(lowered(conds, X), "cond")) == 1


def test_cse_sees_equal_remats_as_equal_and_keeps_policies_apart():
    def twice(policy_a, policy_b):
        a = ember.checkpoint(step, policy=policy_a)
        b = ember.checkpoint(step, policy=policy_b)
        return lambda h, x: a(h, x)[0] + b(h, x)[0]

    dots = ember.checkpoint_policies.dots_saveable
    assert len(eqns_named(lowered(twice(dots, dots), X, X), "remat")) == 1
    assert len(eqns_named(lowered(twice(None, dots), X, X), "remat")) == 2


def test_cse_does_not_merge_a_weak_literal_with_a_strong_one():
    def g(k):
        return (k + 1) + (k + np.int64(1))  # ~i64 + ~1 stays weak; + i64 1 is strong

    graph = lowered(g, 5)
    verify(graph)
    assert int(ember.jit(g)(5)) == 12


# --- folding and DCE inside bodies -----------------------------------------------------------

def test_fold_and_dce_reach_into_a_scan_body():
    def loop(h, xs):
        def body(c, x):
            scale = enp.asarray(2.0) * enp.asarray(3.0)  # a constant computation
            dead = enp.exp(x)  # noqa: F841  an unused one
            return c * scale + x, c
        return lax.scan(body, h, xs)

    graph = ember.jit(loop).lower(X, XS).graph
    (scan,) = eqns_named(graph, "scan")
    body = scan.params["body"].graph
    assert [e.prim.name for e in body.eqns].count("mul") == 1  # 2 * 3 was folded away
    assert "6.0" in str(graph)
    assert not eqns_named(graph, "exp")
    # The body keeps its signature.
    raw = make_graph(lambda h, xs: list(loop(h, xs)), [F64, ArrayType((4, 3), F64.dtype)])
    (raw_scan,) = eqns_named(raw, "scan")
    assert body.in_avals == raw_scan.params["body"].in_avals
    assert body.out_avals == raw_scan.params["body"].out_avals
    carry, ys = ember.jit(loop)(X, XS)
    expected, h = [], X
    for x in XS:
        expected.append(h)
        h = h * 6.0 + x
    np.testing.assert_allclose(carry, h)
    np.testing.assert_allclose(ys, np.stack(expected))


def test_a_collective_of_constants_is_not_folded():
    from ember.parallel.collectives import all_reduce_p

    one = enp.asarray(np.ones(3, np.float32))
    closed = make_graph(lambda: [all_reduce_p.bind(one, axes=("dp",), op="sum",
                                                   mesh=(("dp", 2),))], [])
    assert [e.prim.name for e in fold_constants(closed).graph.eqns] == ["all_reduce"]


def test_equations_rebuilt_by_the_passes_keep_the_line_that_staged_them():
    def loop(h, xs):
        def body(c, x):
            return c * (enp.asarray(2.0) * enp.asarray(3.0)) + x, c  # folded: scan rebuilt
        return lax.scan(body, h, xs)

    (scan,) = eqns_named(ember.jit(loop).lower(X, XS).graph, "scan")
    line = loop.__code__.co_firstlineno + 3
    assert scan.source == f"{__file__}:{line}"


def test_cse_reaches_into_cond_branches():
    g = lowered(lambda x: lax.cond(x[0] > 0, lambda y: enp.sin(y) + enp.sin(y), enp.cos, x), X)
    assert len(eqns_named(g, "sin")) == 1


def test_passes_return_an_unchanged_graph_itself():
    closed = make_graph(lambda h, xs: list(lax.scan(step, h, xs)),
                        [F64, ArrayType((4, 3), F64.dtype)])
    done = optimize(closed)
    for p in (dce, cse, fold_constants, optimize):
        assert p(done) is done


# --- verify ----------------------------------------------------------------------------------

def _graph(build):
    x = Var(F64)
    eqns, out = build(x)
    return ClosedGraph(Graph([], [x], eqns, [out]), [])


def test_verify_catches_a_wrong_output_type():
    def build(x):
        y = Var(ArrayType((3,), np.dtype(np.float32)))
        return [Eqn(ew.sin.prim, [x], [y])], y

    with pytest.raises(VerifyError, match=r"equation 0 .*sin.*outputs typed \[f32\[3\]\], its "
                                          r"shape rule gives \[f64\[3\]\]"):
        verify(_graph(build))


def test_verify_catches_a_use_before_definition():
    def build(x):
        y, z = Var(F64), Var(F64)
        return [Eqn(ew.sin.prim, [y], [z]), Eqn(ew.cos.prim, [x], [y])], z

    with pytest.raises(VerifyError, match=r"equation 0 .*sin.* uses Var\(\d+: f64\[3\]\) before "
                                          "it is defined"):
        verify(_graph(build))


def test_verify_catches_a_duplicate_definition_and_an_undefined_output():
    def build(x):
        y = Var(F64)
        return [Eqn(ew.sin.prim, [x], [y]), Eqn(ew.cos.prim, [x], [y])], y

    with pytest.raises(VerifyError, match=r"equation 1 .*cos.* defines .* already defined"):
        verify(_graph(build))
    with pytest.raises(VerifyError, match="output .* is not defined"):
        verify(_graph(lambda x: ([], Var(F64))))


def test_verify_reports_operands_the_shape_rule_rejects():
    x, short, out = Var(F64), Var(ArrayType((2,), F64.dtype)), Var(F64)
    closed = ClosedGraph(Graph([], [x, short], [Eqn(ew.add.prim, [x, short], [out])], [out]), [])
    with pytest.raises(VerifyError, match=r"equation 0 .*add.*its shape rule rejects the "
                                          r"operands: add: operands must have equal shapes"):
        verify(closed)


def test_verify_refuses_a_function_in_params():
    x, y = Var(F64), Var(F64)
    eqn = Eqn(ew.sin.prim, [x], [y], {"hook": print})
    with pytest.raises(VerifyError, match="equation 0 .*sin.*no canonical key"):
        verify(ClosedGraph(Graph([], [x], [eqn], [y]), []))


def test_verify_recurses_and_names_the_body():
    closed = make_graph(lambda h, xs: list(lax.scan(step, h, xs)),
                        [F64, ArrayType((4, 3), F64.dtype)])
    verify(closed)
    (scan,) = closed.graph.eqns[-1:]
    body = scan.params["body"].graph
    add = next(e for e in body.eqns if e.prim.name == "add")
    add.outputs[0].aval = ArrayType((3,), np.dtype(np.float32))  # a broken pass's doing
    with pytest.raises(VerifyError, match=r"equation \d+ \(.*scan.*\) > body: equation \d+ "
                                          r"\(.*add.*\): outputs typed \[f32\[3\]\]"):
        verify(closed)


# --- bodies run on the backend that runs the program -----------------------------------------

def _custom_sin():
    @ember.custom_vjp
    def f(x):
        return enp.sin(x)

    f.defvjp(lambda x: (enp.sin(x), x), lambda x, g: (g * enp.cos(x),))
    return f


PROGRAMS = {
    "cond": (lambda x: lax.cond(x[0] > 0, enp.sin, enp.cos, x), 1),
    "scan": (lambda x: lax.scan(step, x, XS)[0], 1),
    "while": (lambda x: lax.while_loop(lambda c: c[0] < 10.0, lambda c: c * 2.0 + 1.0, x), 2),
    "remat": (lambda x: ember.checkpoint(lambda y: enp.sin(W @ y))(x), 1),
    "custom_vjp": (lambda x: _custom_sin()(x), 1),
    "grad of remat in scan": (ember.grad(lambda x: enp.sum(lax.scan(
        ember.checkpoint(step), x, XS)[0])), 3),
    "reverse scan over a vector": (lambda x: lax.scan(lambda c, s: (c * s + 1.0, c), x[0], x,
                                                      reverse=True)[1], 1),
}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_bodies_are_compiled_by_the_backend_running_the_program(recording_backend, name):
    fn, n_bodies = PROGRAMS[name]
    x = np.abs(X) + 0.5
    expected = ember.jit(fn)(x)
    got = ember.jit(fn, backend=recording_backend.name)(x)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    top, *inner = recording_backend.compiled
    assert len(inner) >= n_bodies
    # Every body it ran was compiled by it (and memoised under its name), none by NumPy.
    for body in inner:
        assert recording_backend.name in body.cache and "numpy" not in body.cache
    held = [b for eqn in top.graph.eqns for _, b in bodies(eqn)]
    assert held and all("numpy" not in b.cache for b in held)


def test_eager_control_flow_runs_on_the_backend_of_its_operands(recording_backend):
    x = ember.jit(lambda v: v * 1.0, backend=recording_backend.name)(X)
    recording_backend.compiled.clear()
    out = lax.cond(x[0] > 0, enp.sin, enp.cos, x)
    np.testing.assert_allclose(out, np.sin(X) if X[0] > 0 else np.cos(X))
    assert len(recording_backend.compiled) == 1  # the branch that ran


def test_a_body_is_compiled_once_per_backend(recording_backend):
    graph = lowered(lambda h: lax.scan(step, h, XS)[0], X)
    run = recording_backend.compile(graph)
    for _ in range(3):
        np.testing.assert_allclose(run(X)[0], lax.scan(step, X, XS)[0])
    (scan,) = eqns_named(graph, "scan")
    assert recording_backend.compiled.count(scan.params["body"]) == 1
    NumpyBackend().compile(graph)(X)
    assert set(scan.params["body"].cache) >= {recording_backend.name, "numpy"}


def test_control_flow_has_one_implementation_for_every_backend():
    from ember.backends.base import ANY_BACKEND
    from ember.core.primitive import REGISTRY

    control = [p for p in REGISTRY.values() if p.kind == "control"]
    assert {"cond", "while", "scan", "remat", "custom_vjp_call"} <= {p.name for p in control}
    for p in control:
        if p.impls:
            assert ANY_BACKEND in p.impls, p.name
