"""Run under ``ember launch -n 2``: ``shard_map`` with one device per process.

Each process runs the per-device function for its own device, its collectives over MPI; eager
results keep each process's block, jit and grad give every process the global values, and
inside a jit with shardings each process keeps its rows. Prints one line per process when all
holds.
"""

import numpy as np

import ember
import ember.numpy as enp
from ember import parallel as P


def main() -> None:
    n, me = P.process_count(), P.process_index()
    mesh = P.Mesh(P.devices(), ("x",))
    value = np.arange(4.0 * n * 3, dtype=np.float32).reshape(4 * n, 3)
    f = P.shard_map(lambda b: (P.psum(b, "x"), b * P.axis_index("x")), mesh,
                    P.PartitionSpec("x"), (P.PartitionSpec(), P.PartitionSpec("x")))
    total, scaled = f(value)
    want = value.reshape(n, 4, 3).sum(0)
    np.testing.assert_allclose(np.asarray(total), want)  # replicated: whole in every process
    (shard,) = scaled.addressable_shards
    np.testing.assert_array_equal(np.asarray(shard.data), value[4 * me:4 * me + 4] * me)
    jitted = ember.jit(f)(value)
    np.testing.assert_allclose(np.asarray(jitted[0]), want)
    np.testing.assert_allclose(np.asarray(jitted[1]),
                               value * np.repeat(np.arange(n), 4)[:, None])
    g = ember.grad(lambda v: enp.sum(f(v)[0] ** 2))(value)
    np.testing.assert_allclose(np.asarray(g), np.tile(2 * want, (n, 1)))
    # Inside jit with shardings the body runs per process on its rows, with global code around.
    rows = P.NamedSharding(mesh, P.PartitionSpec("x"))
    mixed = ember.jit(lambda v: enp.exp(f(v * 0.5)[1]) + 1.0, in_shardings=rows,
                      out_shardings=rows)
    (block,) = mixed(value).addressable_shards
    assert [c.kind for c in mixed.lower(value).explain().collectives] == ["all_reduce"]  # psum
    np.testing.assert_allclose(np.asarray(block.data),
                               np.exp(value[4 * me:4 * me + 4] * 0.5 * me) + 1.0, rtol=1e-6)
    print(f"process {me}: shard_map ok", flush=True)


if __name__ == "__main__":
    main()
