"""Collectives on virtual devices (threads) against NumPy, and their failure modes.

Every collective runs on 1, 2, 3, 4 and 8 ranks; each rank's result is compared with what
NumPy computes from all ranks' inputs, and reductions are compared bit for bit with a sum
taken in rank order (the contract every runtime keeps). The failure tests check that no rank
is left waiting: a mismatch, a timeout or a rank that raises stops every rank, and the error
names the collective, its sequence number, the shapes and the ranks.
"""

import os
import re
import signal
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from ember.errors import EmberError, EmberValueError
from ember.parallel import runtime
from ember.parallel.communicator import (
    CollectiveAbortedError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    collective_timeout,
)

SIZES = [1, 2, 3, 4, 8]


def inputs(n, shape, dtype=np.float32, seed=0):
    """One input per rank; float values with many significant bits, so the order of a sum
    shows in its last bits."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(dtype)
            for _ in range(n)]


def run(n, body, timeout=20.0):
    """``body(comm, i)`` on n virtual devices."""
    return runtime.run_on_devices(lambda i: body(runtime.world(), i), n, timeout=timeout)


def rank_order(arrays, combine):
    out = arrays[0].copy()
    for a in arrays[1:]:
        out = combine(out, a)
    return out


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op,combine,reference", [
    ("sum", np.add, np.sum), ("prod", np.multiply, np.prod),
    ("max", np.maximum, np.max), ("min", np.minimum, np.min)])
def test_all_reduce(n, op, combine, reference):
    xs = inputs(n, (5, 3))
    outs = run(n, lambda c, i: c.all_reduce(xs[i], op))
    expected = rank_order(xs, combine)
    np.testing.assert_allclose(expected, reference(np.stack(xs), axis=0), rtol=1e-5)
    for out in outs:
        assert_same_bits(out, expected)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_all_gather(n, axis):
    xs = inputs(n, (2, 3))
    for out in run(n, lambda c, i: c.all_gather(xs[i], axis)):
        np.testing.assert_array_equal(out, np.concatenate(xs, axis=axis))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("axis", [0, 1])
def test_reduce_scatter(n, axis):
    shape = (2 * n, 3) if axis == 0 else (3, 2 * n)
    xs = inputs(n, shape)
    outs = run(n, lambda c, i: c.reduce_scatter(xs[i], axis))
    blocks = np.split(rank_order(xs, np.add), n, axis=axis)
    for i, out in enumerate(outs):
        assert_same_bits(out, blocks[i])
    np.testing.assert_allclose(np.concatenate(outs, axis), np.sum(xs, axis=0), rtol=1e-5)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("split_axis,concat_axis", [(0, 1), (1, 0), (0, 0)])
def test_all_to_all(n, split_axis, concat_axis):
    xs = inputs(n, (n * 2, n * 3))
    outs = run(n, lambda c, i: c.all_to_all(xs[i], split_axis, concat_axis))
    for i, out in enumerate(outs):
        expected = np.concatenate([np.split(x, n, split_axis)[i] for x in xs], concat_axis)
        np.testing.assert_array_equal(out, expected)
    # all_to_all twice with the axes swapped back restores every rank's input
    back = run(n, lambda c, i: c.all_to_all(outs[i], concat_axis, split_axis))
    for x, b in zip(xs, back):
        np.testing.assert_array_equal(b, x)


@pytest.mark.parametrize("n", SIZES)
def test_permute_ring_and_partial(n):
    xs = inputs(n, (4,))
    ring = [(i, (i + 1) % n) for i in range(n)]
    for i, out in enumerate(run(n, lambda c, i: c.permute(xs[i], ring))):
        np.testing.assert_array_equal(out, xs[(i - 1) % n])
    partial = [(0, n - 1)]  # only the last rank receives; the others get zeros
    for i, out in enumerate(run(n, lambda c, i: c.permute(xs[i], partial))):
        np.testing.assert_array_equal(out, xs[0] if i == n - 1 else np.zeros(4, np.float32))


@pytest.mark.parametrize("n", SIZES)
def test_broadcast_and_barrier(n):
    xs = inputs(n, (2, 2))
    arrivals = []

    def body(c, i):
        time.sleep(0.01 * i)
        arrivals.append(time.monotonic())
        c.barrier()
        left = time.monotonic()
        return c.broadcast(xs[i], root=n - 1), left

    results = run(n, body)
    for out, _ in results:
        np.testing.assert_array_equal(out, xs[n - 1])
    assert min(left for _, left in results) >= max(arrivals)  # nobody left before all came


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.int32, np.int8, np.bool_,
                                   np.float64, np.complex64])
def test_dtypes_kept(dtype):
    n = 3
    xs = [(np.arange(6).reshape(2, 3) % (2 + i)).astype(dtype) for i in range(n)]
    for total, gathered in run(n, lambda c, i: (c.all_reduce(xs[i]), c.all_gather(xs[i]))):
        assert total.dtype == np.dtype(dtype) and gathered.dtype == np.dtype(dtype)
        assert_same_bits(total, rank_order(xs, np.add))
        np.testing.assert_array_equal(gathered, np.concatenate(xs))


def test_inputs_are_not_written_and_results_are_new_arrays():
    xs = inputs(4, (4, 2))
    kept = [x.copy() for x in xs]

    def body(c, i):
        return [c.all_reduce(xs[i]), c.all_gather(xs[i]), c.reduce_scatter(xs[i]),
                c.all_to_all(xs[i], 0, 1), c.permute(xs[i], [(0, 1)]), c.broadcast(xs[i])]

    outs = [o for per_rank in run(4, body) for o in per_rank]
    # no result shares memory with an input or with another result (each rank may write its own)
    for k, o in enumerate(outs):
        assert not any(np.shares_memory(o, x) for x in xs + outs[k + 1:])
    for x, k in zip(xs, kept):
        np.testing.assert_array_equal(x, k)


def test_one_device_outside_run_on_devices():
    c = runtime.world()
    assert (c.rank, c.size, runtime.local_device()) == (0, 1, 0)
    x = np.arange(6.0).reshape(2, 3)
    for out in (c.all_reduce(x), c.all_gather(x, 1), c.reduce_scatter(x), c.broadcast(x),
                c.all_to_all(x, 0, 1), c.permute(x, [(0, 0)])):
        np.testing.assert_array_equal(out, x)
        assert not np.shares_memory(out, x)


@pytest.mark.parametrize("rows,cols", [(2, 2), (2, 4)])
def test_split_into_mesh_axes(rows, cols):
    """Device i sits at (i // cols, i % cols): splitting by row gives the groups along the
    column axis, and by column those along the row axis, each in mesh order."""
    n = rows * cols
    xs = inputs(n, (cols * rows, 3))

    def body(c, i):
        r, k = divmod(i, cols)
        along_cols, along_rows = c.split(r), c.split(k)
        return (along_cols.rank, along_cols.size, along_rows.rank, along_rows.size,
                along_cols.all_reduce(xs[i]), along_rows.all_gather(xs[i]),
                along_cols.reduce_scatter(xs[i]), c.all_reduce(xs[i]))

    for i, (cr, cs, rr, rs, red, gat, rsc, total) in enumerate(run(n, body)):
        r, k = divmod(i, cols)
        row = [xs[r * cols + j] for j in range(cols)]
        column = [xs[j * cols + k] for j in range(rows)]
        assert (cr, cs, rr, rs) == (k, cols, r, rows)
        assert_same_bits(red, rank_order(row, np.add))
        np.testing.assert_array_equal(gat, np.concatenate(column))
        assert_same_bits(rsc, np.split(rank_order(row, np.add), cols)[k])
        assert_same_bits(total, rank_order(xs, np.add))


def test_split_orders_by_key_and_nests():
    def body(c, i):
        reverse = c.split(0, key=-i)  # one group, ranks in reverse device order
        halves = reverse.split(reverse.rank // 2)
        return reverse.rank, reverse.all_gather(np.array([i])), halves.name, halves.rank, \
            halves.all_gather(np.array([i]))

    for i, (rank, order, name, hrank, horder) in enumerate(run(4, body)):
        assert rank == 3 - i
        np.testing.assert_array_equal(order, [3, 2, 1, 0])
        assert name == f"world/0/{(3 - i) // 2}"
        assert hrank == (3 - i) % 2
        np.testing.assert_array_equal(horder, [3, 2] if i >= 2 else [1, 0])


def test_start_and_wait_in_any_order_overlaps_with_compute():
    n = 4
    xs = inputs(n, (6, 4))

    def body(c, i):
        handles = [c.start_all_reduce(xs[i]), c.start_all_gather(xs[i]),
                   c.start_reduce_scatter(xs[i], 1)]
        local = xs[i] @ xs[i].T  # work between start and wait
        return [h.wait() for h in reversed(handles)], handles[0].wait(), local

    for i, ((scattered, gathered, total), again, local) in enumerate(run(n, body)):
        assert_same_bits(total, rank_order(xs, np.add))
        assert again is total  # a second wait returns the same result
        np.testing.assert_array_equal(gathered, np.concatenate(xs))
        assert_same_bits(scattered, np.split(rank_order(xs, np.add), n, 1)[i])
        np.testing.assert_allclose(local, xs[i] @ xs[i].T)


def test_different_collectives_are_a_mismatch():
    def body(c, i):
        c.all_reduce(np.zeros(3, np.float32))
        if i == 1:
            c.all_gather(np.zeros(3, np.float32))
        else:
            c.all_reduce(np.zeros(3, np.float32))

    with pytest.raises(CollectiveMismatchError) as e:
        run(3, body)
    message = str(e.value)
    assert "group 'world' of 3" in message
    assert "rank 1 called all_gather(axis=0) #2 of float32[3]" in message
    # whichever of ranks 0 and 2 had arrived when the mismatch was seen
    assert re.search(r"ranks? [02](, 2)? called all_reduce\(op='sum'\) #2 of float32\[3\]", message)


def test_mismatched_shapes_and_dtypes_name_each_rank():
    def body(c, i):
        c.all_reduce(np.zeros((2, 3 + (i == 2)), np.float64 if i == 3 else np.float32))

    with pytest.raises(CollectiveMismatchError) as e:
        run(4, body)
    message = str(e.value)
    assert "all_reduce(op='sum') #1" in message
    assert "float32[2, 4]" in message or "float64[2, 3]" in message  # the first odd one seen
    assert isinstance(e.value, EmberError)


def test_a_rank_that_skips_a_collective_and_returns_stops_the_others_at_once():
    started = time.monotonic()

    def body(c, i):
        if i != 2:
            c.all_gather(np.ones(2))

    with pytest.raises(CollectiveMismatchError, match=r"all_gather\(axis=0\) #1 of float64\[2\] "
                       r"in group 'world' of 4: rank 2 returned without calling it"):
        run(4, body, timeout=30)
    assert time.monotonic() - started < 5


def test_a_late_rank_is_a_timeout_naming_it():
    def body(c, i):
        if i == 1:
            time.sleep(1.0)
        c.all_reduce(np.ones(2))

    started = time.monotonic()
    with pytest.raises(CollectiveTimeoutError) as e:
        run(3, body, timeout=0.3)
    assert time.monotonic() - started < 5
    message = str(e.value)
    assert "all_reduce(op='sum') #1 of float64[2] in group 'world' of 3 timed out" in message
    assert "after 0.3 s: rank 1 did not arrive" in message


def test_one_rank_raising_stops_the_others_within_the_timeout():
    errors = {}

    def body(c, i):
        c.barrier()
        if i == 2:
            time.sleep(0.1)
            raise ValueError("device 2 failed")
        try:
            c.all_reduce(np.ones(2))
        except CollectiveAbortedError as e:
            errors[i] = e
            raise

    started = time.monotonic()
    with pytest.raises(ValueError, match="device 2 failed"):
        run(4, body, timeout=30)
    assert time.monotonic() - started < 5
    assert sorted(errors) == [0, 1, 3]
    assert all("all_reduce(op='sum') #2 of float64[2] in group 'world' of 4 abandoned" in str(e)
               and "device 2 failed: ValueError: device 2 failed" in str(e)
               for e in errors.values())
    # Every thread stopped: none is left blocked behind the error.
    assert not [t for t in threading.enumerate() if t.name.startswith("ember-device-")]


def test_a_failure_in_one_split_group_stops_ranks_waiting_in_another():
    def body(c, i):
        group = c.split(i % 2)
        if i == 0:
            raise RuntimeError("stop")
        group.all_reduce(np.ones(1))  # ranks 1, 3 would finish; rank 2 waits for rank 0

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stop"):
        run(4, body, timeout=30)
    assert time.monotonic() - started < 5


def test_ctrl_c_returns_at_once_and_stops_the_devices_at_their_next_collective():
    seen = []

    def body(c, i):
        if i == 0:
            time.sleep(1.5)  # computing when Ctrl-C comes
        try:
            c.all_reduce(np.ones(2))
        except CollectiveAbortedError as e:
            seen.append(i)
            assert "KeyboardInterrupt" in str(e)

    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run(3, body, timeout=60)
    assert time.monotonic() - started < 1.4
    def devices_running():
        return [t for t in threading.enumerate() if t.name.startswith("ember-device-")]

    deadline = time.monotonic() + 10
    while devices_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(seen) == [0, 1, 2] and not devices_running()


def test_results_come_back_in_device_order_with_the_device_index():
    assert runtime.run_on_devices(lambda i: (i, runtime.local_device()), 5) == \
        [(i, i) for i in range(5)]


def test_run_on_devices_rejects_bad_counts_and_nesting():
    with pytest.raises(EmberValueError, match="run_on_devices: n=0"):
        runtime.run_on_devices(lambda i: i, 0)
    with pytest.raises(EmberValueError, match="virtual devices do not nest"):
        runtime.run_on_devices(lambda i: runtime.run_on_devices(lambda j: j, 2), 2)


# --- the pool of device threads kept between calls ------------------------------------------------

def device_threads(n):
    """Which thread ran each of n devices, and each device's index and communicator."""
    return runtime.run_on_devices(
        lambda i: (threading.get_ident(), runtime.local_device(), runtime.world()), n)


def test_calls_reuse_the_threads_and_communicators_of_a_pool_per_device_count():
    first, again, other = device_threads(4), device_threads(4), device_threads(3)
    assert [t for t, _, _ in again] == [t for t, _, _ in first]
    assert {t for t, _, _ in other}.isdisjoint(t for t, _, _ in first)
    assert [d for _, d, _ in again] == [0, 1, 2, 3] and [d for _, d, _ in other] == [0, 1, 2]
    # kept while calls end cleanly (tests/test_parallel_call_cache.py: when they are not)
    assert all(a is b for (_, _, a), (_, _, b) in zip(first, again))
    idle = next(t for t in threading.enumerate() if t.ident == first[1][0])
    assert idle.name == "ember-idle-device-1"  # named ember-device-1 only while it runs


def test_a_failed_call_leaves_the_pool_usable():
    threads = [t for t, _, _ in device_threads(3)]

    def body(c, i):
        if i == 1:
            raise ValueError("device 1 failed")
        c.all_reduce(np.ones(2))

    for _ in range(3):
        with pytest.raises(ValueError, match="device 1 failed"):
            run(3, body, timeout=30)
    assert run(3, lambda c, i: float(c.all_reduce(np.full(2, i + 1.0))[0])) == [6.0] * 3
    assert [t for t, _, _ in device_threads(3)] == threads


def test_a_nested_call_is_an_error_and_the_pool_stays_usable():
    for _ in range(2):
        with pytest.raises(EmberValueError, match="virtual devices do not nest"):
            runtime.run_on_devices(lambda i: runtime.run_on_devices(lambda j: j, 2), 2)
        assert runtime.run_on_devices(lambda i: i * 10, 2) == [0, 10]


def test_concurrent_callers_each_get_their_own_pool():
    """Two user threads run 2-device jobs whose collectives interleave; neither waits for the
    other's threads, and each sums only its own devices."""
    out, both = {}, threading.Barrier(2)

    def caller(k):
        def body(c, i):
            if i == 0:
                both.wait(timeout=10)
            return float(c.all_reduce(np.full(1, 10.0 * k + i))[0])
        out[k] = run(2, body)

    callers = [threading.Thread(target=caller, args=(k,)) for k in (1, 2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=20)
    assert out == {1: [21.0, 21.0], 2: [41.0, 41.0]}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_pool():
    device_threads(2)  # the parent holds a pool whose threads the child will not have
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its result, then leave without running pytest's exit
        ok = False
        try:
            ok = runtime.run_on_devices(lambda i: i * 3, 2) == [0, 3]
        finally:
            os.write(write, b"ok" if ok else b"wrong")
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 20
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in run_on_devices")
        time.sleep(0.02)
    assert os.read(read, 16) == b"ok"
    os.close(read)


def test_after_ctrl_c_a_new_call_runs_while_the_old_devices_still_compute():
    release = threading.Event()

    def body(c, i):
        release.wait(timeout=10)  # device still computing long after the caller left

    threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        run(2, body)
    assert runtime.run_on_devices(lambda i: i + 1, 2) == [1, 2]  # on another pool
    release.set()


@pytest.mark.parametrize("call,message", [
    (lambda c: c.all_reduce(np.ones(4), op="mean"), r"all_reduce: op='mean'"),
    (lambda c: c.reduce_scatter(np.ones((3, 2))),
     r"reduce_scatter: axis=0: dimension 3 of shape \(3, 2\) does not divide evenly over the 2"),
    (lambda c: c.all_to_all(np.ones((2, 3)), 1, 0), r"all_to_all: split_axis=1: dimension 3"),
    (lambda c: c.all_gather(np.ones((2, 3)), axis=2), r"all_gather: axis=2 is out of range"),
    (lambda c: c.permute(np.ones(2), [(0, 1), (1, 1)]), r"permute: .*distinct rank in 0..1"),
    (lambda c: c.permute(np.ones(2), [(0, 5)]), r"permute: .*distinct rank in 0..1"),
    (lambda c: c.broadcast(np.ones(2), root=2), r"broadcast: root=2 is not a rank"),
    (lambda c: c.all_reduce(np.array(["a"])), r"all_reduce: expected a numeric array"),
    (lambda c: c.split(-1), r"split: color=-1"),
])
def test_bad_arguments_are_clear_errors_before_any_exchange(call, message):
    with pytest.raises(EmberValueError, match=message) as e:
        run(2, lambda c, i: call(c))
    assert "test_parallel_comm.py" in str(e.value)  # names the user's line


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("EMBER_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == 300
    monkeypatch.setenv("EMBER_COLLECTIVE_TIMEOUT", "0.25")
    assert collective_timeout() == 0.25
    assert runtime.run_on_devices(lambda i: runtime.world().timeout, 2) == [0.25, 0.25]
    monkeypatch.setenv("EMBER_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(EmberValueError, match="EMBER_COLLECTIVE_TIMEOUT='soon'"):
        collective_timeout()


def test_one_process_without_mpi(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not runtime.launched_under_mpi()
    assert (runtime.process_index(), runtime.process_count()) == (0, 1)
