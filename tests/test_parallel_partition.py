"""The SPMD partitioner: per-device programs give one device's values, with the collectives an
expert expects (issue 9, parts 2 and 3). The lockstep simulator is the oracle; one test runs the
same programs on virtual devices (threads), NumPy and compiled."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ember
import ember.numpy as enp
from ember.backends import get_backend
from ember.ir.sharding import Sharding, ShardingError
from ember.ir.verify import verify
from ember.parallel import Mesh, NamedSharding, PartitionSpec, devices, runtime
from ember.parallel import with_sharding_constraint as constrain
from ember.parallel.partition import partition
from ember.parallel.reshard import collective_bytes
from ember.parallel.simulate import run_spmd, shard, simulate

M2x2 = (("dp", 2), ("tp", 2))
MESHES = [(("dp", 1), ("tp", 2)), M2x2, (("dp", 4), ("tp", 2))]
HERE = os.path.basename(__file__)


def S(mesh, *dims, partial=()):
    return Sharding(mesh, dims, partial)


def rand(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed + len(shape)).standard_normal(shape).astype(dtype)


def partitioned(f, args, ins, outs, mesh=M2x2):
    p = partition(ember.jit(f).lower(*args).graph, ins, outs, mesh)
    verify(p.graph)  # the per-device program is a well-formed graph
    return p


def check(p, f, args, rtol=1e-5, atol=1e-5):
    """The simulated per-device program against ember on one device."""
    got = simulate(p, *args)
    want = ember.tree.tree_leaves(f(*[enp.asarray(a) for a in args]))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.asarray(w), rtol=rtol, atol=atol)
    return got


def nbytes(shape, dtype=np.float32):
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


# --- matmul chains and an MLP --------------------------------------------------------------------

def test_column_then_row_parallel_matmuls_need_exactly_one_all_reduce():
    def f(x, w1, w2):
        h = enp.tanh(x @ w1)
        return h @ w2
    args = rand(8, 16), rand(16, 32), rand(32, 16)
    p = partitioned(f, args, [S(M2x2, None, None), S(M2x2, None, "tp"), S(M2x2, "tp", None)],
                    [S(M2x2, None, None)])
    check(p, f, args)
    (c,) = p.explanation.collectives
    assert (c.kind, c.axes) == ("all_reduce", ("tp",))
    assert c.nbytes == collective_bytes("all_reduce", nbytes((8, 16)), 2) == nbytes((8, 16))
    assert c.source.startswith(__file__) and c.source.endswith(
        f":{f.__code__.co_firstlineno + 2}")  # the line of the row-parallel product


def test_data_parallel_batch_with_tensor_parallel_weights():
    def f(x, w1, w2):
        return enp.maximum(x @ w1, 0.0) @ w2
    args = rand(8, 6), rand(6, 4), rand(4, 6)
    p = partitioned(f, args, [S(M2x2, "dp", None), S(M2x2, None, "tp"), S(M2x2, "tp", None)],
                    None)
    check(p, f, args)
    assert p.out_shardings == [S(M2x2, "dp", None)]  # propagated: still split over the batch
    assert [(c.kind, c.axes) for c in p.explanation.collectives] == [("all_reduce", ("tp",))]
    assert p.explanation.collectives[0].nbytes == nbytes((4, 6))  # 2 (n-1)/n of the local block


def test_mlp_gradient_reduces_weight_gradients_over_the_data_axis():
    def loss(params, x, y):
        w1, b1, w2 = params
        h = enp.tanh(x @ w1 + b1)
        return enp.mean((h @ w2 - y) ** 2)
    params = rand(6, 8, seed=1), rand(8, seed=2), rand(8, 3, seed=3)
    x, y = rand(16, 6, seed=4), rand(16, 3, seed=5)
    grad = ember.value_and_grad(loss)
    ins = [S(M2x2, None, "tp"), S(M2x2, "tp"), S(M2x2, "tp", None), S(M2x2, "dp", None),
           S(M2x2, "dp", None)]
    outs = [S(M2x2), S(M2x2, None, "tp"), S(M2x2, "tp"), S(M2x2, "tp", None)]
    closed = ember.jit(lambda p, x, y: grad(p, x, y)).lower(params, x, y).graph
    p = partition(closed, ins, outs, M2x2)
    got = simulate(p, *params, x, y)
    value, grads = grad(params, x, y)
    for g, w in zip(got, [value, *grads]):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-6)
    kinds = p.explanation.counts()
    assert set(kinds) == {"all_reduce"}
    # Each weight gradient is summed over the batch split once; nothing gathers activations.
    by_reason = {c.reason: c for c in p.explanation.collectives}
    for i, shape in ((1, (6, 4)), (2, (4,)), (3, (4, 3))):
        c = by_reason[f"output {i}"]
        assert c.axes == ("dp",) and c.nbytes == collective_bytes("all_reduce", nbytes(shape), 2)


def test_zero3_style_gathers_each_weight_and_reduce_scatters_its_gradient():
    """Weights and their gradients split over dp like the batch: each weight is gathered once
    (the backward pass reuses it) and each gradient is summed straight into its shard."""
    def loss(w1, w2, x):
        return enp.sum(enp.tanh(x @ w1) @ w2)
    mesh = (("dp", 4),)
    args = rand(64, 128), rand(128, 64, seed=1), rand(256, 64, seed=2)
    f = ember.value_and_grad(loss, argnums=(0, 1))
    zero = S(mesh, "dp", None)
    p = partitioned(f, args, [zero] * 3, [S(mesh), zero, zero], mesh)
    check(p, f, args, rtol=1e-4, atol=1e-3)
    got = [(c.kind, c.nbytes) for c in p.explanation.collectives if c.result != "f32[]{}"]
    assert sorted(got) == sorted(
        [("all_gather", collective_bytes("all_gather", nbytes(w.shape) // 4, 4)) for w in args[:2]]
        + [("reduce_scatter", collective_bytes("reduce_scatter", nbytes(w.shape), 4))
           for w in args[:2]])


# --- reductions, redistributions -----------------------------------------------------------------

def test_sum_over_a_split_dimension_is_one_all_reduce():
    f = lambda x: enp.sum(enp.exp(x), axis=1)  # noqa: E731
    args = (rand(8, 12),)
    p = partitioned(f, args, [S(M2x2, "dp", "tp")], [S(M2x2, "dp")])
    check(p, f, args)
    assert [(c.kind, c.axes, c.nbytes) for c in p.explanation.collectives] == [
        ("all_reduce", ("tp",), nbytes((4,)))]


def test_partial_sum_to_a_split_result_is_a_reduce_scatter():
    f = lambda a, b: a @ b  # noqa: E731
    args = rand(8, 12), rand(12, 6)
    p = partitioned(f, args, [S(M2x2, None, "dp"), S(M2x2, "dp", None)], [S(M2x2, "dp", None)])
    check(p, f, args)
    (c,) = p.explanation.collectives
    assert (c.kind, c.axes) == ("reduce_scatter", ("dp",))
    assert c.nbytes == collective_bytes("reduce_scatter", nbytes((8, 6)), 2) == nbytes((4, 6))


def test_moving_a_split_to_another_dimension_is_an_all_to_all():
    f = lambda x: x * 2.0  # noqa: E731
    args = (rand(8, 12),)
    p = partitioned(f, args, [S(M2x2, ("dp", "tp"), None)], [S(M2x2, "dp", "tp")])
    check(p, f, args)
    (c,) = p.explanation.collectives
    assert (c.kind, c.axes, c.nbytes) == ("all_to_all", ("tp",), nbytes((2, 12)) // 2)


@pytest.mark.parametrize("mesh", MESHES[1:], ids=["2x2", "4x2"])
def test_reordering_the_axes_of_a_split_is_a_collective_permute(mesh):
    f = lambda x: x + 1.0  # noqa: E731
    args = (rand(16, 3),)
    p = partitioned(f, args, [S(mesh, ("dp", "tp"), None)], [S(mesh, ("tp", "dp"), None)], mesh)
    check(p, f, args)
    (c,) = p.explanation.collectives
    local = nbytes((16 // (dict(mesh)["dp"] * 2), 3))
    assert (c.kind, c.axes, c.nbytes) == ("collective_permute", ("dp", "tp"), local)


def test_gathering_a_split_dimension_is_an_all_gather():
    f = lambda x: enp.cumsum(x, axis=0)  # noqa: E731  (needs the whole axis)
    args = (rand(8, 12),)
    p = partitioned(f, args, [S(M2x2, "dp", "tp")], [S(M2x2, None, "tp")])
    check(p, f, args)
    (c,) = p.explanation.collectives
    assert (c.kind, c.axes, c.nbytes) == ("all_gather", ("dp",), nbytes((4, 6)))


def test_splitting_a_replicated_value_needs_no_communication():
    f = lambda x: enp.sin(x)  # noqa: E731
    args = (rand(8, 12),)
    p = partitioned(f, args, [S(M2x2, None, None)], [S(M2x2, "tp", "dp")])
    check(p, f, args)
    assert p.explanation.collectives == []
    names = [e.prim.name for e in p.graph.graph.eqns]
    assert "axis_index" in names and "dynamic_slice" in names


def test_reshape_keeps_a_split_of_the_leading_dimension():
    f = lambda x: enp.tanh(x).reshape(24, 4) + 1.0  # noqa: E731
    args = (rand(4, 6, 4),)
    p = partitioned(f, args, [S(M2x2, "dp", None, "tp")], None)
    check(p, f, args)
    assert p.explanation.collectives == []
    assert p.out_shardings == [S(M2x2, "dp", "tp")]


def test_reshape_of_a_split_inner_dimension_gathers_it():
    f = lambda x: x.reshape(24, 4)  # noqa: E731
    args = (rand(4, 6, 4),)
    p = partitioned(f, args, [S(M2x2, None, "tp", None)], [S(M2x2, None, None)])
    check(p, f, args)
    assert [(c.kind, c.axes) for c in p.explanation.collectives] == [("all_gather", ("tp",))]


def test_broadcast_transpose_slice_and_concatenate():
    def f(x, b):
        y = enp.transpose(x) * b[:, None]
        return enp.concatenate([y[:, :3], y[:, 5:]], axis=1).sum(axis=0)
    args = rand(8, 6), rand(6)
    p = partitioned(f, args, [S(M2x2, "dp", "tp"), S(M2x2, "tp")], None)
    check(p, f, args)


def test_attention_splits_batch_and_heads_without_communication():
    def f(q, k, v):
        return ember.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True)
    q, k, v = rand(2, 4, 6, 8, seed=1), rand(2, 2, 6, 8, seed=2), rand(2, 2, 6, 8, seed=3)
    layout = S(M2x2, "dp", "tp", None, None)
    p = partitioned(f, (q, k, v), [layout] * 3, [layout])
    check(p, f, (q, k, v))
    assert p.explanation.collectives == []


def test_gather_of_embedding_rows_by_split_ids():
    f = lambda table, ids: table[ids]  # noqa: E731
    args = rand(10, 8), np.array([[1, 3, 5], [7, 9, 0]], np.int32)
    p = partitioned(f, args, [S(M2x2, None, "tp"), S(M2x2, "dp", None)], None)
    check(p, f, args)
    assert p.explanation.collectives == []
    assert p.out_shardings == [S(M2x2, "dp", None, "tp")]


def test_embedding_gradient_on_a_split_batch_is_a_partial_scatter_add():
    """Each device scatter-adds its batch's rows into its own addend of the gradient (zeros
    elsewhere than at coordinate 0 of dp), and one all-reduce of the small table finishes it:
    cheaper than gathering the batch's cotangents."""
    def loss(table, ids):
        return enp.sum(enp.tanh(table[ids]) ** 2)
    table, ids = rand(16, 64), np.random.default_rng(1).integers(0, 16, (64, 32)).astype(np.int32)
    f = ember.grad(loss)
    p = partitioned(f, (table, ids), [S(M2x2, None, None), S(M2x2, "dp", None)],
                    [S(M2x2, None, None)])
    check(p, f, (table, ids))
    assert [(c.kind, c.axes, c.nbytes) for c in p.explanation.collectives] == [
        ("all_reduce", ("dp",), collective_bytes("all_reduce", nbytes((16, 64)), 2))]


