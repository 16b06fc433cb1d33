"""Sharding rules: how each primitive's operands and results may be split over a mesh.

A rule describes an equation the way an einsum does, by *factors*: every dimension of every
operand and result is either one factor (a loop index of the computation) or ``None`` (a
dimension that must stay whole on every device: a sliced, sorted or indexed one). Dimensions
that share a factor must be split alike; a factor split over some mesh axes splits every
dimension it appears in, so each device computes its block with the same primitive on local
shapes. This one description serves both passes:

- propagation (``ember.parallel.propagate``) reads a factor's split from whichever operand or
  result already has one and writes it to the others;
- the partitioner (``ember.parallel.partition``) picks each factor's axes, asks every operand
  for the layout the rule implies (inserting collectives where a value is laid out otherwise),
  and gives the results theirs.

A factor in ``reduced`` is summed away (dot_general's contracting dimensions, ``reduce_sum``'s
axes): split over axes ``A``, each device holds an addend of the result, which is then *partial*
over ``A`` (decision 0021); operands in ``accumulates`` (the array a scatter-add adds into)
must then be partial over ``A`` as well. A reduction by ``max`` or ``min`` (``reduce_op``) has
no partial layout: each device reduces its block and the partitioner combines the blocks at
once, by an all-reduce with that op (a softmax's maximum over a vocabulary-split row).

Indexed dimensions may be split too. A scatter drops updates whose index falls outside the
operand, so a scatter into a row-split array is each device scattering into its rows with
the indices made local (``index_columns``). A gather clamps instead, so a lookup into a
row-split table (``masked_columns``) makes the indices local, looks up the clamped row and
zeroes the rows whose index fell outside the device's block: the result is a partial sum over
the table's axes (Megatron's vocabulary-parallel embedding, cross-entropy's pick of the target
logit), summed by whichever collective the cost model picks.

``linear`` lists groups of operands in which the primitive is additive,
``f(a1 + a2, b1 + b2) = f(a1, b1) + f(a2, b2)``: when every operand of one group is partial
over an axis (and no other operand is), the result is partial over it too and no
communication is needed yet; ``mul`` is linear in each operand alone, ``add`` in both
together.

Every registered primitive gets a rule (:func:`install`): by its ``kind`` where that says
enough, by name where not. A primitive without one (library routines, random bits, control
flow other than :data:`WITH_BODIES`, whose bodies the passes go into) gets
:func:`replicated`: its operands are gathered whole and ``explain()`` says "no rule:
replicated"; the partitioner never fails on it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import REGISTRY, Primitive
from ember.ir.graph import Atom, Eqn, Literal, Var
from ember.ir.types import ArrayType

__all__ = ["Rule", "rule_for", "replicated", "install", "NO_RULE", "CALL_LIKE", "WITH_BODIES"]

Factors = tuple[int | None, ...]
NO_RULE = "no rule: replicated"
# Primitives whose ``body`` runs once on their operands, as a function call (nested jit's
# ``call``, checkpointing's ``remat``), and the others whose bodies propagation and the
# partitioner go into rather than replicating them: a scan's body, a cond's branches, a
# while loop's test and body, and a ``custom_vjp_call``'s function (past differentiation, the
# partitioner turns it into a call of that function: its derivative rules are spent).
CALL_LIKE = frozenset({"call", "remat"})
WITH_BODIES = CALL_LIKE | {"scan", "cond", "while", "custom_vjp_call"}


@dataclass(frozen=True)
class Rule:
    """The factor of each dimension of each operand and result (``None``: kept whole)."""

    operands: tuple[Factors, ...]
    results: tuple[Factors, ...]
    reduced: frozenset[int] = frozenset()
    linear: tuple[tuple[int, ...], ...] = ()
    # Operands the result accumulates into (scatter-add's operand): where a reduced factor is
    # split they must be partial over its axes too, each device adding its share to them.
    accumulates: tuple[int, ...] = ()
    # (indices operand, column, array operand): a column of an index array whose values
    # address that dimension of the array; where the dimension is split, the partitioner
    # makes the column's values local (subtracts the block's start).
    index_columns: tuple[tuple[int, int, int], ...] = ()
    # Index columns of a lookup (a gather, which clamps): made local as above, and the result's
    # rows whose index falls outside the device's block are zeroed. The dimension they address
    # has a factor of its own in ``reduced``, so the result is partial over its axes.
    masked_columns: tuple[tuple[int, int, int], ...] = ()
    # How a split reduced factor's blocks combine: "sum" leaves the result partial; "max" and
    # "min" are combined right away by an all-reduce with that op.
    reduce_op: str = "sum"
    note: str | None = None  # shown by explain(): why this equation was replicated


RuleFn = Callable[[Sequence[ArrayType], Sequence[ArrayType], dict[str, Any]], Rule]


def rule_for(eqn: Eqn, producers: Mapping[int, Eqn] | None = None,
             consts: Mapping[int, Any] | None = None) -> Rule:
    """The rule of ``eqn``'s primitive applied to its operand and result types.

    ``producers`` (``Var.id`` -> the equation that computes it, in the graph ``eqn`` is in)
    and ``consts`` (``Var.id`` -> the value of a constant) let a gather or scatter see index
    columns built from iotas (:func:`iota_columns`), which index the operand in step with the
    batch and so let both be split alike.
    """
    ins = [a.aval for a in eqn.inputs]
    outs = [v.aval for v in eqn.outputs]
    fn = eqn.prim.sharding_rule or _by_kind(eqn.prim)
    rule = fn(ins, outs, eqn.params)
    if producers is not None and eqn.prim.name in ("gather", "scatter"):
        columns = iota_columns(eqn.inputs[1], producers, consts or {})
        rule = _batched_columns(rule, eqn, columns)
    return rule


def replicated(ins: Sequence[ArrayType], outs: Sequence[ArrayType], params: dict[str, Any]
               ) -> Rule:
    """Every operand whole on every device; every result computed whole, everywhere."""
    return Rule(tuple((None,) * a.ndim for a in ins), tuple((None,) * a.ndim for a in outs),
                note=NO_RULE)


def _unit(ndim: int) -> Factors:
    return tuple(range(ndim))


# --- elementwise -------------------------------------------------------------------------------

# Elementwise primitives that are additive in all their operands together, in each operand
# alone, or in some operands together.
_ADDITIVE = {"add", "sub", "neg", "copy", "stop_gradient", "real", "imag", "conj", "complex"}
_LINEAR_GROUPS = {"mul": ((0,), (1,)), "div": ((0,),), "select": ((1, 2),)}


def _elementwise(ins: Sequence[ArrayType], outs: Sequence[ArrayType], params: dict[str, Any],
                 name: str) -> Rule:
    dims = _unit(outs[0].ndim)
    if name in _ADDITIVE or (name == "convert" and dtypes.is_inexact(ins[0].dtype)
                              and dtypes.is_inexact(outs[0].dtype)):
        linear = (tuple(range(len(ins))),)
    else:
        linear = _LINEAR_GROUPS.get(name, ())
    return Rule(tuple(dims for _ in ins), (dims,), linear=linear)


# --- reductions, cumulative, sort --------------------------------------------------------------

def _reduction(ins: Sequence[ArrayType], outs: Sequence[ArrayType], params: dict[str, Any],
               name: str) -> Rule:
    x = ins[0]
    axes = set(params["axes"]) if "axes" in params else {params["axis"] % x.ndim}
    kept = tuple(i for i in range(x.ndim) if i not in axes)
    if name == "reduce_sum":  # a split summed axis leaves each device a partial sum
        return Rule((_unit(x.ndim),), (kept,), reduced=frozenset(axes), linear=((0,),))
    if name in ("reduce_max", "reduce_min"):  # each device's extreme, then the extreme of those
        return Rule((_unit(x.ndim),), (kept,), reduced=frozenset(axes), reduce_op=name[7:])
    operand = tuple(None if i in axes else i for i in range(x.ndim))
    return Rule((operand,), tuple(kept for _ in outs))


def _along_axis(ins: Sequence[ArrayType], outs: Sequence[ArrayType], params: dict[str, Any]
                ) -> Rule:
    """cumsum/sort/top_k...: the dimension they run along stays whole (top_k's is the last)."""
    x = ins[0]
    axis = params.get("axis", -1) % x.ndim
    dims = tuple(None if i == axis else i for i in range(x.ndim))
    return Rule((dims,), tuple(dims for _ in outs))


# --- contraction -------------------------------------------------------------------------------

def _dot_general(ins: Sequence[ArrayType], outs: Sequence[ArrayType], params: dict[str, Any]
                 ) -> Rule:
    lhs, rhs = ins
    (lc, rc), (lb, rb) = params["dims"]
    ids = itertools.count()
    left: list[int | None] = [None] * lhs.ndim
    right: list[int | None] = [None] * rhs.ndim
    batch, contracted = [], set()
    for a, b in zip(lb, rb):
        left[a] = right[b] = f = next(ids)
        batch.append(f)
    for a, b in zip(lc, rc):
        left[a] = right[b] = f = next(ids)
        contracted.add(f)
    free_l = [i for i in range(lhs.ndim) if left[i] is None]
    free_r = [i for i in range(rhs.ndim) if right[i] is None]
    for i in free_l:
        left[i] = next(ids)
    for i in free_r:
        right[i] = next(ids)
    out = (*batch, *(left[i] for i in free_l), *(right[i] for i in free_r))
    return Rule((tuple(left), tuple(right)), (tuple(out),), reduced=frozenset(contracted),
                linear=((0,), (1,)))


def _attention(ins: Sequence[ArrayType], outs: Sequence[ArrayType], params: dict[str, Any]
               ) -> Rule:
    """attention and its jvp/backward: batch and head dimensions split; lengths and the head
    dimension stay whole (a causal block's query offset would change with a split length).

    Query heads and key/value heads share one factor: with ``Hq = g * Hk``, query head ``h``
    reads key head ``h // g``, so equal blocks of both line up for any split dividing ``Hk``.
    """
    q, k = ins[:2]
    nb = q.ndim - 3
    heads = nb

    def layout(a: ArrayType) -> Factors:
        """Batch axes, then (for ``[..., heads, length(, dim)]`` arrays) the head axis; an
        axis of size 1 where q's is full (a mask broadcast along it) stays whole."""
        batch = tuple(i if a.shape[i] == q.shape[i] else None for i in range(min(nb, a.ndim)))
        if a.ndim in (q.ndim, q.ndim - 1):
            head = heads if a.shape[nb] in (q.shape[nb], k.shape[nb]) else None
            return (*batch, head) + (None,) * (a.ndim - nb - 1)
        return batch if a.ndim == nb else (None,) * a.ndim

    return Rule(tuple(layout(a) for a in ins), tuple(layout(a) for a in outs))


# --- movement ----------------------------------------------------------------------------------

def _transpose(ins, outs, params) -> Rule:
    return Rule((_unit(ins[0].ndim),), (tuple(params["perm"]),), linear=((0,),))


def _broadcast_in_dim(ins, outs, params) -> Rule:
    x, out = ins[0], outs[0]
    ids = itertools.count(out.ndim)
    operand = tuple(d if x.shape[i] == out.shape[d] else None
                    for i, d in enumerate(params["dims"]))
    result = tuple(d if d in operand else next(ids) for d in range(out.ndim))
    return Rule((operand,), (result,), linear=((0,),))


def _reshape(ins, outs, params) -> Rule:
    """Dimensions are grouped into blocks of equal product (``[B, S, D] -> [B*S, D]``: blocks
    ``[B, S] -> [B*S]`` and ``[D] -> [D]``); within a block only the leading dimensions share
    a factor, because a split of the leading dimension is a split into contiguous runs of the
    whole block, which is the leading dimension's split on the other side too. A split of any
    other dimension of a block does not survive the reshape (it needs the value whole)."""
    a, b = ins[0].shape, outs[0].shape
    left: list[int | None] = [None] * len(a)
    right: list[int | None] = [None] * len(b)
    i = j = 0
    factor = 0
    while i < len(a) and j < len(b):
        while i < len(a) and a[i] == 1:
            i += 1
        while j < len(b) and b[j] == 1:
            j += 1
        if i == len(a) or j == len(b):
            break
        left[i] = right[j] = factor
        factor += 1
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa, i = pa * a[i], i + 1
            else:
                pb, j = pb * b[j], j + 1
    return Rule((tuple(left),), (tuple(right),), linear=((0,),))


def _whole_where(n: int, whole: Callable[[int], bool]) -> Factors:
    return tuple(None if whole(i) else i for i in range(n))


def _slice(ins, outs, params) -> Rule:
    x = ins[0]
    dims = _whole_where(x.ndim, lambda i: (params["start"][i], params["limit"][i],
                                           params["strides"][i]) != (0, x.shape[i], 1))
    return Rule((dims,), (dims,), linear=((0,),))


def _pad(ins, outs, params) -> Rule:
    x = ins[0]
    dims = _whole_where(x.ndim, lambda i: (params["lo"][i], params["hi"][i],
                                           params["interior"][i]) != (0, 0, 0))
    return Rule((dims, ()), (dims,), linear=((0, 1),))


def _concatenate(ins, outs, params) -> Rule:
    dims = _whole_where(outs[0].ndim, lambda i: i == params["axis"])
    return Rule(tuple(dims for _ in ins), (dims,), linear=(tuple(range(len(ins))),))


def _rev(ins, outs, params) -> Rule:
    dims = _whole_where(ins[0].ndim, lambda i: i in params["axes"])
    return Rule((dims,), (dims,), linear=((0,),))


def _iota(ins, outs, params) -> Rule:
    return Rule((), (_whole_where(outs[0].ndim, lambda i: i == params["dimension"]),))


# --- indexing ----------------------------------------------------------------------------------

def _dynamic_slice(ins, outs, params) -> Rule:
    x = ins[0]
    dims = _whole_where(x.ndim, lambda i: params["sizes"][i] != x.shape[i])
    return Rule((dims, *(() for _ in ins[1:])), (dims,), linear=((0,),))


def _dynamic_update_slice(ins, outs, params) -> Rule:
    x, update = ins[:2]
    dims = _whole_where(x.ndim, lambda i: update.shape[i] != x.shape[i])
    return Rule((dims, dims, *(() for _ in ins[2:])), (dims,), linear=((0, 1),))


def _gather(ins, outs, params) -> Rule:
    """``operand[indices]``: the operand's trailing dimensions and the indices' batch
    dimensions pass through to the result. Each indexed dimension of the operand has a factor
    of its own, summed away: split, it is a masked lookup into a block of rows (module
    docstring), and the result is partial over its axes."""
    operand, indices = ins
    k = indices.shape[-1]
    nb = indices.ndim - 1
    trailing = tuple(range(nb, nb + operand.ndim - k))
    looked_up = tuple(range(nb + operand.ndim - k, nb + operand.ndim))
    return Rule(((*looked_up, *trailing), (*range(nb), None)), ((*range(nb), *trailing),),
                reduced=frozenset(looked_up), linear=((0,),),
                masked_columns=tuple((1, c, 0) for c in range(k)))


def _scatter(ins, outs, params) -> Rule:
    """The operand's trailing dimensions pass through from the updates; its indexed ones may
    be split alike with the result's, each device scattering into its own rows (updates for
    other rows fall outside and are dropped; no communication: the gradient of a lookup into
    a row-split table). A scatter-add may split the update batch too: each device adds its
    updates into its share of the operand (made partial), so the result is partial over the
    batch's axes (the gradient of an embedding lookup on a data-parallel batch). Other modes
    keep the batch whole."""
    operand, indices, updates = ins
    k = indices.shape[-1]
    nb = indices.ndim - 1
    ntrail = operand.ndim - k
    trailing = tuple(range(nb, nb + ntrail))
    dims = tuple(range(nb + ntrail, nb + ntrail + k)) + trailing
    columns = tuple((1, c, 0) for c in range(k))
    if params["mode"] != "add":
        whole = (None,) * nb
        linear = ((0, 2),) if params["mode"] == "set" else ()
        return Rule((dims, (None,) * indices.ndim, whole + trailing), (dims,), linear=linear,
                    index_columns=columns)
    batch = tuple(range(nb))
    return Rule((dims, (*batch, None), batch + trailing), (dims,), reduced=frozenset(batch),
                linear=((0, 2),), accumulates=(0,), index_columns=columns)


def iota_columns(indices: Atom, producers: Mapping[int, Eqn], consts: Mapping[int, Any]
                 ) -> dict[int, int]:
    """The columns of an index array ``[*batch, k]`` that hold, at every position, that
    position's index along one of the batch dimensions: column -> that dimension.

    ``take_along_axis`` (cross-entropy's pick of the target's logit) builds its indices so: an
    ``iota`` along each batch dimension, reshaped to ``[*batch, 1]`` and concatenated with the
    data-dependent column; the gradient's scatter clamps them into the operand's bounds first.
    Found by following clamps (``min``/``max`` against constants that leave the column's
    values alone), ``concatenate``, ``reshape`` and ``convert`` back to ``iota``s.
    """
    if not isinstance(indices, Var):
        return {}
    batch, k = indices.aval.shape[:-1], indices.aval.shape[-1]
    lo, hi = np.full(k, -np.inf), np.full(k, np.inf)  # the tightest clamps on each column
    eqn = producers.get(indices.id)
    while eqn is not None and eqn.prim.name in ("min", "max"):
        bounds = [_column_constant(a, k, producers, consts) for a in eqn.inputs]
        side = 1 if bounds[1] is not None else 0 if bounds[0] is not None else None
        if side is None:
            return {}
        if eqn.prim.name == "max":
            lo = np.maximum(lo, bounds[side])
        else:
            hi = np.minimum(hi, bounds[side])
        eqn = producers.get(eqn.inputs[1 - side].id) if isinstance(
            eqn.inputs[1 - side], Var) else None
    if eqn is None:
        return {}
    concatenated = eqn.prim.name == "concatenate" and eqn.params["axis"] == len(batch)
    parts: Sequence[Atom] = eqn.inputs if concatenated else eqn.outputs
    columns, column = {}, 0
    for part in parts:
        dim = _iota_dimension(part, batch, producers)
        if dim is not None and part.aval.shape[-1] == 1 and lo[column] <= 0 \
                and hi[column] >= batch[dim] - 1:
            columns[column] = dim
        column += part.aval.shape[-1]
    return columns


def _iota_dimension(value: Atom, batch: tuple[int, ...], producers: Mapping[int, Eqn]
                    ) -> int | None:
    """The dimension an ``iota`` of the batch's shape runs along, if ``value`` is one
    (reshaped to ``[*batch, 1]``, converted)."""
    while isinstance(value, Var):
        eqn = producers.get(value.id)
        if eqn is None:
            return None
        if eqn.prim.name == "iota":
            return eqn.params["dimension"] if eqn.params["shape"] in (batch, (*batch, 1)) \
                else None
        if eqn.prim.name not in ("reshape", "convert"):
            return None
        value = eqn.inputs[0]
    return None


def _column_constant(atom: Atom, k: int, producers: Mapping[int, Eqn],
                     consts: Mapping[int, Any]) -> np.ndarray | None:
    """The per-column values of a constant broadcast over an index array's rows, if it is one
    (a literal, or a constant vector broadcast along the last dimension)."""
    if isinstance(atom, Literal):
        return np.full(k, float(atom.value))
    eqn = producers.get(atom.id)
    if eqn is None or eqn.prim.name != "broadcast_in_dim":
        return None
    source = eqn.inputs[0]
    if isinstance(source, Literal):
        return np.full(k, float(source.value))
    if source.id in consts and eqn.params["dims"] == (atom.aval.ndim - 1,):
        return np.asarray(consts[source.id], dtype=np.float64).reshape(k)
    return None


def _batched_columns(rule: Rule, eqn: Eqn, columns: dict[int, int]) -> Rule:
    """Give each operand dimension an iota column indexes the factor of that column's batch
    dimension (where their sizes agree) instead of a factor of its own: the column's values
    are made local, never masked, since each device's indices address its own block. A
    scatter's result then splits along it too, and its batch factor is no longer summed
    away."""
    operand, indices = eqn.inputs[0].aval, eqn.inputs[1].aval
    array = list(rule.operands[0])
    result = list(rule.results[0])
    reduced = set(rule.reduced)
    batched = set()
    for column, dim in sorted(columns.items()):
        factor = rule.operands[1][dim]
        if factor is None or operand.shape[column] != indices.shape[dim]:
            continue
        reduced.discard(array[column])  # a gather's lookup factor: no longer a lookup
        array[column] = factor
        if eqn.prim.name == "scatter":
            result[column] = factor
        reduced.discard(factor)
        batched.add(column)
    if not batched:
        return rule
    results = (tuple(result),) if eqn.prim.name == "scatter" else rule.results
    unmasked = tuple(c for c in rule.masked_columns if c[1] in batched)
    return replace(rule, operands=(tuple(array), *rule.operands[1:]), results=results,
                   reduced=frozenset(reduced), index_columns=rule.index_columns + unmasked,
                   masked_columns=tuple(c for c in rule.masked_columns if c[1] not in batched))


# --- installing --------------------------------------------------------------------------------

def _named(fn: Callable[..., Rule], name: str) -> RuleFn:
    return lambda ins, outs, params: fn(ins, outs, params, name)


_BY_NAME: dict[str, RuleFn] = {
    "dot_general": _dot_general, "attention": _attention, "attention_jvp": _attention,
    "attention_bwd": _attention, "transpose": _transpose, "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape, "slice": _slice, "pad": _pad, "concatenate": _concatenate,
    "rev": _rev, "iota": _iota, "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice, "gather": _gather, "scatter": _scatter,
}


def _by_kind(prim: Primitive) -> RuleFn:
    if prim.kind == "elementwise":
        return _named(_elementwise, prim.name)
    if prim.kind == "reduction":
        return _named(_reduction, prim.name)
    if prim.kind in ("cumulative", "sort"):
        return _along_axis
    return replicated


def install() -> None:
    """Give every registered primitive its rule (called on import; again after registering
    primitives later; :func:`rule_for` also falls back to the kind's rule)."""
    for prim in REGISTRY.values():
        if prim.sharding_rule is None:
            prim.sharding_rule = _BY_NAME.get(prim.name) or _by_kind(prim)


install()
