"""Vocabulary parallelism (issue 9, part 6): lookups into a row-split table, scatters into
one, max/min over a split dimension, the softmax cross-entropy over vocabulary-split logits,
and the Llama plans that split the embedding and the head by vocabulary rows (or, where the
vocabulary does not divide, say that they do not).

Programs are partitioned and run by the lockstep simulator against one device, values and
gradients; ``explain()`` is read for the collectives Megatron's layout needs, and no others."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_parallel_plans import (
    PLANS,
    Run,
    assert_same_training,
    batches,
    local_shape,
    mesh_of,
    model_for,
)

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.backends import get_backend
from ember.ir.sharding import Sharding
from ember.ir.verify import verify
from ember.nn import functional as F
from ember.ops.indexing import scatter
from ember.parallel import runtime
from ember.parallel.partition import partition
from ember.parallel.reshard import collective_bytes
from ember.parallel.simulate import shard, simulate

TP2, TP4 = (("tp", 2),), (("tp", 4),)
M2x2 = (("dp", 2), ("tp", 2))


def S(mesh, *dims):
    return Sharding(mesh, tuple(() if d is None else (d,) if isinstance(d, str) else d
                                for d in dims))


def partitioned(f, args, ins, outs, mesh):
    p = partition(ember.jit(f).lower(*args).graph, ins, outs, mesh)
    verify(p.graph)
    return p


def check(p, f, args, rtol=1e-5, atol=1e-5):
    got = simulate(p, *args)
    want = ember.tree.tree_leaves(f(*[enp.asarray(a) for a in args]))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, np.asarray(w), rtol=rtol, atol=atol)


def kinds(p):
    return [(c.kind, local_shape(c)) for c in p.explanation.collectives]


def row_split(mesh):
    """The table's rows over every axis of ``mesh`` (two axes: a block index of both)."""
    return tuple(a for a, _ in mesh)


# --- a lookup into a row-split table -------------------------------------------------------------

@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_lookup_into_a_row_split_table_equals_one_device_values_and_gradients(data):
    mesh = data.draw(st.sampled_from([TP2, TP4, M2x2]), label="mesh")
    n = int(np.prod([s for _, s in mesh]))
    # More rows than twice the lookups (a vocabulary is): gathering the table costs more.
    rows = n * data.draw(st.integers(10, 12), label="rows per device")
    width = data.draw(st.integers(1, 5), label="width")
    batch = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2), label="batch"))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    table = rng.standard_normal((rows, width)).astype(np.float32)
    ids = rng.integers(0, rows, batch).astype(np.int32)
    weight = rng.standard_normal((*batch, width)).astype(np.float32)

    def f(t, i, c):
        return enp.sum(enp.tanh(F.embedding(i, t)) * c)
    fg = ember.value_and_grad(f)
    split = S(mesh, row_split(mesh), None)
    whole = [S(mesh, *(None,) * len(batch)), S(mesh, *(None,) * (len(batch) + 1))]
    p = partitioned(fg, (table, ids, weight), [split, *whole], [S(mesh), split], mesh)
    check(p, fg, (table, ids, weight))
    # The table never moves: its lookups are summed (one all-reduce of [*batch, width]) and
    # its gradient is scattered into each device's rows.
    assert kinds(p) == [("all_reduce", (*batch, width))]


def test_lookup_is_summed_by_the_collective_its_reader_needs():
    """A lookup whose result is wanted split by sequence is reduce-scattered (sequence
    parallelism's embedding), not all-reduced and sliced."""
    table, ids = np.arange(24, dtype=np.float32).reshape(8, 3), np.array([[7, 0, 3, 4]])

    def f(t, i):
        return F.embedding(i, t) * 2.0
    p = partitioned(f, (table, ids), [S(TP2, "tp", None), S(TP2, None, None)],
                    [S(TP2, None, "tp", None)], TP2)
    check(p, f, (table, ids))
    (c,) = p.explanation.collectives
    assert (c.kind, local_shape(c)) == ("reduce_scatter", (1, 2, 3))
    assert c.nbytes == collective_bytes("reduce_scatter", 4 * 3 * 4, 2)


def test_lookup_into_a_table_split_like_its_batch_gathers_the_table_when_that_is_cheaper():
    """ZeRO-3's table split over the data axis, like the batch: gathering the small table
    beats gathering the ids and summing a large lookup."""
    table = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    ids = np.random.default_rng(1).integers(0, 8, (8, 64)).astype(np.int32)

    def f(t, i):
        return F.embedding(i, t)
    dp = (("dp", 2),)
    p = partitioned(f, (table, ids), [S(dp, "dp", None), S(dp, "dp", None)],
                    [S(dp, "dp", None, None)], dp)
    check(p, f, (table, ids))
    assert kinds(p) == [("all_gather", (8, 2))]


