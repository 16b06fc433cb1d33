"""``ember.lax``: structured control flow and the primitive-level operations, as in jax.lax.

Control flow (``cond``, ``switch``, ``while_loop``, ``fori_loop``, ``scan``, ``map``) is what
keeps branches and loops in a traced program. The other functions are the thin, non-promoting
wrappers of single primitives from :mod:`ember.ops`, under their JAX names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember.lax.control_flow import cond, fori_loop, map, scan, switch, while_loop  # noqa: A004
from ember.ops import (  # noqa: F401
    broadcast_in_dim,
    complex,  # noqa: A004  (jax.lax.complex)
    conj,
    dynamic_slice,
    dynamic_update_slice,
    fft,
    gather,
    imag,
    iota,
    real,
    scatter,
    select,
    sort,
    top_k,
)
from ember.ops import dot_general as _dot_general
from ember.ops.elementwise import convert as _convert
from ember.ops.structural import index_in_dim as _index_in_dim
from ember.transforms.autodiff import stop_gradient

__all__ = ["cond", "switch", "while_loop", "fori_loop", "scan", "map", "broadcast_in_dim",
           "dynamic_slice", "dynamic_update_slice", "dynamic_index_in_dim", "dot_general",
           "gather", "iota", "scatter", "select", "sort", "top_k", "convert_element_type",
           "stop_gradient", "complex", "conj", "real", "imag", "fft"]


def dot_general(lhs: Any, rhs: Any, dimension_numbers: tuple[tuple[Sequence[int], Sequence[int]],
                                                            tuple[Sequence[int], Sequence[int]]]
                ) -> Any:
    """``jax.lax.dot_general``: ``dimension_numbers = ((lhs_contract, rhs_contract),
    (lhs_batch, rhs_batch))``."""
    contracting, batch = dimension_numbers
    return _dot_general(lhs, rhs, contracting, batch)


def convert_element_type(x: Any, new_dtype: Any) -> Any:
    """Cast ``x`` to ``new_dtype`` (no promotion rules; the result is strongly typed)."""
    return _convert(x, new_dtype)


def dynamic_index_in_dim(x: Any, index: Any, axis: int = 0, keepdims: bool = True) -> Any:
    """The slice of ``x`` at traced position ``index`` along ``axis`` (clamped in bounds)."""
    from ember.core.trace import aval_of

    shape = aval_of(x).shape
    axis = axis % len(shape)
    starts = [0] * len(shape)
    starts[axis] = index
    sizes = [1 if i == axis else n for i, n in enumerate(shape)]
    out = dynamic_slice(x, starts, sizes)
    return out if keepdims else _index_in_dim(out, 0, axis)
