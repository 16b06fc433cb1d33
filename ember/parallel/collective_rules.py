"""Derivative and batching rules of the collective primitives (``ember.parallel.collectives``).

Every collective but ``all_reduce`` over ``max``/``min`` is linear in its operand, so its
forward derivative applies the same collective to the tangent, and its transpose is the
collective that moves the data back:

- ``all_reduce`` (sum) transposes to itself: every value inside a per-device program is taken to
  vary by device, so the cotangent of each device's addend is the sum of the cotangents of every
  device's result (JAX's rule without replication checking). ``shard_map`` balances it at its
  boundary: an output declared replicated over mesh axes has its cotangent divided by their
  size, and an input replicated over mesh axes has its cotangent summed over them
  (``docs/parallel.md``, "Differentiating per-device code");
- ``all_gather`` and ``reduce_scatter`` (sum) transpose to each other;
- ``all_to_all`` transposes to the ``all_to_all`` with its split and concatenation axes swapped;
- ``collective_permute`` transposes to the permutation with each pair reversed.

``all_reduce`` over ``max``/``min`` differentiates to the tangent of the device(s) holding the
extreme (averaged over ties), written with sums so that it transposes too. ``axis_index`` has no
operand and an integer result: it needs no rule.

Batching (``vmap`` of per-device code) keeps the batch axis where it is and renumbers the
collective's axis parameters around it: each example is communicated as the unbatched program
would communicate it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ember.core.primitive import Primitive
from ember.core.trace import UndefinedPrimal, Zero, aval_of
from ember.errors import UnsupportedError, op_error
from ember.ops import elementwise as ew
from ember.parallel.collectives import (
    all_gather_p,
    all_reduce_p,
    all_to_all_p,
    collective_permute_p,
    reduce_scatter_p,
)

__all__: list[str] = []  # rules only: importing the module attaches them


# --- forward mode --------------------------------------------------------------------------------

def _linear_jvp(prim: Primitive) -> Callable[..., tuple[Any, Any]]:
    """The jvp of a collective linear in its operand: the same collective on the tangent."""
    def jvp(primals: Sequence[Any], tangents: Sequence[Any], **params: Any) -> tuple[Any, Any]:
        (x,), (t,) = primals, tangents
        out = prim.bind(x, **params)
        return out, Zero(aval_of(out)) if isinstance(t, Zero) else prim.bind(t, **params)
    return jvp


def _all_reduce_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, axes: tuple[str, ...],
                    op: str, mesh: Any) -> tuple[Any, Any]:
    if op == "sum":
        return _linear_jvp(all_reduce_p)(primals, tangents, axes=axes, op=op, mesh=mesh)
    (x,), (t,) = primals, tangents
    out = all_reduce_p.bind(x, axes=axes, op=op, mesh=mesh)
    if isinstance(t, Zero):
        return out, Zero(aval_of(out))
    # Where this device holds the extreme, its tangent counts; ties share it equally.
    hit = ew.convert(ew.eq(x, out), aval_of(t).dtype)
    ties = all_reduce_p.bind(hit, axes=axes, op="sum", mesh=mesh)
    summed = all_reduce_p.bind(ew.mul(t, hit), axes=axes, op="sum", mesh=mesh)
    return out, ew.div(summed, ties)


def _reduce_scatter_jvp(primals: Sequence[Any], tangents: Sequence[Any], **params: Any
                        ) -> tuple[Any, Any]:
    if params["op"] != "sum":
        raise op_error(UnsupportedError, "reduce_scatter",
                       f"op={params['op']!r} is not differentiable (only sums are)")
    return _linear_jvp(reduce_scatter_p)(primals, tangents, **params)


all_reduce_p.def_jvp(_all_reduce_jvp)
reduce_scatter_p.def_jvp(_reduce_scatter_jvp)
for _prim in (all_gather_p, all_to_all_p, collective_permute_p):
    _prim.def_jvp(_linear_jvp(_prim))


# --- transposition -------------------------------------------------------------------------------

def _transposed(cts: Any, x: UndefinedPrimal, back: Callable[[Any], Any]) -> list[Any]:
    return [Zero(x.aval) if isinstance(cts, Zero) else back(cts)]


@all_reduce_p.def_transpose
def _all_reduce_transpose(ct: Any, x: UndefinedPrimal, *, axes: tuple[str, ...], op: str,
                          mesh: Any) -> list[Any]:
    if op != "sum":  # the jvp of max/min is written with sums: this is never linear
        raise op_error(UnsupportedError, "all_reduce", f"op={op!r} is not linear")
    return _transposed(ct, x, lambda c: all_reduce_p.bind(c, axes=axes, op="sum", mesh=mesh))


@all_gather_p.def_transpose
def _all_gather_transpose(ct: Any, x: UndefinedPrimal, *, axes: tuple[str, ...], axis: int,
                          mesh: Any) -> list[Any]:
    return _transposed(ct, x, lambda c: reduce_scatter_p.bind(c, axes=axes, axis=axis, op="sum",
                                                              mesh=mesh))


@reduce_scatter_p.def_transpose
def _reduce_scatter_transpose(ct: Any, x: UndefinedPrimal, *, axes: tuple[str, ...], axis: int,
                              op: str, mesh: Any) -> list[Any]:
    return _transposed(ct, x, lambda c: all_gather_p.bind(c, axes=axes, axis=axis, mesh=mesh))


@all_to_all_p.def_transpose
def _all_to_all_transpose(ct: Any, x: UndefinedPrimal, *, axes: tuple[str, ...],
                          split_axis: int, concat_axis: int, mesh: Any) -> list[Any]:
    return _transposed(ct, x, lambda c: all_to_all_p.bind(
        c, axes=axes, split_axis=concat_axis, concat_axis=split_axis, mesh=mesh))


@collective_permute_p.def_transpose
def _permute_transpose(ct: Any, x: UndefinedPrimal, *, axes: tuple[str, ...],
                       pairs: tuple[tuple[int, int], ...], mesh: Any) -> list[Any]:
    inverse = tuple((d, s) for s, d in pairs)
    return _transposed(ct, x, lambda c: collective_permute_p.bind(c, axes=axes, pairs=inverse,
                                                                  mesh=mesh))


# --- batching ------------------------------------------------------------------------------------

def _batch_rule(prim: Primitive, axis_params: tuple[str, ...]) -> Callable[..., Any]:
    """Run ``prim`` on the batched operand with its ``axis_params`` renumbered past the batch
    axis; the result keeps the batch axis in place."""
    def batch(args: Sequence[Any], dims: Sequence[int | None], **params: Any
              ) -> tuple[Any, int | None]:
        (x,), (d,) = args, dims
        for name in axis_params:
            params[name] = params[name] + (d <= params[name])
        return prim.bind(x, **params), d
    return batch


all_reduce_p.def_batch(_batch_rule(all_reduce_p, ()))
all_gather_p.def_batch(_batch_rule(all_gather_p, ("axis",)))
reduce_scatter_p.def_batch(_batch_rule(reduce_scatter_p, ("axis",)))
all_to_all_p.def_batch(_batch_rule(all_to_all_p, ("split_axis", "concat_axis")))
collective_permute_p.def_batch(_batch_rule(collective_permute_p, ()))
