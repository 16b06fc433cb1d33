"""What users write to lay a value out over a mesh: ``PartitionSpec`` and ``NamedSharding``.

``NamedSharding(mesh, PartitionSpec("dp", None))`` splits dimension 0 over mesh axis ``dp`` and
copies dimension 1 whole to every device. It holds real devices; ``.abstract(ndim)`` gives the
device-free :class:`ember.ir.sharding.Sharding` that types, graphs and the jit cache key carry
(decision record 0021).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember.errors import op_error
from ember.ir.sharding import Sharding, ShardingError
from ember.parallel.mesh import Device, Mesh

__all__ = ["PartitionSpec", "NamedSharding"]

Entry = None | str | tuple[str, ...]


class PartitionSpec(tuple):
    """Per array dimension, from the left, the mesh axes that split it.

    Each entry is ``None`` (not split), a mesh axis name, or a tuple of names (split over
    several axes, major first). Dimensions past the last entry are not split, so
    ``PartitionSpec()`` means replicated.
    """

    def __new__(cls, *entries: Entry) -> PartitionSpec:
        for e in entries:
            if not (e is None or isinstance(e, str)
                    or (isinstance(e, tuple) and all(isinstance(a, str) for a in e))):
                raise op_error(ShardingError, "PartitionSpec",
                               f"each entry must be None, a mesh axis name or a tuple of "
                               f"names, got {e!r}")
        return super().__new__(cls, entries)

    def __repr__(self) -> str:
        return f"PartitionSpec({', '.join(map(repr, self))})"

    def __reduce__(self) -> tuple:
        return PartitionSpec, tuple(self)

    def axes(self) -> list[str]:
        """Every mesh axis the spec names, in order."""
        return [a for e in self for a in _entry_axes(e)]


def _entry_axes(entry: Entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else entry


class NamedSharding:
    """A mesh and a partition spec: how an array's dimensions are split over devices.

    Validated when built: every axis the spec names is a mesh axis, used once.
    """

    def __init__(self, mesh: Mesh, spec: PartitionSpec | Sequence[Entry] = ()):
        if not isinstance(mesh, Mesh):
            raise op_error(ShardingError, "NamedSharding",
                           f"expected an ember.parallel.Mesh, got {type(mesh).__name__}")
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec(*spec)
        axes = spec.axes()
        for axis in axes:
            if axis not in mesh.axis_names:
                raise op_error(ShardingError, "NamedSharding",
                               f"{spec} names mesh axis {axis!r}, but the mesh has axes "
                               f"{mesh.axis_names}")
            if axes.count(axis) > 1:
                raise op_error(ShardingError, "NamedSharding",
                               f"{spec} uses mesh axis {axis!r} twice; an axis splits at "
                               f"most one dimension")
        self.mesh = mesh
        self.spec = spec
        # Trailing Nones say nothing: PartitionSpec("dp") and ("dp", None) are one layout.
        entries = list(spec)
        while entries and entries[-1] is None:
            entries.pop()
        self._key = (mesh, tuple(entries))
        # Eager per-shard operations ask for the same layouts over and over: kept per rank and
        # per global shape (a sharding is immutable).
        self._abstract: dict[int, Sharding] = {}
        self._indices: dict[tuple[int, ...], dict[Device, tuple[slice, ...]]] = {}

    @classmethod
    def from_abstract(cls, mesh: Mesh, sharding: Sharding) -> NamedSharding:
        """The NamedSharding over ``mesh`` that lays values out as ``sharding`` says."""
        if sharding.mesh != mesh.abstract or sharding.partial:
            raise op_error(ShardingError, "NamedSharding.from_abstract",
                           f"{sharding!r} is not a layout over {mesh}"
                           + (" (it holds partial sums)" if sharding.partial else ""))
        return cls(mesh, PartitionSpec(*[None if not axes else axes[0] if len(axes) == 1
                                         else axes for axes in sharding.dims]))

    def abstract(self, ndim: int) -> Sharding:
        """The device-free sharding of an ``ndim``-dimensional value."""
        known = self._abstract.get(ndim)
        if known is not None:
            return known
        if len(self.spec) > ndim:
            raise op_error(ShardingError, "NamedSharding",
                           f"{self.spec} has {len(self.spec)} entries, but the value has "
                           f"{ndim} dimensions")
        dims = [_entry_axes(e) for e in self.spec] + [()] * (ndim - len(self.spec))
        out = self._abstract[ndim] = Sharding(self.mesh.abstract, tuple(dims))
        return out

    def shard_shape(self, global_shape: Sequence[int], op: str = "NamedSharding.shard_shape"
                    ) -> tuple[int, ...]:
        """The shape each device holds of a value of ``global_shape``; a dimension that does
        not divide evenly is an error naming ``op``, the spec, the axis and the user's line."""
        global_shape = tuple(global_shape)
        abstract = self.abstract(len(global_shape))
        try:
            return abstract.local_shape(global_shape)
        except ShardingError as e:
            raise op_error(ShardingError, op, f"a value of shape {global_shape} cannot be laid "
                           f"out as {self.spec} over {self.mesh}: {e}") from None

    def indices(self, global_shape: Sequence[int], op: str = "NamedSharding.indices"
                ) -> dict[Device, tuple[slice, ...]]:
        """For every device of the mesh, the part of the global value it holds."""
        global_shape = tuple(global_shape)
        known = self._indices.get(global_shape)
        if known is None:
            self.shard_shape(global_shape, op)  # errors first, naming op
            abstract = self.abstract(len(global_shape))
            known = self._indices[global_shape] = {
                d: abstract.block_slices(global_shape, self.mesh.coordinates(d))
                for d in self.mesh.devices.flat}
        return dict(known)

    @property
    def is_fully_replicated(self) -> bool:
        return not self.spec.axes()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NamedSharding):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"NamedSharding({self.mesh}, {self.spec})"


def as_named_sharding(sharding: Any, op: str) -> NamedSharding:
    """``sharding`` when it is a NamedSharding, else an error naming ``op``."""
    if not isinstance(sharding, NamedSharding):
        raise op_error(ShardingError, op, f"expected an ember.parallel.NamedSharding, got "
                       f"{type(sharding).__name__}: {sharding!r}")
    return sharding
