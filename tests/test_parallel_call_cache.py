"""What a sharded ``jit`` call and the thread runtime keep from one call to the next.

A sharded jit works out once per signature and mesh what the argument values do not change
(each device's blocks, the result layouts and types, the argument types ``in_shardings``
gives); these tests change each thing such a memo could wrongly keep (the mesh, the layout,
plain against sharded arguments, donation) and compare every result with NumPy. The thread
collectives wake each waiting rank once; a rank woken for nothing (a peer of another group
returned) goes back to waiting, and an all-reduce's input may be written once it returned.
"""

import time

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.errors import EmberError
from ember.ir.sharding import ShardingError
from ember.parallel import runtime
from ember.parallel.communicator import CollectiveMismatchError


def _mesh(first: int, n: int = 2) -> P.Mesh:
    return P.Mesh(P.devices()[first:first + n], ("dp",))


def _rows(mesh: P.Mesh) -> P.NamedSharding:
    return P.NamedSharding(mesh, P.PartitionSpec("dp"))


X = np.arange(32.0, dtype=np.float32).reshape(8, 4) / 8


def _held_by(out: P.ShardedArray, mesh: P.Mesh, spec: P.PartitionSpec) -> None:
    assert out.sharding == P.NamedSharding(mesh, spec)
    indices = out.sharding.indices(out.shape)
    for d, buf in zip(mesh.local_devices, out.local_buffers()):
        np.testing.assert_array_equal(buf, np.asarray(out)[indices[d]])


def test_one_signature_over_two_meshes_lays_each_result_out_on_its_own_mesh():
    """No shardings given: the mesh comes from the arguments at each call, and the same
    cached program runs over devices 0-1, then 2-3, then 0-1 again (a new, equal mesh)."""
    f = ember.jit(lambda x: enp.exp(x) * 2.0)
    for mesh in (_mesh(0), _mesh(2), _mesh(0), _mesh(2)):
        out = f(P.device_put(X, _rows(mesh)))
        np.testing.assert_allclose(np.asarray(out), np.exp(X) * 2.0, rtol=1e-6)
        _held_by(out, mesh, P.PartitionSpec("dp"))
    assert f.trace_count == 1


def test_another_layout_of_the_argument_is_another_program():
    f = ember.jit(lambda x: x.sum(axis=0), backend="cpu")
    mesh = P.Mesh(P.devices()[:4], ("a", "b"), (2, 2))
    for spec in (P.PartitionSpec("a"), P.PartitionSpec(None, "b"), P.PartitionSpec("a", "b"),
                 P.PartitionSpec("a")):
        out = f(P.device_put(X, P.NamedSharding(mesh, spec)))
        np.testing.assert_allclose(np.asarray(out), X.sum(axis=0), rtol=1e-6)
    assert f.trace_count == 3


def test_results_are_checked_once_then_reuse_the_layouts_asked_for():
    mesh = _mesh(0, 4)
    rows = _rows(mesh)
    f = ember.jit(lambda x, w: (enp.tanh(x) * w, w.sum()), in_shardings=(rows, None),
                  out_shardings=(rows, None), backend="cpu")
    x, w = P.device_put(X, rows), np.float32(3.0)
    for step in range(3):
        y, total = f(x, w)
        np.testing.assert_allclose(np.asarray(y), np.tanh(np.asarray(x)) * 3.0, rtol=1e-6)
        assert y.sharding is rows  # the caller's own object: next call's check is by identity
        assert y.aval == ember.core.array.ArrayType((8, 4), np.dtype(np.float32),
                                                    sharding=rows.abstract(2))
        assert float(np.asarray(total)) == 3.0 and total.sharding.is_fully_replicated
        assert all(b.shape == (2, 4) and b.flags.c_contiguous for b in y.local_buffers())
        x = y


def test_plain_and_sharded_arguments_of_one_signature_each_give_their_blocks():
    """A NumPy array and a sharded array laid out as in_shardings asks share a cache entry:
    the one is cut into blocks at each call, the other's buffers are taken as they are."""
    mesh = _mesh(0, 4)
    rows = _rows(mesh)
    f = ember.jit(lambda x: x * 2.0 + 1.0, in_shardings=rows)
    for x in (X, P.device_put(X, rows), X + 1.0, P.device_put(X - 1.0, rows)):
        np.testing.assert_allclose(np.asarray(f(x)), np.asarray(x) * 2.0 + 1.0, rtol=1e-6)
    assert f.trace_count == 1