@pytest.mark.parametrize("mode", ["add", "set", "max"])
def test_scatter_into_a_row_split_array_keeps_each_devices_rows_without_communication(mode):
    rng = np.random.default_rng(2)
    operand = rng.standard_normal((8, 3)).astype(np.float32)
    idx = np.array([[1], [6], [6], [3], [0], [7]], np.int32)
    updates = rng.standard_normal((6, 3)).astype(np.float32)
    if mode != "add":  # one update per row: the result does not depend on their order
        idx[2, 0] = 5

    def f(o, i, u):
        return scatter(o * 1.5, i, u, mode=mode)
    split = S(TP4, "tp", None)
    p = partitioned(f, (operand, idx, updates), [split, S(TP4, None, None), S(TP4, None, None)],
                    [split], TP4)
    check(p, f, (operand, idx, updates))
    assert kinds(p) == []


# --- max and min over a split dimension ----------------------------------------------------------

@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("mesh", [TP2, TP4], ids=["tp2", "tp4"])
def test_max_and_min_over_a_split_dimension_all_reduce_each_devices_extreme(op, mesh):
    x = np.random.default_rng(3).standard_normal((3, 5, 8)).astype(np.float32)

    def f(a):
        return getattr(enp, op)(a, axis=(0, 2))
    n = mesh[0][1]
    p = partitioned(f, (x,), [S(mesh, None, None, "tp")], [S(mesh, None)], mesh)
    check(p, f, (x,))
    (c,) = p.explanation.collectives
    assert (c.kind, c.axes, local_shape(c)) == ("all_reduce", ("tp",), (5,))
    assert c.nbytes == collective_bytes("all_reduce", 5 * 4, n)
    assert c.layouts == f"{op} of the blocks"
    reduced = [e for e in p.graph.graph.eqns if e.prim.name == "all_reduce"]
    assert [e.params["op"] for e in reduced] == [op]


def test_logsumexp_over_a_split_dimension_and_its_gradient():
    x = np.random.default_rng(4).standard_normal((4, 12)).astype(np.float32)

    def f(a):
        return enp.sum(ember.numpy.special.logsumexp(a, axis=-1) ** 2)
    fg = ember.value_and_grad(f)
    split = S(M2x2, "dp", "tp")
    p = partitioned(fg, (x,), [split], [S(M2x2), split], M2x2)
    check(p, fg, (x,))
    assert not [c for c in p.explanation.collectives if c.kind == "all_gather"]


# --- cross-entropy over vocabulary-split logits --------------------------------------------------

def test_vocabulary_parallel_cross_entropy_all_reduces_three_statistics_never_the_logits():
    """Megatron's cross-entropy: the maximum, the sum of exponentials and the target's logit,
    each ``[batch, length]``, are all-reduced; forward and backward never move ``[B, S, V]``
    logits or the ``[V, D]`` head; the hidden state's gradient is all-reduced once."""
    B, L, D, V = 2, 5, 4, 16
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((B, L, D)).astype(np.float32)
    head = rng.standard_normal((V, D)).astype(np.float32)
    target = rng.integers(0, V, (B, L)).astype(np.int32)
    target[0, 1] = -100  # ignored

    def loss(h, w, t):
        return F.cross_entropy(F.linear(h, w), t)
    fg = ember.value_and_grad(loss, argnums=(0, 1))
    ins = [S(TP2, None, None, None), S(TP2, "tp", None), S(TP2, None, None)]
    p = partitioned(fg, (hidden, head, target), ins,
                    [S(TP2), S(TP2, None, None, None), S(TP2, "tp", None)], TP2)
    check(p, fg, (hidden, head, target))
    got = sorted((c.kind, local_shape(c), c.nbytes) for c in p.explanation.collectives)
    stat = ("all_reduce", (B, L), collective_bytes("all_reduce", B * L * 4, 2))
    grad = ("all_reduce", (B, L, D), collective_bytes("all_reduce", B * L * D * 4, 2))
    assert got == sorted([stat] * 3 + [grad])
    assert [c.reason for c in p.explanation.collectives].count(
        "reduce_max over a split dimension") == 1


