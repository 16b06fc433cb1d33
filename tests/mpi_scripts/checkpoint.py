"""Run under ``ember launch -n N``: ``checkpoint.py save|load|refuse DIR``.

``save`` lays the same tree out over a mesh of every process (2-D on 4 processes) and saves
it; ``load`` reads it back laid out over a mesh of this job's processes, whatever the job that
saved it, and checks every process's parts and the gathered values against the ones saved.
``refuse`` expects the load to fail (a damaged checkpoint) and prints each process's error.
Prints one line per process when all holds.
"""

import sys

import ml_dtypes
import numpy as np

from ember import parallel as P
from ember.parallel import checkpoint


def values() -> dict[str, np.ndarray]:
    """The saved tree, the same whatever the process count."""
    return {"w": (np.arange(96, dtype=np.float32).reshape(8, 12) * 0.25 - 3.0),
            "e": np.linspace(-2, 2, 32, dtype=np.float32).reshape(8, 4).astype(ml_dtypes.bfloat16),
            "c": np.arange(48, dtype=np.int32).reshape(6, 8) - 20,
            "r": np.arange(5, dtype=np.float32) / 7,
            "s": np.int32(11)}


def layouts(n: int) -> dict[str, P.NamedSharding | None]:
    """How a job of ``n`` processes lays each leaf out (2-D mesh on 4 processes)."""
    if n == 4:
        mesh = P.Mesh(P.devices(), ("a", "b"), (2, 2))
        specs = {"w": P.PartitionSpec("a", "b"), "e": P.PartitionSpec(("a", "b")),
                 "c": P.PartitionSpec(None, ("b", "a")), "r": P.PartitionSpec()}
    else:
        mesh = P.Mesh(P.devices(), ("x",))
        specs = {"w": P.PartitionSpec(None, "x"), "e": P.PartitionSpec("x"),
                 "c": P.PartitionSpec("x"), "r": P.PartitionSpec()}
    return {**{k: P.NamedSharding(mesh, s) for k, s in specs.items()}, "s": None}


def main() -> None:
    mode, path = sys.argv[1:3]
    n, me = P.process_count(), P.process_index()
    expected, shardings = values(), layouts(n)
    if mode == "save":
        tree = {k: v if shardings[k] is None else P.device_put(v, shardings[k])
                for k, v in expected.items()}
        checkpoint.save(path, tree)
        print(f"process {me} of {n}: saved", flush=True)
        return
    if mode == "refuse":
        try:
            checkpoint.load(path, shardings)
        except checkpoint.CheckpointError as e:
            print(f"process {me} of {n} refused: {e}", flush=True)
            return
        raise AssertionError("the load of a damaged checkpoint must fail in every process")
    tree = checkpoint.load(path, shardings)
    for name, want in expected.items():
        got = tree[name]
        if shardings[name] is None:
            assert not isinstance(got, P.ShardedArray)
        else:
            assert got.sharding == shardings[name], (name, got.sharding)
            for shard in got.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
        gathered = P.process_allgather(got)
        assert gathered.dtype == want.dtype, (name, gathered.dtype)
        np.testing.assert_array_equal(gathered, want)
    print(f"process {me} of {n}: loaded ok", flush=True)


if __name__ == "__main__":
    main()
