"""Shared checks for shape rules, so every primitive reports bad operands the same way."""

from __future__ import annotations

from collections.abc import Sequence

from ember.errors import DTypeError, ShapeError, op_error
from ember.ir.types import ArrayType


def same_shapes(op: str, avals: Sequence[ArrayType]) -> None:
    shapes = {a.shape for a in avals}
    if len(shapes) > 1:
        raise op_error(ShapeError, op, "operands must have equal shapes, got "
                       + ", ".join(str(a.shape) for a in avals))


def same_dtypes(op: str, avals: Sequence[ArrayType]) -> None:
    kinds = {a.dtype for a in avals}
    if len(kinds) > 1:
        raise op_error(DTypeError, op, "operands must have equal dtypes, got "
                       + ", ".join(str(a.dtype) for a in avals))


def normalize_axis(op: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise op_error(ShapeError, op, f"axis {axis} is out of bounds for an array of "
                       f"dimension {ndim}")
    return axis % ndim


def normalize_axes(op: str, axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    out = tuple(normalize_axis(op, a, ndim) for a in axes)
    if len(set(out)) != len(out):
        raise op_error(ShapeError, op, f"repeated axis in {tuple(axes)}")
    return out
