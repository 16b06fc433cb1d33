"""Fusion (ember.compiler.fusion): which equations become one ``fused`` group, and that running
the fused graph on the NumPy backend gives bitwise the results of the unfused one."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_equal_or_close
from hypothesis import given, settings
from hypothesis import strategies as st

import ember
import ember.nn.functional as F
import ember.numpy as enp
from ember import dtypes
from ember.backends import get_backend
from ember.compiler.fusion import COMPUTE_KINDS, VIEW_KINDS, fuse, fused_equations
from ember.compiler.loops import (
    Index,
    Let,
    Pred,
    RowLoop,
    Store,
    Update,
    describe,
    flat_index,
    unflatten,
)
from ember.ir.graph import Literal
from ember.ir.verify import verify
from ember.optim import AdamW
from ember.tree import tree_leaves

FUSABLE = COMPUTE_KINDS | VIEW_KINDS


def lower_and_fuse(fn, *args):
    lowered = ember.jit(fn).lower(*args)
    fused = fuse(lowered.graph)
    verify(fused)
    for e in fused_equations(fused):
        verify(e.params["body"])
    return lowered, fused


def interpret(closed, leaves):
    """Run a graph equation by equation on the NumPy backend (a fused equation runs its body).

    Not through the backend's compiled program: that writes results into dead buffers, which
    changes their memory layout and with it the order in which NumPy sums over several axes,
    so two equal graphs compiled with different buffer lifetimes may differ in the last bit.
    """
    backend = get_backend("numpy")
    env = {v.id: np.asarray(c) for v, c in zip(closed.graph.constvars, closed.consts)}
    env.update((v.id, x) for v, x in zip(closed.graph.invars, leaves))

    def read(a):
        return a.value if isinstance(a, Literal) else env[a.id]

    for eqn in closed.graph.eqns:
        out = backend.run_primitive(eqn.prim, [read(a) for a in eqn.inputs], eqn.params)
        for v, o in zip(eqn.outputs, out if eqn.prim.multiple_results else [out]):
            env[v.id] = np.asarray(o, dtype=v.aval.dtype)
    return [np.asarray(read(a)) for a in closed.graph.outvars]


def run_both(lowered, fused, *args):
    """Results of the unfused and the fused graph on the NumPy backend."""
    leaves = [np.asarray(x) for x in tree_leaves((args, {}))]
    return interpret(lowered.graph, leaves), interpret(fused, leaves)


def assert_bitwise(lowered, fused, *args):
    want, got = run_both(lowered, fused, *args)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        assert w.tobytes() == g.tobytes()


def body_prims(eqn) -> list[str]:
    return [b.prim.name for b in eqn.params["body"].graph.eqns]


def check_structure(fused):
    """Every fusable equation is in a group; groups hold nothing else."""
    for e in fused.graph.eqns:
        assert e.prim.kind not in FUSABLE, f"{e.prim.name} left outside every group"
    for e in fused_equations(fused):
        kinds = {b.prim.kind for b in e.params["body"].graph.eqns}
        assert kinds <= FUSABLE, f"group {e.params['name']} holds {kinds - FUSABLE}"
        assert not e.params["body"].consts


def rand(*shape, dtype=np.float32, seed=0):
    return enp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


# --- the groups of the model's building blocks ------------------------------------------------

def test_rms_norm_is_one_row_group():
    x, w = rand(4, 16, 64), rand(64, seed=1)
    lowered, fused = lower_and_fuse(lambda x, w: F.rms_norm(x, w), x, w)
    check_structure(fused)
    (group,) = fused_equations(fused)
    assert fused.graph.eqns == [group]
    assert body_prims(group).count("reduce_sum") == 1
    assert {"sqrt", "div", "mul"} <= set(body_prims(group))
    assert_bitwise(lowered, fused, x, w)


def test_softmax_is_one_row_group_over_the_last_axis():
    x = rand(3, 5, 37)
    lowered, fused = lower_and_fuse(lambda x: F.softmax(x), x)
    (group,) = fused_equations(fused)
    assert fused.graph.eqns == [group]
    prims = body_prims(group)
    assert prims.index("reduce_max") < prims.index("exp") < prims.index("reduce_sum")
    assert_bitwise(lowered, fused, x)


def test_log_softmax_is_one_row_group():
    x = rand(6, 50)
    lowered, fused = lower_and_fuse(lambda x: F.log_softmax(x), x)
    (group,) = fused_equations(fused)
    assert {"reduce_max", "exp", "reduce_sum", "log"} <= set(body_prims(group))
    assert_bitwise(lowered, fused, x)


def test_cross_entropy_keeps_the_gather_out_and_logsumexp_in_one_group():
    logits = rand(8, 50)
    target = enp.asarray(np.arange(8) * 7 % 50)
    lowered, fused = lower_and_fuse(lambda x, t: F.cross_entropy(x, t), logits, target)
    check_structure(fused)
    assert [e.prim.name for e in fused.graph.eqns if e.prim.name != "fused"] == ["gather"]
    rows = [e for e in fused_equations(fused)
            if {"reduce_max", "exp", "reduce_sum", "log"} <= set(body_prims(e))]
    assert len(rows) == 1
    assert len(fused_equations(fused)) <= 5
    assert_bitwise(lowered, fused, logits, target)


def test_rotary_embedding_is_one_group_writing_both_halves():
    x = rand(2, 4, 8, 16)
    cos, sin = rand(8, 8, seed=1), rand(8, 8, seed=2)
    lowered, fused = lower_and_fuse(F.apply_rotary, x, cos, sin)
    check_structure(fused)
    (group,) = fused_equations(fused)
    prims = body_prims(group)
    assert prims.count("slice") == 2 and prims.count("concatenate") == 1
    assert group.outputs[0].aval.shape == (2, 4, 8, 16)
    assert_bitwise(lowered, fused, x, cos, sin)


def test_swiglu_between_the_matmuls_is_one_group():
    x, wg, wu, wd = rand(4, 32), rand(32, 64, seed=1), rand(32, 64, seed=2), rand(64, 32, seed=3)

    def mlp(x, wg, wu, wd):
        return (F.silu(x @ wg) * (x @ wu)) @ wd

    lowered, fused = lower_and_fuse(mlp, x, wg, wu, wd)
    names = [e.prim.name for e in fused.graph.eqns]
    assert names == ["dot_general", "dot_general", "fused", "dot_general"]
    (group,) = fused_equations(fused)
    assert set(body_prims(group)) == {"logistic", "mul"}
    assert_bitwise(lowered, fused, x, wg, wu, wd)


def test_adamw_update_writes_parameter_and_both_moments_in_one_pass():
    params = {"w": rand(16, 8), "b": rand(8, seed=1)}
    grads = {"w": rand(16, 8, seed=2), "b": rand(8, seed=3)}
    opt = AdamW(1e-2)
    state = opt.init(params)
    state = opt.update(params, grads, state)[1]  # non-zero moments
    lowered, fused = lower_and_fuse(opt.update, params, grads, state)
    check_structure(fused)
    groups = fused_equations(fused)
    for shape in [(16, 8), (8,)]:
        (update,) = [e for e in groups if e.outputs[0].aval.shape == shape]
        assert [o.aval.shape for o in update.outputs] == [shape] * 3
        assert {"sqrt", "div", "mul", "sub"} <= set(body_prims(update))
    assert len(groups) == 3  # the two updates and the step's scalars
    assert_bitwise(lowered, fused, params, grads, state)


# --- whole models -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    from tiny_models import tiny_model

    model = tiny_model(64)
    ids = enp.asarray(np.arange(16).reshape(2, 8) * 5 % 64)
    return model, ids


def test_llama_forward_groups(tiny_llama):
    model, ids = tiny_llama
    lowered, fused = lower_and_fuse(lambda m, ids: m(ids), model, ids)
    check_structure(fused)
    before = len(lowered.graph.graph.eqns)
    groups = fused_equations(fused)
    rows = [e for e in groups if "reduce_sum" in body_prims(e)]
    assert len(rows) == 5  # the RMSNorms: two per layer and the final one
    assert sum("logistic" in body_prims(e) for e in groups) == 2  # SwiGLU, per layer
    assert len(fused.graph.eqns) < before / 3
    assert_bitwise(lowered, fused, model, ids)


def test_llama_value_and_grad_groups(tiny_llama):
    model, ids = tiny_llama

    def loss(m, ids):
        logits = m(ids)
        return F.cross_entropy(logits[:, :-1], ids[:, 1:])

    step = ember.value_and_grad(loss)
    lowered, fused = lower_and_fuse(step, model, ids)
    check_structure(fused)
    contractions = sum(e.prim.kind == "contraction" for e in fused.graph.eqns)
    assert contractions == sum(e.prim.kind == "contraction" for e in lowered.graph.graph.eqns)
    assert len(fused_equations(fused)) < len(lowered.graph.graph.eqns) / 4
    assert_bitwise(lowered, fused, model, ids)


# --- the rules that keep fusion correct -------------------------------------------------------

def test_no_group_makes_a_cycle_through_a_matmul():
    x, w = rand(8, 8), rand(8, 8, seed=1)

    def f(x, w):
        a = x * 2.0
        return a + a @ w  # a feeds the matmul, whose result feeds a + ...: two groups

    lowered, fused = lower_and_fuse(f, x, w)
    assert [e.prim.name for e in fused.graph.eqns] == ["fused", "dot_general", "fused"]
    assert_bitwise(lowered, fused, x, w)


def test_a_computed_value_is_not_recomputed_through_a_transpose():
    x = rand(16, 16)
    lowered, fused = lower_and_fuse(lambda x: enp.exp(x) + enp.exp(x).T, x)
    exps = sum(body_prims(e).count("exp") for e in fused_equations(fused))
    assert exps == 1
    assert len(fused_equations(fused)) == 2
    assert_bitwise(lowered, fused, x)


def test_a_broadcast_of_a_computed_value_is_read_not_recomputed():
    x, y = rand(8), rand(4, 8, seed=1)
    lowered, fused = lower_and_fuse(lambda x, y: enp.tanh(x) * y, x, y)
    (tanh_group,) = [e for e in fused_equations(fused) if "tanh" in body_prims(e)]
    assert tanh_group.outputs[0].aval.shape == (8,)
    assert_bitwise(lowered, fused, x, y)


def test_a_reduction_over_leading_axes_joins_its_producers():
    x, g = rand(4, 6, 10), rand(4, 6, 10, seed=1)
    # A norm weight's gradient: the product summed over the batch and sequence axes.
    lowered, fused = lower_and_fuse(lambda x, g: ((x * g).sum(axis=(0, 1)), x * g + 1.0), x, g)
    check_structure(fused)
    (group,) = fused_equations(fused)
    assert {"mul", "reduce_sum"} <= set(body_prims(group))
    nest = describe(group)
    assert (nest.outer, nest.row) == ((10,), (4, 6))
    assert_bitwise(lowered, fused, x, g)


def test_reductions_over_other_axes_of_one_value_are_separate_groups():
    x = rand(6, 10)
    lowered, fused = lower_and_fuse(lambda x: (enp.exp(x).sum(axis=0), enp.exp(x).sum(axis=1)),
                                    x)
    check_structure(fused)
    assert sum(body_prims(e).count("exp") for e in fused_equations(fused)) == 1
    assert_bitwise(lowered, fused, x)


def test_fused_graph_prints_groups_with_their_bodies():
    x = rand(4, 8)
    _, fused = lower_and_fuse(lambda x: F.softmax(x), x)
    text = str(fused)
    (group,) = fused_equations(fused)
    assert f"fused[name={group.params['name']}]" in text
    body = text[text.index("body("):]
    assert "reduce_max" in body and "reduce_sum" in body and "exp" in body


def test_fused_equations_run_eagerly_through_their_bodies():
    x = rand(4, 8)
    _, fused = lower_and_fuse(lambda x: F.softmax(x), x)
    (group,) = fused_equations(fused)
    (out,) = group.prim.bind(x, **group.params)
    assert_equal_or_close(out, F.softmax(x))


# --- random graphs ----------------------------------------------------------------------------

FLOATS = [np.float32, np.float64, dtypes.bfloat16, np.float16]
UNARY = {
    "exp": lambda a: enp.exp(a * 0.5), "tanh": enp.tanh, "neg": lambda a: -a,
    "abs": enp.abs, "sqrt": lambda a: enp.sqrt(enp.abs(a)), "sin": enp.sin,
    "square": lambda a: a * a, "logistic": F.sigmoid,
}
EXACT_UNARY = {"neg", "abs", "sqrt", "square"}
BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (enp.abs(b) + 1.0), "max": enp.maximum, "min": enp.minimum,
    "where": lambda a, b: enp.where(a > b, a, b * 2.0),
}


@st.composite
def random_programs(draw, exact: bool = False):
    """A random chain of elementwise, reduction and movement operations with broadcasting,
    over inputs of one dtype: ``(function, inputs)``. ``exact`` leaves out the operations
    whose compiled results may differ from NumPy's in the last bits (libm functions, sums)."""
    dtype = draw(st.sampled_from(FLOATS))
    rank = draw(st.integers(1, 3))
    base = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    n_in = draw(st.integers(1, 3))
    in_shapes = [tuple(1 if draw(st.booleans()) and i else n for i, n in enumerate(base))
                 for i in range(n_in)]
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    inputs = [enp.asarray(rng.standard_normal(s).astype(dtype)) for s in in_shapes]
    unary = sorted(EXACT_UNARY) if exact else sorted(UNARY)
    steps = []
    values = list(inputs)  # eager values, to know the shapes while drawing
    for _ in range(draw(st.integers(2, 8))):
        op = draw(st.sampled_from(["unary", "binary", "reduce", "move", "move", "cast"]))
        k = draw(st.integers(0, len(values) - 1))
        x = values[k]
        if op == "unary":
            step = ("unary", draw(st.sampled_from(unary)), k)
        elif op == "binary":
            j = draw(st.integers(0, len(values) - 1))
            try:
                np.broadcast_shapes(x.shape, values[j].shape)
            except ValueError:
                continue
            step = ("binary", draw(st.sampled_from(sorted(BINARY))), k, j)
        elif op == "reduce":
            if x.ndim == 0:
                continue
            axes = tuple(sorted(draw(st.sets(st.integers(0, x.ndim - 1), min_size=1))))
            kinds = ["max", "min"] if exact else ["sum", "max", "mean"]
            step = ("reduce", draw(st.sampled_from(kinds)), k, axes, draw(st.booleans()))
        elif op == "move":
            if x.ndim == 0:
                continue
            axis = draw(st.integers(0, x.ndim - 1))
            kinds = ["transpose", "reshape", "flip", "pad", "concat", "broadcast"]
            kinds += ["slice"] if x.shape[axis] > 1 else []
            kinds += ["merge"] if x.ndim > 1 else []
            kinds += ["split"] if _factor(x.shape[axis]) else []
            step = ("move", draw(st.sampled_from(kinds)), k, axis,
                    draw(st.permutations(range(x.ndim))))
        else:
            step = ("cast", draw(st.sampled_from(FLOATS)), k)
        values.append(_apply(step, values))
        steps.append(step)
    n_out = draw(st.integers(1, min(2, len(values))))
    outs = [len(values) - 1 - i for i in range(n_out)]

    def fn(*xs):
        vals = list(xs)
        for step in steps:
            vals.append(_apply(step, vals))
        return [vals[i] for i in outs]

    return fn, inputs


