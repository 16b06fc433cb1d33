"""Eager operations on sharded arrays: per shard, else partitioned, else gathered.

``ember.core.trace.eval_primitive`` hands every primitive with a :class:`ShardedArray` operand
here. An elementwise primitive whose operands share one layout runs once per device on that
device's parts and keeps the layout: no data moves. Any other primitive is compiled alone, as
JAX does: a one-equation graph goes through the SPMD partitioner (propagation picks the result's
layout) and its per-device program runs on every device of the mesh in lockstep, collectives
included; under ``ember launch`` (one device per process, a mesh of every process) each
process runs it for its own device, its collectives over MPI. When that program gathers data
(an ``all_gather`` or ``all_to_all``, or a primitive with no sharding rule, replicated), a
:class:`ShardingGatherWarning` says which collectives, on which mesh axes, and the user's line.
Operands on several meshes, or a mesh of only some processes, are gathered instead (which needs
every part in this process).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember.backends import get_backend
from ember.core import trace
from ember.core.array import Array
from ember.core.primitive import Primitive
from ember.core.trace import abstract_eval, aval_of, eval_primitive, make_graph
from ember.ir.params import param_key
from ember.ir.sharding import Sharding
from ember.ir.types import ArrayType
from ember.ops.structural import copy_p
from ember.parallel.array import (
    ShardedArray,
    device_put,
    place,
    sharding_constraint_p,
    warn_gather,
)
from ember.parallel.mesh import Mesh, process_count
from ember.parallel.partition import Partitioned, partition
from ember.parallel.sharding import NamedSharding, PartitionSpec
from ember.parallel.simulate import run_spmd

__all__ = ["run", "reshard"]


def run(prim: Primitive, args: Sequence[Any], params: dict[str, Any]) -> Any:
    """Evaluate ``prim`` on ``args``, some of them sharded (the eval trace's hook)."""
    if prim is sharding_constraint_p:
        return _constrain(args[0], params["sharding"])
    if prim.kind == "elementwise":
        layout = _common_layout(args)
        if layout is not None:
            return _per_shard(prim, args, params, layout)
    meshes = {a.sharding.mesh for a in args if isinstance(a, ShardedArray)}
    if len(meshes) == 1:
        mesh = meshes.pop()
        if _runs_per_device(mesh):
            return _partitioned(prim, args, params, mesh)
    return _gathered(prim, args, params)


def reshard(x: ShardedArray, sharding: NamedSharding) -> ShardedArray:
    """``x`` laid out by ``sharding`` over the same mesh: its parts move by the collectives the
    partitioner picks, so no process needs the whole value."""
    mesh = x.sharding.mesh
    if not _runs_per_device(mesh):
        return place(x.assemble("device_put"), sharding, x.weak_type)
    return _partitioned(copy_p, [x], {}, mesh, sharding.abstract(x.ndim))


def _runs_per_device(mesh: Mesh) -> bool:
    return len(mesh.local_devices) == mesh.size or _one_device_per_process(mesh)


def _one_device_per_process(mesh: Mesh) -> bool:
    """Whether ``mesh`` holds the device of every process, in process order: then each process
    runs the per-device program for its own device, its collectives over the job's
    communicator (every process runs the same eager operations: SPMD)."""
    return [d.process_index for d in mesh.devices.flat] == list(range(process_count()))


def _common_layout(args: Sequence[Any]) -> NamedSharding | None:
    """The one layout every operand can be read in without moving data, or None.

    Operands split alike share it; replicated ones (a sharded array replicated over the same
    mesh, or an unsharded array, which every device of this process can read) are sliced.
    """
    split = {a.sharding for a in args
             if isinstance(a, ShardedArray) and not a.sharding.is_fully_replicated}
    meshes = {a.sharding.mesh for a in args if isinstance(a, ShardedArray)}
    if len(split) > 1 or len(meshes) > 1:
        return None
    if split:
        return split.pop()
    return NamedSharding(meshes.pop(), PartitionSpec())


def _per_shard(prim: Primitive, args: Sequence[Any], params: dict[str, Any],
               layout: NamedSharding) -> Any:
    out_aval = abstract_eval(prim, [aval_of(a) for a in args], params)
    avals = out_aval if prim.multiple_results else [out_aval]
    shape = avals[0].shape  # elementwise: every operand and result has it
    devices = layout.mesh.local_devices
    indices = layout.indices(shape)
    per_device = [[_part(a, i, indices[d], layout) for a in args] for i, d in enumerate(devices)]
    results = [eval_primitive(prim, local, params) for local in per_device]
    if not prim.multiple_results:
        results = [[r] for r in results]
    outs = [ShardedArray.from_shards([r[k]._buffer for r in results], layout, shape, aval.weak)
            for k, aval in enumerate(avals)]
    return outs if prim.multiple_results else outs[0]


def _part(a: Any, i: int, index: tuple[slice, ...], layout: NamedSharding) -> Any:
    """Operand ``a``'s part on the ``i``-th local device of ``layout``."""
    if isinstance(a, ShardedArray):
        buf = a.local_buffers()[i]
        if a.sharding != layout:  # replicated: this device holds the whole value
            buf = buf[index]
        return Array(buf, ArrayType(buf.shape, a.dtype, a.weak_type))
    if isinstance(a, Array) or np.ndim(a) != 0:
        a = trace.to_array(a)
        host = a.to_numpy()[index]
        return Array(host, ArrayType(host.shape, a.dtype, a.weak_type))
    return a  # a scalar: every device reads it whole


# One-primitive programs already partitioned, by primitive, params, operand types and layouts
# (and the result's layout, for a reshard).
_PROGRAMS: dict[tuple, Partitioned] = {}
_PROGRAMS_SIZE = 512  # emptied when full
_GATHERS = frozenset({"all_gather", "all_to_all"})


def _partitioned(prim: Primitive, args: Sequence[Any], params: dict[str, Any], mesh: Mesh,
                 result_layout: Sharding | None = None) -> Any:
    """Run ``prim`` as a partitioned one-equation program on every device of ``mesh``; its
    result laid out as ``result_layout`` asks (a reshard), else as propagation decides."""
    avals = [aval_of(a).update(sharding=None) for a in args]
    out_aval = abstract_eval(prim, avals, params)  # the user's mistakes are reported here
    layouts = [a.sharding.abstract(a.ndim) if isinstance(a, ShardedArray)
               else Sharding.replicated(mesh.abstract, av.ndim) for a, av in zip(args, avals)]
    program = _program(prim, params, avals, layouts, result_layout, mesh)
    gathers = [c for c in program.explanation.collectives if c.kind in _GATHERS]
    if result_layout is None and (gathers or program.explanation.replicated):
        steps = [f"{c.kind}[{','.join(c.axes)}] {c.nbytes} B/device ({c.reason} "
                 f"{c.layouts})" for c in gathers]
        steps += [f"{name} {why}" for name, why, _ in program.explanation.replicated]
        warn_gather(f"{prim.name}: operands laid out by "
                    f"{', '.join(str(s) for s in layouts)} over {mesh} had to be gathered: "
                    f"{'; '.join(steps)}")
    # Each local device reads its part of a sharded operand, all of another.
    local = len(mesh.local_devices)
    parts = [a.local_buffers() if isinstance(a, ShardedArray)
             else [trace.to_array(a).to_numpy()] * local for a in args]
    per_device = [list(p) for p in zip(*parts)]
    if local == mesh.size:  # every device here: all of them in lockstep
        outs = run_spmd(program.graph, mesh.abstract, per_device)
    else:  # this process's one device; its peers run the same program
        outs = [_compiled(program)(*per_device[0])]
    results = [ShardedArray.from_shards([o[k] for o in outs],
                                        NamedSharding.from_abstract(mesh, layout), aval.shape,
                                        aval.weak)
               for k, (aval, layout) in enumerate(zip(
                   out_aval if prim.multiple_results else [out_aval], program.out_shardings))]
    return results if prim.multiple_results else results[0]


_COMPILED: dict[int, tuple[Partitioned, Any]] = {}  # id(program) -> (program, its callable)


def _compiled(program: Partitioned) -> Any:
    kept = _COMPILED.get(id(program))
    if kept is None or kept[0] is not program:
        if len(_COMPILED) >= _PROGRAMS_SIZE:
            _COMPILED.clear()
        kept = _COMPILED[id(program)] = (program, get_backend("numpy").compile(program.graph))
    return kept[1]


def _program(prim: Primitive, params: dict[str, Any], avals: list[ArrayType],
             layouts: list[Sharding], result_layout: Sharding | None, mesh: Mesh
             ) -> Partitioned:
    try:
        key = (prim.name, param_key(params), tuple(avals), tuple(layouts), result_layout)
    except TypeError:  # params with no canonical key (a callable): partitioned every time
        key = None
    program = _PROGRAMS.get(key) if key is not None else None
    if program is None:
        def one(*xs: Any) -> list[Any]:
            out = prim.bind(*xs, **params)
            return list(out) if prim.multiple_results else [out]

        results = None if result_layout is None else [result_layout]
        program = partition(make_graph(one, avals), layouts, results, mesh)
        if key is not None:
            if len(_PROGRAMS) >= _PROGRAMS_SIZE:
                _PROGRAMS.clear()
            _PROGRAMS[key] = program
    return program


def _gathered(prim: Primitive, args: Sequence[Any], params: dict[str, Any]) -> Any:
    sharded = [a for a in args if isinstance(a, ShardedArray)]
    mesh = sharded[0].sharding.mesh
    warn_gather(f"{prim.name}: operands laid out by "
                f"{', '.join(sorted({str(a.sharding) for a in sharded}))} were gathered onto "
                f"this process and the result replicated over {mesh} (operands on different "
                f"meshes, or a mesh with devices in other processes, run no per-device program "
                f"in eager mode)")
    whole = [Array(a.assemble(prim.name), a.aval.update(sharding=None))
             if isinstance(a, ShardedArray) else a for a in args]
    out = eval_primitive(prim, whole, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    outs = [place(np.asarray(o.to_numpy()), replicated, o.weak_type, prim.name)
            for o in (out if prim.multiple_results else [out])]
    return outs if prim.multiple_results else outs[0]


def _constrain(x: Any, sharding: Any) -> Any:
    """``sharding_constraint`` run eagerly on a sharded array (as when a traced graph is
    evaluated eagerly): lay it out as asked over its own mesh, if that mesh fits."""
    mesh = x.sharding.mesh
    if sharding.mesh != mesh.abstract or sharding.partial:
        return x
    return device_put(x, NamedSharding.from_abstract(mesh, sharding))


trace.register_eager_handler(ShardedArray, run)