@pytest.mark.parametrize("mesh", MESHES, ids=["1x2", "2x2", "4x2"])
def test_cross_entropy_on_a_split_batch_never_gathers_the_logits(mesh):
    """take_along_axis's gather (and its gradient's scatter) index the logits' batch with
    iotas, so each device picks its own rows' targets: only the loss's two scalar sums (the
    total and the count of targets) cross devices."""
    f = ember.value_and_grad(lambda logits, target: ember.nn.functional.cross_entropy(
        logits, target))
    logits = rand(8, 6, 10)
    target = np.random.default_rng(2).integers(0, 10, (8, 6)).astype(np.int32)
    p = partitioned(f, (logits, target), [S(mesh, ("dp", "tp"), None, None),
                                          S(mesh, ("dp", "tp"), None)], None, mesh)
    check(p, f, (logits, target))
    assert all(c.kind == "all_reduce" and "[]" in c.result for c in p.explanation.collectives)
    assert p.out_shardings[1] == S(mesh, ("dp", "tp"), None, None)


def test_cross_entropy_in_a_scan_reads_its_clamp_bounds_through_the_body():
    """Inside a scan the gradient's index clamp reads bounds hoisted out of the body as a
    constant operand; they are still seen, so no step moves logits between devices."""
    def f(logits, target):
        def micro(total, batch):
            lg, t = batch
            g = ember.grad(lambda lg: ember.nn.functional.cross_entropy(lg, t))(lg)
            return total + g, None
        out, _ = ember.lax.scan(micro, enp.zeros(logits.shape[1:], logits.dtype),
                                (logits, target))
        return out
    logits = rand(2, 8, 6, 10)
    target = np.random.default_rng(3).integers(0, 10, (2, 8, 6)).astype(np.int32)
    p = partitioned(f, (logits, target), [S(M2x2, None, "dp", None, None),
                                          S(M2x2, None, "dp", None)], None)
    check(p, f, (logits, target))
    assert all("[]" in c.result for c in p.explanation.collectives)
    inside = [c for c in p.explanation.collectives if c.within]
    assert inside and all(c.within == "scan body (x2)" and c.repeats == 2 for c in inside)
    assert p.explanation.total_bytes == sum(c.nbytes * c.repeats
                                            for c in p.explanation.collectives)
    assert "[in scan body (x2)]" in p.explain()


