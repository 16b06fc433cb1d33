"""Sharded arrays: ``device_put`` round trips for every spec on meshes of 1, 2, 4 and 8 virtual
devices, resharding, uneven errors, eager operations (per shard or gathered with a warning),
``with_sharding_constraint`` under jit/grad/jvp/vmap, and the per-thread trace stack."""

import threading
import warnings

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.core import trace
from ember.ir.sharding import Sharding, ShardingError

SPECS_1D = [P.PartitionSpec(), P.PartitionSpec("x")]
SPECS_2D = [P.PartitionSpec(), P.PartitionSpec("a"), P.PartitionSpec(None, "a"),
            P.PartitionSpec("b"), P.PartitionSpec("a", "b"), P.PartitionSpec("b", "a"),
            P.PartitionSpec(("a", "b")), P.PartitionSpec(None, ("b", "a"))]


def _mesh_1d(n):
    return P.Mesh(P.devices()[:n], ("x",))


def _value(shape, dtype=np.float32):
    return np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)


def _check_layout(arr, value, sharding):
    """Each shard is the part of ``value`` its index names, one per device, in mesh order."""
    assert isinstance(arr, P.ShardedArray)
    assert arr.sharding == sharding
    assert arr.aval.sharding == sharding.abstract(value.ndim)
    assert arr.shape == value.shape and arr.dtype == value.dtype
    shards = arr.addressable_shards
    assert [s.device for s in shards] == list(sharding.mesh.devices.flat)
    for s in shards:
        assert s.data.shape == sharding.shard_shape(value.shape)
        np.testing.assert_array_equal(np.asarray(s.data), value[s.index])
    np.testing.assert_array_equal(np.asarray(arr), value)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("spec", SPECS_1D)
def test_device_put_round_trip_1d_meshes(n, spec):
    value = _value((8, 3))
    sharding = P.NamedSharding(_mesh_1d(n), spec)
    _check_layout(P.device_put(value, sharding), value, sharding)
    _check_layout(P.device_put(enp.asarray(value), sharding), value, sharding)


