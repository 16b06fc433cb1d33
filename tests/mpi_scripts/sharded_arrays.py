"""Run under ``ember launch -n 2`` or ``-n 4``: sharded arrays on MPI processes.

Each process is one device. A value split over the mesh of every process holds one part per
process; elementwise operations stay local, other operations run the partitioned per-device
program with its collectives over MPI, resharding moves parts by collectives, ``np.asarray``
refuses a value with parts elsewhere and ``process_allgather`` assembles it in every process
(with no collective when every process holds it whole).
Prints one line per process when all holds.
"""

import numpy as np

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.parallel import runtime


def main() -> None:
    n, me = P.process_count(), P.process_index()
    assert P.device_count() == n and [d.process_index for d in P.local_devices()] == [me]
    mesh = P.Mesh(P.devices(), ("x",))
    value = np.arange(4.0 * n * 3, dtype=np.float32).reshape(4 * n, 3)
    x = P.device_put(value, P.NamedSharding(mesh, P.PartitionSpec("x")))
    (shard,) = x.addressable_shards
    assert shard.device == P.local_devices()[0]
    np.testing.assert_array_equal(np.asarray(shard.data), value[4 * me:4 * me + 4])

    y = x * 2.0 + 1.0  # per shard: nothing moves
    try:
        np.asarray(y)
    except ember.EmberError as e:
        assert "process_allgather" in str(e), e
    else:
        raise AssertionError("np.asarray of a value split over processes must refuse")
    np.testing.assert_array_equal(P.process_allgather(y), value * 2 + 1)

    total = enp.sum(x, axis=0)  # a partial sum per process, then an all-reduce over MPI
    assert total.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(total), value.sum(0))
    rows = enp.sum(x, axis=1)  # stays split
    assert str(rows.aval) == f"f32[{4 * n}]{{x}}"
    np.testing.assert_allclose(P.process_allgather(rows), value.sum(1))

    replicated = P.device_put(value, P.NamedSharding(mesh, P.PartitionSpec()))
    np.testing.assert_array_equal(np.asarray(replicated), value)  # whole in every process
    # Gathering what every process holds whole sends nothing; a part held elsewhere is sent.
    world, grid = runtime.world(), P.Mesh(np.reshape(P.devices(), (2, n // 2)), ("a", "b"))
    halves = P.device_put(value, P.NamedSharding(grid, P.PartitionSpec("a")))
    for array, collectives in ((replicated, 0), (halves, 1)):
        before = world._seq
        np.testing.assert_array_equal(P.process_allgather(array), value)
        assert world._seq - before == collectives, (array.sharding, world._seq - before)

    # Resharding over the mesh moves parts by collectives, never through one process.
    whole = P.device_put(y, P.NamedSharding(mesh, P.PartitionSpec()))  # an all-gather
    np.testing.assert_array_equal(np.asarray(whole), value * 2 + 1)
    again = P.device_put(whole, x.sharding)  # each process keeps its block
    np.testing.assert_array_equal(np.asarray(again.addressable_shards[0].data),
                                  (value * 2 + 1)[4 * me:4 * me + 4])
    square = np.arange(4.0 * n * n, dtype=np.float32).reshape(2 * n, 2 * n)
    by_rows = P.device_put(square, P.NamedSharding(mesh, P.PartitionSpec("x")))
    by_cols = P.device_put(by_rows, P.NamedSharding(mesh, P.PartitionSpec(None, "x")))
    np.testing.assert_array_equal(np.asarray(by_cols.addressable_shards[0].data),
                                  square[:, 2 * me:2 * me + 2])
    print(f"process {me}: sharded arrays ok", flush=True)


if __name__ == "__main__":
    main()
