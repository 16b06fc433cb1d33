"""Collective primitives, sharding rules, propagation and equations' source lines (issue 9)."""

import os

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember.core.primitive import REGISTRY
from ember.errors import EmberError, ShapeError
from ember.ir.sharding import Sharding, ShardingError
from ember.parallel import Mesh, NamedSharding, PartitionSpec, devices, rules, runtime
from ember.parallel import collectives as coll
from ember.parallel import with_sharding_constraint as constrain
from ember.parallel.propagate import propagate
from ember.parallel.rules import NO_RULE, rule_for
from ember.parallel.simulate import run_spmd

MESH = (("dp", 2), ("tp", 2))


def lowered(f, *args):
    return ember.jit(f).lower(*args).graph


def eqn_of(closed, name):
    return next(e for e in closed.graph.eqns if e.prim.name == name)


# --- collectives ---------------------------------------------------------------------------------

def test_collective_types_are_local_shapes():
    x = ember.ir.types.ArrayType((4, 6), np.dtype(np.float32))
    assert coll.all_gather_p.abstract_eval(x, axes=("dp", "tp"), axis=1, mesh=MESH).shape == (4, 24)
    assert coll.reduce_scatter_p.abstract_eval(x, axes=("tp",), axis=0, op="sum",
                                               mesh=MESH).shape == (2, 6)
    assert coll.all_to_all_p.abstract_eval(x, axes=("dp",), split_axis=1, concat_axis=0,
                                           mesh=MESH).shape == (8, 3)
    assert coll.axis_index_p.abstract_eval(axis="tp", mesh=MESH).dtype == np.int32


@pytest.mark.parametrize("call, message", [
    (lambda x: coll.all_reduce_p.abstract_eval(x, axes=("pp",), op="sum", mesh=MESH),
     "mesh axis 'pp' is not in the mesh"),
    (lambda x: coll.reduce_scatter_p.abstract_eval(x, axes=("dp", "tp"), axis=0, op="sum",
                                                   mesh=MESH), "does not divide evenly"),
    (lambda x: coll.all_reduce_p.abstract_eval(x, axes=("dp",), op="mean", mesh=MESH),
     "op='mean'"),
    (lambda x: coll.collective_permute_p.abstract_eval(x, axes=("dp",), pairs=((0, 1), (1, 1)),
                                                       mesh=MESH), "distinct"),
])
def test_collective_misuse_is_an_ember_error(call, message):
    x = ember.ir.types.ArrayType((6, 4), np.dtype(np.float32))
    with pytest.raises(EmberError, match=message):
        call(x)


def _each_collective():
    """(name, per-device fn, equivalent graph builder) for every collective kind."""
    return [
        ("all_reduce", lambda x: coll.all_reduce(x, "tp", MESH, "max")),
        ("all_gather", lambda x: coll.all_gather(x, ("tp", "dp"), MESH, 1)),
        ("reduce_scatter", lambda x: coll.reduce_scatter(x, "dp", MESH, 0)),
        ("all_to_all", lambda x: coll.all_to_all(x, ("dp", "tp"), MESH, 0, 1)),
        ("collective_permute", lambda x: coll.collective_permute(x, "tp", MESH, [(0, 1)])),
        ("axis_index", lambda x: x * enp.asarray(coll.axis_index("dp", MESH)).astype(x.dtype)),
    ]


