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

import functools
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
        if m is not meshes[0] and m != meshes[0]:
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
    positional arguments); a sharded argument laid out otherwise is an error.

    Called on every call of the jitted function, before its cache lookup: the types are
    worked out once per (``in_shardings``, argument structure, argument types), and a call
    only checks that its sharded arguments live on the meshes ``in_shardings`` names (the
    one thing the types cannot say).
    """
    memo = _input_memo(in_shardings)
    last = memo.get(None)  # (tree, avals, answer) of the last call: a loop's next call is
    if last is not None and last[0] is tree and last[1] == avals:  # compared by identity
        known = last[2]
    else:
        known = memo.get((tree, avals))
        if known is None:
            known = memo[(tree, avals)] = _input_types(in_shardings, tree, avals)
        memo[None] = (tree, avals, known)
    out, checks = known
    for i, s in checks:
        leaf = leaves[i]
        if isinstance(leaf, ShardedArray) and leaf._sharding is not s and leaf._sharding != s:
            raise op_error(ShardingError, "jit", f"{_argument_names(tree)[i]} is a sharded "
                           f"array laid out by {leaf.sharding}, but in_shardings asks for {s}: "
                           f"device_put it to that layout, or leave its in_shardings entry None")
    return out


# id(in_shardings) -> (in_shardings, {(tree, avals): input_types' answer, None: the last call's
# (tree, avals, answer)}); the object is kept so that its id is not reused. A jitted function
# holds its in_shardings for good anyway.
_INPUT_MEMOS: dict[int, tuple[Any, dict]] = {}


def _input_memo(in_shardings: Any) -> dict:
    known = _INPUT_MEMOS.get(id(in_shardings))
    if known is None:
        if len(_INPUT_MEMOS) >= 256:  # many short-lived jits: start over rather than grow
            _INPUT_MEMOS.clear()
        known = _INPUT_MEMOS[id(in_shardings)] = (in_shardings, {})
    return known[1]


def _input_types(in_shardings: Any, tree: TreeDef, avals: tuple[ArrayType, ...]
                 ) -> tuple[tuple[ArrayType, ...], list[tuple[int, NamedSharding]]]:
    """The argument types, and the positions (with their sharding) where a sharded array
    must be checked at each call."""
    args, kwargs = tree.children
    given = expand(in_shardings, args, "in_shardings") + [None] * kwargs.num_leaves
    names = None
    out = list(avals)
    checks = []
    for i, (aval, s) in enumerate(zip(avals, given)):
        if s is None:
            continue
        names = names or _argument_names(tree)
        try:
            abstract = s.abstract(aval.ndim)
            abstract.local_shape(aval.shape)
        except ShardingError as e:
            raise op_error(ShardingError, "jit", f"{names[i]} ({aval}) cannot be laid out as "
                           f"{s.spec} over {s.mesh}: {_reason(e)}") from None
        if aval.sharding is not None:  # a sharded array's type: its layout must be s
            checks.append((i, s))
        if aval.sharding != abstract:
            out[i] = aval.update(sharding=abstract)
    return tuple(out), checks


# --- lowering: the partitioned program ------------------------------------------------------------

@dataclass
class ShardedPlan:
    """What ``jit`` keeps for a signature with shardings: the partitioned program, the mesh
    its shardings name (``None``: the mesh of the sharded arguments, at each call) and the
    ``out_shardings`` entry of each result (empty when none was given)."""

    partitioned: Partitioned
    mesh: Mesh | None
    given_out: list[NamedSharding | None] = field(default_factory=list)

    def as_text(self) -> str:
        mesh = ", ".join(f"{n}={s}" for n, s in self.partitioned.mesh)
        return f"# per-device program, mesh ({mesh})\n{self.partitioned.graph}"

    def out_shardings(self, mesh: Mesh, count: int) -> list[NamedSharding]:
        """The layouts of the first ``count`` results over ``mesh``: the user's own
        ``out_shardings`` objects where they say the same (so that the next call's
        ``in_shardings`` check finds them by identity)."""
        out = []
        for j, s in enumerate(self.partitioned.out_shardings[:count]):
            named = NamedSharding.from_abstract(mesh, s)
            given = self.given_out[j] if j < len(self.given_out) else None
            out.append(given if given is not None and given == named else named)
        return out

    def compile(self, lowered: Lowered) -> Compiled:
        backend = get_backend(lowered.backend)
        program = backend.compile(self.partitioned.graph, lowered.donate)
        return Compiled(lowered, program, _Runner(lowered, self, backend, program))


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
    return ShardedPlan(schedule(partition(graph, ins, outs, mesh)), concrete, given)


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


@dataclass(eq=False)
class _Placement:
    """What a call over one concrete mesh needs that no argument's value changes: worked out
    on the first call over that mesh, then reused by every call."""

    mesh: Mesh
    positions: list[int]  # this process's devices (flat mesh positions)
    threads: int  # OpenMP threads per device (0: one device, left as it is)
    # Per argument: each device's block of a plain array (None: replicated, the whole buffer).
    blocks: list[list[tuple[slice, ...]] | None]
    # Per result: its layout and global type, shared by every call's results.
    outputs: list[tuple[NamedSharding, ArrayType]]
    checked: bool = False  # one call's results were validated: the program fixes them


class _Runner:
    """The per-device program as a function of the global argument arrays."""

    def __init__(self, lowered: Lowered, plan: ShardedPlan, backend: Backend,
                 program: Callable[..., list[Any]]) -> None:
        self.name, self.plan, self.backend, self.program = lowered.name, plan, backend, program
        self.hidden = lowered.hidden
        self.out_tree = lowered.out_tree
        self.in_avals = lowered.graph.in_avals  # global types: the arguments, then hidden state
        self.out_avals = lowered.graph.out_avals
        self.n_out = len(self.out_avals) - len(self.hidden)
        self.donated = [i for i, d in enumerate(lowered.donate) if d]
        self.overwrites = getattr(program, "overwrites", ()) if self.donated else ()
        self.placements: list[_Placement] = []  # one per mesh it ran over: rarely more

    def placement(self, leaves: Sequence[Any]) -> _Placement:
        mesh = self.plan.mesh or _mesh_of(leaves, self.name)
        for known in self.placements:  # by identity, then (a mesh built anew) by value
            if known.mesh is mesh:
                return known
        for known in self.placements:
            if known.mesh == mesh:
                return known
        positions = _positions(mesh, self.name)
        blocks = [None if not any(s.dims) else
                  [s.block_slices(a.shape, mesh_coords(s.mesh, p)) for p in positions]
                  for s, a in zip(self.plan.partitioned.in_shardings, self.in_avals)]
        layouts = self.plan.out_shardings(mesh, self.n_out)
        outputs = [(s, ArrayType(a.shape, a.dtype, a.weak, s.abstract(a.ndim)))
                   for s, a in zip(layouts, self.out_avals)]
        threads = threads_per_device(len(positions)) if len(positions) > 1 else 0
        known = _Placement(mesh, positions, threads, blocks, outputs)
        self.placements.append(known)
        return known

    def __call__(self, leaves: list[Any]) -> Any:
        place = self.placement(leaves)
        mesh, n = place.mesh, len(place.positions)
        values = [*leaves, *(s.current() for s in self.hidden)] if self.hidden else leaves
        columns = []
        for i, (x, blocks) in enumerate(zip(values, place.blocks)):
            if isinstance(x, ShardedArray):
                columns.append(_shards_on(x, mesh, i))
            elif blocks is None:
                columns.append([x._buffer] * n)
            else:
                buffer = x._buffer
                columns.append([np.ascontiguousarray(buffer[b]) for b in blocks])
        per_device = [list(c) for c in zip(*columns)] if columns else [[] for _ in range(n)]
        # Donated arrays let go of their buffers, so that each device's is seen only by its
        # list above and the program may write it in place (else ``writable`` copies it).
        del columns
        for i in self.donated:
            _give_up(values[i])
        # A call that fails leaves donated arguments donated: devices that ran may have
        # written their buffers already.
        if n > 1:
            outs = runtime.run_on_devices(
                functools.partial(self.device, per_device, place.threads), n)
        else:
            outs = [self.device(per_device, 0, 0)]
        results = self.results(place, outs)
        for s, j in zip(self.hidden, range(self.n_out, len(self.out_avals))):
            s.set(Array(np.asarray(outs[0][j]), self.out_avals[j], self.backend))
        return results[0] if self.out_tree is LEAF else self.out_tree.unflatten(results)

    def device(self, per_device: list[list[Any]], threads: int, k: int) -> Sequence[Any]:
        """Device ``k``'s run of the program on its blocks."""
        if threads:
            _limit_threads(self.program, threads)
        buffers = per_device[k]
        for i in self.overwrites:
            buffers[i] = self.backend.writable(buffers[i])
        return self.program(*buffers)

    def results(self, place: _Placement, outs: list[Sequence[Any]]) -> list[ShardedArray]:
        """The global results from each device's outputs. The first call's are checked
        (``from_shards``); later calls' come from the same program, so their shapes and
        dtypes are those, and they are taken as they are."""
        by_result = list(zip(*outs))
        if place.checked:
            return [ShardedArray._of(list(b), s, a)
                    for b, (s, a) in zip(by_result, place.outputs)]
        results = [ShardedArray.from_shards(b, s, a.shape, a.weak)
                   for b, (s, a) in zip(by_result, place.outputs)]
        for r, (_, a) in zip(results, place.outputs):
            if r.aval != a:
                raise EmberError(f"ember bug: jit of {self.name} gave a {r.aval} result where "
                                 f"its program says {a}\n  at {user_frame()}")
        # (A backend that hands back NumPy scalars for 0-d results is converted every call.)
        place.checked = all(type(b) is np.ndarray for o in outs for b in o[:self.n_out])
        return results


def _shards_on(x: ShardedArray, mesh: Mesh, i: int) -> list[np.ndarray]:
    """A sharded argument's buffers, checked to live on ``mesh``."""
    buffers = x.local_buffers()
    if x._sharding.mesh is not mesh and x._sharding.mesh != mesh:
        raise op_error(ShardingError, "jit", f"argument leaf {i} lives on "
                       f"{x._sharding.mesh}, but the program runs over {mesh}")
    return buffers


def _give_up(x: Any) -> None:
    """``x`` is donated: it can no longer be used (its buffers now belong to the program)."""
    if isinstance(x, ShardedArray):
        x._donate()
    else:
        x._buffer = None
