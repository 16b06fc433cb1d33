"""``threefry2x32``: the counter-based hash every random number in Ember comes from.

Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011) maps a 64-bit key and a 64-bit counter to 64 random bits. Because it is a pure function
of (key, counter), the same key gives the same numbers on every backend and under every
transformation, and keys can be split without shared state. The primitive is elementwise over
its four ``uint32`` operands (key halves and counter halves); ``ember.random`` builds keys,
splitting and distributions from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import Zero
from ember.errors import DTypeError, op_error
from ember.ir.types import ArrayType
from ember.ops._checks import same_shapes

__all__ = ["threefry2x32"]

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = np.uint32(0x1BD11BDA)

threefry_p = Primitive("threefry2x32", kind="random", multiple_results=True)


@threefry_p.def_abstract_eval
def _threefry_rule(k0: ArrayType, k1: ArrayType, x0: ArrayType, x1: ArrayType
                   ) -> list[ArrayType]:
    same_shapes("threefry2x32", (k0, k1, x0, x1))
    for a in (k0, k1, x0, x1):
        if a.dtype != dtypes.uint32:
            raise op_error(DTypeError, "threefry2x32", f"operands must be uint32, got {a.dtype}")
    return [ArrayType(x0.shape, dtypes.uint32)] * 2


def threefry_numpy(k0: np.ndarray, k1: np.ndarray, x0: np.ndarray, x1: np.ndarray
                   ) -> list[np.ndarray]:
    """Reference implementation on uint32 NumPy arrays (wrapping arithmetic)."""
    ks = (k0.astype(np.uint32), k1.astype(np.uint32),
          (k0 ^ k1 ^ _PARITY).astype(np.uint32))
    a = (x0 + ks[0]).astype(np.uint32)
    b = (x1 + ks[1]).astype(np.uint32)
    for group in range(5):
        rotations = _ROTATIONS[:4] if group % 2 == 0 else _ROTATIONS[4:]
        for r in rotations:
            a = a + b
            b = (b << np.uint32(r)) | (b >> np.uint32(32 - r))
            b = b ^ a
        a = a + ks[(group + 1) % 3]
        b = b + ks[(group + 2) % 3] + np.uint32(group + 1)
    return [a, b]


threefry_p.def_impl(threefry_numpy)


@threefry_p.def_jvp
def _threefry_jvp(primals, tangents):
    outs = threefry_p.bind(*primals)
    return outs, [Zero(o.aval) for o in outs]


@threefry_p.def_batch
def _threefry_batch(args, dims):
    from ember.ops.elementwise import _batch_elementwise

    out, d = _batch_elementwise(threefry_p)(args, dims)
    return out, [d, d]


def threefry2x32(k0: Any, k1: Any, x0: Any, x1: Any) -> tuple[Any, Any]:
    a, b = threefry_p.bind(k0, k1, x0, x1)
    return a, b