def test_a_primitive_without_a_rule_runs_replicated_and_is_explained():
    def f(a):
        return enp.linalg.cholesky(a @ a.T + 8.0 * enp.eye(8, dtype=a.dtype)) * 2.0
    args = (rand(8, 8),)
    p = partitioned(f, args, [S(M2x2, "dp", None)], [S(M2x2, "dp", None)])
    check(p, f, args, rtol=1e-4)
    assert [name for name, _, _ in p.explanation.replicated] == ["cholesky"]
    assert "cholesky: no rule: replicated" in p.explain()


def test_a_scan_body_is_partitioned_with_its_step_dimension_whole():
    """The scanned operand's leading (step) dimension is gathered; the carry keeps its split
    (tp, from the body) from step to step, so the body needs no communication."""
    def f(x, w):
        h = enp.tanh(x @ w)
        total, ys = ember.lax.scan(lambda c, row: (c + row, c * row), enp.zeros(4), h)
        return ys * 2.0, total
    args = rand(8, 6), rand(6, 4)
    p = partitioned(f, args, [S(M2x2, "dp", None), S(M2x2, None, "tp")],
                    [S(M2x2, "dp", None), S(M2x2, None)])
    check(p, f, args)
    assert p.explanation.replicated == []
    scan = next(e for e in p.graph.graph.eqns if e.prim.name == "scan")
    assert [str(v.aval) for v in scan.outputs] == ["f64[2]{tp}", "f64[8,2]{_,tp}"]
    assert [(c.kind, c.axes, c.reason) for c in p.explanation.collectives] == [
        ("all_gather", ("dp",), "scan operand 1"), ("all_gather", ("tp",), "output 0"),
        ("all_gather", ("tp",), "output 1")]