@pytest.mark.parametrize("name, fn", _each_collective(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_collectives_on_threads_equal_the_lockstep_simulator(name, fn):
    """The NumPy implementations (on the virtual-device runtime's communicators) and the
    simulator's direct computation give the same values, so groups and ranks agree."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
    on_threads = runtime.run_on_devices(lambda d: np.asarray(fn(enp.asarray(xs[d]))), 4,
                                        timeout=30)
    closed = lowered(fn, xs[0])
    simulated = run_spmd(closed, MESH, [[x] for x in xs])
    for d in range(4):
        np.testing.assert_array_equal(on_threads[d], simulated[d][0])


def test_collective_groups_follow_the_mesh():
    """all_gather over tp concatenates the two devices of one dp row in tp order."""
    xs = [np.full((1,), d, np.float32) for d in range(4)]
    closed = lowered(lambda x: coll.all_gather(x, "tp", MESH, 0), xs[0])
    outs = run_spmd(closed, MESH, [[x] for x in xs])
    assert [o[0].tolist() for o in outs] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_collectives_are_host_steps_of_the_compiled_backend():
    """Kind "collective" is neither fused nor lowered to C: the cpu backend runs it through
    NumPy, here inside a program that also has fused arithmetic."""
    def f(x):
        return coll.all_reduce(enp.exp(x) * 2.0, ("dp", "tp"), MESH) + 1.0
    xs = [np.full((3,), d, np.float32) for d in range(4)]
    compiled = ember.jit(f, backend="cpu")
    got = runtime.run_on_devices(lambda d: np.asarray(compiled(xs[d])), 4, timeout=60)
    want = sum(np.exp(x) * 2 for x in xs) + 1
    for g in got:
        np.testing.assert_allclose(g, want, rtol=1e-6)


# --- rules ---------------------------------------------------------------------------------------

def test_every_primitive_has_a_rule():
    """install() (run on import) covers what is registered by then; primitives registered
    later (fusion's ``fused``) get theirs when installed again, and rule_for falls back on
    the kind's rule meanwhile."""
    rules.install()
    missing = [name for name, p in REGISTRY.items() if p.sharding_rule is None]
    assert not missing


def test_dot_general_rule_contracting_factor_is_reduced():
    closed = lowered(lambda a, b: a @ b, np.ones((4, 6), np.float32), np.ones((6, 8), np.float32))
    rule = rule_for(eqn_of(closed, "dot_general"))
    (m, k), (k2, n) = rule.operands
    assert k == k2 and rule.reduced == {k} and rule.results == ((m, n),)
    assert rule.linear == ((0,), (1,))


def test_reshape_rule_shares_only_leading_dimensions():
    closed = lowered(lambda x: x.reshape(24, 5), np.ones((4, 6, 5), np.float32))
    rule = rule_for(eqn_of(closed, "reshape"))
    (b, s, d), = rule.operands
    (bs, d2), = rule.results
    assert b == bs and d == d2 and s is None


def test_attention_rule_splits_batch_and_heads_alike_for_grouped_queries():
    q = np.ones((2, 4, 5, 8), np.float32)
    kv = np.ones((2, 2, 5, 8), np.float32)
    closed = lowered(lambda q, k, v: ember.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), q, kv, kv)
    rule = rule_for(eqn_of(closed, "attention"))
    assert rule.operands[0] == rule.operands[1] == rule.operands[2] == (0, 1, None, None)
    assert rule.results[0] == (0, 1, None, None) and rule.results[1] == (0, 1, None)


def test_a_primitive_without_a_rule_replicates():
    closed = lowered(lambda x: enp.linalg.cholesky(x), np.eye(4, dtype=np.float32))
    rule = rule_for(eqn_of(closed, "cholesky"))
    assert rule.note == NO_RULE and rule.operands == ((None, None),)


# --- propagation ---------------------------------------------------------------------------------

def test_propagation_goes_forward_and_backward():
    def f(x, w):
        h = enp.tanh(x) @ w          # x's split reaches h forward
        return h + enp.ones_like(h)  # and the ones' layout comes from h
    x, w = np.ones((8, 6), np.float32), np.ones((6, 4), np.float32)
    closed = lowered(f, x, w)
    out = closed.graph.outvars[0]
    layouts = propagate(closed, MESH, [Sharding(MESH, ("dp", None)), None],
                        [Sharding(MESH, (None, "tp"))])
    assert layouts.of(out).dims == ((), ("tp",))  # annotated output: fixed
    assert layouts.of(closed.graph.invars[1]).dims == ((), ("tp",))  # backward to w
    dot = eqn_of(closed, "dot_general")
    assert layouts.of(dot.outputs[0]).dims == (("dp",), ("tp",))


def test_annotations_win_over_inferred_layouts():
    mesh = Mesh(devices()[:4], ("dp", "tp"), shape=(2, 2))
    def f(x):
        y = constrain(enp.exp(x), NamedSharding(mesh, PartitionSpec(None, "dp")))
        return enp.sin(y)
    x = np.ones((8, 6), np.float32)
    closed = lowered(f, x)
    layouts = propagate(closed, MESH, [Sharding(MESH, ("dp", None))])
    exp = eqn_of(closed, "exp")
    sin = eqn_of(closed, "sin")
    assert layouts.of(closed.graph.invars[0]).dims == (("dp",), ())
    assert layouts.of(exp.outputs[0]).dims == (("dp",), ())  # from the input, first
    assert layouts.of(sin.outputs[0]).dims == ((), ("dp",))  # from the constraint


def test_uneven_annotation_names_the_value_axis_and_line():
    closed = lowered(lambda x: x * 2.0, np.ones((6, 4), np.float32))
    with pytest.raises(ShardingError) as e:
        propagate(closed, (("dp", 4),), [Sharding((("dp", 4),), ("dp", None))])
    message = str(e.value)
    assert "input 0" in message and "'dp'" in message and "size 4" in message
    assert os.path.basename(__file__) in message


def test_propagation_never_splits_unevenly():
    closed = lowered(lambda x, y: x @ y, np.ones((8, 6), np.float32), np.ones((6, 3), np.float32))
    layouts = propagate(closed, MESH, [Sharding(MESH, ("dp", "tp")), None])
    assert layouts.of(closed.graph.invars[1]).dims == (("tp",), ())
    dot = eqn_of(closed, "dot_general")
    assert layouts.of(dot.outputs[0]).dims == (("dp",), ())


# --- equation sources ----------------------------------------------------------------------------

def test_staged_equations_carry_the_users_line():
    """Forward equations name the line that computed them; the backward pass's, staged by
    ember's transpose rules, the user line that asked for the gradient."""
    def f(x):
        y = enp.exp(x)
        return enp.sum(y * y)
    closed = lowered(ember.grad(f), np.ones(3, np.float32))
    here = os.path.basename(__file__)
    sources = [e.source for e in closed.graph.eqns]
    assert all(s and here in s.split(":")[0] for s in sources)
    assert sources[0].endswith(f":{f.__code__.co_firstlineno + 1}")  # exp


def test_source_is_not_part_of_an_equation():
    a = lowered(lambda x: x + 1.0, np.ones(3, np.float32))
    b = lowered(lambda x: x + 1.0, np.ones(3, np.float32))
    ea, eb = a.graph.eqns[0], b.graph.eqns[0]
    assert ea.source != eb.source
    assert ember.ir.params.graph_key(a.graph) == ember.ir.params.graph_key(b.graph)


def test_shape_error_inside_collective_names_the_op():
    with pytest.raises(ShapeError, match="all_gather"):
        coll.all_gather_p.abstract_eval(ember.ir.types.ArrayType((2,), np.dtype(np.float32)),
                                        axes=("dp",), axis=3, mesh=MESH)


def test_scatter_add_may_split_its_update_batch_into_partial_sums():
    closed = lowered(ember.grad(lambda t, i: enp.sum(t[i])), np.ones((5, 3), np.float32),
                     np.zeros((4, 2), np.int32))
    eqn = eqn_of(closed, "scatter")
    rule = rule_for(eqn)
    (b0, b1, _), (row, trail) = rule.operands[1], rule.results[0]
    assert rule.operands[0] == rule.results[0]
    assert rule.operands[2] == (b0, b1, trail)
    assert rule.reduced == {b0, b1} and rule.accumulates == (0,)
    # The rows may be split too (each device scatters into its own, indices made local).
    assert row not in (b0, b1, trail, None) and rule.index_columns == ((1, 0, 0),)


def _graph_facts(closed):
    graph = closed.graph
    return ({v.id: e for e in graph.eqns for v in e.outputs},
            {v.id: c for v, c in zip(graph.constvars, closed.consts)})


def test_take_along_axis_index_columns_are_seen_as_batched():
    """Cross-entropy's gather and its gradient's (clamped) scatter index the logits' batch
    dimensions with iotas: those operand dimensions share the batch's factors."""
    def f(logits, target):
        return enp.sum(enp.take_along_axis(logits, target[..., None], axis=-1))
    closed = lowered(ember.value_and_grad(f), np.ones((2, 3, 5), np.float32),
                     np.zeros((2, 3), np.int32))
    facts = _graph_facts(closed)
    gather, scatter = eqn_of(closed, "gather"), eqn_of(closed, "scatter")
    for eqn in (gather, scatter):
        assert rules.iota_columns(eqn.inputs[1], *facts) == {0: 0, 1: 1}
    rule = rule_for(scatter, *facts)
    assert rule.operands[0][:2] == rule.operands[1][:2] == rule.results[0][:2]
    assert not rule.reduced & set(rule.operands[1][:2])
    assert {c for _, c, _ in rule.index_columns} == {0, 1, 2}  # 2: the class, made local
    plain = rule_for(gather)  # without the graph: three masked lookups, summed away
    assert set(plain.operands[0]) == plain.reduced and len(plain.reduced) == 3
    assert {c for _, c, _ in plain.masked_columns} == {0, 1, 2}
    batched = rule_for(gather, *facts)
    assert {c for _, c, _ in batched.index_columns} == {0, 1}
    assert [c for _, c, _ in batched.masked_columns] == [2]
    assert batched.reduced == {batched.operands[0][2]}


def test_a_clamp_that_changes_an_iota_column_is_not_batched():
    def f(x):
        rows = ember.lax.iota(np.int32, (4, 1), 0)
        idx = enp.concatenate([enp.minimum(rows, 2), enp.zeros((4, 1), np.int32)], axis=1)
        return ember.ops.indexing.gather(x, idx)
    closed = lowered(f, np.ones((4, 3), np.float32))
    assert rules.iota_columns(eqn_of(closed, "gather").inputs[1], *_graph_facts(closed)) == {}
