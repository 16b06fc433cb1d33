"""``ShardedArray``: an array that lives on several devices, one buffer per device.

A ``ShardedArray`` holds, for each device of its mesh that this process can address, that
device's part of the global value (a NumPy buffer), in mesh order, plus its ``NamedSharding``.
Its type (``aval``) is the global one with the abstract sharding in ``ArrayType.sharding``, so
shape rules, printing and the jit cache key see the layout. ``device_put`` makes one;
``with_sharding_constraint`` asks for a layout inside a traced function, where it is an
annotation in the graph (the ``sharding_constraint`` primitive) for the propagation pass.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ember.backends import get_backend
from ember.backends.cpu import kernels
from ember.core.array import Array, Tracer
from ember.core.primitive import Primitive
from ember.core.trace import Zero, innermost_dynamic, to_array
from ember.errors import EmberError, op_error, user_frame
from ember.ir.sharding import Sharding, ShardingError
from ember.ir.types import ArrayType
from ember.parallel import runtime
from ember.parallel.mesh import Device, process_count
from ember.parallel.sharding import NamedSharding, as_named_sharding

__all__ = ["ShardedArray", "Shard", "ShardingGatherWarning", "device_put", "process_allgather",
           "with_sharding_constraint", "sharding_constraint_p"]

_EMBER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ShardingGatherWarning(UserWarning):
    """A sharded value was gathered onto one device to run an operation that has no
    per-shard path yet (the SPMD partitioner, when it compiles the operation, avoids it)."""


def warn_gather(message: str) -> None:
    """Warn, attributed to the user's line (so each line warns once, as Python does)."""
    frame, level = sys._getframe(1), 2  # level 2: warn_gather's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _EMBER_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{message}\n  at {user_frame()}", ShardingGatherWarning, stacklevel=level)


@functools.cache
def _numpy_backend() -> Any:
    """The backend a sharded array's parts run on (looked up once, not per array)."""
    return get_backend("numpy")


class Shard(NamedTuple):
    """One device's part of a sharded array."""

    device: Device
    index: tuple[slice, ...]  # where this part sits in the global value
    data: Array


