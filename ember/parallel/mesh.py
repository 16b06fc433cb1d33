"""Devices and meshes: what a job can compute on, and how those devices are arranged.

A job is one process with ``EMBER_CPU_DEVICES=N`` virtual CPU devices (default 1: tests and
debugging run a whole mesh in one process), or several processes started by ``ember launch``
(MPI), each of them one device. Device ids run over the whole job, process by process, so every
process sees the same list from :func:`devices` and the same mesh from the same code.

A :class:`Mesh` arranges devices in an n-d grid with a name per axis (``("dp", "tp")``); a
sharding then says which mesh axes split which array dimension.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.errors import EmberValueError, op_error
from ember.ir.sharding import UNSPLIT
from ember.parallel import runtime

__all__ = ["Device", "Mesh", "devices", "local_devices", "device_count", "process_index",
           "process_count"]

CPU_DEVICES_VARIABLE = "EMBER_CPU_DEVICES"


@dataclass(frozen=True)
class Device:
    """One device of the job: its id (unique in the job), the process that owns it, its kind."""

    id: int
    process_index: int = 0
    platform: str = "cpu"

    def __repr__(self) -> str:
        return f"Device({self.platform}:{self.id}, process={self.process_index})"


def process_index() -> int:
    """This process's index in the job (0 unless launched by ``ember launch``)."""
    return runtime.process_index()


def process_count() -> int:
    """The number of processes in the job."""
    return runtime.process_count()


def devices() -> list[Device]:
    """Every device of the job, ordered by id (the same list in every process).

    Read once: ``EMBER_CPU_DEVICES`` must be set before the first call.
    """
    return list(_devices())


@functools.cache
def _devices() -> tuple[Device, ...]:
    per_process = _devices_per_process(os.environ.get(CPU_DEVICES_VARIABLE), process_count())
    return tuple(Device(p * per_process + i, p) for p in range(process_count())
                 for i in range(per_process))


def local_devices() -> list[Device]:
    """The devices this process holds buffers for (its addressable devices)."""
    here = process_index()
    return [d for d in devices() if d.process_index == here]


def device_count() -> int:
    return len(devices())


def _devices_per_process(value: str | None, processes: int) -> int:
    """Devices per process from ``EMBER_CPU_DEVICES`` (unset: 1)."""
    if value is None or value.strip() == "":
        return 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise EmberValueError(f"{CPU_DEVICES_VARIABLE}={value!r}: expected a positive whole "
                              f"number of virtual CPU devices")
    if count > 1 and processes > 1:
        raise EmberValueError(f"{CPU_DEVICES_VARIABLE}={value!r}: this job has {processes} "
                              f"processes, each of them one device; virtual devices are for a "
                              f"single process (unset {CPU_DEVICES_VARIABLE} under ember launch)")
    return count


class Mesh:
    """Devices in an n-d grid, one name per axis.

    ``devices`` is an n-d nested list or ndarray of :class:`Device` (its shape is the mesh's),
    or a flat sequence with ``shape`` given, or a flat sequence alone: then its length is
    factored over the axes as evenly as possible, larger factors first (8 devices and
    ``("dp", "tp")`` give 4 x 2; 12 devices and three axes give 3 x 2 x 2). Devices are laid
    out in row-major order, so the last axis joins devices with neighbouring ids.
    """

    def __init__(self, devices: Any, axis_names: str | Sequence[str],
                 shape: Sequence[int] | None = None):
        names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
        grid = _device_grid(devices, names, shape)
        for name in names:
            if not isinstance(name, str) or not name.isidentifier():
                raise _mesh_error(f"axis names must be identifiers, got {name!r}")
            if name == UNSPLIT:
                raise _mesh_error(f"the axis name {UNSPLIT!r} is reserved (it prints an "
                                  f"unsplit dimension)")
            if names.count(name) > 1:
                raise _mesh_error(f"axis name {name!r} appears twice in {names}")
        seen: set[Device] = set()
        for d in grid.flat:
            if not isinstance(d, Device):
                raise _mesh_error(f"expected ember.parallel.Device objects (from devices()), "
                                  f"got {d!r}")
            if d in seen:
                raise _mesh_error(f"{d!r} appears twice")
            seen.add(d)
        grid.flags.writeable = False
        self._devices = grid
        self._names = names
        self._coords = {d: tuple(int(i) for i in idx) for idx, d in np.ndenumerate(grid)}

    @property
    def axis_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def devices(self) -> np.ndarray:
        """The devices as a read-only object ndarray of the mesh's shape."""
        return self._devices

    @property
    def shape(self) -> dict[str, int]:
        """Axis name -> size, in mesh order."""
        return dict(zip(self._names, self._devices.shape))

    @property
    def size(self) -> int:
        return self._devices.size

    @property
    def abstract(self) -> tuple[tuple[str, int], ...]:
        """Names and sizes without devices: the mesh as the IR's ``Sharding`` sees it."""
        return tuple(zip(self._names, self._devices.shape))

    def coordinates(self, device: Device) -> dict[str, int]:
        """Where ``device`` sits in the mesh: axis name -> index."""
        coords = self._coords.get(device)
        if coords is None:
            raise _mesh_error(f"{device!r} is not in {self}")
        return dict(zip(self._names, coords))

    @functools.cached_property
    def local_devices(self) -> list[Device]:
        """This process's devices of the mesh, in mesh order (row-major): the order of a
        sharded array's buffers."""
        here = process_index()
        return [d for d in self._devices.flat if d.process_index == here]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mesh):
            return NotImplemented
        return self._names == other._names and self._devices.shape == other._devices.shape \
            and list(self._devices.flat) == list(other._devices.flat)

    def __hash__(self) -> int:
        return hash((self._names, self._devices.shape, tuple(self._devices.flat)))

    def __repr__(self) -> str:
        axes = ", ".join(f"{n}={s}" for n, s in self.abstract)
        ids = np.vectorize(lambda d: d.id, otypes=[int])(self._devices).tolist()
        return f"Mesh({axes}; device ids {ids})"


def _device_grid(devices: Any, names: tuple[str, ...], shape: Sequence[int] | None
                 ) -> np.ndarray:
    """The devices as an object ndarray of the mesh's shape (errors name what does not fit)."""
    try:
        grid = np.array(devices, dtype=object)
    except ValueError:
        raise _mesh_error("the nested lists of devices have different lengths") from None
    if grid.ndim == 0 or grid.size == 0:
        raise _mesh_error(f"expected a non-empty sequence of devices, got {devices!r}")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != grid.size:
            raise _mesh_error(f"shape {shape} holds {math.prod(shape)} devices, but "
                              f"{grid.size} were given")
        grid = grid.reshape(shape)
    elif grid.ndim == 1 and len(names) > 1:
        grid = grid.reshape(_even_factors(grid.size, len(names)))
    if grid.ndim != len(names):
        raise _mesh_error(f"{len(names)} axis names {names} for a mesh of shape {grid.shape}")
    return grid


def _even_factors(n: int, k: int) -> tuple[int, ...]:
    """``k`` factors of ``n``, as even as possible, larger first: the smallest such tuple
    compared from its largest factor down (8, 2 -> (4, 2); 16, 3 -> (4, 2, 2))."""
    if k == 1:
        return (n,)
    candidates = []
    for first in range(1, n + 1):
        if n % first == 0:
            rest = _even_factors(n // first, k - 1)
            if rest[0] <= first:  # factors in decreasing order: each tuple is counted once
                candidates.append((first, *rest))
    return min(candidates)


def _mesh_error(message: str) -> EmberValueError:
    return op_error(EmberValueError, "Mesh", message)
