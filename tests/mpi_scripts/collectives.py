"""Run under ``ember launch -n N``: every collective of the MPI communicator against NumPy.

Every rank builds every rank's input from one seed, so it can compute the expected result
alone. Reductions must equal a sum in rank order bit for bit, and the in-process (thread)
runtime, run here on the same inputs, must give the same bits: one contract, two runtimes.
Prints one line per rank ending in "ok"; any difference raises (and aborts the job).
"""

import ml_dtypes
import numpy as np

from ember import parallel as P
from ember.parallel import runtime
from ember.parallel.communicator import Communicator


def inputs(n, shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(dtype)
            for _ in range(n)]


def rank_order(arrays, combine=np.add):
    out = arrays[0].copy()
    for a in arrays[1:]:
        out = combine(out, a)
    return out


def same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes(), f"{what}: results differ"


def every_collective(c: Communicator, n: int, i: int) -> list:
    """Run each collective once; return the results (compared with NumPy by the caller)."""
    xs = inputs(n, (2 * n, 3))
    odd = inputs(n, (7,), seed=1)  # 7 elements: all-reduce's chunks are uneven
    halves = inputs(n, (3, 2), ml_dtypes.bfloat16, seed=2)
    started = [c.start_all_reduce(xs[i]), c.start_all_gather(xs[i], 1)]
    return [
        c.all_reduce(odd[i]), c.all_reduce(odd[i], "max"), c.all_reduce(halves[i]),
        c.all_gather(halves[i], 0), c.reduce_scatter(xs[i], 0),
        c.all_to_all(xs[i], 0, 1), c.permute(xs[i], [(r, (r + 1) % n) for r in range(n)]),
        c.permute(xs[i], [(0, n - 1)]), c.broadcast(xs[i], n - 1), c.barrier(),
        c.all_reduce(np.array(i < 1)), *[h.wait() for h in reversed(started)],
    ]


def expected(n: int, i: int) -> list:
    xs = inputs(n, (2 * n, 3))
    odd = inputs(n, (7,), seed=1)
    halves = inputs(n, (3, 2), ml_dtypes.bfloat16, seed=2)
    return [
        rank_order(odd), rank_order(odd, np.maximum), rank_order(halves),
        np.concatenate(halves, 0), np.split(rank_order(xs), n)[i],
        np.concatenate([np.split(x, n, 0)[i] for x in xs], 1), xs[(i - 1) % n],
        xs[0] if i == n - 1 else np.zeros_like(xs[0]), xs[n - 1], None,
        np.array(True), np.concatenate(xs, 1), rank_order(xs),
    ]


def main() -> None:
    c = runtime.world()
    n, i = c.size, c.rank
    assert (runtime.process_count(), runtime.process_index()) == (n, i)
    assert [d.process_index for d in P.devices()] == list(range(n))  # one device a process
    got = every_collective(c, n, i)
    want = expected(n, i)
    threads = runtime.run_on_devices(lambda d: every_collective(runtime.world(), n, d), n)[i]
    for k, (g, w, t) in enumerate(zip(got, want, threads)):
        if w is None:
            assert g is None and t is None
            continue
        same_bits(g, w, f"collective {k}")
        same_bits(g, t, f"collective {k} (MPI against threads)")

    # Groups of a 2 x (n/2) mesh: rows and columns, each reduced and gathered.
    if n % 2 == 0:
        cols = n // 2
        r, k = divmod(i, cols)
        row, column = c.split(r), c.split(k)
        assert (row.rank, row.size, column.rank, column.size) == (k, cols, r, 2)
        xs = inputs(n, (4,), seed=3)
        same_bits(row.all_reduce(xs[i]), rank_order(xs[r * cols:(r + 1) * cols]), "row")
        same_bits(column.all_gather(xs[i]), np.concatenate(xs[k::cols]), "column")
        assert row.members == tuple(range(r * cols, (r + 1) * cols)), row.members
    print(f"rank {i} of {n}: ok", flush=True)


if __name__ == "__main__":
    main()
