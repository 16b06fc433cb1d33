"""Eager operations on sharded arrays: per shard where the layout allows, else gathered.

``ember.core.trace.eval_primitive`` hands every primitive with a :class:`ShardedArray` operand
here. An elementwise primitive whose operands share one layout runs once per device on that
device's parts and keeps the layout: no data moves. Anything else (a reduction, a matmul,
operands laid out differently) is gathered onto one device, run once, and its result replicated
over the same mesh, with a :class:`ShardingGatherWarning` saying where. The SPMD partitioner
(``jit`` with shardings) is the way to run those without gathering.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember.core import trace
from ember.core.array import Array
from ember.core.primitive import Primitive
from ember.core.trace import abstract_eval, aval_of, eval_primitive
from ember.ir.types import ArrayType
from ember.parallel.array import (
    ShardedArray,
    device_put,
    place,
    sharding_constraint_p,
    warn_gather,
)
from ember.parallel.sharding import NamedSharding, PartitionSpec

__all__ = ["run"]


def run(prim: Primitive, args: Sequence[Any], params: dict[str, Any]) -> Any:
    """Evaluate ``prim`` on ``args``, some of them sharded (the eval trace's hook)."""
    if prim is sharding_constraint_p:
        return _constrain(args[0], params["sharding"])
    if prim.kind == "elementwise":
        layout = _common_layout(args)
        if layout is not None:
            return _per_shard(prim, args, params, layout)
    return _gathered(prim, args, params)


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


def _gathered(prim: Primitive, args: Sequence[Any], params: dict[str, Any]) -> Any:
    sharded = [a for a in args if isinstance(a, ShardedArray)]
    mesh = sharded[0].sharding.mesh
    warn_gather(f"{prim.name}: operands laid out by "
                f"{', '.join(sorted({str(a.sharding.spec) for a in sharded}))} over {mesh} "
                f"were gathered onto one device and the result replicated (no per-shard rule "
                f"in eager mode; the SPMD partitioner under jit partitions it)")
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
