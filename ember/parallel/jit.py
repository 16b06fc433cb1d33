"""``jit`` with shardings: the traced global program, partitioned, runs on every device.

``ember.jit`` traces and caches as always (its cache key holds each argument's abstract
sharding). For a signature with shardings (the jit's ``in_shardings``/``out_shardings``, or
sharded arguments) it hands the traced global graph to this module through its sharding hook
(``ember.transforms.jit`` sits below this layer and cannot import it):

1. :func:`input_types` puts the layouts ``in_shardings`` asks for into the argument types, so
   another layout is another cache entry;
2. :func:`lower` partitions the graph (``ember.parallel.partition``): plain arguments are
   replicated, sharded ones keep their layout, results are laid out as ``out_shardings`` says
   or as the partitioner chose;
3. :meth:`ShardedPlan.compile` compiles the per-device graph with the program's backend, once
   per signature, and each call runs it on every local device (one thread per virtual device,
   ``runtime.run_on_devices``, each with its communicator; under ``ember launch`` the process's
   one device) and assembles the results as :class:`ShardedArray` s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ember.backends import Backend, get_backend
from ember.backends.cpu.program import program_threads
from ember.core.array import Array
from ember.errors import EmberError, UnsupportedError, op_error, user_frame
from ember.ir.sharding import Sharding, ShardingError
from ember.ir.types import ArrayType
from ember.parallel import runtime
from ember.parallel.array import ShardedArray
from ember.parallel.collectives import mesh_coords
from ember.parallel.mesh import Mesh
from ember.parallel.partition import Partitioned, partition
from ember.parallel.propagate import layout
from ember.parallel.schedule import schedule
from ember.parallel.sharding import NamedSharding
from ember.transforms.jit import Compiled, Lowered, ShardingHook, register_sharding_hook
from ember.tree import LEAF, TreeDef, tree_flatten

__all__ = ["ShardedPlan", "input_types", "lower"]


# --- shardings given as pytree prefixes ---------------------------------------------------------

def _is_entry(x: Any) -> bool:
    return x is None or isinstance(x, NamedSharding)


def expand(prefix: Any, tree: TreeDef, what: str) -> list[NamedSharding | None]:
    """One entry per leaf of ``tree`` from ``prefix``, a pytree prefix of it whose leaves are
    ``NamedSharding`` or ``None`` (one entry covers the whole subtree it stands at)."""
    if isinstance(prefix, list):
        prefix = tuple(prefix)  # ``in_shardings=[a, b]`` for the argument tuple
    entries, ptree = tree_flatten(prefix, is_leaf=_is_entry)
    for e in entries:
        if not _is_entry(e):
            raise op_error(ShardingError, "jit", f"{what} holds {e!r}: expected "
                           f"ember.parallel.NamedSharding or None (a PartitionSpec needs "
                           f"its mesh: NamedSharding(mesh, spec))")
    out: list[NamedSharding | None] = []
    it = iter(entries)

    def walk(p: TreeDef, t: TreeDef) -> None:
        if p.node is None:
            out.extend([next(it)] * t.num_leaves)
        elif p.node is t.node and p.aux == t.aux and len(p.children) == len(t.children):
            for pc, tc in zip(p.children, t.children):
                walk(pc, tc)
        else:
            raise op_error(ShardingError, "jit", f"{what} has structure {p}, which is not a "
                           f"prefix of the structure {t} it is for")

    walk(ptree, tree)
    return out


def _meshes(*shardings: Any) -> list[Mesh]:
    """The meshes named in these pytrees of shardings."""
    return [s.mesh for tree in shardings if tree is not None
            for s in tree_flatten(tree, is_leaf=_is_entry)[0] if isinstance(s, NamedSharding)]


def _one_mesh(meshes: Sequence[Mesh], what: str) -> Mesh | None:
    for m in meshes[1:]:
        if m != meshes[0]:
            raise op_error(ShardingError, "jit", f"{what} name two meshes, {meshes[0]} and {m}: "
                           f"one program runs over one mesh")
    return meshes[0] if meshes else None


def _argument_names(tree: TreeDef) -> list[str]:
    """For each leaf of ``(args, kwargs)``, the argument it belongs to."""
    args, kwargs = tree.children
    names = []
    for i, child in enumerate(args.children):
        names += [f"argument {i}" + (f" (leaf {j} of {child.num_leaves})"
                                     if child.num_leaves > 1 else "")
                  for j in range(child.num_leaves)]
    return names + [f"keyword argument leaf {j}" for j in range(kwargs.num_leaves)]


def input_types(in_shardings: Any, tree: TreeDef, leaves: list[Any],
                avals: tuple[ArrayType, ...]) -> tuple[ArrayType, ...]:
    """The argument types with the layouts ``in_shardings`` gives them (a prefix of the
    positional arguments); a sharded argument laid out otherwise is an error."""
    args, kwargs = tree.children
    given = expand(in_shardings, args, "in_shardings") + [None] * kwargs.num_leaves
    names = None
    out = list(avals)
    for i, (leaf, aval, s) in enumerate(zip(leaves, avals, given)):
        if s is None:
            continue
        names = names or _argument_names(tree)
        try:
            abstract = s.abstract(aval.ndim)
            abstract.local_shape(aval.shape)
        except ShardingError as e:
            raise op_error(ShardingError, "jit", f"{names[i]} ({aval}) cannot be laid out as "
                           f"{s.spec} over {s.mesh}: {_reason(e)}") from None
        if isinstance(leaf, ShardedArray) and leaf.sharding != s:
            raise op_error(ShardingError, "jit", f"{names[i]} is a sharded array laid out by "
                           f"{leaf.sharding}, but in_shardings asks for {s}: device_put it "
                           f"to that layout, or leave its in_shardings entry None")
        if aval.sharding != abstract:
            out[i] = aval.update(sharding=abstract)
    return tuple(out)


# --- lowering: the partitioned program ------------------------------------------------------------

@dataclass
class ShardedPlan:
    """What ``jit`` keeps for a signature with shardings: the partitioned program, and the
    mesh its shardings name (``None``: the mesh of the sharded arguments, at each call)."""

    partitioned: Partitioned
    mesh: Mesh | None
    # Per concrete mesh: the output layouts as NamedShardings (built once, not per call).
    _out: dict[Mesh, list[NamedSharding]] = field(default_factory=dict)

    def as_text(self) -> str:
        mesh = ", ".join(f"{n}={s}" for n, s in self.partitioned.mesh)
        return f"# per-device program, mesh ({mesh})\n{self.partitioned.graph}"

    def out_shardings(self, mesh: Mesh, count: int) -> list[NamedSharding]:
        known = self._out.get(mesh)
        if known is None:
            known = self._out[mesh] = [NamedSharding.from_abstract(mesh, s)
                                       for s in self.partitioned.out_shardings[:count]]
        return known

    def compile(self, lowered: Lowered) -> Compiled:
        backend = get_backend(lowered.backend)
        program = backend.compile(self.partitioned.graph, lowered.donate)
        return Compiled(lowered, program, _runner(lowered, self, backend, program))


def lower(lowered: Lowered, in_shardings: Any, out_shardings: Any) -> ShardedPlan:
    """Partition ``lowered``'s global graph: inputs as their types say (a plain argument
    replicated), outputs as ``out_shardings`` says (else as the partitioner chooses)."""
    graph = lowered.graph
    concrete = _one_mesh(_meshes(in_shardings, out_shardings), "in_shardings and out_shardings")
    meshes = {a.sharding.mesh for a in graph.in_avals if a.sharding is not None}
    mesh = concrete.abstract if concrete is not None else next(iter(meshes), None)
    if mesh is None:
        raise op_error(ShardingError, "jit", f"{lowered.name}: every in_shardings and "
                       f"out_shardings entry is None and no argument is sharded, so no mesh "
                       f"is named: give a NamedSharding, or leave both out")
    if meshes - {mesh}:
        raise op_error(ShardingError, "jit", f"{lowered.name}: the arguments are laid out over "
                       f"{len(meshes | {mesh})} meshes: one program runs over one mesh")
    replicated = [layout(mesh, ((),) * a.ndim) for a in graph.in_avals]
    ins = [a.sharding or r for a, r in zip(graph.in_avals, replicated)]
    n_out = len(graph.out_avals) - len(lowered.hidden)
    given = ([] if out_shardings is None
             else expand(out_shardings, lowered.out_tree, "out_shardings"))
    outs: list[Sharding | None] = [
        None if s is None else _output_layout(s, a, i)
        for i, (s, a) in enumerate(zip(given or [None] * n_out, graph.out_avals))]
    outs += [layout(mesh, ((),) * a.ndim) for a in graph.out_avals[n_out:]]  # ember.random
    return ShardedPlan(schedule(partition(graph, ins, outs, mesh)), concrete)


def _output_layout(s: NamedSharding, aval: ArrayType, i: int) -> Sharding:
    try:
        return s.abstract(aval.ndim)
    except ShardingError as e:
        raise op_error(ShardingError, "jit", f"out_shardings entry for result {i} ({aval}): "
                       f"{_reason(e)}") from None


def _reason(error: ShardingError) -> str:
    """An error's message without the line it names (ember's own, not the user's)."""
    return str(error).split("\n  at ")[0]


