"""The vmap fallback every primitive without a batching rule gets: a loop over the batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember.core.primitive import Primitive
from ember.core.trace import aval_of, to_array
from ember.ir.types import ArrayType
from ember.ops import structural as st


def batch_by_loop(prim: Primitive, args: Sequence[Any], dims: Sequence[int | None],
                  **params: Any) -> tuple[Any, Any]:
    """Batch any primitive by applying it to each element and stacking the results."""
    size = next(aval_of(a).shape[d] for a, d in zip(args, dims) if d is not None)
    results = []
    for i in range(size):
        sliced = [a if d is None else st.index_in_dim(a, i, d) for a, d in zip(args, dims)]
        out = prim.bind(*sliced, **params)
        results.append(out if prim.multiple_results else [out])
    if size == 0:
        in_avals = [aval_of(a) if d is None else _drop(aval_of(a), d) for a, d in zip(args, dims)]
        out_avals = prim.abstract_eval(*in_avals, **params)
        out_avals = out_avals if prim.multiple_results else [out_avals]
        stacked = [to_array(np.zeros((0, *a.shape), a.dtype)) for a in out_avals]
    else:
        stacked = [st.concatenate([st.expand_dims(r[k], 0) for r in results], 0)
                   for k in range(len(results[0]))]
    if prim.multiple_results:
        return stacked, [0] * len(stacked)
    return stacked[0], 0


def _drop(aval: ArrayType, axis: int) -> ArrayType:
    shape = list(aval.shape)
    del shape[axis]
    return aval.update(shape=tuple(shape))
