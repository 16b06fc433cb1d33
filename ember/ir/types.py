"""Abstract array types: what the compiler knows about a value without its data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ember import dtypes


@dataclass(frozen=True)
class ArrayType:
    """Shape, dtype and placement of an array value.

    ``weak`` marks a value that came from a Python scalar and so promotes weakly (NEP 50).
    ``sharding`` is an :class:`ember.ir.sharding.Sharding` (which mesh axes split which
    dimension) or ``None`` for "not annotated". Both are part of the type, so they are part
    of the jit cache key.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    weak: bool = False
    sharding: Any = field(default=None, compare=True)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        # math.prod, not np.prod: passes ask every equation's types for it (NumPy's call
        # cost more than the rest of the overlap schedule on a 10k-equation program).
        return int(math.prod(self.shape))

    # Types are dictionary keys on every eager operation (the shape-rule memo) and every jit
    # call (the cache key), so the hash is computed once per type and equality first tries
    # identity. The cached hash is never pickled: dtype hashes differ between processes.
    _hash = None  # not a field: set on first use

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = hash((self.shape, self.dtype, self.weak, self.sharding))
            object.__setattr__(self, "_hash", h)
        return h

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if other.__class__ is not ArrayType:
            return NotImplemented
        return (self.shape == other.shape and self.dtype == other.dtype
                and self.weak == other.weak and self.sharding == other.sharding)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def update(self, **changes: Any) -> ArrayType:
        fields = {"shape": self.shape, "dtype": self.dtype, "weak": self.weak,
                  "sharding": self.sharding}
        fields.update(changes)
        return ArrayType(**fields)

    def strong(self) -> ArrayType:
        return self.update(weak=False) if self.weak else self

    def __str__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        weak = "~" if self.weak else ""
        layout = "" if self.sharding is None else str(self.sharding)  # f32[8,576]{dp,_}
        return f"{weak}{dtypes.short_name(self.dtype)}[{dims}]{layout}"

    __repr__ = __str__


def type_of(value: Any) -> ArrayType:
    """The type of a concrete value (NumPy array or scalar)."""
    if dtypes.is_python_scalar(value):
        return ArrayType((), dtypes.scalar_dtype(value), weak=True)
    value = np.asarray(value)
    return ArrayType(tuple(value.shape), dtypes.canonicalize(value.dtype))
