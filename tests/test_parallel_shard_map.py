"""``shard_map`` and the collectives per-device code calls, on virtual devices.

Every collective is compared with NumPy on meshes of 1, 2, 4 and 8 devices and on a 2x2 mesh
(over one axis, the other, and both); gradients through per-device code are compared with
finite differences and with the same function written on one device; ``vmap`` and ``jit``
(NumPy and compiled CPU backends) of a ``shard_map`` are compared with the eager call; a
data-parallel training step written with ``shard_map`` + ``pmean`` matches the single-device
step.
"""

import os

import numpy as np
import pytest
from helpers import numeric_grad

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.errors import EmberValueError, ShapeError
from ember.ir.sharding import ShardingError
from ember.parallel import (
    all_gather,
    all_to_all,
    axis_index,
    pmax,
    pmean,
    pmin,
    ppermute,
    psum,
    psum_scatter,
    shard_map,
)

HERE = os.path.basename(__file__)
SPLIT = P.PartitionSpec(("a", "b"))  # dimension 0 split over every device, a major


def grid(a, b):
    """A mesh of a x b virtual devices with axes ("a", "b")."""
    return P.Mesh(P.devices()[:a * b], ("a", "b"), shape=(a, b))


MESHES = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2)]


def per_group(blocks, mesh_shape, axes, fn):
    """What every device computes, in NumPy: ``blocks[d]`` is device ``d``'s operand (flat
    mesh order); ``fn(stacked)`` maps the operands of one group, in rank order, to the group's
    results in rank order. Returns the results concatenated in device order."""
    names = ("a", "b")
    g = np.asarray(blocks).reshape(*mesh_shape, *blocks[0].shape)
    order = [names.index(a) for a in axes] + [i for i in range(2) if names[i] not in axes]
    moved = np.transpose(g, [*order, *range(2, g.ndim)])
    sizes = [mesh_shape[i] for i in order]
    group = int(np.prod(sizes[:len(axes)]))
    rest = int(np.prod(sizes[len(axes):]))
    flat = moved.reshape(group, rest, *blocks[0].shape)
    out = np.stack([fn(flat[:, r]) for r in range(rest)], axis=1)  # (group, rest, ...)
    out = out.reshape(*sizes, *out.shape[2:])
    back = np.transpose(out, [*np.argsort(order), *range(2, out.ndim)])
    return np.concatenate(list(back.reshape(-1, *out.shape[len(sizes):])), axis=0)


def _blocks(x, n):
    return np.split(x, n, axis=0)


def _gather_stack(xs):
    return np.stack([np.stack(list(xs), axis=1)] * len(xs))


def _scatter(xs):
    return np.stack(np.split(xs.sum(0), len(xs), axis=0))


def _to_all(xs):
    n = len(xs)
    return np.stack([np.concatenate([np.split(x, n, 0)[r] for x in xs], 1) for r in range(n)])


def _to_all_stacked(xs):
    n = len(xs)
    rows = [x.reshape(n, -1) for x in xs]
    return np.stack([np.stack([rows[s][r] for s in range(n)], axis=1) for r in range(n)])


def _shift(xs):
    return np.roll(xs, 1, axis=0)


def _first_to_second(xs):
    out = np.zeros_like(xs)
    if len(xs) > 1:
        out[1] = xs[0]
    return out


def _ring(n):
    return [(i, (i + 1) % n) for i in range(n)]


