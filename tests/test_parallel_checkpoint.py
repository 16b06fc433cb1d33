"""Sharded checkpoints (``ember.parallel.checkpoint``): saved on one mesh, loaded on any other.

Values are compared with the NumPy arrays saved, shard by shard (each device's buffer against
the global value at its index) and whole. Saving is killed at each step of its commit in a child
process to check that the previous checkpoint survives; corrupt and mismatched checkpoints must
be clear errors naming the file and the leaf. The MPI tests save and load with other process
counts under ``ember launch`` (skipped where MPI is missing, except in CI).
"""

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest

import ember
from ember import parallel as P
from ember.errors import EmberError
from ember.parallel import checkpoint
from ember.parallel.checkpoint import CheckpointError

DEVICES = P.devices()  # eight virtual devices (conftest)
SCRIPTS = pathlib.Path(__file__).parent / "mpi_scripts"


def sharding(shape, names, *spec):
    mesh = P.Mesh(DEVICES[:math.prod(shape)], names, shape)
    return P.NamedSharding(mesh, P.PartitionSpec(*spec))


def value(shape, dtype=np.float32, seed=0):
    out = (np.arange(math.prod(shape)) * 0.37 - 5 + seed).reshape(shape)
    return (out * 4).astype(dtype) if np.dtype(dtype).kind == "i" else out.astype(dtype)


def check(got, want, layout):
    """``got`` holds ``want`` laid out by ``layout`` (None: a plain array)."""
    if layout is None:
        assert type(got) is ember.Array
    else:
        assert got.sharding == layout
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    got = np.asarray(got)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


ONE_D = [((n,), ("x",), spec) for n in (1, 2, 4, 8)
         for spec in ((), ("x",), (None, "x"), ("x", None))]
TWO_D = [(shape, ("a", "b"), spec) for shape in ((2, 2), (2, 4), (4, 2))
         for spec in (("a", "b"), ("b", "a"), (("a", "b"),), (None, ("b", "a")), ("a",),
                      (None, "b"), ())]


@pytest.mark.parametrize("shape,names,spec", ONE_D + TWO_D)
def test_every_layout_round_trips(tmp_path, shape, names, spec):
    layout = sharding(shape, names, *spec)
    want = value((8, 16))
    checkpoint.save(tmp_path / "ck", {"w": P.device_put(want, layout)})
    check(checkpoint.load(tmp_path / "ck", {"w": layout})["w"], want, layout)


SAVED = [((4,), ("x",), ("x",)), ((4,), ("x",), (None, "x")), ((2, 2), ("a", "b"), ("a", "b")),
         ((2, 2), ("a", "b"), (None, ("a", "b"))), ((2,), ("x",), ("x",)), ((1,), ("x",), ())]
LOADED = [((1,), ("x",), ()), ((2,), ("x",), ("x",)), ((2,), ("x",), (None, "x")),
          ((2, 2), ("a", "b"), ("b", "a")), ((4,), ("x",), ("x",)),
          ((8,), ("x",), (None, "x")), ((2, 4), ("a", "b"), ("a", "b")), None]


@pytest.mark.parametrize("saved", SAVED, ids=str)
@pytest.mark.parametrize("loaded", LOADED, ids=str)
def test_loading_reshards_onto_another_mesh(tmp_path, saved, loaded):
    """4 devices -> 2, 1, 2 x 2, 8 and a plain array, and 2 or 1 device -> 4, 2 x 2, 8."""
    want = value((8, 16), seed=1)
    checkpoint.save(tmp_path / "ck", {"w": P.device_put(want, sharding(*saved[:2], *saved[2]))})
    layout = None if loaded is None else sharding(*loaded[:2], *loaded[2])
    check(checkpoint.load(tmp_path / "ck", {"w": layout})["w"], want, layout)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32, np.float16,
                                   np.bool_])
def test_dtypes_are_kept_bit_for_bit(tmp_path, dtype):
    want = value((4, 8), dtype)
    checkpoint.save(tmp_path / "ck", [P.device_put(want, sharding((2, 2), ("a", "b"), "a", "b"))])
    layout = sharding((2,), ("x",), None, "x")
    check(checkpoint.load(tmp_path / "ck", [layout])[0], want, layout)


