"""A lockstep SPMD interpreter: every device of a mesh in one thread, equation by equation.

It runs a per-device program (what :func:`ember.parallel.partition.partition` makes) for all
devices at once: each equation is computed on every device's values with the NumPy backend,
and a collective is computed directly from all the devices' operands (sums in rank order, as
the communicators do). No threads, no communicator, no timeouts: it is the oracle the
partitioner's tests compare against, and a debugging tool (every device's every value can be
looked at after any equation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ember.backends import get_backend
from ember.errors import EmberError, user_frame
from ember.ir.graph import ClosedGraph, Eqn, Literal, Var
from ember.ir.sharding import Sharding
from ember.parallel.collectives import group_color, group_rank, mesh_coords
from ember.parallel.partition import Partitioned
from ember.parallel.rules import CALL_LIKE

__all__ = ["simulate", "run_spmd", "shard", "unshard"]

Mesh = tuple[tuple[str, int], ...]


def simulate(partitioned: Partitioned, *args: Any) -> list[np.ndarray]:
    """Run ``partitioned`` on every device of its mesh from global ``args``; the global outputs.

    Each argument is cut into its devices' blocks by the program's input shardings, and each
    output is assembled from the devices' blocks; devices that hold the same block must agree
    (a disagreement is the partitioner's bug and raises).
    """
    mesh = partitioned.mesh
    if len(args) != len(partitioned.in_shardings):
        raise EmberError(f"simulate: {len(args)} arguments for a program of "
                         f"{len(partitioned.in_shardings)} inputs\n  at {user_frame()}")
    partial = [i for i, s in enumerate(partitioned.in_shardings) if s.partial]
    if partial:
        raise EmberError(f"simulate: inputs {partial} are partial sums, which a global value "
                         f"does not say how to split: use run_spmd with each device's "
                         f"addend\n  at {user_frame()}")
    per_device = [[shard(np.asarray(x), s, d) for x, s in zip(args, partitioned.in_shardings)]
                  for d in range(_count(mesh))]
    outs = run_spmd(partitioned.graph, mesh, per_device)
    shapes = [v.aval.shape for v in partitioned.graph.graph.outvars]
    return [unshard([o[i] for o in outs], s, _global_shape(shapes[i], s), f"output {i}")
            for i, s in enumerate(partitioned.out_shardings)]


def shard(x: np.ndarray, sharding: Sharding, device: int) -> np.ndarray:
    """Device ``device``'s block of the global value ``x``."""
    return x[sharding.block_slices(x.shape, mesh_coords(sharding.mesh, device))]


def unshard(blocks: Sequence[np.ndarray], sharding: Sharding, shape: tuple[int, ...],
            what: str = "a value") -> np.ndarray:
    """The global value of shape ``shape`` from every device's block (in device order)."""
    if sharding.partial:
        raise EmberError(f"simulate: {what} is a partial sum over {sharding.partial}")
    out = np.empty(shape, blocks[0].dtype)
    seen: dict[tuple, int] = {}
    for d, block in enumerate(blocks):
        where = sharding.block_slices(shape, mesh_coords(sharding.mesh, d))
        key = tuple((s.start, s.stop) for s in where)
        if key in seen:
            if not np.array_equal(out[where], block, equal_nan=True):
                raise EmberError(f"simulate: devices {seen[key]} and {d} hold different copies "
                                 f"of {what} (laid out {sharding})")
            continue
        seen[key] = d
        out[where] = block
    return out


def run_spmd(closed: ClosedGraph, mesh: Mesh, args: Sequence[Sequence[Any]],
             watch: Callable[[Eqn, list[list[np.ndarray]]], None] | None = None
             ) -> list[list[np.ndarray]]:
    """Run the per-device program ``closed`` with ``args[device]`` on every device; each
    device's outputs. ``watch(eqn, outs)``, if given, sees every equation's results on every
    device (``outs[device][result]``) as they are computed."""
    graph = closed.graph
    n = _count(mesh)
    coords = [mesh_coords(mesh, d) for d in range(n)]
    envs: list[dict[int, Any]] = [{} for _ in range(n)]
    for d in range(n):
        for v, c in zip(graph.constvars, closed.consts):
            envs[d][v.id] = _host(c)
        for v, x in zip(graph.invars, args[d]):
            envs[d][v.id] = np.asarray(x)

    def read(d: int, a: Var | Literal) -> Any:
        return np.asarray(a.value, a.aval.dtype) if isinstance(a, Literal) else envs[d][a.id]

    backend = get_backend("numpy")
    for eqn in graph.eqns:
        operands = [[read(d, a) for a in eqn.inputs] for d in range(n)]
        if eqn.prim.kind == "collective":
            outs = [[r] for r in _collective(eqn, operands, mesh, coords)]
        elif eqn.prim.name in CALL_LIKE:  # a partitioned body: its collectives span devices
            outs = run_spmd(eqn.params["body"], mesh, operands)
        elif eqn.prim.name == "scan":
            outs = _scan(eqn, operands, mesh)
        elif eqn.prim.name == "cond":
            outs = _cond(eqn, operands, mesh)
        elif eqn.prim.name == "while":
            outs = _while(eqn, operands, mesh)
        else:
            outs = []
            for d in range(n):
                out = backend.run_primitive(eqn.prim, operands[d], eqn.params)
                outs.append(list(out) if eqn.prim.multiple_results else [out])
        for d in range(n):
            for v, o in zip(eqn.outputs, outs[d]):
                envs[d][v.id] = _typed(o, v)
        if watch is not None:
            watch(eqn, [[envs[d][v.id] for v in eqn.outputs] for d in range(n)])
    return [[read(d, a) for a in graph.outvars] for d in range(n)]


def _scan(eqn: Eqn, operands: list[list[np.ndarray]], mesh: Mesh) -> list[list[np.ndarray]]:
    """A scan whose body may hold collectives: every step runs on all devices in lockstep."""
    p = eqn.params
    first, carry = p["num_consts"], p["num_carry"]
    consts = [ops[:first] for ops in operands]
    state = [ops[first:first + carry] for ops in operands]
    xs = [ops[first + carry:] for ops in operands]
    ys: list[list[list[np.ndarray]]] = [[] for _ in operands]
    steps = range(p["length"] - 1, -1, -1) if p["reverse"] else range(p["length"])
    for i in steps:
        outs = run_spmd(p["body"], mesh, [[*c, *s, *(x[i] for x in xd)]
                                          for c, s, xd in zip(consts, state, xs)])
        state = [o[:carry] for o in outs]
        for d, o in enumerate(outs):
            ys[d].append(o[carry:])
    if p["reverse"]:
        ys = [y[::-1] for y in ys]
    stacked = eqn.outputs[carry:]
    return [[*state[d], *(np.stack([step[j] for step in ys[d]]) if ys[d] else
                          np.empty(v.aval.shape, v.aval.dtype) for j, v in enumerate(stacked))]
            for d in range(len(operands))]


def _cond(eqn: Eqn, operands: list[list[np.ndarray]], mesh: Mesh) -> list[list[np.ndarray]]:
    """A cond whose branches may hold collectives: every device takes the same branch."""
    branches = eqn.params["branches"]
    taken = {int(np.clip(ops[0], 0, len(branches) - 1)) for ops in operands}
    if len(taken) > 1:
        raise EmberError(f"simulate: devices take different branches {sorted(taken)} of a cond")
    return run_spmd(branches[taken.pop()], mesh, [ops[1:] for ops in operands])


def _while(eqn: Eqn, operands: list[list[np.ndarray]], mesh: Mesh) -> list[list[np.ndarray]]:
    """A while loop whose test and body may hold collectives, stepped on all devices."""
    p = eqn.params
    tests = [ops[:p["cond_nconsts"]] for ops in operands]
    steps = [ops[p["cond_nconsts"]:p["cond_nconsts"] + p["body_nconsts"]] for ops in operands]
    carry = [ops[p["cond_nconsts"] + p["body_nconsts"]:] for ops in operands]
    while True:
        answers = {bool(o[0]) for o in run_spmd(p["cond"], mesh, [[*t, *c] for t, c in
                                                                 zip(tests, carry)])}
        if len(answers) > 1:
            raise EmberError("simulate: devices disagree on whether a while loop goes on")
        if not answers.pop():
            return carry
        carry = run_spmd(p["body"], mesh, [[*s, *c] for s, c in zip(steps, carry)])


def _collective(eqn: Eqn, operands: list[list[np.ndarray]], mesh: Mesh,
                coords: list[dict[str, int]]) -> list[np.ndarray]:
    """Every device's result of one collective, computed from every device's operand."""
    p = eqn.params
    if eqn.prim.name == "axis_index":
        return [np.int32(c[p["axis"]]) for c in coords]
    axes = p["axes"]
    groups: dict[int, list[int]] = {}
    for d, c in enumerate(coords):
        groups.setdefault(group_color(mesh, axes, c), []).append(d)
    results: list[Any] = [None] * len(coords)
    for members in groups.values():
        members.sort(key=lambda d: group_rank(mesh, axes, coords[d]))
        xs = [operands[d][0] for d in members]
        for rank, d in enumerate(members):
            results[d] = _one(eqn.prim.name, p, xs, rank)
    return results


_COMBINE = {"sum": np.add, "max": np.maximum, "min": np.minimum}


def _one(kind: str, p: dict[str, Any], xs: list[np.ndarray], rank: int) -> np.ndarray:
    """Member ``rank``'s result of collective ``kind`` over the group's operands ``xs``."""
    n = len(xs)
    if kind in ("all_reduce", "reduce_scatter"):
        total = np.array(xs[0], copy=True)
        for x in xs[1:]:  # rank order, as the communicators sum
            _COMBINE[p["op"]](total, x, out=total)
        return total if kind == "all_reduce" else np.split(total, n, axis=p["axis"])[rank]
    if kind == "all_gather":
        return np.concatenate(xs, axis=p["axis"])
    if kind == "all_to_all":
        return np.concatenate([np.split(x, n, axis=p["split_axis"])[rank] for x in xs],
                              axis=p["concat_axis"])
    if kind == "collective_permute":
        source = {dst: src for src, dst in p["pairs"]}.get(rank)
        return np.zeros_like(xs[rank]) if source is None else xs[source].copy()
    raise EmberError(f"ember bug: simulate has no rule for collective {kind!r}")


def _typed(value: Any, var: Var) -> np.ndarray:
    """NumPy may return scalars or widen a dtype: make it the type the graph says."""
    value = np.asarray(value)
    if value.dtype != var.aval.dtype:
        value = value.astype(var.aval.dtype)
    if value.shape != var.aval.shape:
        raise EmberError(f"ember bug: {value.shape} computed for a value of type {var.aval}")
    return value


def _host(value: Any) -> np.ndarray:
    return value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)


def _count(mesh: Mesh) -> int:
    return math.prod(s for _, s in mesh)


def _global_shape(local: tuple[int, ...], sharding: Sharding) -> tuple[int, ...]:
    return tuple(n * sharding.split_count(i) for i, n in enumerate(local))