# (name, per-device function of (block, axes, group size), NumPy result of a group's operands)
CASES = [
    ("psum", lambda x, ax, n: psum(x, ax), lambda xs: np.stack([xs.sum(0)] * len(xs))),
    ("pmean", lambda x, ax, n: pmean(x, ax), lambda xs: np.stack([xs.mean(0)] * len(xs))),
    ("pmax", lambda x, ax, n: pmax(x, ax), lambda xs: np.stack([xs.max(0)] * len(xs))),
    ("pmin", lambda x, ax, n: pmin(x, ax), lambda xs: np.stack([xs.min(0)] * len(xs))),
    ("all_gather", lambda x, ax, n: all_gather(x, ax, axis=1), _gather_stack),
    ("all_gather_tiled", lambda x, ax, n: all_gather(x, ax, tiled=True),
     lambda xs: np.stack([np.concatenate(list(xs))] * len(xs))),
    ("psum_scatter_tiled", lambda x, ax, n: psum_scatter(x, ax, tiled=True), _scatter),
    ("psum_scatter", lambda x, ax, n: enp.reshape(psum_scatter(enp.reshape(x, (n, -1)), ax),
                                                  (-1, 3)),
     lambda xs: _scatter(xs.reshape(len(xs), len(xs), -1)).reshape(len(xs), -1, 3)),
    ("all_to_all_tiled", lambda x, ax, n: all_to_all(x, ax, 0, 1, tiled=True), _to_all),
    ("all_to_all", lambda x, ax, n: all_to_all(enp.reshape(x, (n, -1)), ax, 0, 1),
     _to_all_stacked),
    ("ppermute_ring", lambda x, ax, n: ppermute(x, ax, _ring(n)), _shift),
    ("ppermute_partial", lambda x, ax, n: ppermute(x, ax, [(0, 1)] if n > 1 else []),
     _first_to_second),
    ("axis_index", lambda x, ax, n: enp.reshape(axis_index(ax), (1,)),
     lambda xs: np.arange(len(xs), dtype=np.int32)[:, None]),
]


def _axes_for(shape):
    if shape == (2, 2):
        return [("a",), ("b",), ("a", "b"), ("b", "a")]
    return [("a",)]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name,per_device,reference", CASES, ids=[c[0] for c in CASES])
def test_collectives_match_numpy(shape, name, per_device, reference):
    size = shape[0] * shape[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8 * size, 3)).astype(np.float32)
    # (mesh, spec splitting dimension 0 over every device, a major): a 1-d mesh stands for n x 1
    layouts = [(grid(*shape), SPLIT)]
    if shape[1] == 1:
        layouts.append((P.Mesh(P.devices()[:size], ("a",)), P.PartitionSpec("a")))
    for mesh, spec in layouts:
        for axes in _axes_for(shape):
            n = int(np.prod([mesh.shape[a] for a in axes]))
            ax = axes[0] if len(axes) == 1 else axes
            f = shard_map(lambda b: per_device(b, ax, n), mesh, spec, spec)
            got = f(x)
            assert isinstance(got, P.ShardedArray)
            assert got.sharding == P.NamedSharding(mesh, spec)
            want = per_group(_blocks(x, size), shape, axes, reference)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name} over {axes} of {mesh}")


# --- specs, layouts and results ------------------------------------------------------------------

def test_in_and_out_specs_split_copy_and_assemble():
    mesh = grid(2, 2)
    x = np.arange(32.0, dtype=np.float32).reshape(4, 8)
    w = np.arange(8.0, dtype=np.float32)
    seen = []

    def body(xb, wb):
        seen.append((xb.shape, wb.shape))
        return xb * wb, psum(enp.sum(xb * wb), ("a", "b"))

    f = shard_map(body, mesh, (P.PartitionSpec("a", "b"), P.PartitionSpec("b")),
                  (P.PartitionSpec("a", "b"), P.PartitionSpec()))
    prod, total = f(x, w)
    assert seen == [((2, 4), (4,))]  # traced once, on one device's blocks
    np.testing.assert_array_equal(np.asarray(prod), x * w)
    np.testing.assert_allclose(np.asarray(total), np.sum(x * w))
    assert total.sharding.is_fully_replicated
    assert prod.sharding == P.NamedSharding(mesh, P.PartitionSpec("a", "b"))


def test_pytree_specs_and_sharded_inputs():
    mesh = grid(4, 1)
    x = P.device_put(np.arange(8.0, dtype=np.float32), P.NamedSharding(mesh, P.PartitionSpec("a")))
    tree = {"x": x, "y": np.ones(3, np.float32)}
    f = shard_map(lambda t: {"s": psum(t["x"], "a") + t["y"][0], "y": t["y"]}, mesh,
                  ({"x": P.PartitionSpec("a"), "y": P.PartitionSpec()},),
                  {"s": P.PartitionSpec("a"), "y": P.PartitionSpec()})
    out = f(tree)
    want = np.asarray(x).reshape(4, 2).sum(0) + 1
    np.testing.assert_allclose(np.asarray(out["s"]), np.tile(want, 4))
    np.testing.assert_array_equal(np.asarray(out["y"]), np.ones(3))