def test_a_tree_of_sharded_and_plain_leaves_keeps_its_structure(tmp_path):
    layout = sharding((4,), ("x",), "x")
    tree = {"params": {"w": P.device_put(value((8, 2)), layout), "b": value((3,))},
            "opt": (ember.numpy.asarray(value((8,), seed=2)), [np.int32(7)]),
            "empty": P.device_put(np.zeros((0, 4), np.float32), sharding((2,), ("x",), None, "x"))}
    checkpoint.save(tmp_path / "ck", tree)
    layout_file = json.loads((tmp_path / "ck" / checkpoint.LAYOUT_FILE).read_text())
    assert [leaf["path"] for leaf in layout_file["leaves"]] == [
        "empty", "opt.0", "opt.1.0", "params.b", "params.w"]
    assert layout_file["leaves"][-1]["spec"] == ["x"]
    assert layout_file["leaves"][-1]["mesh"] == {"axis_names": ["x"], "shape": [4]}
    new = sharding((2,), ("x",), "x")
    out = checkpoint.load(tmp_path / "ck", {"params": {"w": new, "b": None},
                                            "opt": (new, [None]), "empty": None})
    check(out["params"]["w"], value((8, 2)), new)
    check(out["params"]["b"], value((3,)), None)
    check(out["opt"][0], value((8,), seed=2), new)
    check(out["opt"][1][0], np.asarray(np.int32(7)), None)
    check(out["empty"], np.zeros((0, 4), np.float32), None)


def test_a_copied_block_is_written_once_and_each_device_reads_only_what_overlaps(
        tmp_path, monkeypatch):
    # Split over "a", copied over "b": 2 distinct blocks of the 4 devices' parts.
    want = value((8, 4))
    checkpoint.save(tmp_path / "ck", {"w": P.device_put(want, sharding((2, 2), ("a", "b"),
                                                                       "a"))})
    layout = json.loads((tmp_path / "ck" / checkpoint.LAYOUT_FILE).read_text())
    assert [b["index"] for b in layout["leaves"][0]["blocks"]] == [[[0, 4], [0, 4]],
                                                                   [[4, 8], [0, 4]]]
    reads = []
    region = []
    read_region, tensor = checkpoint._read_region, checkpoint._Files.tensor

    def reading(leaf, ranges, files):
        region[:] = [ranges]
        return read_region(leaf, ranges, files)

    def opening(self, block, leaf):
        reads.append((region[0], block.ranges))
        return tensor(self, block, leaf)

    monkeypatch.setattr(checkpoint, "_read_region", reading)
    monkeypatch.setattr(checkpoint._Files, "tensor", opening)
    layout = sharding((4,), ("x",), "x")  # rows 0:2, 2:4 from the first block, 4:6, 6:8...
    check(checkpoint.load(tmp_path / "ck", {"w": layout})["w"], want, layout)
    assert reads == [(((0, 2), (0, 4)), ((0, 4), (0, 4))), (((2, 4), (0, 4)), ((0, 4), (0, 4))),
                     (((4, 6), (0, 4)), ((4, 8), (0, 4))), (((6, 8), (0, 4)), ((4, 8), (0, 4)))]


def test_saving_over_a_checkpoint_needs_overwrite(tmp_path):
    layout = sharding((2,), ("x",), "x")
    checkpoint.save(tmp_path / "ck", {"w": P.device_put(value((4,)), layout)})
    with pytest.raises(CheckpointError, match=r"checkpoint.save: .*ck exists; pass "
                                              r"overwrite=True") as e:
        checkpoint.save(tmp_path / "ck", {"w": P.device_put(value((4,), seed=1), layout)})
    assert "test_parallel_checkpoint.py" in str(e.value)  # the user's line
    checkpoint.save(tmp_path / "ck", {"w": P.device_put(value((4,), seed=2), layout)},
                    overwrite=True)
    check(checkpoint.load(tmp_path / "ck", {"w": layout})["w"], value((4,), seed=2), layout)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no staging or previous copy left


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_litter(tmp_path):
    checkpoint.save(tmp_path / "ck", {"w": value((4,))})
    with pytest.raises(EmberError, match="complex64"):
        checkpoint.save(tmp_path / "ck", {"w": value((4,)).astype(np.complex64)},
                        overwrite=True)
    with pytest.raises(CheckpointError, match="leaf 'w' is a traced value"):
        ember.jit(lambda x: checkpoint.save(tmp_path / "ck2", {"w": x}))(value((4,)))
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    check(checkpoint.load(tmp_path / "ck", {"w": None})["w"], value((4,)), None)


# --- a save killed midway ---------------------------------------------------------------------

