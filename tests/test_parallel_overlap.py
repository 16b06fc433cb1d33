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

import collections
import dataclasses
import re
import sys
import threading

import numpy as np
import pytest
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.errors import EmberValueError
from ember.ir.graph import Eqn, Var
from ember.ir.params import bodies
from ember.ir.types import ArrayType
from ember.models import finetune
from ember.models.finetune import _make_step
from ember.models.llama import LlamaForCausalLM
from ember.parallel import collectives as coll
from ember.parallel import runtime
from ember.parallel.communicator import CollectiveAbortedError
from ember.parallel.explain import Overlap
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
    explained = lowered.explain().collectives
    # A ZeRO-3 layer gathers its parameters again in its backward pass (plans.llama), so its
    # gathers and its gradients' scatters run inside the layer's body and overlap its work
    # there: every gradient is scattered while the rest of its layer's backward runs, and
    # the parameters are gathered while the layer computes with those gathered before.
    gradients = [c for c in explained if c.kind == "reduce_scatter"
                 and c.reason == "with_sharding_constraint"]
    assert len(gradients) == 18  # 9 weights a layer, 2 layers
    assert all(c.within == "remat body" and c.overlap.equations >= 10 for c in gradients)
    gathers = [c for c in explained if c.kind == "all_gather" and c.within == "remat body"]
    assert sum(c.overlap.equations >= 10 for c in gathers) >= 18

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


# --- the placement in near-linear time, pinned to the plain quadratic one ----------------------

_schedule_module = sys.modules["ember.parallel.schedule"]


def _reference_place(eqns, limit, overlaps, moved):
    """The placement written plainly: each start and done moved one gap at a time, the bytes in
    flight and the work re-read over the whole span at every step (quadratic). ``moved``
    counts the steps the bound moved starts and dones, and the collectives split with a done
    moved, to show a test reached those paths."""
    made = {v.id: k for k, e in enumerate(eqns) for v in e.outputs}
    first_use = {}
    for k, e in enumerate(eqns):
        for a in e.inputs:
            if isinstance(a, Var):
                first_use.setdefault(a.id, k)

    def ready(x):
        if not isinstance(x, Var) or x.id not in made:
            return 0
        return first_use[x.id] if eqns[made[x.id]].prim.kind == "collective" else made[x.id] + 1

    def nbytes(v):
        return v.aval.size * v.aval.dtype.itemsize

    load = [0] * (len(eqns) + 1)
    splits = []
    for start, i in sorted((ready(e.inputs[0]), i) for i, e in enumerate(eqns)
                           if e.prim in coll.STARTS):
        x, y = eqns[i].inputs[0], eqns[i].outputs[0]
        done, size = first_use.get(y.id, len(eqns)), nbytes(x) + nbytes(y)

        def fits(start, done, size=size):
            return size + max(load[start:done]) <= limit

        while start < i and not fits(start, done):
            start, moved["start"] = start + 1, moved["start"] + 1
        last = done
        while done > i + 1 and not fits(start, done):
            done, moved["done"] = done - 1, moved["done"] + 1
        work = [e for e in eqns[start:done] if e.prim.kind != "collective"]
        if not work or not fits(start, done):
            overlaps[y.id] = Overlap(0, 0.0, 0, "no local work between its operand and its "
                                     "first use" if fits(start, done) else
                                     f"its {size} B would pass the bound of {limit} B in "
                                     f"flight (EMBER_OVERLAP_BYTES)")
            continue
        for k in range(start, done):
            load[k] += size
        splits.append(_schedule_module._Split(i, start, done))
        moved["earlier done split"] += done < last
        overlaps[y.id] = Overlap(len(work), float(sum(_cost(e)[0] for e in work)),
                                 sum(_cost(e)[1] for e in work))
    return splits


def _llama_step(plan, mesh, layers=2):
    """A fine-tuning step of a tiny Llama with ``layers`` layers placed by ``plan``,
    partitioned, not scheduled."""
    config = dataclasses.replace(tiny_model(64).config, num_hidden_layers=layers)
    model, opt = LlamaForCausalLM(config), ember.optim.AdamW(lr=1e-2)
    state, layouts, place_batch = finetune.place(model, opt, mesh, plan)
    step = ember.jit(_make_step(opt, 1.0).fun, donate_argnums=1, out_shardings=layouts)
    batch = place_batch(np.zeros((1, 8, 8), np.int32))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBER_OVERLAP", "0")
        return step.lower(model, state, batch).sharded.partitioned