def test_closure_values_are_replicated_operands():
    mesh = grid(4, 1)
    w = enp.asarray(np.arange(3.0, dtype=np.float32))
    f = shard_map(lambda x: x * w, mesh, P.PartitionSpec("a"), P.PartitionSpec("a"))
    x = np.ones((8, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(f(x)), x * np.arange(3.0))
    g = ember.grad(lambda w_: enp.sum(shard_map(lambda x: x * w_, mesh, P.PartitionSpec("a"),
                                                P.PartitionSpec("a"))(x)))
    np.testing.assert_allclose(np.asarray(g(np.arange(3.0, dtype=np.float32))), x.sum(0))


def test_psum_of_a_constant_is_the_group_size():
    mesh = grid(2, 2)
    f = shard_map(lambda x: x + psum(1.0, ("a", "b")) + pmean(2.0, "a"), mesh,
                  P.PartitionSpec(), P.PartitionSpec())
    np.testing.assert_array_equal(np.asarray(f(np.zeros(2, np.float32))), [6.0, 6.0])


# --- errors --------------------------------------------------------------------------------------

def test_unknown_axis_names_the_axis_mesh_and_line():
    mesh = grid(2, 2)
    f = shard_map(lambda x: psum(x, "tp"), mesh, P.PartitionSpec("a"), P.PartitionSpec("a"))
    with pytest.raises(EmberValueError, match=r"psum: mesh axis 'tp' is not an axis of the "
                       r"enclosing shard_map's mesh \(a=2, b=2\)") as e:
        f(np.zeros((4,), np.float32))
    assert HERE in str(e.value)


def test_collective_outside_shard_map_is_an_error():
    with pytest.raises(EmberValueError, match="all_gather: called outside shard_map") as e:
        all_gather(np.zeros(3, np.float32), "a")
    assert HERE in str(e.value)
    with pytest.raises(EmberValueError, match="psum: called outside shard_map"):
        ember.jit(lambda x: psum(x, "a"))(np.zeros(3, np.float32))


def test_bad_specs_and_shapes_are_named():
    mesh = grid(4, 1)
    ok = P.PartitionSpec("a")
    with pytest.raises(ShardingError, match=r"shard_map: argument 0 .*f32\[6\].*dimension 0 of "
                       r"size 6 does not divide evenly over mesh axis 'a' \(size 4\)") as e:
        shard_map(lambda x: x, mesh, ok, ok)(np.zeros(6, np.float32))
    assert HERE in str(e.value)
    with pytest.raises(ShardingError, match="shard_map: argument 0 .*mesh axis 'tp'"):
        shard_map(lambda x: x, mesh, P.PartitionSpec("tp"), ok)(np.zeros(8, np.float32))
    with pytest.raises(EmberValueError, match=r"shard_map: in_specs=.* does not match"):
        shard_map(lambda x, y: x, mesh, (ok,), ok)(np.zeros(8), np.zeros(8))
    with pytest.raises(ShapeError, match="psum_scatter: dimension 0 .* must equal the 4"):
        shard_map(lambda x: psum_scatter(x, "a"), mesh, ok, ok)(np.zeros(24, np.float32))
    with pytest.raises(ShapeError, match="all_gather: axis=3 is out of range"):
        shard_map(lambda x: all_gather(x, "a", axis=3), mesh, ok, ok)(np.zeros(8, np.float32))


def test_a_result_declared_replicated_must_be_replicated():
    mesh = grid(4, 1)
    f = shard_map(lambda x: x * 2.0, mesh, P.PartitionSpec("a"), P.PartitionSpec())
    with pytest.raises(EmberValueError, match=r"result 0 is declared replicated over mesh axes "
                       r"\['a'\] \(its.*devices 0 and 1 computed different values") as e:
        f(np.arange(8.0, dtype=np.float32))
    assert HERE in str(e.value)


def test_nested_shard_map_is_refused():
    mesh = grid(2, 1)
    inner = shard_map(lambda x: x, mesh, P.PartitionSpec(), P.PartitionSpec())
    outer = shard_map(lambda x: inner(x), mesh, P.PartitionSpec(), P.PartitionSpec())
    with pytest.raises(EmberValueError, match="does not nest"):
        outer(np.zeros(2, np.float32))


# --- autodiff ------------------------------------------------------------------------------------

W = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float64)


