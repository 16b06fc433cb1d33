"""``einsum``: Einstein summation lowered to diagonals, sums and pairwise ``dot_general``.

No einsum primitive exists: the expression is rewritten, when traced, into primitives every
transformation already understands. Per operand, repeated labels become diagonals, size-1
dimensions that broadcast against a longer one are dropped, and labels found nowhere else are
summed out. Operands are then contracted two at a time, always picking the pair whose result is
smallest (a greedy order, which avoids building large outer products), until one remains; it
is transposed into the output order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ember import dtypes
from ember.core.trace import aval_of
from ember.errors import EmberValueError, ShapeError, op_error
from ember.numpy._core import value
from ember.numpy._shape_more import diagonal
from ember.ops import elementwise as ew
from ember.ops import reduce as rd
from ember.ops import structural as st
from ember.ops.linalg import dot_general

__all__ = ["einsum"]

Labels = list[str]


def einsum(subscripts: Any, *operands: Any, dtype: Any = None, optimize: Any = True) -> Any:
    """``numpy.einsum``: explicit (``'ij,jk->ik'``) or implicit (``'ij,jk'``) output, ``...``
    for broadcast dimensions, and NumPy's interleaved ``(op, [0, 1], op, [1, 2])`` form.

    ``optimize`` is accepted for compatibility; the contraction order is always greedy.
    """
    if not isinstance(subscripts, str):
        subscripts, operands = _from_sublists(subscripts, operands)
    vals = [value(o) for o in operands]
    if not vals:
        raise op_error(EmberValueError, "einsum", "needs at least one operand")
    inputs, output = _parse(subscripts, [aval_of(v).shape for v in vals])
    dt = dtypes.canonicalize(dtype) if dtype is not None else dtypes.result_type(*vals)
    terms = [_take_diagonals(ew.convert(v, dt), labels) for v, labels in zip(vals, inputs)]
    terms = _drop_broadcast_dims(terms)
    terms = [_sum_private(k, terms, output) for k in range(len(terms))]
    while len(terms) > 1:
        i, j = _cheapest_pair(terms, output)
        rest = [t for k, t in enumerate(terms) if k not in (i, j)]
        keep = set(output).union(*(labels for _, labels in rest))
        terms = rest + [_contract(terms[i], terms[j], keep)]
    x, labels = terms[0]
    return st.transpose(x, [labels.index(label) for label in output])


# --- parsing ---------------------------------------------------------------------------------

def _from_sublists(first: Any, rest: Sequence[Any]) -> tuple[str, list[Any]]:
    """Turn ``einsum(op0, sub0, op1, sub1, ..., [out])`` into a subscripts string."""
    args = [first, *rest]
    out = args.pop() if len(args) % 2 else None
    operands, subs = args[0::2], args[1::2]

    def letters(sub: Sequence[Any]) -> str:
        text = ""
        for s in sub:
            if s is Ellipsis:
                text += "..."
            elif isinstance(s, int) and 0 <= s < 52:
                text += chr(ord("a") + s) if s < 26 else chr(ord("A") + s - 26)
            else:
                raise op_error(EmberValueError, "einsum", f"subscript {s!r} must be an integer "
                               "in [0, 52) or Ellipsis")
        return text

    text = ",".join(letters(s) for s in subs)
    if out is not None:
        text += "->" + letters(out)
    return text, operands


def _split_term(term: str, ndim: int, where: str) -> Labels:
    """Labels of one term; ``...`` becomes labels ``'...k'`` numbered from the right, so
    ellipsis dimensions of different operands line up right-aligned, as they broadcast."""
    if term.count("...") > 1 or "." in term.replace("...", ""):
        raise op_error(EmberValueError, "einsum", f"invalid ellipsis in {where} {term!r}")
    letters = term.replace("...", "")
    for c in letters:
        if not ("a" <= c <= "z" or "A" <= c <= "Z"):
            raise op_error(EmberValueError, "einsum", f"invalid subscript {c!r} in {where} "
                           f"{term!r}: only letters a-z, A-Z are allowed")
    if "..." not in term:
        if len(letters) != ndim:
            raise op_error(ShapeError, "einsum", f"{where} {term!r} has {len(letters)} labels "
                           f"but the operand has {ndim} dimensions")
        return list(letters)
    n_ell = ndim - len(letters)
    if n_ell < 0:
        raise op_error(ShapeError, "einsum", f"{where} {term!r} has more labels than the "
                       f"operand's {ndim} dimensions")
    head, tail = term.split("...")
    return list(head) + [f"...{n_ell - i}" for i in range(n_ell)] + list(tail)


def _parse(subscripts: str, shapes: list[tuple[int, ...]]) -> tuple[list[Labels], Labels]:
    text = "".join(subscripts.split())
    lhs, arrow, rhs = text.partition("->")
    if "->" in rhs or "-" in lhs or ">" in lhs:
        raise op_error(EmberValueError, "einsum", f"malformed subscripts {subscripts!r}")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise op_error(EmberValueError, "einsum", f"{subscripts!r} names {len(terms)} operands "
                       f"but {len(shapes)} were given")
    inputs = [_split_term(t, len(s), f"operand {k}") for k, (t, s) in
              enumerate(zip(terms, shapes))]
    n_ell = max((sum(lb.startswith("...") for lb in labels) for labels in inputs), default=0)
    ellipsis = [f"...{n_ell - i}" for i in range(n_ell)]
    if arrow:
        if rhs.count("...") > 1 or "." in rhs.replace("...", ""):
            raise op_error(EmberValueError, "einsum", f"invalid ellipsis in output {rhs!r}")
        head, _, tail = rhs.partition("...")
        output = list(head) + (ellipsis if "..." in rhs else []) + list(tail)
        seen = {lb for labels in inputs for lb in labels}
        for lb in output:
            if output.count(lb) > 1:
                raise op_error(EmberValueError, "einsum", f"output subscript {lb!r} appears "
                               "more than once")
            if lb not in seen:
                raise op_error(EmberValueError, "einsum", f"output subscript {lb!r} does not "
                               "appear in any input")
    else:
        counts: dict[str, int] = {}
        for labels in inputs:
            for lb in labels:
                counts[lb] = counts.get(lb, 0) + 1
        output = ellipsis + sorted(lb for lb, c in counts.items()
                                   if c == 1 and not lb.startswith("..."))
    return inputs, output


# --- per-operand rewriting -------------------------------------------------------------------

def _take_diagonals(x: Any, labels: Labels) -> tuple[Any, Labels]:
    """Replace every label repeated within one operand by the diagonal over its axes."""
    labels = list(labels)
    while len(set(labels)) < len(labels):
        label = next(lb for lb in labels if labels.count(lb) > 1)
        p = labels.index(label)
        q = labels.index(label, p + 1)
        shape = aval_of(x).shape
        if shape[p] != shape[q]:
            raise op_error(ShapeError, "einsum", f"dimensions for repeated label {label!r} do "
                           f"not match ({shape[p]} != {shape[q]}) in one operand")
        x = diagonal(x, 0, p, q)
        labels = [lb for k, lb in enumerate(labels) if k not in (p, q)] + [label]
    return x, labels


def _drop_broadcast_dims(terms: list[tuple[Any, Labels]]) -> list[tuple[Any, Labels]]:
    """Check label sizes agree; a size-1 dimension against a longer one broadcasts, which is
    the same as dropping it from that operand."""
    sizes: dict[str, int] = {}
    for x, labels in terms:
        for lb, n in zip(labels, aval_of(x).shape):
            if sizes.get(lb, 1) not in (1, n) and n != 1:
                raise op_error(ShapeError, "einsum", f"label {lb!r} has size {sizes[lb]} in "
                               f"one operand and {n} in another")
            sizes[lb] = max(sizes.get(lb, 1), n)
    out = []
    for x, labels in terms:
        shape = aval_of(x).shape
        drop = [k for k, (lb, n) in enumerate(zip(labels, shape)) if n == 1 and sizes[lb] > 1]
        if drop:
            x = st.squeeze(x, drop)
            labels = [lb for k, lb in enumerate(labels) if k not in drop]
        out.append((x, labels))
    return out


def _sum_private(k: int, terms: list[tuple[Any, Labels]], output: Labels) -> tuple[Any, Labels]:
    """Operand ``k`` with the labels that no other operand and not the output mention summed."""
    x, labels = terms[k]
    elsewhere = set(output).union(*(other for j, (_, other) in enumerate(terms) if j != k))
    axes = [k for k, lb in enumerate(labels) if lb not in elsewhere]
    if not axes:
        return x, labels
    return rd.reduce_sum(x, axes), [lb for lb in labels if lb in elsewhere]


# --- contraction -----------------------------------------------------------------------------

def _sizes(terms: list[tuple[Any, Labels]]) -> dict[str, int]:
    return {lb: n for x, labels in terms for lb, n in zip(labels, aval_of(x).shape)}


def _result_labels(a: Labels, b: Labels, keep: set[str]) -> tuple[Labels, Labels, Labels]:
    """(batch, contracted, result) labels of contracting operands labelled ``a`` and ``b``."""
    common = [lb for lb in a if lb in b]
    batch = [lb for lb in common if lb in keep]
    contracted = [lb for lb in common if lb not in keep]
    result = batch + [lb for lb in a if lb not in common] + [lb for lb in b if lb not in common]
    return batch, contracted, result


def _cheapest_pair(terms: list[tuple[Any, Labels]], output: Labels) -> tuple[int, int]:
    sizes = _sizes(terms)
    best = (math.inf, 0, 1)
    for i in range(len(terms)):
        for j in range(i + 1, len(terms)):
            others = [t[1] for k, t in enumerate(terms) if k not in (i, j)]
            keep = set(output).union(*others)
            _, _, result = _result_labels(terms[i][1], terms[j][1], keep)
            cost = math.prod(sizes[lb] for lb in result)
            if cost < best[0]:
                best = (cost, i, j)
    return best[1], best[2]


def _contract(lhs: tuple[Any, Labels], rhs: tuple[Any, Labels], keep: set[str]
              ) -> tuple[Any, Labels]:
    (x, a), (y, b) = lhs, rhs
    batch, contracted, result = _result_labels(a, b, keep)
    out = dot_general(x, y,
                      ([a.index(lb) for lb in contracted], [b.index(lb) for lb in contracted]),
                      ([a.index(lb) for lb in batch], [b.index(lb) for lb in batch]))
    return out, result