# Each case lets the child die (os._exit: no clean-up runs, as under SIGKILL) right after one
# step of the commit; ``survivor`` is the checkpoint a load must then find.
KILLS = {
    "blocks written": ("checkpoint.safetensors", "save", 1),
    "layout written": ("checkpoint", "write_text_atomic", 1),
    "old moved aside": ("checkpoint.os", "rename", 1),
    "new moved in": ("checkpoint", "_fsync_directory", 2),
}
CHILD = """
import os, sys
import numpy as np
from ember import parallel as P
from ember.parallel import checkpoint

path, owner, name, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
layout = P.NamedSharding(P.Mesh(P.devices()[:4], ("x",)), P.PartitionSpec("x"))
def tree(seed):
    return {"w": P.device_put(np.arange(16, dtype=np.float32) + seed, layout),
            "b": np.full(3, seed, np.int32)}
checkpoint.save(path, tree(0))
if name == "loop":  # save new values until killed from outside
    while True:
        seed += 1
        checkpoint.save(path, tree(seed), overwrite=True)
        print(seed, flush=True)
target = eval(owner, {"checkpoint": checkpoint})
real = getattr(target, name)
def dying(*args, **kwargs):
    real(*args, **kwargs)
    os._exit(17)
setattr(target, name, dying)
checkpoint.save(path, tree(seed), overwrite=True)
"""


