"""Collectives overlap with computation (``ember.parallel.schedule``, issue 9 part 5).

A jitted sharded program runs each collective as a start, placed as early as its operand
allows, and a done, placed right before its first use, with local work between. Checked here:
a data-parallel MLP training step and a ZeRO-3 Llama step give the same bits with and without
the schedule (virtual devices; MPI processes in ``mpi_scripts/overlap.py``); the schedule is
deterministic and keeps the collectives' order; the ZeRO-3 step's gradient reduce-scatters of
the last layer overlap the backward of the layer before (read from ``explain()``); the bytes
in flight stay under the bound; a collective needed at once stays blocking; a scan's body is
scheduled inside itself; a device failing between start and done stops its peers with an
error naming the device and the collective.
"""

import re
import threading

import numpy as np
import pytest
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.errors import EmberValueError
from ember.ir.graph import Var
from ember.ir.params import bodies
from ember.models import finetune
from ember.models.finetune import _make_step
from ember.parallel import collectives as coll
from ember.parallel import runtime
from ember.parallel.communicator import CollectiveAbortedError
from ember.parallel.schedule import _cost, schedule


def _spec(mesh, *entries):
    return P.NamedSharding(mesh, P.PartitionSpec(*entries))


def _mesh(**axes):
    sizes = tuple(axes.values())
    return P.Mesh(P.devices()[:int(np.prod(sizes))], tuple(axes), sizes)


@pytest.fixture
def overlap(monkeypatch):
    """``overlap(False)``: jit functions made from now on run every collective blocking."""
    def set_overlap(on: bool) -> None:
        monkeypatch.setenv("EMBER_OVERLAP", "1" if on else "0")
    return set_overlap


# --- a data-parallel MLP training step ---------------------------------------------------------

def _mlp_loss(params, x, y):
    h = enp.tanh(x @ params["w1"] + params["b1"])
    return enp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def _mlp_step(params, x, y):
    loss, grads = ember.value_and_grad(_mlp_loss)(params, x, y)
    return {k: params[k] - 0.1 * grads[k] for k in params}, loss


def _mlp_train(mesh, backend, steps=3):
    """The parameters and losses of ``steps`` data-parallel steps, and the lowered step."""
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((8, 16)).astype(np.float32) / 3,
              "b1": rng.standard_normal(16).astype(np.float32) / 10,
              "w2": rng.standard_normal((16, 4)).astype(np.float32) / 4,
              "b2": rng.standard_normal(4).astype(np.float32) / 10}
    params = {k: enp.asarray(v) for k, v in params.items()}
    batch = _spec(mesh, "dp")
    step = ember.jit(_mlp_step, backend=backend, in_shardings=(_spec(mesh), batch, batch),
                     out_shardings=(_spec(mesh), _spec(mesh)))
    losses = []
    for _ in range(steps):
        x = rng.standard_normal((16, 8)).astype(np.float32)
        params, loss = step(params, x, np.sin(x[:, :4]))
        losses.append(np.asarray(loss))
    return {k: np.asarray(v) for k, v in params.items()}, losses, step.lower(params, x, x[:, :4])


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_mlp_training_gives_the_same_bits_with_and_without_overlap(backend, overlap):
    mesh = _mesh(dp=4)
    params, losses, lowered = _mlp_train(mesh, backend)
    assert "all_reduce_start[" in lowered.as_text()
    overlap(False)
    params0, losses0, lowered0 = _mlp_train(mesh, backend)
    assert "_start[" not in lowered0.as_text()
    assert all(c.overlap is None for c in lowered0.explain().collectives)
    np.testing.assert_array_equal(losses, losses0)
    for k in params:
        np.testing.assert_array_equal(params[k], params0[k], err_msg=k)
    # the gradient sums over dp overlap the backward of the layers before them
    overlapping = [c for c in lowered.explain().collectives if c.overlap.equations]
    assert len(overlapping) >= 3 and all(c.overlap.flops > 0 for c in overlapping)
    assert re.search(r"all_reduce\[dp\] .*; overlaps \d+ equations, [\d.]+ k?FLOP / [\d.]+ "
                     r"K?i?B of local work", str(lowered.explain()))


# --- the ZeRO-3 Llama step ---------------------------------------------------------------------

def _zero3(steps=2):
    mesh, plan = _mesh(dp=2), P.plans.llama(dp="dp", zero=3)
    model, opt = tiny_model(64), ember.optim.AdamW(lr=1e-2)
    state, layouts, place_batch = finetune.place(model, opt, mesh, plan)
    step = ember.jit(_make_step(opt, 1.0).fun, donate_argnums=1, backend="numpy",
                     out_shardings=layouts)
    rng = np.random.default_rng(0)
    data = [place_batch(rng.integers(0, 64, (1, 8, 8)).astype(np.int32)) for _ in range(steps)]
    lowered = step.lower(model, state, data[0])
    losses = []
    for batch in data:
        loss, _, params, state = step(model, state, batch)
        model.update(params)
        losses.append(np.asarray(loss))
    return losses, model.trainable_parameters(), lowered