def test_gradient_accumulation_in_a_scan_sums_over_devices_once():
    """Micro-batches split over dp inside a scan: the accumulated gradient is carried as a
    partial sum from step to step (the zeros it starts from made partial locally) and summed
    over dp once, after the loop; nothing gathers the batch."""
    def loss(w, xb):
        return enp.mean(enp.tanh(xb @ w) ** 2)

    def accumulate(w, batches):
        total, _ = ember.lax.scan(lambda t, xb: (t + ember.grad(loss)(w, xb), None),
                                  enp.zeros_like(w), batches)
        return total / batches.shape[0]
    args = rand(6, 4), rand(3, 8, 6, seed=1)
    p = partitioned(accumulate, args, [S(M2x2, None, None), S(M2x2, None, "dp", None)],
                    [S(M2x2, None, None)])
    check(p, accumulate, args)
    assert [(c.kind, c.axes, c.nbytes, c.reason) for c in p.explanation.collectives] == [
        ("all_reduce", ("dp",), collective_bytes("all_reduce", nbytes((6, 4)), 2), "output 0")]
    scan = next(e for e in p.graph.graph.eqns if e.prim.name == "scan")
    assert str(scan.outputs[0].aval) == "f32[6,4]{_,_}+dp"
    assert not any(e.prim.kind == "collective" for e in scan.params["body"].graph.eqns)


@pytest.mark.parametrize("flag", [1, 0])
def test_cond_branches_are_partitioned_alike(flag):
    """Every branch gets the same operand and result layouts; the one with a row-parallel
    product holds its all-reduce, and the index is whole so every device takes one branch."""
    def f(x, w1, w2, flag):
        return ember.lax.cond(flag > 0, lambda x: enp.tanh(x @ w1) @ w2, lambda x: x * 2.0, x)
    args = rand(8, 6), rand(6, 4, seed=1), rand(4, 6, seed=2), np.int32(flag)
    p = partitioned(f, args, [S(M2x2, "dp", None), S(M2x2, None, "tp"), S(M2x2, "tp", None),
                              S(M2x2)], None)
    check(p, f, args)
    cond = next(e for e in p.graph.graph.eqns if e.prim.name == "cond")
    inner = [[e.prim.name for e in b.graph.eqns if e.prim.kind == "collective"]
             for b in cond.params["branches"]]
    assert sorted(inner) == [[], ["all_reduce"]]
    assert p.explanation.replicated == []


def test_a_while_loop_is_partitioned_with_its_test_whole_on_every_device():
    """The test sums a split value (an all-reduce inside it) so every device decides alike; the
    body's result goes back to the carry's layout at every step."""
    def f(x, w):
        def body(c):
            h, n = c
            return enp.tanh(h @ w) * 0.5, n + 1
        return ember.lax.while_loop(lambda c: enp.sum(c[0] ** 2) > 1e-3, body, (x, 0))
    args = rand(8, 6), rand(6, 6, seed=1) * 0.5
    p = partitioned(f, args, [S(M2x2, "dp", None), S(M2x2, None, "tp")], None)
    check(p, f, args)
    loop = next(e for e in p.graph.graph.eqns if e.prim.name == "while")
    test = [e.prim.name for e in loop.params["cond"].graph.eqns if e.prim.kind == "collective"]
    assert test == ["all_reduce"] and str(loop.outputs[0].aval) == "f32[4,6]{dp,_}"
    assert p.explanation.replicated == []