@pytest.mark.parametrize("shape", [(2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("spec", SPECS_2D)
def test_device_put_round_trip_2d_meshes(shape, spec):
    mesh = P.Mesh(P.devices()[:shape[0] * shape[1]], ("a", "b"), shape=shape)
    value = _value((16, 8), np.int32)
    sharding = P.NamedSharding(mesh, spec)
    _check_layout(P.device_put(value, sharding), value, sharding)


def test_shards_are_owned_copies_and_the_value_is_read_only():
    value = _value((4, 4))
    x = P.device_put(value, P.NamedSharding(_mesh_1d(4), P.PartitionSpec()))
    value[...] = -1  # the caller's array is not shared
    assert np.asarray(x)[0, 1] == 1
    bufs = x.local_buffers()
    assert len({id(b) for b in bufs}) == 4 and all(b.base is None for b in bufs)
    with pytest.raises(ValueError):
        np.asarray(x)[0, 0] = 5


def test_scalars_weak_types_and_dtypes_are_kept():
    mesh = _mesh_1d(2)
    s = P.device_put(2.5, P.NamedSharding(mesh, P.PartitionSpec()))
    assert s.aval.weak and s.shape == () and float(s) == 2.5
    b = P.device_put(np.array([True, False]), P.NamedSharding(mesh, P.PartitionSpec("x")))
    assert b.dtype == np.bool_ and np.asarray(b).tolist() == [True, False]


@pytest.mark.parametrize("src, dst", [
    (P.PartitionSpec("a"), P.PartitionSpec(None, "b")),
    (P.PartitionSpec("a", "b"), P.PartitionSpec()),
    (P.PartitionSpec(), P.PartitionSpec(("b", "a"))),
    (P.PartitionSpec("b", "a"), P.PartitionSpec("a", "b"))])
def test_reshard(src, dst):
    mesh = P.Mesh(P.devices(), ("a", "b"))  # 4 x 2
    value = _value((8, 8))
    x = P.device_put(value, P.NamedSharding(mesh, src))
    target = P.NamedSharding(mesh, dst)
    _check_layout(P.device_put(x, target), value, target)


def test_reshard_to_another_mesh_and_same_layout_is_the_same_array():
    value = _value((8, 4))
    x = P.device_put(value, P.NamedSharding(_mesh_1d(2), P.PartitionSpec("x")))
    assert P.device_put(x, P.NamedSharding(_mesh_1d(2), ("x", None))) is x
    other = P.NamedSharding(P.Mesh(P.devices()[4:8], ("y",)), P.PartitionSpec(None, "y"))
    _check_layout(P.device_put(x, other), value, other)


def test_uneven_device_put_names_the_spec_axis_and_line():
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    with pytest.raises(ShardingError) as e:
        P.device_put(np.zeros((6, 4)), P.NamedSharding(mesh, P.PartitionSpec("dp")))
    text = str(e.value)
    assert text.startswith("device_put: a value of shape (6, 4)")
    assert "PartitionSpec('dp')" in text and "mesh axis 'dp' (size 4)" in text
    assert "test_parallel_array.py" in text
    with pytest.raises(ShardingError, match="expected an ember.parallel.NamedSharding"):
        P.device_put(np.zeros(4), P.PartitionSpec("dp"))


def test_from_shards_takes_per_device_buffers_and_checks_them():
    mesh = P.Mesh(P.devices()[:4], ("a", "b"))
    sharding = P.NamedSharding(mesh, P.PartitionSpec("b", "a"))
    value = _value((4, 6))
    parts = [value[sharding.indices(value.shape)[d]] for d in mesh.devices.flat]
    _check_layout(P.ShardedArray.from_shards(parts, sharding, (4, 6)), value, sharding)
    with pytest.raises(ember.EmberError, match="3 buffers for the 4 devices"):
        P.ShardedArray.from_shards(parts[:3], sharding, (4, 6))
    with pytest.raises(ember.EmberError, match=r"the buffer of Device\(cpu:2.*is float64\[2, 3\]"
                                               r", expected float32\[2, 3\]"):
        P.ShardedArray.from_shards([*parts[:2], parts[2].astype(np.float64), parts[3]],
                                   sharding, (4, 6))
    with pytest.raises(ShardingError, match="from_shards: a value of shape"):
        P.ShardedArray.from_shards(parts, sharding, (5, 6))


def test_repr_and_errors_of_a_sharded_array():
    x = P.device_put(_value((4,)), P.NamedSharding(_mesh_1d(2), P.PartitionSpec("x")))
    text = repr(x)
    assert text.startswith("ShardedArray([0., 1., 2., 3.], dtype=float32, sharding=")
    assert "PartitionSpec('x')" in text
    with pytest.raises(ember.EmberError, match="lives on the 2 devices"):
        x.device  # noqa: B018


def test_parts_held_by_other_processes_name_process_allgather():
    """A mesh with devices of another process: this process holds only its own parts."""
    here, there = P.devices()[0], P.Device(99, process_index=1)
    mesh = P.Mesh([here, there], ("x",))
    assert mesh.local_devices == [here]
    split = P.device_put(_value((4,)), P.NamedSharding(mesh, P.PartitionSpec("x")))
    assert len(split.addressable_shards) == 1
    np.testing.assert_array_equal(np.asarray(split.addressable_shards[0].data), [0, 1])
    with pytest.raises(ember.EmberError, match="holds 1 of the 2 distinct parts.*"
                                               "process_allgather"):
        np.asarray(split)
    assert "not all held by this process" in repr(split)
    # replicated: every process holds the whole value
    whole = P.device_put(_value((4,)), P.NamedSharding(mesh, P.PartitionSpec()))
    np.testing.assert_array_equal(np.asarray(whole), _value((4,)))
    # elementwise work stays on this process's parts; a gather cannot see the others
    doubled = split * 2.0 + whole
    assert len(doubled.addressable_shards) == 1
    np.testing.assert_array_equal(np.asarray(doubled.addressable_shards[0].data), [0, 3])
    with pytest.warns(P.ShardingGatherWarning), \
            pytest.raises(ember.EmberError, match="reduce_sum: this process holds 1 of the 2"):
        enp.sum(split)


def test_process_allgather_in_one_process_assembles():
    u = _value((8, 2))
    x = P.device_put(u, P.NamedSharding(_mesh_1d(4), P.PartitionSpec("x")))
    out = P.process_allgather(x)
    np.testing.assert_array_equal(out, u)
    assert out.flags.writeable  # a new array, the caller's
    np.testing.assert_array_equal(P.process_allgather(enp.asarray(u)), u)


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_arrays_on_mpi_processes(n, ember_launch):
    """``tests/mpi_scripts/sharded_arrays.py`` on ``n`` processes of one device each: parts per
    process, eager operations with collectives over MPI, process_allgather."""
    status, out, _ = ember_launch(n, "sharded_arrays.py", timeout=20.0)
    assert status == 0, out
    for rank in range(n):
        assert f"process {rank}: sharded arrays ok" in out, out


# --- eager operations -------------------------------------------------------------------------

class _Raise:
    """Turn a warning category into an error inside a block."""

    def __init__(self, category):
        self.category = category
        self._ctx = warnings.catch_warnings()

    def __enter__(self):
        self._ctx.__enter__()
        warnings.simplefilter("error", self.category)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@pytest.mark.parametrize("spec", [P.PartitionSpec("a"), P.PartitionSpec("a", "b"),
                                  P.PartitionSpec(None, ("a", "b")), P.PartitionSpec()])
def test_elementwise_stays_sharded_without_gathering(spec):
    mesh = P.Mesh(P.devices(), ("a", "b"))
    sharding = P.NamedSharding(mesh, spec)
    u, v = _value((8, 16)), _value((8, 16))[::-1].copy() + 1
    x, y = P.device_put(u, sharding), P.device_put(v, sharding)
    replicated = P.device_put(v, P.NamedSharding(mesh, P.PartitionSpec()))
    with _Raise(P.ShardingGatherWarning):
        results = {
            "x * y + 1": (x * y + 1, u * v + 1),
            "2.0 * x": (2.0 * x, 2 * u),
            "exp(x / 100)": (enp.exp(x / 100), np.exp(u / 100)),
            "x - numpy": (x - v, u - v),
            "x / replicated": (x / replicated, u / v),
            "where": (enp.where(x > y, x, y), np.where(u > v, u, v)),
            "astype": (x.astype(np.int32), u.astype(np.int32)),
        }
    for name, (got, want) in results.items():
        assert isinstance(got, P.ShardedArray), name
        assert got.sharding == sharding, name
        assert got.aval.sharding == sharding.abstract(2)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=name)
        assert got.dtype == want.dtype, name


@pytest.mark.parametrize("name, run, want, layout", [
    ("sum over the split axis", lambda x, y, w: enp.sum(x, axis=0), lambda u: u.sum(0), "{_}"),
    ("sum over the other axis", lambda x, y, w: enp.sum(x, axis=1), lambda u: u.sum(1), "{a}"),
    ("mean", lambda x, y, w: enp.mean(x), lambda u: u.mean(), "{}"),
    ("matmul", lambda x, y, w: x @ w, lambda u: u @ u.T, "{a,b}"),
    ("add of two splits", lambda x, y, w: x + y, lambda u: 2 * u, "{a,b}"),
    ("transpose", lambda x, y, w: x.T, lambda u: u.T, "{_,a}"),
    ("reshape", lambda x, y, w: x.reshape(32), lambda u: u.reshape(32), "{a}"),
])
def test_other_operations_are_partitioned_without_gathering(name, run, want, layout):
    """Each primitive is partitioned alone; its result keeps the layout propagation chose."""
    mesh = P.Mesh(P.devices(), ("a", "b"))
    u = _value((8, 4))
    x = P.device_put(u, P.NamedSharding(mesh, P.PartitionSpec("a")))
    y = P.device_put(u, P.NamedSharding(mesh, P.PartitionSpec(None, "b")))
    w = P.device_put(u.T, P.NamedSharding(mesh, P.PartitionSpec(None, "b")))
    with _Raise(P.ShardingGatherWarning):
        out = run(x, y, w)
    assert isinstance(out, P.ShardedArray) and out.sharding.mesh == mesh
    assert str(out.aval.sharding) == layout
    np.testing.assert_allclose(np.asarray(out), want(u), rtol=1e-6)
    for shard in out.addressable_shards:  # every device's part is right, not just the whole
        np.testing.assert_allclose(np.asarray(shard.data), np.asarray(want(u))[shard.index],
                                   rtol=1e-6)


def test_operations_that_gather_say_where():
    mesh = P.Mesh(P.devices(), ("a", "b"))
    u = _value((8, 4))[::-1].copy()
    x = P.device_put(u, P.NamedSharding(mesh, P.PartitionSpec("a")))
    with pytest.warns(P.ShardingGatherWarning) as record:
        ordered = enp.sort(x, axis=0)  # sorting along the split axis needs the whole axis
    message = str(record[0].message)
    assert message.startswith("sort: operands laid out by {a,_}")
    assert "all_gather[a] 96 B/device (sort operand 0 {a,_} -> {_,_})" in message
    assert "test_parallel_array.py" in message and record[0].filename == __file__
    np.testing.assert_array_equal(np.asarray(ordered), np.sort(u, axis=0))
    assert ordered.sharding.mesh == mesh
    with pytest.warns(P.ShardingGatherWarning, match="fft: .*replicated"):
        spectrum = enp.fft.fft(x, axis=1)  # no sharding rule: replicated
    np.testing.assert_allclose(np.asarray(spectrum), np.fft.fft(u, axis=1), rtol=1e-5,
                               atol=1e-3)


def test_operands_on_two_meshes_are_gathered_and_replicated_with_a_warning():
    u = _value((4, 4))
    left = P.Mesh(P.devices()[:2], ("x",))
    x = P.device_put(u, P.NamedSharding(left, P.PartitionSpec("x")))
    y = P.device_put(u, P.NamedSharding(P.Mesh(P.devices()[2:6], ("y",)), P.PartitionSpec("y")))
    with pytest.warns(P.ShardingGatherWarning, match=r"dot_general: operands laid out by "
                                                     r"NamedSharding.*PartitionSpec\('x'\).*"
                                                     r"PartitionSpec\('y'\).*were gathered"):
        out = x @ y
    assert out.sharding == P.NamedSharding(left, P.PartitionSpec())
    np.testing.assert_allclose(np.asarray(out), u @ u)


def test_eager_grad_of_a_function_of_a_sharded_array():
    mesh = P.Mesh(P.devices()[:4], ("x",))
    u = _value((8, 2)) / 10
    x = P.device_put(u, P.NamedSharding(mesh, P.PartitionSpec("x")))
    with _Raise(P.ShardingGatherWarning):
        g = ember.grad(lambda t: enp.sum(enp.sin(t) * t))(x)
    assert isinstance(g, P.ShardedArray)
    np.testing.assert_allclose(np.asarray(g), np.cos(u) * u + np.sin(u), rtol=1e-5)


def test_donated_sharded_arrays_cannot_be_used():
    x = P.device_put(_value((4,)), P.NamedSharding(_mesh_1d(2), P.PartitionSpec("x")))
    f = ember.jit(lambda t: t + 1, donate_argnums=0)
    with _Raise(P.ShardingGatherWarning):  # partitioned: each device's shard is donated
        np.testing.assert_array_equal(np.asarray(f(x)), _value((4,)) + 1)
    with pytest.raises(ember.EmberError, match="donated"):
        x + 1  # noqa: B018


# --- with_sharding_constraint -----------------------------------------------------------------

def test_with_sharding_constraint_eager_is_device_put():
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    s = P.NamedSharding(mesh, P.PartitionSpec("dp", "tp"))
    u = _value((8, 4))
    _check_layout(P.with_sharding_constraint(u, s), u, s)
    x = P.device_put(u, P.NamedSharding(mesh, P.PartitionSpec()))
    _check_layout(P.with_sharding_constraint(x, s), u, s)


def test_constraint_is_an_annotation_in_the_graph():
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    s = P.NamedSharding(mesh, P.PartitionSpec("dp"))

    def f(t):
        return enp.tanh(P.with_sharding_constraint(t * 2, s))

    u = _value((8, 4)) / 10
    text = ember.jit(f).lower(u).as_text()
    assert "sharding_constraint[sharding=Sharding({dp,_}, mesh=(dp=4, tp=2))]" in text
    for backend in ("numpy", "cpu"):
        np.testing.assert_allclose(np.asarray(ember.jit(f, backend=backend)(u)),
                                   np.tanh(u * 2), rtol=1e-6)
    with pytest.raises(ShardingError, match=r"with_sharding_constraint: .*f32\[6,4\].*"
                                            r"dimension 0 of size 6"):
        ember.jit(f).lower(_value((6, 4)))


def test_constraint_differentiates_and_batches():
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    s = P.NamedSharding(mesh, P.PartitionSpec("dp", "tp"))
    u = _value((8, 4)) / 10

    def f(t):
        return enp.sum(P.with_sharding_constraint(t * t, s) * 3.0)

    np.testing.assert_allclose(np.asarray(ember.grad(f)(u)), 6 * u, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ember.jit(ember.grad(f))(u)), 6 * u, rtol=1e-6)
    # the forward value's constraint and the cotangent's (transpose rule)
    both = ember.jit(ember.value_and_grad(f)).lower(u).as_text()
    assert both.count("sharding_constraint[sharding=Sharding({dp,tp}") == 2
    primal, tangent = ember.jvp(lambda t: P.with_sharding_constraint(t * t, s), (u,),
                                (np.ones_like(u),))
    np.testing.assert_allclose(np.asarray(tangent), 2 * u, rtol=1e-6)
    batched = ember.jit(ember.vmap(lambda t: P.with_sharding_constraint(t + 1, s)))
    stack = np.stack([u, 2 * u, 3 * u])
    np.testing.assert_allclose(np.asarray(batched(stack)), stack + 1)
    assert "{_,dp,tp}" in batched.lower(stack).as_text()  # the batch dimension is not split
    # batched at axis 1 (nothing moves it first): that axis is the unsplit one
    in_axis_1 = ember.vmap(lambda t: P.with_sharding_constraint(t, s), in_axes=1, out_axes=1)
    middle = np.stack([u, 2 * u, 3 * u], 1)
    np.testing.assert_allclose(np.asarray(ember.jit(in_axis_1)(middle)), middle)
    assert "{dp,_,tp}" in ember.jit(in_axis_1).lower(middle).as_text()
    with pytest.raises(ShardingError, match="with_sharding_constraint: expected an "
                                            "ember.parallel.NamedSharding, got PartitionSpec"):
        P.with_sharding_constraint(u, P.PartitionSpec("dp"))


def test_constraint_evaluated_eagerly_on_a_sharded_array_lays_it_out():
    mesh = P.Mesh(P.devices(), ("dp", "tp"))
    u = _value((8, 4))
    x = P.device_put(u, P.NamedSharding(mesh, P.PartitionSpec()))
    want = P.NamedSharding(mesh, P.PartitionSpec(None, "tp"))
    out = P.array.sharding_constraint_p.bind(x, sharding=want.abstract(2))
    _check_layout(out, u, want)
    elsewhere = Sharding({"other": 8}, (None, None))
    assert P.array.sharding_constraint_p.bind(x, sharding=elsewhere) is x


# --- the trace stack is per thread ------------------------------------------------------------

def test_a_thread_runs_eagerly_while_another_traces():
    inside, resume = threading.Event(), threading.Event()
    seen = {}

    def worker():
        inside.wait(10)
        seen["tracing_in_worker"] = trace.tracing_active()
        seen["value"] = np.asarray(enp.asarray(np.float32(3)) * 2)
        resume.set()

    def f(t):
        inside.set()
        resume.wait(10)  # the main thread is inside the jit trace meanwhile
        seen["tracing_in_main"] = trace.tracing_active()
        return t + 1

    thread = threading.Thread(target=worker)
    thread.start()
    out = ember.jit(f)(np.float32(1))
    thread.join(10)
    assert seen == {"tracing_in_worker": False, "value": 6.0, "tracing_in_main": True}
    assert float(out) == 2.0


def test_a_thread_traces_while_the_main_thread_runs_eagerly():
    inside, resume = threading.Event(), threading.Event()
    result = {}

    def f(t):
        inside.set()
        resume.wait(10)
        return enp.cos(t)

    thread = threading.Thread(target=lambda: result.setdefault(
        "out", ember.jit(f).lower(np.zeros(3, np.float32)).as_text()))
    thread.start()
    inside.wait(10)
    assert not trace.tracing_active()
    eager = enp.asarray(np.arange(3.0)) + 1
    assert type(eager) is ember.Array
    np.testing.assert_array_equal(np.asarray(eager), [1, 2, 3])
    resume.set()
    thread.join(10)
    assert "cos" in result["out"]


def test_two_threads_trace_jit_functions_that_draw_random_numbers_at_once():
    # ember.random's key is hidden state each jit trace collects: per thread, like the stack.
    # The worker starts tracing first, and draws while the main thread's trace is open too.
    inside, resume, drawn = threading.Event(), threading.Event(), threading.Event()
    result = {}

    def g(t):
        inside.set()
        resume.wait(10)
        noise = ember.random.normal(ember.random.next_key(), shape=(3,))
        drawn.set()
        return t + noise

    def worker():
        try:
            result["g"] = ember.jit(g)(np.zeros(3, np.float32))
        except Exception as e:  # reported below, in the test's thread
            result["error"] = e
            drawn.set()

    def f(t):
        inside.wait(10)
        resume.set()
        drawn.wait(10)
        return t * ember.random.uniform(ember.random.next_key(), shape=(3,))

    thread = threading.Thread(target=worker)
    thread.start()
    out = ember.jit(f)(np.ones(3, np.float32))
    thread.join(10)
    assert "error" not in result, result
    assert out.shape == (3,) and result["g"].shape == (3,)


def test_the_count_of_active_traces_returns_to_zero_after_a_failing_trace():
    def bad(t):
        raise ValueError("inside the trace")

    with pytest.raises(ValueError):
        ember.jit(bad)(np.float32(1))
    assert trace._tracing == 0 and not trace.tracing_active()
    assert trace.innermost_dynamic().level == 0 and trace.innermost_main().level == 0