def _scan_program():
    mesh = _mesh(tp=2)
    args = (np.ones((2, 8), np.float32), np.ones((8, 8), np.float32),
            np.ones((3, 2, 8), np.float32))
    closed = ember.jit(_scan_body_fn).lower(*args).graph
    return P.partition(closed, [_spec(mesh, None, "tp"), _spec(mesh, "tp"), _spec(mesh)],
                       [_spec(mesh)] * 2, mesh)


@pytest.fixture(scope="module")
def programs():
    """Partitioned programs with every kind of collective the plans make: a dp MLP step, a
    ZeRO-3 and a dp x tp Llama step (gathers, scatters, all-reduces), a scan body."""
    return {"mlp": _partitioned_mlp_step(_mesh(dp=2)),
            "zero3": _llama_step(P.plans.llama(dp="dp", zero=3), _mesh(dp=2)),
            "dp_tp": _llama_step(P.plans.llama(dp="dp", tp="tp"), _mesh(dp=2, tp=2)),
            "scan": _scan_program()}


def test_the_schedule_is_the_plain_quadratic_ones_under_every_bound(programs, monkeypatch):
    moved = collections.Counter()
    for name, part in programs.items():
        peak = _in_flight_peak(schedule(part).graph)
        for limit in (None, peak, peak // 2, peak // 5, peak // 20, 0):
            got = schedule(part, max_bytes=limit)
            with monkeypatch.context() as patch:
                patch.setattr(_schedule_module, "_place", lambda eqns, limit, overlaps:
                              _reference_place(eqns, limit, overlaps, moved))
                want = schedule(part, max_bytes=limit)
            assert str(got.graph) == str(want.graph), (name, limit)
            assert str(got.explanation) == str(want.explanation), (name, limit)
    assert moved["start"] > 100 and moved["done"] > 10, moved  # the bound moved both


def _program(sin, sizes, recipe):
    """Equations ``recipe`` says, each ``(op, k)``: a sine (local work) or an all-reduce of
    value ``k`` (the inputs of ``sizes`` floats first, then each equation's result)."""
    values = [Var(ArrayType((size,), np.dtype(np.float32))) for size in sizes]
    eqns = []
    for op, k in recipe:
        y = Var(values[k].aval)
        eqns.append(Eqn(coll.all_reduce_p if op == "all_reduce" else sin, [values[k]], [y],
                        {"axes": ("dp",)}))
        values.append(y)
    return eqns


# Under a bound of 459 B the all-reduce of value 5 (448 B) starts late, at equation 8, after
# the all-reduce of value 7 (240 B) that is ready later; that one's done then moves up to
# equation 8 (a case the real programs above do not reach).
_DONE_MOVED_UP = ((56, 30, 5), [("all_reduce", 2), ("sin", 3), ("sin", 0), ("all_reduce", 3),
                                ("all_reduce", 1), ("sin", 5), ("all_reduce", 7), ("sin", 8),
                                ("sin", 6), ("all_reduce", 5), ("sin", 4)])


def test_the_placement_is_the_plain_quadratic_ones_on_random_programs():
    sin = ember.jit(enp.sin).lower(np.ones(1, np.float32)).graph.graph.eqns[0].prim
    rng, moved = np.random.default_rng(0), collections.Counter()
    programs = [_program(sin, *_DONE_MOVED_UP)]
    for _ in range(150):
        n = int(rng.integers(1, 40))  # operands among the last few values: local chains
        programs.append(_program(sin, (4, 16, 64), [
            ("all_reduce" if rng.random() < 0.4 else "sin", int(rng.integers(max(0, k - 3), k + 3)))
            for k in range(n)]))
    for eqns in programs:
        for limit in (0, 40, 200, 300, 459, 600, 10**6):
            got, want = {}, {}
            assert (_schedule_module._place(eqns, limit, got)
                    == _reference_place(eqns, limit, want, moved))
            assert got == want
    assert moved["start"] > 50 and moved["done"] > 50 and moved["earlier done split"], moved


def test_the_bytes_in_flight_tree_finds_what_a_list_finds():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 100):
        tree, plain = _schedule_module._InFlight(n), [0] * n
        for _ in range(60):
            lo, hi = sorted(rng.integers(0, n + 1, 2))
            if rng.random() < 0.5:
                nbytes = int(rng.integers(0, 100))
                tree.add(lo, hi, nbytes)
                plain[lo:hi] = [b + nbytes for b in plain[lo:hi]]
            level = int(rng.integers(-1, 3 * max(plain) + 2))
            above = [k for k in range(lo, hi) if plain[k] > level]
            assert tree.first_above(lo, hi, level) == (above[0] if above else None)
            assert tree.last_above(lo, hi, level) == (above[-1] if above else None)