def test_zero3_llama_step_overlaps_gathers_and_gradient_scatters_with_the_same_bits(overlap):
    losses, params, lowered = _zero3()
    graph = lowered.sharded.partitioned.graph.graph
    total = sum(_cost(e)[0] for e in graph.eqns if e.prim.kind != "collective")
    explained = lowered.explain().collectives
    gradients = [c for c in explained if c.kind == "reduce_scatter"
                 and c.reason == "with_sharding_constraint" and c.overlap.equations]
    # Backward runs the last layer first: its 9 weights' gradients are scattered while the
    # backward of layer 0 runs (over a fifth of the step's work); layer 0's have little left.
    assert len(gradients) == 18  # 9 weights a layer, 2 layers, the last one first
    last, first = gradients[:9], gradients[9:]
    assert all(c.overlap.flops > 0.2 * total for c in last)
    assert sum(c.overlap.flops for c in last) > 2 * sum(c.overlap.flops for c in first)
    # the next layer's parameters are gathered while an earlier layer computes
    gathers = [c for c in explained if c.kind == "all_gather" and c.overlap.equations]
    assert sum(c.overlap.flops > 0.1 * total for c in gathers) >= 9

    overlap(False)
    losses0, params0, lowered0 = _zero3()
    assert "_start[" not in lowered0.as_text()
    np.testing.assert_array_equal(losses, losses0)
    for name in params:
        np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(params0[name]), name)


# --- the schedule itself -----------------------------------------------------------------------

def _partitioned_mlp_step(mesh):
    x = np.ones((16, 8), np.float32)
    params = {"w1": np.ones((8, 16), np.float32), "b1": np.ones(16, np.float32),
              "w2": np.ones((16, 4), np.float32), "b2": np.ones(4, np.float32)}
    closed = ember.jit(_mlp_step).lower(params, x, x[:, :4]).graph
    rep, batch = P.NamedSharding(mesh), _spec(mesh, "dp")
    return P.partition(closed, [rep] * 4 + [batch, batch], [rep] * 5, mesh)


def _collectives(closed, started_only=False):
    """(name, params without seq, operand type) of each collective or start, in order."""
    out = []
    for e in closed.graph.eqns:
        if e.prim in coll.STARTS.values() or not started_only and e.prim in coll.STARTS:
            name = e.prim.name.removesuffix("_start")
            params = {k: v for k, v in e.params.items() if k != "seq"}
            out.append((name, sorted(params.items()), str(e.inputs[0].aval)))
    return out


def test_schedule_is_deterministic_and_starts_each_collective_once_its_operand_is_ready():
    part = _partitioned_mlp_step(_mesh(dp=2))
    first, second = schedule(part), schedule(part)
    assert str(first.graph) == str(second.graph)
    assert str(first.explanation) == str(second.explanation)
    assert sorted(_collectives(first.graph)) == sorted(_collectives(part.graph))
    eqns = first.graph.graph.eqns
    starts = [k for k, e in enumerate(eqns) if e.prim in coll.STARTS.values()]
    assert [eqns[k].params["seq"] for k in starts] == list(range(len(starts))) != []
    made = {v.id: k for k, e in enumerate(eqns) for v in e.outputs}
    for k in starts:  # right after its operand (and other starts there)
        assert all(e.prim in coll.STARTS.values()
                   for e in eqns[made[eqns[k].inputs[0].id] + 1:k])


_BLOCKING = {start: blocking for blocking, start in coll.STARTS.items()}


def _in_flight_peak(closed):
    """The most bytes (operand + result) of started collectives at any point of the graph;
    every ticket is defined and finished in the graph that starts it."""
    held, peak = {}, 0
    for e in closed.graph.eqns:
        for _, body in bodies(e):
            peak = max(peak, _in_flight_peak(body))
        if e.prim in _BLOCKING:
            x = e.inputs[0].aval
            params = {k: v for k, v in e.params.items() if k != "seq"}
            out = _BLOCKING[e.prim].abstract_eval(x, **params)
            held[e.outputs[0].id] = (x.size + out.size) * x.dtype.itemsize
        elif e.prim is coll.collective_done_p:
            del held[e.inputs[0].id]
        peak = max(peak, sum(held.values()))
    assert not held and not any(isinstance(v, Var) and v.id in held
                                for v in closed.graph.outvars)
    return peak


def test_bytes_in_flight_stay_under_the_bound():
    part = _partitioned_mlp_step(_mesh(dp=2))
    unbounded = schedule(part)
    assert _in_flight_peak(unbounded.graph) > 1200
    bounded = schedule(part, max_bytes=1200)
    assert 0 < _in_flight_peak(bounded.graph) <= 1200
    assert any(c.overlap.equations for c in bounded.explanation.collectives)
    nothing = schedule(part, max_bytes=0)
    assert _collectives(nothing.graph, started_only=True) == []
    assert all("EMBER_OVERLAP_BYTES" in c.overlap.blocking
               for c in nothing.explanation.collectives)