def test_an_argument_on_another_mesh_than_in_shardings_is_still_an_error_after_hits():
    rows = _rows(_mesh(0))
    f = ember.jit(lambda x: x + 1.0, in_shardings=rows)
    f(P.device_put(X, rows))
    f(P.device_put(X, rows))  # the types are known now: only the layout check runs
    with pytest.raises(ShardingError, match=r"argument 0 is a sharded array laid out by "
                                            r"NamedSharding.*in_shardings asks for"):
        f(P.device_put(X, _rows(_mesh(2))))


def test_donated_arguments_stay_donated_across_cached_calls():
    rows = _rows(_mesh(0))
    f = ember.jit(lambda x: x * 3.0, in_shardings=rows, out_shardings=rows, donate_argnums=0,
                  backend="cpu")
    x = P.device_put(X, rows)
    for _ in range(3):
        y = f(x)
        with pytest.raises(EmberError, match="donated to a jitted function"):
            f(x)
        np.testing.assert_allclose(np.asarray(y), X * 3.0, rtol=1e-6)
        x = P.device_put(X, rows)
    plain = enp.asarray(X)
    np.testing.assert_allclose(np.asarray(f(plain)), X * 3.0, rtol=1e-6)
    with pytest.raises(EmberError, match="donated to a jitted function"):
        f(plain)


# --- the thread runtime -----------------------------------------------------------------------

def test_an_all_reduce_input_written_after_it_returns_changes_no_result():
    xs = [np.full(256, 10.0 ** k, np.float64) + k for k in range(4)]
    want = ((xs[0] + xs[1]) + xs[2]) + xs[3]

    def body(i):
        mine = xs[i].copy()
        out = runtime.world().all_reduce(mine)
        mine[:] = np.nan  # the caller owns its input again: peers must not see this
        return out

    for _ in range(20):
        outs = runtime.run_on_devices(body, 4)
        for out in outs:
            np.testing.assert_array_equal(out, want)
        assert not any(np.shares_memory(a, b) for k, a in enumerate(outs) for b in outs[k + 1:])


def test_a_rank_woken_when_a_peer_of_another_group_returns_waits_on():
    def body(i):
        group = runtime.world().split(i // 2)
        if i == 2:
            time.sleep(0.2)  # rank 3 sleeps in the all-reduce while ranks 0 and 1 return
        return float(group.all_reduce(np.full(1, i + 1.0))[0])

    assert runtime.run_on_devices(body, 4, timeout=20) == [3.0, 3.0, 7.0, 7.0]


def _worlds(n, body=lambda c, i: None):
    """Each device's world communicator in a run of ``body(comm, i)``."""
    def device(i):
        body(runtime.world(), i)
        return runtime.world()
    return runtime.run_on_devices(device, n, timeout=20)


def test_communicators_are_kept_only_after_a_run_that_ended_cleanly():
    kept = _worlds(3)
    assert all(a is b for a, b in zip(kept, _worlds(3)))

    def fail(c, i):
        if i == 1:
            raise ValueError("device 1 failed")
        c.all_reduce(np.ones(2))

    with pytest.raises(ValueError):
        _worlds(3, fail)
    after_failure = _worlds(3)
    assert all(a is not b for a, b in zip(kept, after_failure))

    def leave_one_unfinished(c, i):  # rank 0 starts an all-gather nobody else joins
        if i == 0:
            c.start_all_gather(np.ones(2))

    _worlds(3, leave_one_unfinished)
    assert all(a is not b for a, b in zip(after_failure, _worlds(3)))


def test_kept_communicators_count_collectives_from_one_again():
    def mismatch(c, i):
        c.all_reduce(np.ones(2))
        c.split(0).all_reduce(np.ones(2))
        if i == 1:
            c.all_gather(np.ones(2))
        else:
            c.all_reduce(np.ones(2))

    for _ in range(2):
        _worlds(2, lambda c, i: c.all_reduce(np.ones(2)))  # ends cleanly: kept
        with pytest.raises(CollectiveMismatchError, match=r"all_gather\(axis=0\) #3 of"):
            _worlds(2, mismatch)


def test_a_sharded_program_splits_its_mesh_axis_groups_once_over_many_calls(monkeypatch):
    from ember.parallel.threads import ThreadCommunicator

    splits = []
    split = ThreadCommunicator._split

    def counted(self, sig, color, key):
        splits.append(color)
        return split(self, sig, color, key)

    monkeypatch.setattr(ThreadCommunicator, "_split", counted)
    mesh = P.Mesh(P.devices()[:4], ("dp", "tp"), (2, 2))
    cols = P.NamedSharding(mesh, P.PartitionSpec("dp", "tp"))
    f = ember.jit(lambda x: enp.sum(x, axis=1), in_shardings=cols, backend="cpu")
    x = P.device_put(X, cols)
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(f(x)), X.sum(axis=1), rtol=1e-6)
    assert len(splits) == 4  # the tp groups, split by each of the 4 devices on the first call