def test_nested_jit_and_checkpoint_bodies_are_partitioned_not_replicated():
    """call (a nested jit) and remat (checkpoint) bodies run once on their operands: they are
    partitioned in their turn, their collectives inside them, named by the body's lines."""
    @ember.jit
    def layer(x, w1, w2):
        return enp.tanh(x @ w1) @ w2  # the row-parallel product: an all-reduce over tp

    def loss(w1, w2, x):
        return enp.sum(ember.checkpoint(lambda x: layer(x, w1, w2))(x) ** 2)
    f = ember.value_and_grad(loss, argnums=(0, 1))
    args = rand(8, 16), rand(16, 8, seed=1), rand(4, 8, seed=2)
    p = partitioned(f, args, [S(M2x2, None, "tp"), S(M2x2, "tp", None), S(M2x2, "dp", None)],
                    None)
    check(p, f, args, rtol=1e-4, atol=1e-4)
    assert p.explanation.replicated == []
    top = p.graph.graph.eqns
    assert "remat" in {e.prim.name for e in top}
    assert not any(e.prim.name == "all_reduce" and e.params["axes"] == ("tp",) for e in top)
    tp = [c for c in p.explanation.collectives if c.axes == ("tp",)]
    line = f"{__file__}:{layer.__wrapped__.__code__.co_firstlineno + 2}"
    assert tp and all(c.kind == "all_reduce" and c.source == line for c in tp)
    assert p.out_shardings[1:] == [S(M2x2, None, "tp"), S(M2x2, "tp", None)]


def test_propagation_goes_through_a_call():
    inner = ember.jit(lambda x: enp.tanh(x) * 2.0)
    f = lambda x: inner(x) + 1.0  # noqa: E731
    args = (rand(8, 6),)
    p = partitioned(f, args, [S(M2x2, "dp", "tp")], None)
    check(p, f, args)
    assert p.out_shardings == [S(M2x2, "dp", "tp")] and p.explanation.collectives == []


def test_a_sharding_constraint_is_honoured():
    mesh = Mesh(devices()[:4], ("dp", "tp"), shape=(2, 2))

    def f(x):
        y = constrain(enp.exp(x), NamedSharding(mesh, PartitionSpec(None, "tp")))
        return enp.sin(y)
    args = (rand(8, 12),)
    p = partition(ember.jit(f).lower(*args).graph, [NamedSharding(mesh, PartitionSpec("dp"))],
                  None, mesh)
    check(p, f, args)
    assert p.out_shardings == [S(M2x2, None, "tp")]
    assert [c.kind for c in p.explanation.collectives] == ["all_gather"]


def test_uneven_input_is_an_error_naming_value_axis_and_line():
    f = lambda x: x + 1.0  # noqa: E731
    with pytest.raises(ShardingError) as e:
        partitioned(f, (rand(6, 4),), [S((("dp", 4),), "dp", None)], None, (("dp", 4),))
    assert "input 0" in str(e.value) and "'dp' (size 4)" in str(e.value)
    assert HERE in str(e.value)


def test_printed_program_shows_local_shapes_and_layouts():
    f = lambda a, b: a @ b  # noqa: E731
    p = partitioned(f, (rand(8, 12), rand(12, 6)), [S(M2x2, "dp", "tp"), S(M2x2, "tp", None)],
                    None)
    text = str(p.graph)
    assert "f32[4,6]{dp,_}+tp = dot_general" in text
    assert "f32[4,6]{dp,_} = all_reduce[axes=('tp',)" in text
    assert "all_reduce[tp]" in p.explain() and HERE in p.explain()


# --- random programs -----------------------------------------------------------------------------

_UNARY = {"tanh": enp.tanh, "sin": enp.sin, "neg": lambda x: -x, "square": lambda x: x * x}
_BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