@pytest.mark.parametrize("name, value", [("EMBER_OVERLAP", "yes"),
                                         ("EMBER_OVERLAP_BYTES", "64M")])
def test_bad_overlap_settings_are_errors_naming_the_variable(monkeypatch, name, value):
    part = _partitioned_mlp_step(_mesh(dp=2))
    monkeypatch.setenv(name, value)
    with pytest.raises(EmberValueError, match=f"{name}='{value}': expected"):
        schedule(part)


def test_a_collective_needed_at_once_stays_blocking():
    mesh = _mesh(tp=2)
    f = ember.jit(lambda x, w: enp.tanh(x @ w), in_shardings=(_spec(mesh, None, "tp"),
                                                                _spec(mesh, "tp")))
    lowered = f.lower(np.ones((4, 8), np.float32), np.ones((8, 4), np.float32))
    (c,) = lowered.explain().collectives
    assert c.kind == "all_reduce" and c.overlap.equations == 0
    assert "blocking: no local work between its operand and its first use" in str(c)
    assert "all_reduce[" in lowered.as_text() and "_start[" not in lowered.as_text()


def _scan_body_fn(h0, w, xs):
    def body(h, x):
        y = h @ w  # w split by rows: a partial sum, all-reduced where tanh needs it
        z = enp.sin(h) * 2.0 + x  # local work that needs no collective
        h = enp.tanh(y) + z
        return h, h.sum()
    return ember.lax.scan(body, h0, xs)


def test_a_scan_body_is_scheduled_inside_itself():
    mesh = _mesh(tp=2)
    args = (np.full((2, 8), 0.1, np.float32), np.eye(8, dtype=np.float32) / 2,
            np.linspace(0, 1, 3 * 2 * 8, dtype=np.float32).reshape(3, 2, 8))
    shardings = (_spec(mesh, None, "tp"), _spec(mesh, "tp"), _spec(mesh))
    f = ember.jit(_scan_body_fn, in_shardings=shardings, out_shardings=_spec(mesh))
    lowered = f.lower(*args)
    inner = [c for c in lowered.explain().collectives if c.within.startswith("scan body")]
    # the partial product's sum overlaps the local work after it; the sum of the output does not
    assert [c.kind for c in inner if c.overlap.equations >= 2] == ["reduce_scatter"]
    (scan,) = [e for e in lowered.sharded.partitioned.graph.graph.eqns if e.prim.name == "scan"]
    _in_flight_peak(scan.params["body"])  # every ticket stays inside the body
    assert _collectives(scan.params["body"])
    want = _scan_body_fn(*map(enp.asarray, args))
    for got, expect in zip(f(*args), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expect), rtol=1e-6)


def test_a_started_all_reduce_is_combined_before_anyone_waits_on_virtual_devices():
    """The last device to start it reduces at once, so the data is combined while the others
    compute; their waits then only copy the one result."""
    started, results = threading.Barrier(3), {}

    def device(i):
        comm = runtime.world()
        handle = comm.start_all_reduce(np.full(3, i + 1.0, np.float32))
        started.wait(10)
        if i == 0:
            results["combined"] = next(iter(comm._group.slots.values())).common.copy()
        started.wait(10)
        return handle.wait()

    out = runtime.run_on_devices(device, 3)
    np.testing.assert_array_equal(results["combined"], np.full(3, 6.0, np.float32))
    for r in out:
        np.testing.assert_array_equal(r, np.full(3, 6.0, np.float32))


# --- failures ----------------------------------------------------------------------------------

def test_a_device_failing_between_start_and_done_stops_the_others_naming_it():
    mesh = (("dp", 2),)
    start_sum = coll.STARTS[coll.all_reduce_p].impls["numpy"]
    start_gather = coll.STARTS[coll.all_gather_p].impls["numpy"]
    done = coll.collective_done_p.impls["numpy"]
    x = np.arange(4, dtype=np.float32)
    waiting, seen = threading.Event(), {}

    def device(i):
        summed = start_sum(x, axes=("dp",), op="sum", mesh=mesh, seq=0)
        if i == 1:  # device 1 fails with its all-reduce in flight, once device 0 waits
            waiting.wait(10)
            raise ValueError("device 1 broke while its all-reduce was in flight")
        gathered = start_gather(x, axes=("dp",), axis=0, mesh=mesh, seq=1)
        waiting.set()
        try:
            done(gathered, result=None)
        except CollectiveAbortedError as e:
            seen["error"] = e
            raise
        done(summed, result=None)

    with pytest.raises(ValueError, match="device 1 broke"):
        runtime.run_on_devices(device, 2)
    message = str(seen["error"])
    assert "all_gather" in message and "rank 0" in message and "device 1 failed" in message


# --- MPI ---------------------------------------------------------------------------------------

def test_overlap_gives_the_same_bits_on_mpi_processes(ember_launch):
    status, out, _ = ember_launch(2, "overlap.py", timeout=30.0, limit=200)
    assert status == 0, out
    for rank in range(2):
        assert f"process {rank}: overlap ok" in out, out