def _embed_and_classify(table, ids, target):
    """A tied embedding and head with a cross-entropy loss, and its gradient."""
    return ember.value_and_grad(lambda t: F.cross_entropy(
        F.linear(enp.tanh(F.embedding(ids, t)), t), target))(table)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_vocabulary_parallel_program_runs_compiled_on_virtual_devices(backend):
    """The per-device program (masked lookups, max all-reduce, local scatters) compiled by a
    backend and run on four threads gives the simulator's values, batch over dp and
    vocabulary over tp."""
    rng = np.random.default_rng(6)
    args = (rng.standard_normal((12, 4)).astype(np.float32),
            rng.integers(0, 12, (4, 3)).astype(np.int32), rng.integers(0, 12, (4, 3)).astype(
                np.int32))
    split = S(M2x2, "tp", None)
    p = partitioned(_embed_and_classify, args, [split, S(M2x2, "dp", None), S(M2x2, "dp", None)],
                    [S(M2x2), split], M2x2)
    assert "all_gather" not in {c.kind for c in p.explanation.collectives}
    program = get_backend(backend).compile(p.graph)
    blocks = runtime.run_on_devices(
        lambda d: [np.asarray(o) for o in program(*[shard(a, s, d) for a, s in
                                                   zip(args, p.in_shardings)])], 4, timeout=60)
    want = simulate(p, *args)
    check(p, _embed_and_classify, args)
    for d in range(4):
        for got, w, s in zip(blocks[d], want, p.out_shardings):
            np.testing.assert_allclose(got, shard(w, s, d), rtol=1e-5, atol=1e-6)


# --- the Llama plans -----------------------------------------------------------------------------

def llama_gradient_program(plan, mesh, vocab):
    model = Run(None, None, vocab=vocab).model
    model.activation_sharding = plan.annotator(mesh)
    ids = batches(1, 1)[0][0]
    fg = ember.jit(lambda m, b: ember.nn.value_and_grad(lambda m: m.loss(b))(m))
    closed = fg.lower(model, ids).graph
    ins = plan.model_shardings(model, mesh) + [plan.batch_sharding(mesh)]
    return model, ids, partition(closed, ins, None, mesh)