class ShardedArray(Array):
    """An array split (or copied) over the devices of a mesh.

    ``np.asarray(x)`` assembles the global value when every part of it is held by this
    process; in a job of several processes, gather it first with
    ``ember.parallel.process_allgather``.
    """

    __slots__ = ("_shards", "_sharding", "_gathered")

    def __init__(self, shards: Sequence[np.ndarray], sharding: NamedSharding, aval: ArrayType):
        """Internal: ``shards`` are owned buffers, one per addressable device of the mesh in
        mesh order, of the local shape; ``aval`` carries ``sharding.abstract``. Use
        :func:`device_put` or :meth:`from_shards`."""
        self._shards: list[np.ndarray] | None = list(shards)
        self._sharding = sharding
        self._aval = aval
        self._backend = _numpy_backend()
        self._gathered: np.ndarray | None = None

    @classmethod
    def from_shards(cls, buffers: Sequence[Any], sharding: NamedSharding,
                    shape: Sequence[int], weak: bool = False) -> ShardedArray:
        """The array of global ``shape`` whose parts on this process's devices are ``buffers``
        (one per local device of the mesh, in mesh order, as per-device programs return
        them). The buffers are taken, not copied: nothing may write them afterwards."""
        op = "ShardedArray.from_shards"
        shape = tuple(shape)
        local = sharding.shard_shape(shape, op)
        buffers = [np.asarray(b) for b in buffers]
        devices = sharding.mesh.local_devices
        if len(buffers) != len(devices) or not buffers:
            raise op_error(EmberError, op, f"{len(buffers)} buffers for the {len(devices)} "
                           f"devices of {sharding.mesh} in this process")
        dtype = buffers[0].dtype
        for d, b in zip(devices, buffers):
            if b.shape != local or b.dtype != dtype:
                raise op_error(EmberError, op, f"the buffer of {d!r} is {b.dtype}{list(b.shape)}"
                               f", expected {dtype}{list(local)} (a part of {list(shape)} laid "
                               f"out as {sharding.spec})")
        return cls(buffers, sharding, ArrayType(shape, dtype, weak, sharding.abstract(len(shape))))

    @classmethod
    def _of(cls, buffers: list[np.ndarray], sharding: NamedSharding, aval: ArrayType
            ) -> ShardedArray:
        """Internal: the array made of ``buffers`` as they are, unchecked, for callers that
        know them right (``jit``'s results: their program fixes every shape and dtype)."""
        self = cls.__new__(cls)
        self._shards, self._sharding, self._aval = buffers, sharding, aval
        self._backend, self._gathered = _numpy_backend(), None
        return self

    @property
    def sharding(self) -> NamedSharding:
        return self._sharding

    @property
    def addressable_shards(self) -> list[Shard]:
        """This process's parts: device, index slices and data (an ember Array)."""
        indices = self._sharding.indices(self.shape)
        return [Shard(d, indices[d], Array(buf, ArrayType(buf.shape, self.dtype, self.weak_type),
                                           self._backend))
                for d, buf in zip(self._sharding.mesh.local_devices, self.local_buffers())]

    @property
    def device(self) -> Device:  # type: ignore[override]
        raise op_error(EmberError, "ShardedArray.device",
                       f"this array lives on the {self._sharding.mesh.size} devices of "
                       f"{self._sharding.mesh}: see .sharding and .addressable_shards")

    def local_buffers(self) -> list[np.ndarray]:
        """This process's parts as NumPy buffers, in mesh order (what a per-device program
        reads; never write into them: the array is a value)."""
        if self._shards is None:
            raise EmberError(f"this array was donated to a jitted function and can no longer "
                             f"be used\n  at {user_frame()}")
        return list(self._shards)

    def assemble(self, op: str = "np.asarray") -> np.ndarray:
        """The global value as one new NumPy array; an error naming ``op`` when part of it
        lives only in other processes."""
        indices = self._sharding.indices(self.shape)
        out = np.empty(self.shape, self.dtype)
        held = set()
        for d, buf in zip(self._sharding.mesh.local_devices, self.local_buffers()):
            out[indices[d]] = buf
            held.add(_block(indices[d]))
        parts = len({_block(i) for i in indices.values()})
        if len(held) < parts:
            raise op_error(EmberError, op,
                           f"this process holds {len(held)} of the {parts} distinct parts of "
                           f"a {self.aval} array laid out by "
                           f"{self._sharding}; gather it from every process first with "
                           f"ember.parallel.process_allgather(x)")
        return out

    def to_numpy(self) -> np.ndarray:
        out = self.assemble("to_numpy")
        out.flags.writeable = False  # a value: writing through it must not look possible
        return out

    # Code that does not know shardings (``__dlpack__``, a backend handed the array) reads
    # ``_buffer`` and gets the global value, assembled once and kept. ``jit`` never does: it
    # runs the partitioned program on the shards (``ember.parallel.jit``).
    @property  # type: ignore[override]
    def _buffer(self) -> np.ndarray | None:
        if self._shards is None:
            return None
        if self._gathered is None:
            self._gathered = self.to_numpy()
            warn_gather(f"a {self.aval} array laid out by {self._sharding} was gathered into "
                        f"one buffer by code that does not partition it: it runs on the "
                        f"global value")
        return self._gathered

    def _donate(self) -> None:
        """Internal (``jit``'s ``donate_argnums``): the shards now belong to a program; this
        array can no longer be used."""
        self._shards = self._gathered = None

    def __repr__(self) -> str:
        try:
            body = np.array_repr(self.assemble())[len("array"):]
        except EmberError:
            body = f"(<{self.aval}, not all held by this process>)"
        return f"ShardedArray{body[:-1]}, sharding={self._sharding})"


def process_allgather(x: Any) -> np.ndarray:
    """The global value of ``x`` in every process, the parts held by other processes sent over
    the job's communicator. A collective: every process of the job must call it, in the same
    order. Anything but a sharded array is returned as a NumPy array.

    When every process holds every part (a replicated array, as a data-parallel job's
    parameters are), nothing is sent: each process assembles its own copy. Every process
    decides this alike, from the layout alone, so none waits in a collective the others skip.
    """
    if not isinstance(x, ShardedArray):
        return np.asarray(x)
    if process_count() == 1 or _whole_in_every_process(x.sharding, x.shape):
        return x.assemble("process_allgather")
    # Under MPI each process has one device: it sends its part (zeros when the mesh leaves its
    # device out), and the parts arrive in process order.
    sharding = x.sharding
    mine = x.local_buffers()
    part = mine[0] if mine else np.zeros(sharding.shard_shape(x.shape), x.dtype)
    parts = runtime.world().all_gather(part[None], axis=0)
    indices = sharding.indices(x.shape)
    out = np.empty(x.shape, x.dtype)
    for d in sharding.mesh.devices.flat:
        out[indices[d]] = parts[d.process_index]
    return out


