"""Run under ``ember launch -n 2``: ``ember.jit`` with shardings, one device per process.

A data-parallel step (the batch split over the processes, the weights replicated) runs its
per-device program in each process, the gradient summed over MPI; a tensor-parallel product
keeps each process's block of the result. Prints one line per process when all holds.
"""

import numpy as np

import ember
import ember.numpy as enp
from ember import parallel as P


def main() -> None:
    n, me = P.process_count(), P.process_index()
    mesh = P.Mesh(P.devices(), ("dp",))
    rows, whole = P.NamedSharding(mesh, P.PartitionSpec("dp")), P.NamedSharding(mesh, ())
    rng = np.random.default_rng(0)  # the same values in every process
    x = rng.standard_normal((4 * n, 3)).astype(np.float32)
    w = rng.standard_normal((3, 2)).astype(np.float32)

    def step(w, x):
        return w - 0.1 * ember.grad(lambda w: enp.sum(enp.tanh(x @ w) ** 2))(w)

    sharded = ember.jit(step, in_shardings=(whole, rows), out_shardings=whole,
                        donate_argnums=0)
    new = sharded(w, x)
    want = ember.jit(step)(w, x)
    (shard,) = new.addressable_shards
    np.testing.assert_allclose(np.asarray(shard.data), np.asarray(want), rtol=1e-5, atol=1e-6)
    collectives = sharded.lower(w, x).explain().collectives
    assert [(c.kind, c.axes) for c in collectives] == [("all_reduce", ("dp",))], collectives
    # a result left split: each process holds its block
    product = ember.jit(lambda x, w: x @ w, in_shardings=(rows, whole))(x, w)
    (block,) = product.addressable_shards
    np.testing.assert_allclose(np.asarray(block.data), (x @ w)[4 * me:4 * me + 4], rtol=1e-5,
                               atol=1e-6)
    print(f"process {me}: jit with shardings ok", flush=True)


if __name__ == "__main__":
    main()