def _grad_cases(mesh_shape):
    """(name, per-device body, in spec, out spec, the same function on one device)."""
    a = mesh_shape[0]
    rows = P.PartitionSpec("a")
    everywhere = P.PartitionSpec(("a", "b"))
    return [
        ("psum", lambda x: psum(enp.sin(x), "a"), rows, P.PartitionSpec(),
         lambda x: enp.sum(enp.reshape(enp.sin(x), (a, -1, 8)), axis=0)),
        ("pmean_of_replicated", lambda x: pmean(x * x, ("a", "b")), P.PartitionSpec(),
         P.PartitionSpec(), lambda x: x * x),
        ("all_gather", lambda x: enp.tanh(all_gather(x, "a", tiled=True)), rows,
         P.PartitionSpec(), lambda x: enp.tanh(x)),
        ("psum_scatter", lambda x: psum_scatter(enp.sin(x), "a", tiled=True), P.PartitionSpec(),
         rows, lambda x: a * enp.sin(x)),
        ("all_to_all", lambda x: all_to_all(x * x, "a", 1, 0, tiled=True), rows,
         P.PartitionSpec(None, "a"), lambda x: x * x),
        ("ppermute", lambda x: ppermute(enp.sin(x), "a", _ring(a)), rows, rows,
         lambda x: enp.sin(enp.roll(x, 4 // a, axis=0))),
        ("pmax", lambda x: pmax(x, "a"), rows, P.PartitionSpec(),
         lambda x: enp.max(enp.reshape(x, (a, -1, 8)), axis=0)),
        ("axis_index", lambda x: x * enp.astype(axis_index(("a", "b")), x.dtype), everywhere,
         everywhere, lambda x: x * enp.asarray(np.repeat(np.arange(a * mesh_shape[1]),
                                                         4 // (a * mesh_shape[1]))[:, None])),
    ]


GRAD_MESHES = [(4, 1), (2, 2)]


@pytest.mark.parametrize("shape", GRAD_MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _grad_cases((4, 1))])
def test_grad_matches_one_device_and_finite_differences(shape, case):
    mesh = grid(*shape)
    name, body, in_spec, out_spec, single = _grad_cases(shape)[case]
    f = shard_map(body, mesh, in_spec, out_spec)
    x = np.random.default_rng(2).standard_normal((4, 8))

    def loss(v):
        y = f(v)
        return enp.sum(y * enp.asarray(W[:y.shape[0], :y.shape[1]]))

    def loss_single(v):
        y = single(v)
        return enp.sum(y * enp.asarray(W[:y.shape[0], :y.shape[1]]))

    np.testing.assert_allclose(float(loss(x)), float(loss_single(x)), rtol=1e-12)
    got = np.asarray(ember.grad(loss)(x))
    np.testing.assert_allclose(got, np.asarray(ember.grad(loss_single)(x)), rtol=1e-10,
                               atol=1e-12, err_msg=name)
    def loss_numpy(v):
        y = np.asarray(f(v))
        return np.sum(y * W[:y.shape[0], :y.shape[1]])

    numeric = numeric_grad(loss_numpy, x)
    np.testing.assert_allclose(got, numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_one_body_under_different_specs_transposes_by_each():
    """Equal traces share a body; its transpose still follows each shard_map's specs."""
    mesh = grid(4, 1)
    x = np.arange(3.0)
    for out, scale in ((P.PartitionSpec(), 2.0), (P.PartitionSpec("a"), 8.0)):
        f = shard_map(lambda v: v * 2.0, mesh, P.PartitionSpec(), out)
        g = ember.grad(lambda v: enp.sum(f(v)))(x)
        np.testing.assert_allclose(np.asarray(g), np.full(3, scale))


def test_jvp_and_linearize_of_a_shard_map():
    mesh = grid(2, 2)
    f = shard_map(lambda x: psum(enp.sin(x), "b") * 2.0, mesh, P.PartitionSpec("a", "b"),
                  P.PartitionSpec("a"))
    x = np.random.default_rng(3).standard_normal((4, 6))
    t = np.random.default_rng(4).standard_normal((4, 6))

    def single(v):
        return enp.sum(enp.reshape(enp.sin(v), (4, 2, 3)), axis=1) * 2.0

    out, tangent = ember.jvp(f, (x,), (t,))
    want, want_t = ember.jvp(single, (x,), (t,))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(want_t), rtol=1e-12)
    _, f_jvp = ember.linearize(f, x)
    np.testing.assert_allclose(np.asarray(f_jvp(t)), np.asarray(want_t), rtol=1e-12)


def test_grad_inside_the_body():
    """Differentiating per-device code inside it: each device's own derivative."""
    mesh = grid(4, 1)
    f = shard_map(lambda x: ember.grad(lambda v: enp.sum(enp.sin(v) * psum(v, "a")))(x), mesh,
                  P.PartitionSpec("a"), P.PartitionSpec("a"))
    x = np.random.default_rng(5).standard_normal(8)
    blocks = x.reshape(4, 2)
    total = blocks.sum(0)
    # d/dv_d of sum(sin(v_d) * psum(v)): cos(v_d) * psum(v) + psum(sin(v)) (psum transposes
    # to psum: every device's cotangent reaches every addend).
    want = np.cos(blocks) * total + np.sin(blocks).sum(0)
    np.testing.assert_allclose(np.asarray(f(x)), want.reshape(-1), rtol=1e-12)


# --- vmap and jit --------------------------------------------------------------------------------

def test_vmap_of_a_shard_map():
    mesh = grid(2, 2)
    f = shard_map(lambda x, y: (all_gather(x * y, "b", axis=0, tiled=True), psum(x, "a")),
                  mesh, (P.PartitionSpec("a", "b"), P.PartitionSpec()),
                  (P.PartitionSpec("a"), P.PartitionSpec(None, "b")))
    xs = np.random.default_rng(6).standard_normal((3, 4, 6)).astype(np.float32)
    y = np.float32(1.5)
    got = ember.vmap(f, in_axes=(0, None))(xs, y)
    for i in range(3):
        want = f(xs[i], y)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g)[i], np.asarray(w), rtol=1e-6)
    moved = ember.vmap(f, in_axes=(2, None), out_axes=1)(np.moveaxis(xs, 0, 2), y)
    np.testing.assert_allclose(np.asarray(moved[0]), np.moveaxis(np.asarray(got[0]), 0, 1))


def test_vmap_batches_every_collective():
    mesh = grid(2, 2)
    spec = P.PartitionSpec(("a", "b"))

    def body(x):
        return (psum_scatter(x, "a", scatter_dimension=1, tiled=True),
                all_to_all(x, ("a", "b"), 1, 0, tiled=True), ppermute(x, "b", [(0, 1), (1, 0)]),
                pmax(x, "a"), all_gather(x, "b", axis=1))

    f = shard_map(body, mesh, spec, spec)
    xs = np.random.default_rng(10).standard_normal((3, 8, 4)).astype(np.float32)
    for axis in (0, 1, 2):
        got = ember.vmap(f, in_axes=axis)(np.moveaxis(xs, 0, axis))
        for i in range(3):
            for g, w in zip(got, f(xs[i])):
                np.testing.assert_allclose(np.asarray(g)[i], np.asarray(w), rtol=1e-6,
                                           err_msg=f"in_axes={axis}")


def test_vmap_of_grad_of_a_shard_map():
    mesh = grid(4, 1)
    f = shard_map(lambda x: pmax(enp.sin(x), "a"), mesh, P.PartitionSpec("a"), P.PartitionSpec())
    xs = np.random.default_rng(7).standard_normal((3, 8))
    g = ember.vmap(ember.grad(lambda v: enp.sum(f(v))))(xs)
    for i in range(3):
        blocks = np.sin(xs[i]).reshape(4, 2)
        hit = blocks == blocks.max(0)
        want = (hit * np.cos(xs[i]).reshape(4, 2)).reshape(-1)
        np.testing.assert_allclose(np.asarray(g)[i], want, rtol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_jit_matches_eager(backend):
    mesh = grid(2, 2)
    spec = P.PartitionSpec("a", "b")

    def body(x, w):
        h = enp.tanh(x @ w)  # each device: its rows times its block of w's rows
        h = psum(h, "b")  # sums the contraction over b
        return all_gather(h, "a", tiled=True), ppermute(x, "b", [(0, 1), (1, 0)])

    f = shard_map(body, mesh, (spec, P.PartitionSpec("b")), (P.PartitionSpec(), spec))
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    eager = f(x, w)
    jitted = ember.jit(f, backend=backend)(x, w)
    for e, j in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-5, atol=1e-6)
    loss = lambda x, w: enp.sum(f(x, w)[0] ** 2) + enp.sum(f(x, w)[1])  # noqa: E731
    g_eager = ember.grad(loss, argnums=(0, 1))(x, w)
    g_jit = ember.jit(ember.grad(loss, argnums=(0, 1)), backend=backend)(x, w)
    for e, j in zip(g_eager, g_jit):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-4, atol=1e-5)


def test_called_on_a_virtual_device_runs_that_device_only():
    """Inside per-device code (a partitioned program's device), a shard_map over a mesh of
    every device runs this device's blocks and gathers the results from its peers."""
    from ember.parallel import runtime

    mesh = grid(4, 1)
    f = shard_map(lambda x: psum(x, "a") * enp.astype(axis_index("a"), x.dtype), mesh,
                  P.PartitionSpec("a"), P.PartitionSpec("a"))
    x = np.arange(8.0, dtype=np.float32)
    want = np.asarray(f(x))
    outs = runtime.run_on_devices(lambda d: np.asarray(f(x)), 4)
    for out in outs:
        np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(want, np.repeat(np.arange(4), 2) * x.reshape(4, 2).sum(0)[
        np.tile(np.arange(2), 4)])


# --- a data-parallel training step ---------------------------------------------------------------

def _mlp_loss(params, x, y):
    h = enp.tanh(x @ params["w1"] + params["b1"])
    return enp.mean((h @ params["w2"] - y) ** 2)


def _sgd(params, grads, lr=0.1):
    return {k: params[k] - lr * grads[k] for k in params}


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_data_parallel_mlp_step_matches_one_device(devices):
    mesh = grid(devices, 1)
    rng = np.random.default_rng(9)
    params = {"w1": rng.standard_normal((5, 16)).astype(np.float32) * 0.3,
              "b1": np.zeros(16, np.float32),
              "w2": rng.standard_normal((16, 2)).astype(np.float32) * 0.3}
    x = rng.standard_normal((16, 5)).astype(np.float32)
    y = rng.standard_normal((16, 2)).astype(np.float32)

    def local_step(p, xb, yb):
        loss, grads = ember.value_and_grad(_mlp_loss)(p, xb, yb)
        return _sgd(p, pmean(grads, "a")), pmean(loss, "a")

    step = ember.jit(shard_map(local_step, mesh,
                               (P.PartitionSpec(), P.PartitionSpec("a"), P.PartitionSpec("a")),
                               (P.PartitionSpec(), P.PartitionSpec())))
    single = ember.jit(lambda p, x, y: (_sgd(p, ember.grad(_mlp_loss)(p, x, y)),
                                        _mlp_loss(p, x, y)))
    p_dp, p_one = params, params
    for _ in range(3):
        p_dp, loss_dp = step(p_dp, x, y)
        p_one, loss_one = single(p_one, x, y)
        np.testing.assert_allclose(float(loss_dp), float(loss_one), rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(np.asarray(p_dp[k]), np.asarray(p_one[k]), rtol=1e-5,
                                   atol=1e-6)


# --- several processes ---------------------------------------------------------------------------

def test_shard_map_psum_under_ember_launch(ember_launch):
    status, out, _ = ember_launch(2, "shard_map.py")
    assert status == 0, out
    for rank in range(2):
        assert f"process {rank}: shard_map ok" in out, out


def _mixed(mesh):
    """Global ops around a shard_map over ``mesh``: rows of ``x`` over "a", columns of ``w``
    over "b"; the body's product is block (a, b) of ``x @ w``, and its psum over "b" gives
    each row block's sums."""
    def body(x, w):
        h = x @ w
        return h, psum(enp.sum(h, axis=1), "b")

    mapped = shard_map(body, mesh, (P.PartitionSpec("a"), P.PartitionSpec(None, "b")),
                       (P.PartitionSpec("a", "b"), P.PartitionSpec("a")))

    def f(x, w):
        h, rows = mapped(enp.tanh(x), w * 0.5)
        return enp.exp(h) + rows[:, None], enp.sum(rows)

    def reference(x, w):
        h = np.tanh(x) @ (w * 0.5)
        return np.exp(h) + h.sum(1)[:, None], h.sum()

    return f, reference


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_a_shard_map_inside_jit_with_shardings_runs_per_device(backend):
    """A jit with shardings over a function that mixes global ops with a shard_map (2x2
    mesh) equals one device; where the operands are laid out as the in specs say and the
    results are wanted as the out specs give them, the program communicates only what the
    function wrote (its psum) and what the global sum needs."""
    mesh = grid(2, 2)
    f, reference = _mixed(mesh)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    spec = lambda *dims: P.NamedSharding(mesh, P.PartitionSpec(*dims))  # noqa: E731
    jitted = ember.jit(f, in_shardings=(spec("a"), spec(None, "b")),
                       out_shardings=(spec("a", "b"), spec()), backend=backend)
    got = jitted(x, w)
    for g, want in zip(got, reference(x, w)):
        np.testing.assert_allclose(np.asarray(g), want, rtol=2e-5, atol=2e-5)
    collectives = jitted.lower(x, w).explain().collectives
    assert not [c for c in collectives if c.kind in ("all_gather", "all_to_all")], collectives
    written = [c for c in collectives if c.within.startswith("shard_map")]
    assert [(c.kind, c.axes) for c in written] == [("all_reduce", ("b",))]
    assert [(c.kind, c.axes) for c in collectives if not c.within] == [("all_reduce", ("a",))]


def test_a_shard_map_inside_a_partitioned_program_reshards_only_what_differs():
    """An operand laid out otherwise than its in spec is redistributed (``x``'s rows, split
    over ("a", "b"), gathered over "b"), and nothing else moves; the simulator and the
    virtual devices agree with one device."""
    from ember.backends import get_backend
    from ember.core.trace import aval_of, make_graph
    from ember.parallel import runtime
    from ember.parallel.partition import partition
    from ember.parallel.simulate import simulate

    mesh = grid(2, 2)
    f, reference = _mixed(mesh)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    closed = make_graph(lambda a, b: list(f(a, b)), [aval_of(enp.asarray(x)),
                                                      aval_of(enp.asarray(w))])
    spec = lambda *dims: P.NamedSharding(mesh, P.PartitionSpec(*dims))  # noqa: E731
    program = partition(closed, [spec(("a", "b")), spec()], [spec(), spec()], mesh)
    for got, want in zip(simulate(program, x, w), reference(x, w)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    moved = [c for c in program.explanation.collectives if "operand" in c.reason]
    assert [(c.kind, c.axes) for c in moved] == [("all_gather", ("b",))], moved
    compiled = get_backend("numpy").compile(program.graph)
    blocks = np.split(x, 4)
    outs = runtime.run_on_devices(lambda d: [np.asarray(o) for o in compiled(blocks[d], w)], 4)
    for out in outs:
        for got, want in zip(out, reference(x, w)):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_the_gradient_of_a_shard_map_inside_jit_with_shardings_matches_eager():
    """The transformed shard_maps (the known half with its residuals, the transposed body)
    are partitioned per device in their turn."""
    mesh = grid(2, 2)
    f, _ = _mixed(mesh)

    def loss(x, w):
        h, total = f(x, w)
        return enp.sum(h * h) + total

    rng = np.random.default_rng(13)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    spec = lambda *dims: P.NamedSharding(mesh, P.PartitionSpec(*dims))  # noqa: E731
    grad = ember.grad(loss, argnums=(0, 1))
    jitted = ember.jit(grad, in_shardings=(spec("a"), spec(None, "b")),
                       out_shardings=(spec("a"), spec(None, "b")))
    for got, want in zip(jitted(x, w), grad(x, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    gathered = [c for c in jitted.lower(x, w).explain().collectives if c.kind == "all_gather"]
    assert not gathered, gathered