def test_tensor_parallel_llama_never_gathers_logits_or_the_embedding():
    vocab, mesh, plan = 256, mesh_of(tp=2), P.plans.llama(tp="tp")
    model, ids, p = llama_gradient_program(plan, mesh, vocab)
    assert plan.param_shardings(model, mesh)["model.embed_tokens.weight"].spec == \
        P.PartitionSpec("tp", None)
    leaves = [np.asarray(x) for x in ember.tree.tree_leaves((model, ids))]
    loss, *_ = simulate(p, *leaves)
    model.activation_sharding = None
    np.testing.assert_allclose(loss, np.asarray(model.loss(ids)), rtol=1e-5)
    for c in p.explanation.collectives:  # no [.., V] or [V, ..] block ever moves
        assert not {vocab, vocab // 2} & set(local_shape(c)), c
    b, length = ids.shape
    stats = [c for c in p.explanation.collectives if local_shape(c) == (b, length)]
    assert [(c.kind, c.nbytes) for c in stats] == \
        [("all_reduce", collective_bytes("all_reduce", b * length * 4, 2))] * 3


@pytest.mark.parametrize("plan, axes", [p[1:] for p in PLANS if "tp" in p[1]],
                         ids=[p[0] for p in PLANS if "tp" in p[1]])
def test_the_tensor_parallel_plans_trained_like_one_device_split_the_vocabulary(plan, axes):
    """tests/test_parallel_plans.py trains every plan like one device (losses, parameters):
    those with ``tp`` do so with the (tied) embedding and head split by vocabulary rows."""
    plan, mesh = P.plans.llama(**plan), mesh_of(**axes)
    spec = plan.param_shardings(model_for(), mesh)["model.embed_tokens.weight"].spec
    assert spec[0] in ("tp", ("tp", "dp"))


def test_zero3_on_a_vocabulary_that_does_not_divide_trains_like_one_device():
    """Vocabulary 259 on dp=2: ZeRO-3 splits the table by its columns instead, says so, and
    trains like one device."""
    plan, mesh = P.plans.llama(dp="dp", zero=3), mesh_of(dp=2)
    run = assert_same_training(plan, mesh, steps=2, vocab=259)
    shardings = plan.param_shardings(run.model, mesh)
    assert shardings["model.embed_tokens.weight"].spec == P.PartitionSpec(None, "dp")
    assert re.search(r"model\.embed_tokens\.weight \(259, 32\): ZeRO splits dimension 1 over "
                     r"mesh axis 'dp' \(size 2\): dimension 0 of size 259 does not divide",
                     plan.describe(run.model, mesh))


def test_a_vocabulary_that_does_not_divide_over_tp_keeps_the_embedding_replicated():
    model, mesh = Run(None, None, vocab=259).model, mesh_of(dp=2, tp=2)
    plan = P.plans.llama(dp="dp", tp="tp", zero=1)
    layouts = plan.param_shardings(model, mesh)
    assert layouts["model.embed_tokens.weight"].spec == P.PartitionSpec(None, None)
    assert layouts["model.layers.0.mlp.up_proj.weight"].spec == P.PartitionSpec("tp", None)
    described = plan.describe(model, mesh).splitlines()
    assert described[1:] == [
        "  model.embed_tokens.weight (259, 32): dimension 0 of size 259 stays whole over mesh "
        "axis 'tp' (size 2): it does not divide",
        "  model.embed_tokens.weight (259, 32): ZeRO splits dimension 1 over mesh axis 'dp' "
        "(size 2): dimension 0 of size 259 does not divide (optimizer state)"]
    assert P.plans.llama(tp="tp").describe(Run(None, None, vocab=256).model, mesh_of(tp=2)) \
        .endswith("every parameter is laid out as planned")


# --- vocabulary 256: AdamW and rounding-level gradients ------------------------------------------

V256 = [(dict(tp="tp"), dict(tp=2)), (dict(dp="dp", tp="tp"), dict(dp=2, tp=2))]


def trainable(run):
    return {k: np.asarray(v) for k, v in run.model.trainable_parameters().items()}


def clipped_gradients(model, ids):
    """The gradients of the loss on ``ids`` as the step clips them (global norm 1)."""
    _, grads = ember.nn.value_and_grad(lambda m: m.loss(ids))(model)
    grads = {k: np.asarray(g, np.float64) for k, g in grads.items()}
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    return {k: g / max(norm, 1.0) for k, g in grads.items()}


@pytest.mark.parametrize("plan, axes", V256, ids=["tp2", "dp2xtp2"])
def test_vocabulary_256_updates_parameters_like_one_device(plan, axes):
    """At vocabulary 256 the tensor-parallel AdamW runs leave rtol 1e-4 of one device's
    parameters after two steps. Not a bug: against float64 runs of the same steps, after one
    step every element more than 1e-6 from float64, on one device and under tp, has a clipped
    gradient under 1e-6 (33 of 20k elements; the rest agree to 5e-7). AdamW's first update,
    ``lr * g / (|g| + eps)``, makes a rounding-level ``g`` a step of up to ``lr`` of either
    sign, and the second step's gradients carry those few weights' differences everywhere
    (its errors from float64 scale with the first step's, one run to the next). So SGD, linear
    in the gradients, checks every update over two steps; AdamW's first step every element
    whose gradient is above rounding, and its losses."""
    plan, mesh = P.plans.llama(**plan), mesh_of(**axes)
    data = batches(2, 1)
    sgd = ember.optim.SGD(lr=1.0)
    one, many = Run(None, None, vocab=256, opt=sgd), Run(plan, mesh, vocab=256, opt=sgd)
    start = trainable(one)
    many.train(data)
    one.train(data)
    for name, value in trainable(many).items():
        # Rounding in a gradient scales with the terms summed, not the sum: a tensor's
        # updates are compared to 1e-5 of its largest.
        want = trainable(one)[name] - start[name]
        np.testing.assert_allclose(value - start[name], want, rtol=1e-4,
                                   atol=1e-5 * np.abs(want).max(), err_msg=name)

    one, many = Run(None, None, vocab=256), Run(plan, mesh, vocab=256)
    grads = clipped_gradients(one.model, data[0][0])
    np.testing.assert_allclose(many.train(data[:1]), one.train(data[:1]), rtol=2e-5)
    rounding = sum(int(np.sum(np.abs(g) < 1e-6)) for g in grads.values())
    assert rounding < 1e-2 * sum(g.size for g in grads.values())  # a few, never a tensor
    for name, value in trainable(many).items():
        # Above 1e-6, float32's noise in g (~1e-9) moves lr * g / (|g| + eps) by under 1e-7.
        above = np.abs(grads[name]) >= 1e-6
        np.testing.assert_allclose(value[above], trainable(one)[name][above], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose(many.train(data[1:]), one.train(data[1:]), rtol=2e-5)