def _whole_in_every_process(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    """Whether the devices of each process of the job hold, together, every distinct part of
    an array of ``shape`` laid out by ``sharding`` (the same answer in every process)."""
    indices = sharding.indices(shape)
    held: dict[int, set] = {p: set() for p in range(process_count())}
    for d, index in indices.items():
        held[d.process_index].add(_block(index))
    parts = {_block(i) for i in indices.values()}
    return all(blocks == parts for blocks in held.values())


def _block(index: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
    """A hashable form of a part's index (slices are not hashable before Python 3.12)."""
    return tuple((s.start, s.stop) for s in index)


def _split(value: np.ndarray, sharding: NamedSharding, op: str = "device_put"
           ) -> list[np.ndarray]:
    """This process's parts of ``value`` laid out by ``sharding``: owned copies, in mesh order
    (each device holds its own buffer, as separate memories would)."""
    indices = sharding.indices(value.shape, op)
    return [np.array(value[indices[d]], copy=True, order="C")
            for d in sharding.mesh.local_devices]


def place(value: np.ndarray, sharding: NamedSharding, weak: bool = False,
          op: str = "device_put") -> ShardedArray:
    """``value`` (the global value, a NumPy array) laid out by ``sharding``."""
    return ShardedArray.from_shards(_split(value, sharding, op), sharding, value.shape, weak)


def device_put(x: Any, sharding: NamedSharding) -> ShardedArray:
    """``x`` (a NumPy array, scalar, ember Array or ShardedArray) laid out by ``sharding``.

    A ShardedArray with the same layout is returned as is; with another layout over its mesh
    it is resharded by collectives (no process needs the whole value); onto another mesh it is
    assembled and split again.
    """
    sharding = as_named_sharding(sharding, "device_put")
    if isinstance(x, Tracer):
        raise op_error(EmberError, "device_put",
                       f"got a traced value ({x.aval}); inside a transformation use "
                       f"ember.parallel.with_sharding_constraint")
    if isinstance(x, ShardedArray):
        if x.sharding == sharding:
            return x
        if x.sharding.mesh == sharding.mesh:
            from ember.parallel import eager  # it builds on this module

            return eager.reshard(x, sharding)
        return place(x.assemble("device_put"), sharding, x.weak_type)
    arr = to_array(x)
    return place(np.asarray(arr.to_numpy()), sharding, arr.weak_type)


# --- with_sharding_constraint -----------------------------------------------------------------

sharding_constraint_p = Primitive("sharding_constraint", kind="elementwise")
# On one device, or once partitioned, the annotation is the identity: a fused C kernel keeps it.
sharding_constraint_p.def_lowering("c", kernels.identity)


@sharding_constraint_p.def_abstract_eval
def _constraint_rule(x: ArrayType, *, sharding: Sharding) -> ArrayType:
    if sharding.ndim != x.ndim:
        raise op_error(ShardingError, "with_sharding_constraint",
                       f"a sharding of {sharding.ndim} dimensions {sharding} for a {x} value")
    try:
        sharding.local_shape(x.shape)
    except ShardingError as e:
        raise op_error(ShardingError, "with_sharding_constraint",
                       f"the {x} value cannot be laid out as {sharding}: {e}") from None
    # Shape rules never set shardings: the annotation is the param, which propagation reads.
    return x.update(sharding=None) if x.sharding is not None else x


sharding_constraint_p.def_impl(lambda x, *, sharding: x)  # values are unchanged


@sharding_constraint_p.def_jvp
def _constraint_jvp(primals, tangents, *, sharding):
    (x,), (t,) = primals, tangents
    out = sharding_constraint_p.bind(x, sharding=sharding)
    if isinstance(t, Zero):
        return out, Zero(out.aval)
    return out, sharding_constraint_p.bind(t, sharding=sharding)


@sharding_constraint_p.def_transpose
def _constraint_transpose(ct, x, *, sharding):
    if isinstance(ct, Zero):
        return [Zero(x.aval)]
    return [sharding_constraint_p.bind(ct, sharding=sharding)]


@sharding_constraint_p.def_batch
def _constraint_batch(args, dims, *, sharding):
    (x,), (d,) = args, dims
    # The batch dimension is not split: each example keeps the layout asked for.
    batched = Sharding(sharding.mesh, (*sharding.dims[:d], (), *sharding.dims[d:]),
                       sharding.partial)
    return sharding_constraint_p.bind(x, sharding=batched), d


def with_sharding_constraint(x: Any, sharding: NamedSharding) -> Any:
    """Ask that ``x`` be laid out by ``sharding``.

    Eagerly this is :func:`device_put`. Inside a traced function (``jit``, ``grad``...) it
    records the ``sharding_constraint`` primitive, an identity whose param is the abstract
    sharding: the propagation pass takes it as the user's annotation.
    """
    sharding = as_named_sharding(sharding, "with_sharding_constraint")
    if isinstance(x, Tracer) or innermost_dynamic().level != 0:
        ndim = x.aval.ndim if isinstance(x, Array) else np.ndim(x)
        return sharding_constraint_p.bind(x, sharding=sharding.abstract(ndim))
    return device_put(x, sharding)

