"""Run under ``ember launch -n 4``: the collective primitives of per-device programs over MPI.

Each process is one device of a 2 x 2 mesh (dp, tp). Every collective primitive, eager and
inside a program compiled by the CPU backend, must give on each process what the lockstep
simulator computes for that device from every device's input (the simulator runs here, in
each process, on inputs all processes build from one seed).
"""

import numpy as np

import ember
import ember.numpy as enp
from ember.parallel import collectives as coll
from ember.parallel import runtime
from ember.parallel.simulate import run_spmd

MESH = (("dp", 2), ("tp", 2))
PROGRAMS = {
    "all_reduce": lambda x: coll.all_reduce(x, "tp", MESH, "max"),
    "all_gather": lambda x: coll.all_gather(x, ("tp", "dp"), MESH, 1),
    "reduce_scatter": lambda x: coll.reduce_scatter(x, "dp", MESH, 0),
    "all_to_all": lambda x: coll.all_to_all(x, ("dp", "tp"), MESH, 0, 1),
    "collective_permute": lambda x: coll.collective_permute(x, "tp", MESH, [(0, 1)]),
    "axis_index": lambda x: x * enp.asarray(coll.axis_index("dp", MESH)).astype(x.dtype),
    "compiled": lambda x: coll.all_reduce(enp.exp(x) * 2.0, ("dp", "tp"), MESH) + 1.0,
}


def main() -> None:
    device = runtime.process_index()
    assert runtime.process_count() == 4
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
    for name, fn in PROGRAMS.items():
        graph = ember.jit(fn).lower(xs[0]).graph
        want = run_spmd(graph, MESH, [[x] for x in xs])[device][0]
        if name == "compiled":
            got = np.asarray(ember.jit(fn, backend="cpu")(xs[device]))
            np.testing.assert_allclose(got, want, rtol=1e-6)
        else:
            got = np.asarray(fn(enp.asarray(xs[device])))
            np.testing.assert_array_equal(got, want, err_msg=name)
    print(f"process {device}: ok", flush=True)


if __name__ == "__main__":
    main()