def child(*args):
    env = {**os.environ, "EMBER_CPU_DEVICES": "4"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load_small(path):
    layout = sharding((2,), ("x",), "x")
    tree = checkpoint.load(path, {"w": layout, "b": None})
    w, b = np.asarray(tree["w"]), np.asarray(tree["b"])
    seed = int(b[0])
    np.testing.assert_array_equal(w, np.arange(16, dtype=np.float32) + seed)
    np.testing.assert_array_equal(b, np.full(3, seed, np.int32))
    return seed


@pytest.mark.parametrize("step", sorted(KILLS))
def test_a_save_killed_midway_leaves_a_complete_checkpoint(tmp_path, step):
    owner, name, survivor = KILLS[step]
    proc = child(tmp_path / "ck", owner, name, 2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 17, err
    assert load_small(tmp_path / "ck") == (0 if survivor == 1 else 2)
    # The next save (another job) recovers and cleans up whatever the dead one left.
    layout = sharding((4,), ("x",), "x")
    checkpoint.save(tmp_path / "ck", {"w": P.device_put(np.arange(16, dtype=np.float32) + 5,
                                                        layout), "b": np.full(3, 5, np.int32)},
                    overwrite=True)
    assert load_small(tmp_path / "ck") == 5
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_save_killed_at_any_moment_leaves_a_complete_checkpoint(tmp_path):
    proc = child(tmp_path / "ck", "checkpoint", "loop", 0)
    seen = proc.stdout.readline()  # two saves done: the kill lands in the middle of a later one
    assert seen, proc.stderr.read()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert load_small(tmp_path / "ck") >= int(seen)


# --- corrupt, incomplete and mismatched checkpoints --------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of two leaves: w (8 x 4, split in 4 blocks) and b (plain)."""
    layout = sharding((4,), ("x",), "x")
    checkpoint.save(tmp_path / "ck", {"w": P.device_put(value((8, 4)), layout),
                                      "b": value((3,))})
    return tmp_path / "ck"


def edit_layout(path, edit):
    layout = json.loads((path / checkpoint.LAYOUT_FILE).read_text())
    edit({leaf["path"]: leaf for leaf in layout["leaves"]})
    (path / checkpoint.LAYOUT_FILE).write_text(json.dumps(layout))


LOAD_AS = {"w": sharding((2,), ("x",), "x"), "b": None}

CORRUPTIONS = {
    "no layout": (lambda p: (p / "layout.json").unlink(), r"holds no layout.json"),
    "layout not json": (lambda p: (p / "layout.json").write_text("{"),
                        r"layout.json: cannot read it as JSON"),
    "other version": (lambda p: (p / "layout.json").write_text(
        json.dumps({"format": checkpoint.FORMAT, "version": 99})), r"version 1, got .* 99"),
    "block dropped": (lambda p: edit_layout(p, lambda leaves: leaves["w"]["blocks"].pop()),
                      r"leaf 'w': its blocks leave \[6, 8\) of dimension 0 uncovered"),
    "blocks overlap": (lambda p: edit_layout(
        p, lambda leaves: leaves["w"]["blocks"][1].update(index=[[1, 3], [0, 4]])),
        r"leaf 'w': its blocks overlap in dimension 0 \(\[1, 3\) starts before 2\)"),
    "block twice": (lambda p: edit_layout(
        p, lambda leaves: leaves["w"]["blocks"].append(leaves["w"]["blocks"][0])),
        r"leaf 'w': a block is stored twice"),
    "block outside": (lambda p: edit_layout(
        p, lambda leaves: leaves["w"]["blocks"][3].update(index=[[6, 9], [0, 4]])),
        r"leaf 'w': block 'w@6:8,0:4' lies outside its shape \[8, 4\]"),
    "malformed leaf": (lambda p: edit_layout(p, lambda leaves: leaves["b"].pop("shape")),
                       r"leaf 'b' is malformed \(KeyError"),
    "file missing": (lambda p: (p / "process-0.safetensors").unlink(),
                     r"leaf '[bw]': .*process-0.safetensors is missing"),
    "file truncated": (lambda p: os.truncate(p / "process-0.safetensors", 200),
                       r"leaf '[bw]': .*process-0.safetensors: corrupt or truncated"),
    "tensor missing": (lambda p: edit_layout(
        p, lambda leaves: leaves["w"]["blocks"][0].update(tensor="w@9")),
        r"leaf 'w': .*process-0.safetensors has no tensor 'w@9'"),
    "tensor of another shape": (lambda p: edit_layout(
        p, lambda leaves: leaves["w"]["blocks"][0].update(tensor="b@0:3")),
        r"leaf 'w': .*tensor 'b@0:3' is float32\[3\], the layout says float32\[2, 4\]"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_an_error_naming_the_file_and_the_leaf(saved, case):
    corrupt, message = CORRUPTIONS[case]
    corrupt(saved)
    with pytest.raises(CheckpointError, match=r"checkpoint.load: .*" + message) as e:
        checkpoint.load(saved, LOAD_AS)
    assert "test_parallel_checkpoint.py" in str(e.value)


def test_a_grid_missing_one_block_is_an_error(tmp_path):
    layout = sharding((2, 2), ("a", "b"), "a", "b")
    checkpoint.save(tmp_path / "ck", {"w": P.device_put(value((4, 4)), layout)})
    edit_layout(tmp_path / "ck", lambda leaves: leaves["w"]["blocks"].pop(1))
    with pytest.raises(CheckpointError, match=r"leaf 'w': its blocks do not cover its shape "
                                              r"\[4, 4\] \(3 blocks where the grid has 4\)"):
        checkpoint.load(tmp_path / "ck", {"w": layout})


def test_a_mismatched_request_is_an_error_naming_the_leaves(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: 'v'; in the checkpoint "
                                              r"but not asked for: 'w'"):
        checkpoint.load(saved, {"v": LOAD_AS["w"], "b": None})
    # None is an empty subtree too (an optimizer's unused slot): where nothing is saved, it stays
    assert checkpoint.load(saved, {**LOAD_AS, "unused": None})["unused"] is None
    with pytest.raises(CheckpointError, match=r"leaf 'w': .*\(8, 4\) cannot be laid out as "
                                              r"PartitionSpec\(None, 'x'\)"):
        checkpoint.load(saved, {"w": sharding((8,), ("x",), None, "x"), "b": None})
    with pytest.raises(CheckpointError, match=r"leaf 'w' is a str; expected"):
        checkpoint.load(saved, {"w": "x", "b": None})
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory"):
        checkpoint.load(tmp_path / "nothing", LOAD_AS)
    with pytest.raises(CheckpointError, match=r"several leaves are named 'a.b'"):
        checkpoint.save(tmp_path / "dots", {"a": {"b": 1.0}, "a.b": 2.0})


# --- several processes (ember launch) ---------------------------------------------------------


@pytest.fixture
def launch_checkpoint(ember_launch):
    """``launch_checkpoint(n, *args)``: ``checkpoint.py args`` as ``n`` MPI processes (they must
    succeed): their output."""
    def run(n, *args):
        status, out, _ = ember_launch(n, "checkpoint.py", *args, timeout=60)
        assert status == 0, out
        return out
    return run


@pytest.mark.parametrize("saving,loading", [(4, (2, 1)), (2, (4,)), (1, (4,))])
def test_a_checkpoint_saved_by_some_processes_loads_on_others(tmp_path, launch_checkpoint, saving,
                                                              loading):
    output = launch_checkpoint(saving, "save", tmp_path / "ck")
    assert all(f"process {i} of {saving}: saved" in output for i in range(saving)), output
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["layout.json", *[f"process-{i}.safetensors" for i in range(saving)]]
    for n in loading:
        output = launch_checkpoint(n, "load", tmp_path / "ck")
        assert all(f"process {i} of {n}: loaded ok" in output for i in range(n)), output


def test_a_process_that_cannot_read_its_shards_stops_every_process(tmp_path, launch_checkpoint):
    """Process 1's file is truncated: process 0, which reads only its own file (its shards
    overlap only its blocks), must stop too, naming process 1."""
    launch_checkpoint(2, "save", tmp_path / "ck")
    os.truncate(tmp_path / "ck" / "process-1.safetensors", 100)
    output = launch_checkpoint(2, "refuse", tmp_path / "ck")
    assert re.search(r"process 1 of 2 refused: checkpoint.load: leaf '\w+': .*process-1"
                     r".safetensors: corrupt or truncated", output), output
    assert re.search(r"process 0 of 2 refused: checkpoint.load: process\(es\) 1 could not read "
                     r"its shards", output), output
