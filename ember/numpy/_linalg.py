"""Products: matmul, dot, vdot, vecdot, inner, outer, tensordot, kron, trace (einsum lives in
``_einsum``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.trace import aval_of
from ember.errors import ShapeError, op_error
from ember.numpy._core import normalize_axis_arg, promote_args, value
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops.linalg import dot_general
from ember.ops.reduce import reduce_sum

__all__ = ["matmul", "dot", "vdot", "vecdot", "inner", "outer", "tensordot",
           "matrix_transpose", "kron", "trace"]


def _promoted(op: str, a: Any, b: Any) -> tuple[Any, Any]:
    x, y = value(a), value(b)
    dt = dtypes.result_type(x, y)
    return ew.convert(x, dt), ew.convert(y, dt)


def matmul(x1: Any, x2: Any, /) -> Any:
    """``x1 @ x2`` with NumPy's rules for 1-d operands and broadcast batch dimensions."""
    a, b = _promoted("matmul", x1, x2)
    sa, sb = aval_of(a).shape, aval_of(b).shape
    if not sa or not sb:
        raise op_error(ShapeError, "matmul", f"operands must be at least 1-d, got shapes {sa} "
                       f"and {sb} (use * for scalars)")
    a2 = st.reshape(a, (1, sa[0])) if len(sa) == 1 else a
    b2 = st.reshape(b, (sb[0], 1)) if len(sb) == 1 else b
    sa2, sb2 = aval_of(a2).shape, aval_of(b2).shape
    if sa2[-1] != sb2[-2]:
        raise op_error(ShapeError, "matmul", f"contracted dimensions differ: {sa} @ {sb} "
                       f"({sa2[-1]} != {sb2[-2]})")
    try:
        batch = tuple(np.broadcast_shapes(sa2[:-2], sb2[:-2]))
    except ValueError:
        raise op_error(ShapeError, "matmul", f"batch dimensions do not broadcast: {sa} @ "
                       f"{sb}") from None
    nb = len(batch)
    if nb and (sa2[:-2] != batch or sb2[:-2] != batch):
        if len(sb2) == 2:  # (..., n, k) @ (k, m): fold the batch into rows, one big GEMM
            flat = st.reshape(st.broadcast_to_shape(a2, (*batch, *sa2[-2:])),
                              (int(np.prod(batch)) * sa2[-2], sa2[-1]))
            out = dot_general(flat, b2, ((1,), (0,)))
            out = st.reshape(out, (*batch, sa2[-2], sb2[-1]))
            return _squeeze_vectors(out, sa, sb)
        a2 = st.broadcast_to_shape(a2, (*batch, *sa2[-2:]))
        b2 = st.broadcast_to_shape(b2, (*batch, *sb2[-2:]))
    if nb == 0 or len(sb2) == 2 and len(sa2) == 2:
        out = dot_general(a2, b2, ((1,), (0,)))
    elif len(sb2) == 2:
        out = dot_general(a2, b2, ((nb + 1,), (0,)))
    else:
        out = dot_general(a2, b2, ((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    return _squeeze_vectors(out, sa, sb)


def _squeeze_vectors(out: Any, sa: tuple, sb: tuple) -> Any:
    shape = list(aval_of(out).shape)
    if len(sb) == 1:
        shape.pop(-1)
    if len(sa) == 1:
        shape.pop(-1 if len(sb) == 1 else -2)
    return st.reshape(out, shape)


def matrix_transpose(x: Any, /) -> Any:
    v = value(x)
    nd = aval_of(v).ndim
    if nd < 2:
        raise op_error(ShapeError, "matrix_transpose", f"needs at least 2 dimensions, got {nd}")
    return st.moveaxis(v, -1, -2)


def dot(a: Any, b: Any) -> Any:
    """``numpy.dot``: scalars multiply, N-d contracts the last axis of a with b's 2nd-to-last."""
    x, y = _promoted("dot", a, b)
    sa, sb = aval_of(x).shape, aval_of(y).shape
    if not sa or not sb:
        return ew.mul(*promote_args("dot", x, y))
    if len(sb) <= 2:
        return matmul(x, y)
    if sa[-1] != sb[-2]:
        raise op_error(ShapeError, "dot", f"shapes {sa} and {sb} not aligned: "
                       f"{sa[-1]} (dim {len(sa) - 1}) != {sb[-2]} (dim {len(sb) - 2})")
    return dot_general(x, y, ((len(sa) - 1,), (len(sb) - 2,)))


def vdot(a: Any, b: Any, /) -> Any:
    """Dot product of the flattened arrays, conjugating ``a`` (as NumPy)."""
    x, y = _promoted("vdot", a, b)
    if dtypes.is_complex(aval_of(x).dtype):
        x = ew.conj(x)
    return dot(st.reshape(x, (aval_of(x).size,)), st.reshape(y, (aval_of(y).size,)))


def inner(a: Any, b: Any, /) -> Any:
    x, y = _promoted("inner", a, b)
    sa, sb = aval_of(x).shape, aval_of(y).shape
    if not sa or not sb:
        return ew.mul(*promote_args("inner", x, y))
    if sa[-1] != sb[-1]:
        raise op_error(ShapeError, "inner", f"last dimensions differ: {sa} and {sb}")
    return dot_general(x, y, ((len(sa) - 1,), (len(sb) - 1,)))


def vecdot(x1: Any, x2: Any, /, *, axis: int = -1) -> Any:
    """Dot product of vectors along ``axis`` of the broadcast shape (array API), conjugating
    ``x1`` (``sum(conj(x1) * x2)``); the other axes broadcast, the vectors must have equal
    lengths."""
    shapes = [aval_of(value(x)).shape for x in (x1, x2)]
    a, b = promote_args("vecdot", x1, x2)
    nd = aval_of(a).ndim
    (ax,) = normalize_axis_arg("vecdot", axis, nd)
    back = ax - nd  # the same axis counted from the end, as it is in each operand
    if any(len(s) < -back or s[back] != aval_of(a).shape[ax] for s in shapes):
        raise op_error(ShapeError, "vecdot", f"vectors along axis {axis} must have equal "
                       f"lengths, got shapes {shapes[0]} and {shapes[1]}")
    if dtypes.is_complex(aval_of(a).dtype):
        a = ew.conj(a)
    return reduce_sum(ew.mul(a, b), (ax,))


def outer(a: Any, b: Any, /) -> Any:
    x, y = _promoted("outer", a, b)
    x = st.reshape(x, (aval_of(x).size, 1))
    y = st.reshape(y, (1, aval_of(y).size))
    return ew.mul(*promote_args("outer", x, y))


def tensordot(a: Any, b: Any, /, axes: int | Sequence[Any] = 2) -> Any:
    x, y = _promoted("tensordot", a, b)
    na, nb = aval_of(x).ndim, aval_of(y).ndim
    if isinstance(axes, int):
        ax_a, ax_b = list(range(na - axes, na)), list(range(axes))
    else:
        ax_a, ax_b = axes
        ax_a = [ax_a] if isinstance(ax_a, int) else list(ax_a)
        ax_b = [ax_b] if isinstance(ax_b, int) else list(ax_b)
    return dot_general(x, y, ([i % na for i in ax_a], [i % nb for i in ax_b]))


def kron(a: Any, b: Any, /) -> Any:
    x, y = _promoted("kron", a, b)
    sa, sb = aval_of(x).shape, aval_of(y).shape
    nd = max(len(sa), len(sb))
    sa, sb = (1,) * (nd - len(sa)) + sa, (1,) * (nd - len(sb)) + sb
    x, y = st.reshape(x, sa), st.reshape(y, sb)
    xi = st.reshape(x, [d for n in sa for d in (n, 1)])
    yi = st.reshape(y, [d for n in sb for d in (1, n)])
    prod = ew.mul(*promote_args("kron", xi, yi))
    return st.reshape(prod, [p * q for p, q in zip(sa, sb)])


def trace(a: Any, offset: int = 0, axis1: int = 0, axis2: int = 1) -> Any:
    from ember.numpy._reductions import sum as sum_
    from ember.numpy._shape_more import diagonal

    return sum_(diagonal(a, offset, axis1, axis2), axis=-1)