@st.composite
def programs(draw, mesh):
    """A random straight-line program of elementwise ops, sums (some broadcast back), products
    and transposes over a few inputs of shapes built from 4 and 8, and random layouts for its
    inputs and output."""
    sizes = [4, 8]
    shapes = [tuple(draw(st.sampled_from(sizes)) for _ in range(2)) for _ in range(3)]
    steps = []
    pool = list(shapes)
    for _ in range(draw(st.integers(2, 7))):
        op = draw(st.sampled_from(["unary", "binary", "sum", "matmul", "transpose", "center"]))
        i = draw(st.integers(0, len(pool) - 1))
        a = pool[i]
        if op == "unary":
            steps.append(("unary", draw(st.sampled_from(sorted(_UNARY))), i))
        elif op == "binary":
            same = [j for j, s in enumerate(pool) if s == a]
            steps.append(("binary", draw(st.sampled_from(sorted(_BINARY))), i,
                          draw(st.sampled_from(same))))
        elif op == "sum" and len(a) == 2:
            axis = draw(st.integers(0, 1))
            steps.append(("sum", axis, i))
            a = (a[1 - axis],)
        elif op == "matmul" and len(a) == 2:
            partners = [j for j, s in enumerate(pool) if len(s) == 2 and s[0] == a[1]]
            if not partners:
                continue
            j = draw(st.sampled_from(partners))
            steps.append(("matmul", i, j))
            a = (a[0], pool[j][1])
        elif op == "transpose" and len(a) == 2:
            steps.append(("transpose", i))
            a = a[::-1]
        elif op == "center" and len(a) == 2:  # a sum broadcast back: partial sums, broadcasts
            steps.append(("center", draw(st.integers(0, 1)), i))
        else:
            continue
        pool.append(a)
    ins = [draw(layouts(mesh, s)) for s in shapes]
    out = draw(st.one_of(st.none(), layouts(mesh, pool[-1])))
    return shapes, steps, ins, out


@st.composite
def layouts(draw, mesh, shape):
    sizes = dict(mesh)
    choices = [(), ("dp",), ("tp",), ("dp", "tp"), ("tp", "dp")]
    dims, used = [], set()
    for n in shape:
        ok = [c for c in choices if not used & set(c)
              and n % int(np.prod([sizes[a] for a in c])) == 0]
        c = draw(st.sampled_from(ok))
        dims.append(c)
        used |= set(c)
    return Sharding(mesh, tuple(dims))


def run_program(steps, *xs):
    pool = list(xs)
    for step in steps:
        kind = step[0]
        if kind == "unary":
            pool.append(_UNARY[step[1]](pool[step[2]]))
        elif kind == "binary":
            pool.append(_BINARY[step[1]](pool[step[2]], pool[step[3]]))
        elif kind == "sum":
            pool.append(enp.sum(pool[step[2]], axis=step[1]))
        elif kind == "matmul":
            pool.append(pool[step[1]] @ pool[step[2]])
        elif kind == "center":
            x = pool[step[2]]
            pool.append(x - enp.sum(x, axis=step[1], keepdims=True) / x.shape[step[1]])
        else:
            pool.append(enp.transpose(pool[step[1]]))
    return pool[-1]