def _factor(n: int) -> int | None:
    """The smallest factor of ``n`` other than 1 and itself (None for primes, 0 and 1)."""
    return next((f for f in range(2, n) if n % f == 0), None)


def _apply(step, vals):
    kind, what, k = step[:3]
    x = vals[k]
    if kind == "unary":
        return UNARY[what](x)
    if kind == "binary":
        return BINARY[what](x, vals[step[3]])
    if kind == "cast":
        return x.astype(what)
    if kind == "reduce":
        axes, keep = step[3], step[4]
        return getattr(enp, what)(x, axis=axes, keepdims=keep)
    axis, perm = step[3], step[4]
    if what == "transpose":
        return enp.transpose(x, perm)
    if what == "reshape":
        return x.reshape(x.shape[:axis] + (1,) + x.shape[axis:])
    if what == "merge":  # permuted axes, two of them as one: loops index it with / and %
        x, a = enp.transpose(x, perm), min(axis, x.ndim - 2)
        return x.reshape(x.shape[:a] + (x.shape[a] * x.shape[a + 1],) + x.shape[a + 2:])
    if what == "split":  # an axis as two
        f = _factor(x.shape[axis])
        return x.reshape(x.shape[:axis] + (f, x.shape[axis] // f) + x.shape[axis + 1:])
    if what == "flip":
        return enp.flip(x, axis=axis)
    if what == "pad":
        pads = [(0, 0)] * x.ndim
        pads[axis] = (1, 2)
        return enp.pad(x, pads, constant_values=0.5)
    if what == "concat":
        return enp.concatenate([x, x * 2.0], axis=axis)
    if what == "broadcast":
        return enp.broadcast_to(x, (2,) + x.shape)
    return x[(slice(None),) * axis + (slice(1, None),)]  # slice


@settings(max_examples=60, deadline=None)
@given(random_programs())
def test_random_graphs_fused_equal_unfused_bitwise(program):
    fn, inputs = program
    lowered, fused = lower_and_fuse(fn, *inputs)
    check_structure(fused)
    assert_bitwise(lowered, fused, *inputs)


# --- the loop description ---------------------------------------------------------------------

def test_index_algebra_simplifies_a_reshape_and_its_inverse():
    i, j = Index.axis("i", 8), Index.axis("j", 32)
    flat = flat_index((i, j), (8, 32))
    heads = unflatten(flat, (8, 4, 8))  # [8, 32] -> [8, 4, 8]
    assert heads[0] == i and heads[1] == j // 8 and heads[2] == j % 8
    assert flat_index(heads, (8, 4, 8)) == flat
    assert unflatten(flat, (256,)) == (flat,)
    assert Index.axis("k", 1) == Index.of(0)  # an axis of size 1 is the constant 0
    assert ((i * 4 + 3) // 4) == i and ((i * 4 + 3) % 4) == Index.of(3)
    assert ((i - 2) // 2).format() == "(i/2) - 1"  # evaluated only where i - 2 >= 0


def test_index_predicates_are_decided_by_ranges():
    i = Index.axis("i", 8)
    assert Pred(i, 0, 8).value() is True
    assert Pred(i, 8, None).value() is False
    assert Pred(i, 2, 5).value() is None
    assert Pred(i * 2, None, None, step=2).value() is True
    assert Pred(i * 2 + 1, None, None, step=2).value() is False


def test_softmax_loop_nest_has_three_row_loops_and_no_recomputation():
    x = rand(4, 37)
    _, fused = lower_and_fuse(lambda x: F.softmax(x * 2.0 + 1.0), x)
    (group,) = fused_equations(fused)
    nest = describe(group)
    assert (nest.outer, nest.row) == ((4,), (37,))
    loops = [s for s in nest.body if isinstance(s, RowLoop)]
    assert len(loops) == 3  # max; sum of exponentials; normalise
    lets = [s.eqn.prim.name for s in nest.statements() if isinstance(s, Let)]
    assert lets.count("exp") == 1 and lets.count("mul") == 2
    assert len(nest.scratch) == 2  # x * 2 + 1 for the second loop, exp(...) for the third
    assert sum(isinstance(s, Update) for s in nest.statements()) == 2


def test_rotate_half_loop_nest_writes_both_halves_from_one_domain():
    x, cos, sin = rand(2, 4, 8, 16), rand(8, 8, seed=1), rand(8, 8, seed=2)
    _, fused = lower_and_fuse(F.apply_rotary, x, cos, sin)
    nest = describe(fused_equations(fused)[0])
    assert nest.outer == (2, 4, 8, 8) and nest.row == ()
    stores = [s for s in nest.statements() if isinstance(s, Store)]
    assert len(stores) == 2
    assert stores[1].index == stores[0].index + 8  # the second half, 8 elements along


def test_adamw_update_writes_each_result_over_its_old_value():
    params = {"w": rand(16, 8), "b": rand(8, seed=1)}
    grads = {"w": rand(16, 8, seed=2), "b": rand(8, seed=3)}
    opt = AdamW(1e-2)
    lowered, fused = lower_and_fuse(opt.update, params, grads, opt.init(params))
    invars = lowered.graph.graph.invars
    gradients = {v.id for v in invars[2:4]}  # params, then grads, then the state
    for group in fused_equations(fused):
        if group.outputs[0].aval.shape == ():
            continue  # the step's scalars
        pairs = describe(group).in_place()
        assert len(pairs) == 3  # parameter, exp_avg, exp_avg_sq
        paired = {group.inputs[j].id for _, j in pairs}
        assert paired <= {v.id for v in invars} and not paired & gradients