register_sharding_hook(ShardingHook(input_types, lower))


# --- running on every device --------------------------------------------------------------------

def threads_per_device(devices: int) -> int:
    """OpenMP threads each of ``devices`` virtual devices of this process runs its program
    with: the process's count (``EMBER_NUM_THREADS``, else its cores) shared out, so that 8
    devices on 2 cores do not start 16 threads."""
    return max(1, program_threads() // devices)


def _limit_threads(program: Any, threads: int) -> None:
    """Set the calling thread's OpenMP thread count for ``program`` (a program of a backend
    without threads of its own, NumPy's, has nothing to set)."""
    set_threads = getattr(program, "set_threads", None)
    if set_threads is not None:
        set_threads(threads)


def _positions(mesh: Mesh, name: str) -> list[int]:
    """The flat mesh positions of this process's devices: every one (virtual devices, one
    thread each) or, under ``ember launch``, the process's one device."""
    flat = list(mesh.devices.flat)
    positions = [flat.index(d) for d in mesh.local_devices]
    if not positions or (len(positions) > 1 and positions != list(range(len(flat)))):
        raise op_error(UnsupportedError, "jit", f"{name}: this process holds "
                       f"{len(positions)} of the {len(flat)} devices of {mesh}; a sharded "
                       f"program runs on all of one process's devices or on one device per "
                       f"process")
    return positions


def _mesh_of(leaves: Sequence[Any], name: str) -> Mesh:
    meshes = [x.sharding.mesh for x in leaves if isinstance(x, ShardedArray)]
    found = _one_mesh(meshes, f"{name}'s sharded arguments")
    if found is None:
        raise EmberError(f"ember bug: jit of {name} was lowered with shardings but has no "
                         f"mesh\n  at {user_frame()}")
    return found


def _blocks(x: Any, s: Sharding, mesh: Mesh, positions: list[int], what: str) -> list[Any]:
    """Argument ``x``'s block on each device at ``positions``: a sharded array's own buffers,
    else parts of the whole value (the whole buffer itself where the layout replicates)."""
    if isinstance(x, ShardedArray):
        if x.sharding.mesh != mesh:
            raise op_error(ShardingError, "jit", f"{what} lives on {x.sharding.mesh}, but the "
                           f"program runs over {mesh}")
        return x.local_buffers()
    buffer = x._buffer
    if not any(s.dims):
        return [buffer] * len(positions)
    return [np.ascontiguousarray(buffer[s.block_slices(buffer.shape, mesh_coords(s.mesh, p))])
            for p in positions]


def _runner(lowered: Lowered, plan: ShardedPlan, backend: Backend,
            program: Callable[..., list[Any]]) -> Callable[[list[Any]], Any]:
    """The per-device ``program`` as a function of the global argument arrays."""
    part = plan.partitioned
    hidden = lowered.hidden
    out_avals = lowered.graph.out_avals
    n_out = len(out_avals) - len(hidden)
    donated = [i for i, d in enumerate(lowered.donate) if d]
    overwrites = getattr(program, "overwrites", ()) if donated else ()

    def run(leaves: list[Any]) -> Any:
        mesh = plan.mesh or _mesh_of(leaves, lowered.name)
        positions = _positions(mesh, lowered.name)
        values = [*leaves, *(s.current() for s in hidden)]
        columns = [_blocks(x, s, mesh, positions, f"argument leaf {i}")
                   for i, (x, s) in enumerate(zip(values, part.in_shardings))]
        per_device = [[c[k] for c in columns] for k in range(len(positions))]
        # Donated arrays let go of their buffers, so that each device's is seen only by its
        # list below and the program may write it in place (else ``writable`` copies it).
        del columns
        for i in donated:
            _give_up(values[i])
        threads = threads_per_device(len(positions))

        def device(k: int) -> list[Any]:
            if len(positions) > 1:
                _limit_threads(program, threads)
            buffers = per_device[k]
            for i in overwrites:
                buffers[i] = backend.writable(buffers[i])
            return list(program(*buffers))

        # A call that fails leaves donated arguments donated: devices that ran may have
        # written their buffers already.
        outs = (runtime.run_on_devices(device, len(positions)) if len(positions) > 1
                else [device(0)])
        layouts = plan.out_shardings(mesh, n_out)
        results = [ShardedArray.from_shards([o[j] for o in outs], layouts[j], out_avals[j].shape,
                                            out_avals[j].weak) for j in range(n_out)]
        for s, j in zip(hidden, range(n_out, len(out_avals))):
            s.set(Array(np.asarray(outs[0][j]), out_avals[j], backend))
        return results[0] if lowered.out_tree is LEAF else lowered.out_tree.unflatten(results)
    return run


def _give_up(x: Any) -> None:
    """``x`` is donated: it can no longer be used (its buffers now belong to the program)."""
    if isinstance(x, ShardedArray):
        x._donate()
    else:
        x._buffer = None