@pytest.mark.parametrize("mesh", MESHES, ids=["1x2", "2x2", "4x2"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_programs_partitioned_give_one_devices_values(mesh, data):
    shapes, steps, ins, out = data.draw(programs(mesh))
    args = [rand(*s, seed=i, dtype=np.float64) for i, s in enumerate(shapes)]
    f = lambda *xs: run_program(steps, *xs)  # noqa: E731
    p = partitioned(f, args, ins, None if out is None else [out], mesh)
    check(p, f, args, rtol=1e-9, atol=1e-9)
    # One explanation entry per collective of the program, in order, each byte count its
    # kind's formula of the local block it reads.
    eqns = [e for e in p.graph.graph.eqns if e.prim.kind == "collective"
            and e.prim.name != "axis_index"]
    assert [e.prim.name for e in eqns] == [c.kind for c in p.explanation.collectives]
    for e, c in zip(eqns, p.explanation.collectives):
        n = int(np.prod([dict(mesh)[a] for a in c.axes]))
        a = e.inputs[0].aval
        assert c.nbytes == collective_bytes(c.kind, a.size * a.dtype.itemsize, n)


# --- on virtual devices --------------------------------------------------------------------------

def _mlp_sum(x, w1, w2):
    return enp.sum(enp.tanh(x @ w1) @ w2, axis=0)


def _accumulated_mlp_sum(xs, w1, w2):  # a scan whose body holds collectives
    total, _ = ember.lax.scan(lambda t, x: (t + _mlp_sum(x, w1, w2), None), enp.zeros(6), xs)
    return total


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("f, x, x_layout", [
    (_mlp_sum, rand(8, 6), ("dp", None)),
    (_accumulated_mlp_sum, rand(3, 8, 6), (None, "dp", None))], ids=["mlp", "scan"])
def test_per_device_program_runs_on_virtual_devices(backend, f, x, x_layout):
    """The partitioned program compiled by a backend and run on four threads, each with its
    own communicator, gives the simulator's values."""
    args = x, rand(6, 4, seed=1), rand(4, 6, seed=2)
    p = partitioned(f, args, [S(M2x2, *x_layout), S(M2x2, None, "tp"), S(M2x2, "tp", None)],
                    [S(M2x2, "tp")])
    program = get_backend(backend).compile(p.graph)
    blocks = runtime.run_on_devices(
        lambda d: [np.asarray(o) for o in program(*[shard(a, s, d) for a, s in
                                                   zip(args, p.in_shardings)])], 4, timeout=60)
    want = check(p, f, args)[0]
    for d in range(4):
        np.testing.assert_allclose(blocks[d][0], shard(want, p.out_shardings[0], d), rtol=1e-5,
                                   atol=1e-6)


# --- a tiny Llama, data and tensor parallel ------------------------------------------------------

def _llama_layouts(model, leaves, mesh):
    """Megatron's splits by hand: q/k/v/gate/up split by output rows, o/down by input
    columns (PyTorch layout [out, in]), the rest replicated; the batch split over dp."""
    names = {id(v): k for k, v in model.state_dict().items()}
    layouts = []
    for leaf in leaves[:-1]:
        name, dims = names.get(id(leaf), ""), [None] * np.ndim(leaf)
        if any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            dims[0] = "tp"
        elif any(p in name for p in ("o_proj", "down_proj")):
            dims[1] = "tp"
        layouts.append(S(mesh, *dims))
    return [*layouts, S(mesh, "dp", None)]


@pytest.mark.parametrize("grad", [False, True], ids=["loss", "grad"])
def test_tiny_llama_tensor_and_data_parallel(grad):
    from tiny_models import tiny_model

    model = tiny_model(64)
    f = lambda m, b: m.loss(b)  # noqa: E731
    if grad:
        f = ember.nn.value_and_grad(f)
    batch = np.random.default_rng(0).integers(0, 64, (4, 9)).astype(np.int32)
    leaves = ember.tree.tree_leaves((model, batch))
    closed = ember.jit(f).lower(model, batch).graph
    p = partition(closed, _llama_layouts(model, leaves, M2x2), None, M2x2)
    got = simulate(p, *[np.asarray(x) for x in leaves])
    want = ember.tree.tree_leaves(f(model, enp.asarray(batch)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=2e-6)
    tp = [c for c in p.explanation.collectives if c.axes == ("tp",)]
    hidden = nbytes((2, 9, 32))  # a device's block of the residual stream
    # Forward: one all-reduce after attention and one after the MLP in each of the 2 blocks;
    # backward: the same two per block, for the residual stream's cotangent.
    assert [(c.kind, c.nbytes) for c in tp] == [("all_reduce", hidden)] * (8 if grad else 4)


def test_tiny_llama_data_parallel_adamw_step_sums_each_gradient_once():
    """Pure data parallelism on a training step: every parameter's gradient is all-reduced over
    dp exactly once (clipping's norm and both AdamW moments reuse the sum), and the updated
    parameters and moments equal one device's."""
    from tiny_models import tiny_model

    model = tiny_model(64)
    opt = ember.optim.AdamW(lr=1e-2)
    grad = ember.nn.value_and_grad(lambda m, b: m.loss(b))

    def step(model, state, batch):
        loss, grads = grad(model, batch)
        grads, _ = ember.optim.clip_grad_norm(grads, 1.0)
        params, state = opt.update(model.trainable_parameters(), grads, state)
        return loss, params, state

    state = opt.init(model.trainable_parameters())
    batch = np.random.default_rng(0).integers(0, 64, (4, 9)).astype(np.int32)
    mesh = (("dp", 2),)
    leaves = ember.tree.tree_leaves((model, state, batch))
    ins = [S(mesh, *[None] * np.ndim(x)) for x in leaves[:-1]] + [S(mesh, "dp", None)]
    closed = ember.jit(step).lower(model, state, batch).graph
    p = partition(closed, ins, None, mesh)
    got = simulate(p, *[np.asarray(x) for x in leaves])
    want = ember.tree.tree_leaves(step(model, state, enp.asarray(batch)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=1e-6)
    shapes = sorted(tuple(np.shape(v)) for v in model.trainable_parameters().values())
    entries = [c for c in p.explanation.collectives if c.kind == "all_reduce"]
    sums = [e for e in p.graph.graph.eqns if e.prim.name == "all_reduce"]
    assert len(sums) == len(entries)
    weights = [(e, c) for e, c in zip(sums, entries) if e.inputs[0].aval.ndim]
    assert sorted(e.inputs[0].aval.shape for e, _ in weights) == shapes
    for e, c in weights:
        assert c.axes == ("dp",)
        assert c.nbytes == collective_bytes("all_reduce", nbytes(e.inputs[0].aval.shape), 2)


def test_every_process_makes_the_same_per_device_program():
    """Processes partition independently (MPI ranks): the program, its collectives in order,
    must not depend on anything that differs between processes, such as string hashing."""
    import subprocess
    import sys

    script = (
        "import numpy as np, ember, ember.numpy as enp\n"
        "from ember.ir.sharding import Sharding\n"
        "from ember.parallel.partition import partition\n"
        "m = (('dp', 2), ('tp', 2))\n"
        "def loss(w1, w2, x):\n"
        "    return enp.sum(enp.tanh(x @ w1) @ w2)\n"
        "args = [np.ones((6, 8), np.float32), np.ones((8, 6), np.float32),"
        " np.ones((4, 6), np.float32)]\n"
        "g = ember.jit(ember.value_and_grad(loss, argnums=(0, 1))).lower(*args).graph\n"
        "p = partition(g, [Sharding(m, (None, 'tp')), Sharding(m, ('tp', None)),"
        " Sharding(m, ('dp', None))], None, m)\n"
        "print(p.graph)\n")
    texts = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
             for seed in ("1", "2")]
    assert texts[0] == texts[1] and "all_reduce" in texts[0]


def test_a_partial_input_is_summed_where_it_is_needed():
    """An input given as partial sums over dp (each device an addend) is all-reduced before
    the nonlinear tanh; run_spmd takes each device's addend."""
    f = lambda x: enp.tanh(x)  # noqa: E731
    x = rand(8, 6)
    p = partitioned(f, (x,), [S(M2x2, None, "tp", partial=("dp",))], [S(M2x2, None, "tp")])
    addends = [x * 0.25, x * 0.75]  # over dp; tp splits the columns
    per_device = [[shard(addends[d // 2], S(M2x2, None, "tp"), d)] for d in range(4)]
    outs = run_spmd(p.graph, M2x2, per_device)
    for d in range(4):
        np.testing.assert_allclose(outs[d][0], shard(np.tanh(x), S(M2x2, None, "tp"), d),
                                   rtol=1e-6)
    assert [(c.kind, c.axes) for c in p.explanation.collectives] == [("all_reduce", ("dp",))]
    with pytest.raises(ember.EmberError, match="partial sums"):
        simulate(p, x)


def test_shardings_that_do_not_fit_the_program_are_errors():
    closed = ember.jit(lambda x: x + 1.0).lower(rand(4, 4)).graph
    with pytest.raises(ember.EmberError, match="partition: 2 shardings for 1 values"):
        partition(closed, [S(M2x2, "dp", None)] * 2, None, M2x2)
    with pytest.raises(ember.EmberError, match="a sharding over mesh"):
        partition(closed, [S((("dp", 4),), "dp", None)], None, M2x2)


# --- values computed again rather than moved -----------------------------------------------------

def test_a_broadcast_read_in_two_layouts_is_broadcast_again_not_moved():
    """One broadcast scalar scales a row-split and a column-split matrix: each device
    broadcasts its block in each layout (no all_to_all), and the values are unchanged."""
    def f(a, b, s):
        scale = enp.broadcast_to(s * 2.0, (8, 8))
        return a * scale, b * scale

    args = (rand(8, 8), rand(8, 8, seed=1), np.float32(0.7))
    rows, cols = S(M2x2, "tp", None), S(M2x2, None, "tp")
    p = partitioned(f, args, [rows, cols, S(M2x2)], [rows, cols])
    check(p, f, args)
    assert p.explanation.collectives == []


def test_tensor_parallel_training_step_moves_no_broadcast_scalar():
    """The fine-tuning step under tp=2: the clipping factor and AdamW's scalars, broadcast to
    a weight shape that q_proj (rows split) and o_proj (columns split) share, are computed
    in each layout where needed: the step has no all_to_all (the greedy cost model once
    moved them by 18) and trains like one device."""
    from tiny_models import tiny_model

    from ember.models import finetune
    from ember.parallel import plans

    mesh = Mesh(devices()[:2], ("tp",))
    plan = plans.llama(tp="tp")
    batch = np.random.default_rng(0).integers(0, 64, (1, 4, 8)).astype(np.int32)
    results = []
    for sharded in (False, True):
        model, opt = tiny_model(64), ember.optim.AdamW(lr=1e-2)
        if sharded:
            state, layouts, place_batch = finetune.place(model, opt, mesh, plan)
            step = ember.jit(finetune._make_step(opt, 0.5).fun, backend="numpy",
                             out_shardings=layouts)
            args = (model, state, place_batch(batch))
            kinds = {c.kind for c in step.lower(*args).explain().collectives}
            assert "all_to_all" not in kinds and "all_reduce" in kinds, kinds
        else:
            state = opt.init(model.trainable_parameters())
            step = ember.jit(finetune._make_step(opt, 0.5).fun, backend="numpy")
            args = (model, state, batch)
        loss, norm, params, _ = step(*args)
        results.append((loss, norm, params))
    (loss1, norm1, params1), (loss2, norm2, params2) = results
    np.testing.assert_allclose(np.asarray(loss2), np.asarray(loss1), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(norm2), np.asarray(norm1), rtol=2e-5)
    assert float(np.asarray(norm1)) > 0.5  # the clipping factor is in play
    for name, value in params1.items():
        np.testing.assert_allclose(np.asarray(params2[name]), np.asarray(value), rtol=1e-4,
                                   atol=2e-5, err_msg=name)
