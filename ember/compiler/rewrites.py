"""Rewrites that spare a compiled program whole passes over memory, before fusion groups it.

Three patterns that differentiation produces cost a pass over a large array each, though the
same result is one equation away:

- **A product transposed after the fact.** The gradient of ``x @ w`` with respect to a ``w``
  stored ``[in, out]`` traces to ``transpose(dot_general(dy, x))``: a product writing
  ``[out, in]``, then a copy reading it with a stride. A transpose that only swaps the two
  operands' free axes is the product of the operands taken the other way round, which writes
  the transposed layout directly (BLAS computes ``C^T = B^T A^T`` as fast as ``C``).
- **A scatter-add into zeros, then added to something.** The gradient of an indexing read
  (``take_along_axis`` in a cross-entropy, an embedding lookup) scatters its cotangent into a
  fresh zeros array; the sum of the gradient's paths then adds that to the rest. Scattering
  into the other addend instead gives the same sums without writing the zeros nor reading the
  scattered array back, and the scatter may then update that addend in place.
- **Two zero-padded halves added up.** The gradient of slicing an array into pieces (the
  rotary embedding's halves) pads each piece's cotangent back to full size with zeros and adds
  the pads. Where the pieces tile the axis, that sum is their concatenation, which fusion
  writes straight from the kernels computing the pieces instead of materialising each pad.

Each rewrite applies only where the intermediate has no other reader, so no work is repeated.
Results are the same up to the rounding of reordered additions: ``(0 + u) + y`` becomes
``y + u`` (equal but for the sign of a zero), and repeated indices add their updates to ``y``
one after the other instead of to zero first; a concatenation keeps a ``-0.0`` that adding
the other pad's ``+0.0`` turned into ``+0.0``.
"""

from __future__ import annotations

import numpy as np

from ember.ir.graph import ClosedGraph, Eqn, Literal, Var
from ember.ir.passes import dce
from ember.ops.elementwise import add_p
from ember.ops.indexing import scatter_p
from ember.ops.linalg import dot_general_p
from ember.ops.structural import broadcast_in_dim_p, concatenate_p, pad_p, transpose_p

__all__ = ["rewrite"]


def rewrite(closed: ClosedGraph) -> ClosedGraph:
    """``closed`` with transposed products and scatter-adds into zeros rewritten (see the
    module docstring); the graph itself when neither occurs."""
    g = closed.graph
    producer = {v.id: eqn for eqn in g.eqns for v in eqn.outputs}
    reads: dict[int, int] = {}
    for a in [*(a for eqn in g.eqns for a in eqn.inputs), *g.outvars]:
        if isinstance(a, Var):
            reads[a.id] = reads.get(a.id, 0) + 1

    def sole(a: object, prim: object) -> Eqn | None:
        """The equation of ``prim`` that produces ``a``, if ``a`` has no other reader."""
        eqn = producer.get(a.id) if isinstance(a, Var) else None
        return eqn if eqn is not None and eqn.prim is prim and reads[a.id] == 1 else None

    eqns = []
    for eqn in g.eqns:
        if eqn.prim is transpose_p:
            eqn = _swapped_product(eqn, sole(eqn.inputs[0], dot_general_p)) or eqn
        elif eqn.prim is add_p:
            eqn = next((new for side in (0, 1) if (new := _scatter_into(
                eqn, side, sole(eqn.inputs[side], scatter_p), producer)) is not None), eqn)
            eqn = _concatenation(eqn, [sole(a, pad_p) for a in eqn.inputs]) or eqn
        eqns.append(eqn)
    if all(a is b for a, b in zip(eqns, g.eqns)):
        return closed
    return dce(ClosedGraph(type(g)(g.constvars, g.invars, eqns, g.outvars), closed.consts))


def _swapped_product(transpose: Eqn, product: Eqn | None) -> Eqn | None:
    """``dot_general(b, a)`` for ``transpose(dot_general(a, b))`` when the permutation keeps
    the batch axes and swaps the blocks of ``a``'s and ``b``'s free axes."""
    if product is None:
        return None
    (lc, rc), (lb, rb) = product.params["dims"]
    a, b = product.inputs
    nb = len(lb)
    nl = a.aval.ndim - len(lc) - nb
    nr = b.aval.ndim - len(rc) - nb
    swapped = [*range(nb), *range(nb + nl, nb + nl + nr), *range(nb, nb + nl)]
    if nl == 0 or nr == 0 or list(transpose.params["perm"]) != swapped:
        return None
    return Eqn(dot_general_p, [b, a], transpose.outputs,
               {**product.params, "dims": ((rc, lc), (rb, lb))})


def _scatter_into(add: Eqn, side: int, scatter: Eqn | None,
                  producer: dict[int, Eqn]) -> Eqn | None:
    """``scatter_add(y, i, u)`` for ``add(scatter_add(zeros, i, u), y)`` (either order)."""
    if scatter is None or scatter.params["mode"] != "add" or \
            not _zeros(scatter.inputs[0], producer):
        return None
    other = add.inputs[1 - side]
    out = scatter.outputs[0].aval
    if not isinstance(other, Var) or (other.aval.shape, other.aval.dtype) != (out.shape,
                                                                              out.dtype):
        return None
    return Eqn(scatter_p, [other, *scatter.inputs[1:]], add.outputs, scatter.params)


def _zeros(a: object, producer: dict[int, Eqn]) -> bool:
    """Whether ``a`` is a literal zero broadcast to an array."""
    eqn = producer.get(a.id) if isinstance(a, Var) else None
    return (eqn is not None and eqn.prim is broadcast_in_dim_p
            and isinstance(eqn.inputs[0], Literal) and bool(np.all(eqn.inputs[0].value == 0)))


def _concatenation(add: Eqn, pads: list[Eqn | None]) -> Eqn | None:
    """``concatenate([a, b], axis)`` for ``add(pad(a), pad(b))`` (either order) where both
    pads add zeros along one axis only and the two pieces tile it."""
    if add.prim is not add_p or any(p is None for p in pads):
        return None
    pieces = []
    for pad in pads:
        value = pad.inputs[1]
        params = pad.params
        moved = [k for k, (lo, hi) in enumerate(zip(params["lo"], params["hi"])) if lo or hi]
        if not isinstance(value, Literal) or not np.all(value.value == 0) or \
                any(params["interior"]) or len(moved) != 1 or \
                min(params["lo"][moved[0]], params["hi"][moved[0]]) < 0:
            return None
        pieces.append((params["lo"][moved[0]], moved[0], pad.inputs[0]))
    (lo_a, axis, a), (lo_b, axis_b, b) = sorted(pieces, key=lambda p: p[0])
    out = add.outputs[0].aval
    if axis != axis_b or lo_a != 0 or lo_b != a.aval.shape[axis] or \
            lo_b + b.aval.shape[axis] != out.shape[axis] or \
            not a.aval.dtype == b.aval.dtype == out.dtype:
        return None
    return Eqn(concatenate_p, [a, b], add.outputs, {"axis": axis})
