"""The abstract sharding of a value: which mesh axes split which dimension, which hold sums.

This is what the compiler reasons about (decision record 0021): mesh axis names and sizes, and
per array dimension the axes that split it, with no device objects. It is frozen and hashable,
so it is part of a value's type (``ArrayType.sharding``), of the jit cache key and of equation
params, and one compiled per-device program serves every mesh of the same names and sizes.

Shard geometry: a dimension of global size ``n`` split over axes of sizes ``s1..sk`` (major
first) has local size ``n / (s1 * ... * sk)``, and the device at mesh coordinate ``c`` holds
block ``c[a1] * s2 * ... * sk + ... + c[ak]`` of it. Uneven splits are refused: every device
then runs one program on equal shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberValueError, op_error

__all__ = ["Sharding", "ShardingError"]

# The printer's mark for a dimension no axis splits, so it cannot name a mesh axis.
UNSPLIT = "_"


class ShardingError(EmberValueError):
    """A sharding does not fit its mesh, or a value's shape does not fit a sharding."""


@dataclass(frozen=True, init=False)  # its own __init__: a generated one would hide the caller
class Sharding:
    """How a value is laid out over a mesh (the IR's view; users build ``NamedSharding``).

    ``mesh``: ``((axis name, size), ...)`` in mesh order. ``dims``: per dimension, the mesh
    axes splitting it, major first (``()`` for none). ``partial``: mesh axes over which each
    device holds an addend of the value (a sum still pending, DTensor's ``Partial``). Built
    from friendlier forms too: ``Sharding({"dp": 4, "tp": 2}, ("dp", None))``.
    """

    mesh: tuple[tuple[str, int], ...]
    dims: tuple[tuple[str, ...], ...]
    partial: tuple[str, ...] = ()

    def __init__(self, mesh: Mapping[str, int] | Iterable[tuple[str, int]],
                 dims: Iterable[Any], partial: Any = ()):
        mesh = tuple(mesh.items()) if isinstance(mesh, Mapping) else mesh
        object.__setattr__(self, "mesh", tuple((str(n), int(s)) for n, s in mesh))
        object.__setattr__(self, "dims", tuple(_axes(d) for d in dims))
        object.__setattr__(self, "partial", _axes(partial))
        self._validate()

    def _validate(self) -> None:
        names = [n for n, _ in self.mesh]
        for name, size in self.mesh:
            if not name or name == UNSPLIT:
                raise _invalid(f"mesh axis name {name!r} is reserved (it prints an unsplit "
                               f"dimension)" if name else "a mesh axis has an empty name")
            if names.count(name) > 1:
                raise _invalid(f"mesh axis {name!r} appears twice in {self.mesh}")
            if size < 1:
                raise _invalid(f"mesh axis {name!r} has size {size}; sizes are >= 1")
        seen: dict[str, str] = {}
        places = [(f"dimension {i}", d) for i, d in enumerate(self.dims)]
        for where, axes in [*places, ("the partial sums", self.partial)]:
            for axis in axes:
                if axis not in names:
                    raise _invalid(f"{where} names mesh axis {axis!r}, which the mesh "
                                   f"({_mesh_text(self.mesh)}) does not have")
                if axis in seen:
                    raise _invalid(f"mesh axis {axis!r} is used by both {seen[axis]} and "
                                   f"{where}; an axis splits at most one dimension")
                seen[axis] = where

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def replicated(cls, mesh: Mapping[str, int] | Iterable[tuple[str, int]], ndim: int
                   ) -> Sharding:
        """Every device holds the whole value."""
        return cls(mesh, ((),) * ndim)

    # --- what it says -------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.dims)

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def is_replicated(self) -> bool:
        return not self.partial and not any(self.dims)

    def split_count(self, dim: int) -> int:
        """Into how many blocks dimension ``dim`` is split."""
        sizes = self.axis_sizes
        return math.prod(sizes[a] for a in self.dims[dim])

    def local_shape(self, global_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape each device holds. Raises :class:`ShardingError` naming the dimension, the
        axes and their sizes when a dimension does not divide evenly (callers add the value and
        the user's line)."""
        global_shape = tuple(global_shape)
        self._check_rank(global_shape)
        local = []
        for i, n in enumerate(global_shape):
            parts = self.split_count(i)
            if n % parts:
                raise ShardingError(f"dimension {i} of size {n} does not divide evenly over "
                                    f"{self._axes_text(i)}")
            local.append(n // parts)
        return tuple(local)

    def block_slices(self, global_shape: Sequence[int], coords: Mapping[str, int]
                     ) -> tuple[slice, ...]:
        """The part of the global value held at mesh coordinates ``coords`` (axis -> index)."""
        local = self.local_shape(global_shape)
        sizes = self.axis_sizes
        slices = []
        for axes, n in zip(self.dims, local):
            block = 0
            for axis in axes:  # major first: mixed-radix digits
                block = block * sizes[axis] + coords[axis]
            slices.append(slice(block * n, (block + 1) * n))
        return tuple(slices)

    def _check_rank(self, global_shape: tuple[int, ...]) -> None:
        if len(global_shape) != self.ndim:
            raise ShardingError(f"a sharding of {self.ndim} dimensions {self} cannot lay out "
                                f"a value of shape {global_shape}")

    def _axes_text(self, dim: int) -> str:
        sizes = self.axis_sizes
        axes = self.dims[dim]
        if len(axes) == 1:
            return f"mesh axis {axes[0]!r} (size {sizes[axes[0]]})"
        each = ", ".join(f"{a!r} of size {sizes[a]}" for a in axes)
        return f"mesh axes {each} ({self.split_count(dim)} blocks)"

    # --- printing -----------------------------------------------------------------------------
    def __str__(self) -> str:
        """The printer form after a type: ``{dp,_}``, ``{(dp,tp),_}``, ``{_,_}+tp``."""
        dims = ",".join(_group(d) or UNSPLIT for d in self.dims)
        partial = f"+{_group(self.partial)}" if self.partial else ""
        return f"{{{dims}}}{partial}"

    def __repr__(self) -> str:
        return f"Sharding({self}, mesh=({_mesh_text(self.mesh)}))"


def _axes(entry: Any) -> tuple[str, ...]:
    """One dimension's axes as a tuple: None -> (), a name -> (name,), a sequence as is."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
        return tuple(entry)
    raise _invalid(f"a dimension's mesh axes must be None, a name or a tuple of names, got "
                   f"{entry!r}")


def _invalid(message: str) -> ShardingError:
    return op_error(ShardingError, "Sharding", message)


def _group(axes: tuple[str, ...]) -> str:
    return axes[0] if len(axes) == 1 else f"({','.join(axes)})" if axes else ""


def _mesh_text(mesh: tuple[tuple[str, int], ...]) -> str:
    return ", ".join(f"{n}={s}" for n, s in mesh)
