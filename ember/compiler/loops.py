"""The loop description of a fused equation, shared by every code generator.

A ``fused`` equation (see :mod:`ember.compiler.fusion`) iterates over a domain ``(full,
reduced)``: a full shape whose ``reduced`` axes (none for an elementwise group) are the row
axes ``r0, r1...`` its reductions run over, and whose other axes are the outer axes
``o0, o1...``. :func:`describe` turns the group's body into a :class:`LoopNest`:

- a list of statements run once per outer point, in which :class:`RowLoop` blocks run once per
  row point (a softmax has three: the max, the sum of exponentials, the normalised output);
- values are scalar expressions: :class:`Load` of an input at an :class:`Index`, constants,
  :class:`Where` (pad and concatenate pick a source by index), references to locals that
  :class:`Let` statements computed with an elementwise primitive, and reduction accumulators
  (:class:`Init`, :class:`Update`);
- :class:`Store` writes an output element; :class:`ScratchStore`/:class:`ScratchLoad` keep a
  row of a computed value that a later row loop reads again, so nothing is computed twice;
- :meth:`LoopNest.in_place` says which outputs may share a buffer with an input.

Movement primitives never produce statements: they only change index expressions. Their index
rules (registered as ``prim.lowerings["loops"]``) map a point of the result to the element of
the operand it reads (``gather``) and, for views that move each element to exactly one place,
an operand element to its place in the result (``place``, used to write a computed value
straight into a transposed or concatenated output). Fusion uses the same rules to decide which
views stay inside a group.

Index expressions are affine in the loop variables, with floor division and remainder by
constants where a reshape splits or merges axes, kept in a normal form (a sum of terms with
integer coefficients) and simplified with each variable's range, so that a reshape followed by
its inverse gives back the plain loop variable. Every index evaluated is non-negative, so a
backend may render floor division and remainder with C's ``/`` and ``%``. Where a view merges
axes that the loops then divide again (``(o2/64)*32768 + o1*64 + (o2%64)``: attention's output
moved back to [batch, seq, heads*dim]), :func:`describe` splits the loop into the factors
(9 by 64 here) so each index is affine and the innermost loop reads memory in order: division
per element keeps a compiler from vectorising a loop, and it ran 4-8x slower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ember.ir.graph import ClosedGraph, Eqn, Literal, Var
from ember.ir.types import ArrayType

__all__ = ["Index", "Axis", "Div", "Mod", "Pred", "Load", "Const", "IndexValue", "Where",
           "Ref", "ScratchLoad", "Let", "Init", "Update", "Store", "ScratchStore", "RowLoop",
           "LoopNest", "ViewRule", "describe", "flat_index", "site", "domain_of", "view_rule",
           "same_site", "reduced_axes", "domain_level", "loads_of", "split", "unflatten"]


# --- index expressions -----------------------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """A loop variable running over ``0 <= name < size``."""

    name: str
    size: int

    def bounds(self) -> tuple[int, int]:
        return 0, self.size - 1


@dataclass(frozen=True)
class Div:
    """``floor(expr / divisor)``."""

    expr: Index
    divisor: int

    def bounds(self) -> tuple[int, int]:
        lo, hi = self.expr.bounds()
        return lo // self.divisor, hi // self.divisor


@dataclass(frozen=True)
class Mod:
    """``expr mod divisor`` (floor convention; operands are non-negative where evaluated)."""

    expr: Index
    divisor: int

    def bounds(self) -> tuple[int, int]:
        lo, hi = self.expr.bounds()
        return (lo, hi) if lo >= 0 and hi < self.divisor else (0, self.divisor - 1)


Atom = Axis | Div | Mod


@dataclass(frozen=True, eq=False)
class Index:
    """``sum(coefficient * atom) + const``; build with :meth:`axis`, :meth:`of`, ``+``, ``*``,
    ``//`` and ``%`` (integers only), which keep the normal form.

    Terms keep the order they were built in (so the code reads ``i0*8 + i1``); two indices
    with the same terms in another order are equal and hash alike.
    """

    terms: tuple[tuple[Atom, int], ...] = ()
    const: int = 0

    def _key(self) -> tuple[frozenset, int]:
        key = self.__dict__.get("_cached_key")
        if key is None:
            key = (frozenset(self.terms), self.const)
            object.__setattr__(self, "_cached_key", key)
        return key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Index) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @staticmethod
    def of(value: int) -> Index:
        return Index((), int(value))

    @staticmethod
    def axis(name: str, size: int) -> Index:
        """A loop variable; one of size 1 is the constant 0."""
        return Index.of(0) if size == 1 else Index(((Axis(name, size), 1),))

    @staticmethod
    def _make(terms: dict[Atom, int], const: int) -> Index:
        # d * (x // d) + x % d == x: an axis a reshape split, merged back by another.
        for a, c in list(terms.items()):
            if isinstance(a, Mod) and c and a in terms:
                div = Div(a.expr, a.divisor)
                if terms.get(div, 0) == c * a.divisor:
                    del terms[a], terms[div]
                    for b, cb in a.expr.terms:
                        terms[b] = terms.get(b, 0) + c * cb
                    const += c * a.expr.const
        return Index(tuple((a, c) for a, c in terms.items() if c), const)

    def __add__(self, other: Index | int) -> Index:
        other = other if isinstance(other, Index) else Index.of(other)
        terms = dict(self.terms)
        for a, c in other.terms:
            terms[a] = terms.get(a, 0) + c
        return Index._make(terms, self.const + other.const)

    def __mul__(self, k: int) -> Index:
        return Index._make({a: c * k for a, c in self.terms}, self.const * k)

    def __neg__(self) -> Index:
        return self * -1

    def __sub__(self, other: Index | int) -> Index:
        return self + (-(other if isinstance(other, Index) else Index.of(other)))

    def bounds(self) -> tuple[int, int]:
        lo = hi = self.const
        for a, c in self.terms:
            alo, ahi = a.bounds()
            lo += min(c * alo, c * ahi)
            hi += max(c * alo, c * ahi)
        return lo, hi

    def _split(self, d: int) -> tuple[Index, Index]:
        """``self == d * quotient + rest`` with the terms divisible by ``d`` in the quotient."""
        q = {a: c // d for a, c in self.terms if c % d == 0}
        r = {a: c for a, c in self.terms if c % d}
        cq, cr = divmod(self.const, d)
        return Index._make(q, cq), Index._make(r, cr)

    def single(self) -> Atom | None:
        """The atom, when the expression is exactly one atom."""
        if self.const == 0 and len(self.terms) == 1 and self.terms[0][1] == 1:
            return self.terms[0][0]
        return None

    def __floordiv__(self, d: int) -> Index:
        if d == 1:
            return self
        quotient, rest = self._split(d)  # floor((d*q + r) / d) == q + floor(r / d)
        lo, hi = rest.bounds()
        if 0 <= lo and hi < d:
            return quotient
        inner = rest.single()
        if isinstance(inner, Div):  # floor(floor(x / a) / b) == floor(x / (a * b))
            return quotient + Index(((Div(inner.expr, inner.divisor * d), 1),))
        return quotient + Index(((Div(rest, d), 1),))

    def __mod__(self, d: int) -> Index:
        if d == 1:
            return Index.of(0)
        _, rest = self._split(d)  # (d*q + r) mod d == r mod d
        lo, hi = rest.bounds()
        if 0 <= lo and hi < d:
            return rest
        inner = rest.single()
        if isinstance(inner, Mod) and inner.divisor % d == 0:
            return inner.expr % d
        return Index(((Mod(rest, d), 1),))

    def is_const(self) -> bool:
        return not self.terms

    def format(self, name: Callable[[Axis], str] = lambda a: a.name, div: str = "/",
               mod: str = "%") -> str:
        """The expression in C-like syntax (``div``/``mod`` name the operators)."""
        parts = []
        for a, c in self.terms:
            if isinstance(a, Axis):
                s = name(a)
            else:
                op = div if isinstance(a, Div) else mod
                inner = a.expr.format(name, div, mod)
                inner = inner if a.expr.single() or a.expr.is_const() else f"({inner})"
                s = f"({inner}{op}{a.divisor})"
            parts.append(s if c == 1 else f"{s}*{c}")
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts).replace("+ -", "- ")


def flat_index(idx: Sequence[Index], shape: Sequence[int]) -> Index:
    """Row-major offset of element ``idx`` in an array of ``shape``."""
    flat = Index.of(0)
    for i, n in zip(idx, shape):
        flat = flat * int(n) + i
    return flat


def unflatten(flat: Index, shape: Sequence[int]) -> tuple[Index, ...]:
    out = []
    stride = int(np.prod(shape, dtype=np.int64))
    for n in shape:
        stride //= max(int(n), 1)
        out.append((flat // stride) % int(n) if n != 1 else Index.of(0))
    return tuple(out)


@dataclass(frozen=True)
class Pred:
    """``lo <= expr < hi`` and ``expr % step == 0`` (a conjunction; ``hi`` None: unbounded)."""

    expr: Index
    lo: int | None = None
    hi: int | None = None
    step: int = 1

    def value(self) -> bool | None:
        """True or False when the bounds of ``expr`` decide it, else None."""
        lo, hi = self.expr.bounds()
        if (self.lo is not None and hi < self.lo) or (self.hi is not None and lo >= self.hi):
            return False
        decided = (self.lo is None or lo >= self.lo) and (self.hi is None or hi < self.hi)
        if self.step != 1:
            rest = self.expr % self.step
            if rest.is_const() and rest.const != 0:
                return False
            decided = decided and rest.is_const()
        return True if decided else None


# --- scalar expressions and statements -------------------------------------------------------

@dataclass(frozen=True)
class Load:
    """Element ``index`` (flat) of input buffer ``input``."""

    input: int
    index: Index
    dtype: np.dtype


@dataclass(frozen=True)
class Const:
    value: Any
    dtype: np.dtype


@dataclass(frozen=True)
class IndexValue:
    """A loop index as a value (``iota``)."""

    index: Index
    dtype: np.dtype


@dataclass(frozen=True)
class Where:
    """``then`` where every predicate holds, else ``other`` (only one side is evaluated)."""

    preds: tuple[Pred, ...]
    then: Any
    other: Any
    dtype: np.dtype


@dataclass(frozen=True)
class Ref:
    """The local that a :class:`Let` (or a reduction's :class:`Init`) defined."""

    local: int
    dtype: np.dtype


@dataclass(frozen=True)
class ScratchLoad:
    """Element ``index`` (flat over the row) of a row kept in scratch buffer ``scratch``."""

    scratch: int
    index: Index
    dtype: np.dtype


Expr = Load | Const | IndexValue | Where | Ref | ScratchLoad


@dataclass(frozen=True)
class Let:
    """``local = eqn.prim(*args)`` for an elementwise equation (its params and types)."""

    local: int
    eqn: Eqn
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Init:
    """Start reduction ``eqn`` in accumulator ``local`` (before its row loop)."""

    local: int
    eqn: Eqn


@dataclass(frozen=True)
class Update:
    """Combine ``value`` into accumulator ``local`` of reduction ``eqn`` (in a row loop)."""

    local: int
    eqn: Eqn
    value: Any


@dataclass(frozen=True)
class Store:
    """Write ``value`` to element ``index`` (flat) of output buffer ``output``."""

    output: int
    index: Index
    value: Any


@dataclass(frozen=True)
class ScratchStore:
    scratch: int
    index: Index
    value: Any


@dataclass
class RowLoop:
    """Statements run for every point of the row (axes ``r0, r1...``)."""

    body: list[Any] = field(default_factory=list)


@dataclass
class LoopNest:
    """A fused equation as loops: run ``body`` for every point of ``outer``."""

    outer: tuple[int, ...]
    row: tuple[int, ...]
    inputs: list[ArrayType]
    outputs: list[ArrayType]
    scratch: list[np.dtype]  # one row of each, per outer point (per thread)
    body: list[Any]

    def statements(self) -> list[Any]:
        """Every statement, row loops flattened (for checks over the whole kernel)."""
        out = []
        for s in self.body:
            out.extend(s.body if isinstance(s, RowLoop) else [s])
        return out

    def in_place(self) -> tuple[tuple[int, int], ...]:
        """Pairs ``(output, input)`` that may be one buffer: the output is written once per
        element, at the only index the input is ever read at, no earlier than the input's
        last read. Each output gets the candidate that the fewest other outputs read (the new
        AdamW parameter pairs with the old parameter, not with the gradient every result
        reads), so a plan that writes over donated operands finds the natural pairs."""
        store_at: dict[int, tuple[int, Store]] = {}
        loads: dict[int, list[tuple[int, Index]]] = {}
        counts: dict[int, int] = {}
        # Positions in run order: at one point, a row loop runs its statements in order, so
        # a read that follows the store in the same loop would see the output, not the input.
        for at, st in enumerate(self.statements()):
            if isinstance(st, Store):
                counts[st.output] = counts.get(st.output, 0) + 1
                store_at[st.output] = (at, st)
            for load in loads_of(st):
                loads.setdefault(load.input, []).append((at, load.index))
        readers = self._readers()
        pairs, taken = [], set()
        for k, (at, store) in store_at.items():
            out = self.outputs[k]
            fits = [j for j, seen in loads.items()
                    if counts[k] == 1 and j not in taken
                    and (self.inputs[j].shape, self.inputs[j].dtype) == (out.shape, out.dtype)
                    and all(i == store.index and s <= at for s, i in seen)]
            if fits:
                j = min(fits, key=lambda j: (len(readers.get(j, ())), j))
                pairs.append((k, j))
                taken.add(j)
        return tuple(pairs)

    def divisions(self) -> list[Div | Mod]:
        """Every floor division and remainder the indices compute, once per place they
        appear (a kernel without them reads and writes memory at affine offsets)."""
        return [d for idx in _indices(self.body) for d in _divisions(idx)]

    def _readers(self) -> dict[int, set[int]]:
        """For each input, the outputs whose values depend on it."""
        defs: dict[int, list[Any]] = {}  # local or scratch -> the expressions it holds
        for st in self.statements():
            if isinstance(st, Let):
                defs.setdefault(("v", st.local), []).extend(st.args)
            elif isinstance(st, Update):
                defs.setdefault(("v", st.local), []).append(st.value)
            elif isinstance(st, ScratchStore):
                defs.setdefault(("s", st.scratch), []).append(st.value)
        memo: dict[Any, frozenset[int]] = {}

        def inputs_of(e: Any) -> frozenset[int]:
            if isinstance(e, Load):
                return frozenset([e.input])
            if isinstance(e, Where):
                return inputs_of(e.then) | inputs_of(e.other)
            key = ("v", e.local) if isinstance(e, Ref) else \
                ("s", e.scratch) if isinstance(e, ScratchLoad) else None
            if key is None:
                return frozenset()
            if key not in memo:
                memo[key] = frozenset()  # a local never depends on itself
                memo[key] = frozenset().union(*(inputs_of(x) for x in defs.get(key, [])))
            return memo[key]

        readers: dict[int, set[int]] = {}
        for st in self.statements():
            if isinstance(st, Store):
                for j in inputs_of(st.value):
                    readers.setdefault(j, set()).add(st.output)
        return readers


def _accumulates(eqn: Eqn) -> bool:
    """Whether an equation is a reduction over at least one axis (one over none is its
    operand)."""
    return eqn.prim.kind == "reduction" and bool(reduced_axes(eqn))


def loads_of(node: Any) -> list[Load]:
    """The loads of input buffers in a statement or expression."""
    if isinstance(node, Load):
        return [node]
    if isinstance(node, Where):
        return loads_of(node.then) + loads_of(node.other)
    if isinstance(node, Let):
        return [x for a in node.args for x in loads_of(a)]
    if isinstance(node, (Update, Store, ScratchStore)):
        return loads_of(node.value)
    return []


# --- index rules of views --------------------------------------------------------------------

@dataclass(frozen=True)
class ViewRule:
    """How a movement or generator primitive indexes.

    ``gather(eqn, idx)`` lists where element ``idx`` of the result comes from, as
    ``(preds, source)`` pairs tried in order (the last has no predicates): ``source`` is
    ``(operand number, operand index)`` or, for generators, a scalar expression.
    ``place(eqn, k, idx)`` is where element ``idx`` of operand ``k`` lands in the result, for
    views that move every element to exactly one place.
    """

    gather: Callable[[Eqn, tuple[Index, ...]], list[tuple[tuple[Pred, ...], Any]]]
    place: Callable[[Eqn, int, tuple[Index, ...]], tuple[Index, ...]] | None = None


def view_rule(prim: Any) -> ViewRule | None:
    return prim.lowerings.get("loops")


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


def _broadcast_gather(eqn, idx):
    shape, dims = eqn.params["shape"], eqn.params["dims"]
    x_shape = _shape(eqn.inputs[0])
    return [((), (0, tuple(idx[d] if n == shape[d] else Index.of(0)
                           for n, d in zip(x_shape, dims))))]


def _reshape_gather(eqn, idx):
    return [((), (0, unflatten(flat_index(idx, _shape(eqn.outputs[0])),
                               _shape(eqn.inputs[0]))))]


def _reshape_place(eqn, k, idx):
    return unflatten(flat_index(idx, _shape(eqn.inputs[0])), _shape(eqn.outputs[0]))


def _transpose_gather(eqn, idx):
    perm = eqn.params["perm"]
    src = [Index.of(0)] * len(perm)
    for i, p in enumerate(perm):
        src[p] = idx[i]
    return [((), (0, tuple(src)))]


def _transpose_place(eqn, k, idx):
    return tuple(idx[p] for p in eqn.params["perm"])


def _rev_flip(eqn, idx):
    shape = _shape(eqn.inputs[0])
    return tuple(Index.of(shape[j] - 1) - i if j in eqn.params["axes"] else i
                 for j, i in enumerate(idx))


def _slice_gather(eqn, idx):
    p = eqn.params
    return [((), (0, tuple(i * d + s for i, s, d in zip(idx, p["start"], p["strides"]))))]


def _pad_gather(eqn, idx):
    p = eqn.params
    preds, src = [], []
    for i, n, lo, step in zip(idx, _shape(eqn.inputs[0]), p["lo"], p["interior"]):
        t = i - lo  # position in the operand spread out by the interior padding
        preds.append(Pred(t, 0, (n - 1) * (step + 1) + 1, step + 1))
        src.append(t // (step + 1))
    return [(tuple(preds), (0, tuple(src))), ((), (1, ()))]


def _concatenate_gather(eqn, idx):
    axis = eqn.params["axis"]
    out, offset = [], 0
    for k, x in enumerate(eqn.inputs):
        n = _shape(x)[axis]
        shifted = tuple(i - offset if j == axis else i for j, i in enumerate(idx))
        last = k == len(eqn.inputs) - 1
        out.append(((), (k, shifted)) if last else
                   ((Pred(idx[axis], None, offset + n),), (k, shifted)))
        offset += n
    return out


def _concatenate_place(eqn, k, idx):
    axis = eqn.params["axis"]
    offset = sum(_shape(x)[axis] for x in eqn.inputs[:k])
    return tuple(i + offset if j == axis else i for j, i in enumerate(idx))


def _iota_gather(eqn, idx):
    return [((), IndexValue(idx[eqn.params["dimension"]], eqn.outputs[0].aval.dtype))]


def _register_view_rules() -> None:
    from ember.ops import structural as st

    rules = {
        st.broadcast_in_dim_p: ViewRule(_broadcast_gather),
        st.reshape_p: ViewRule(_reshape_gather, _reshape_place),
        st.transpose_p: ViewRule(_transpose_gather, _transpose_place),
        st.rev_p: ViewRule(lambda e, idx: [((), (0, _rev_flip(e, idx)))],
                           lambda e, k, idx: _rev_flip(e, idx)),
        st.slice_p: ViewRule(_slice_gather),
        st.pad_p: ViewRule(_pad_gather),
        st.concatenate_p: ViewRule(_concatenate_gather, _concatenate_place),
        st.iota_p: ViewRule(_iota_gather),
    }
    for prim, rule in rules.items():
        prim.def_lowering("loops", rule)


_register_view_rules()


# --- domains and sites -----------------------------------------------------------------------

def reduced_axes(eqn: Eqn) -> tuple[int, ...]:
    """The axes a reduction equation combines (``axes`` for sums and extrema, ``axis`` for
    argmax/argmin)."""
    if "axes" in eqn.params:
        return tuple(eqn.params["axes"])
    return (eqn.params["axis"],)


def split(full: tuple[int, ...], reduced: tuple[int, ...]
          ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The outer and row shapes of the domain ``(full, reduced)``."""
    return (tuple(n for a, n in enumerate(full) if a not in reduced),
            tuple(full[a] for a in reduced))


def domain_level(shape: Sequence[int], full: tuple[int, ...], reduced: tuple[int, ...]
                 ) -> str | None:
    """Where a value of ``shape`` lives in the domain ``(full, reduced)``: ``"full"`` (one
    element per point), ``"outer"`` (one per row: the outer shape, or the full one with the
    reduced axes kept as 1s), or None when it does not fit."""
    shape = tuple(shape)
    if shape == full:
        return "full"
    kept = tuple(1 if a in reduced else n for a, n in enumerate(full))
    if reduced and (shape == split(full, reduced)[0] or shape == kept):
        return "outer"
    return None


def site(shape: Sequence[int], full: tuple[int, ...], reduced: tuple[int, ...]
         ) -> tuple[Index, ...] | None:
    """The element of a value of ``shape`` that the domain point ``(o..., r...)`` computes:
    the point itself for full values (outer axes ``o``, reduced axes ``r``, in the order of
    ``full``), its outer part for per-row values; None if the shape fits neither."""
    level = domain_level(shape, full, reduced)
    if level is None:
        return None
    outer, row = split(full, reduced)
    o = iter(Index.axis(f"o{k}", n) for k, n in enumerate(outer))
    r = iter(Index.axis(f"r{k}", n) for k, n in enumerate(row))
    if level == "full":
        return tuple(next(r) if a in reduced else next(o) for a in range(len(full)))
    if len(shape) == len(outer):
        return tuple(o)
    return tuple(Index.of(0) if a in reduced else next(o) for a in range(len(full)))


def same_site(eqn: Eqn, full: tuple[int, ...], reduced: tuple[int, ...]) -> bool:
    """Whether a one-operand view reads, at each domain point, exactly the element of its
    operand that the point computes: then the view costs nothing inside the group (a reshape
    between per-row shapes, a per-row value broadcast along the row)."""
    rule = view_rule(eqn.prim)
    out = site(_shape(eqn.outputs[0]), full, reduced)
    src = site(_shape(eqn.inputs[0]), full, reduced) if eqn.inputs else None
    if rule is None or out is None or src is None:
        return False
    picks = rule.gather(eqn, out)
    return len(picks) == 1 and picks[0][1][0] == 0 and tuple(picks[0][1][1]) == src


def domain_of(body: ClosedGraph) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A fused body's domain ``(full, reduced)``: its reductions' operand shape and axes, else
    the shape of its computed values (or, for a lone view, of its result) and no axes."""
    graph = body.graph
    for eqn in graph.eqns:
        if _accumulates(eqn):
            return _shape(eqn.inputs[0]), tuple(sorted(reduced_axes(eqn)))
    for eqn in graph.eqns:
        if eqn.prim.kind == "elementwise":
            return _shape(eqn.outputs[0]), ()
    return tuple(graph.outvars[0].aval.shape), ()


# --- describing a fused equation -------------------------------------------------------------

class _Builder:
    def __init__(self, body: ClosedGraph):
        graph = body.graph
        self.graph = graph
        self.full, self.reduced = domain_of(body)
        self.outer, self.row = split(self.full, self.reduced)
        self.inputs = {v.id: k for k, v in enumerate(graph.invars)}
        self.producer: dict[int, Eqn] = {v.id: e for e in graph.eqns for v in e.outputs}
        self.phase: dict[int, int] = {}
        self.computed: set[int] = set()  # vars that depend on a compute equation
        for eqn in graph.eqns:
            ins = [a for a in eqn.inputs if isinstance(a, Var)]
            p = max((self.phase.get(a.id, 0) for a in ins), default=0)
            comp = eqn.prim.kind in ("elementwise", "reduction") or \
                any(a.id in self.computed for a in ins)
            for v in eqn.outputs:
                self.phase[v.id] = p + _accumulates(eqn)
                if comp:
                    self.computed.add(v.id)
        self.n_locals = 0
        self.scopes: list[dict] = [{}]
        self.scratch: list[np.dtype] = []
        self.scratch_of: dict[int, Any] = {}  # var id -> where a later row loop reads it

    def in_row(self, v: Var) -> bool:
        return bool(self.reduced) and _shape(v) == self.full

    def site(self, v: Any) -> tuple[Index, ...]:
        s = site(_shape(v), self.full, self.reduced)
        assert s is not None, f"{v} does not fit the domain {self.full}/{self.reduced}"
        return s

    def lookup(self, key: Any) -> Any:
        for scope in reversed(self.scopes):
            if key in scope:
                return scope[key]
        return None

    def local(self) -> int:
        self.n_locals += 1
        return self.n_locals - 1

    def value(self, a: Any, idx: tuple[Index, ...], out: list, loop_phase: int | None) -> Any:
        """The scalar expression of ``a`` at ``idx``, appending the statements it needs."""
        if isinstance(a, Literal):
            return Const(a.value, a.aval.dtype)
        if a.id in self.inputs:
            return Load(self.inputs[a.id], flat_index(idx, _shape(a)), a.aval.dtype)
        key = (a.id, tuple(idx))
        known = self.lookup(key)
        if known is not None:
            return known
        eqn = self.producer[a.id]
        kind = eqn.prim.kind
        if kind == "reduction" and not _accumulates(eqn):
            return self.value(eqn.inputs[0], idx, out, loop_phase)  # over no axes: itself
        if kind == "elementwise":
            if (loop_phase is not None and self.in_row(a) and self.phase[a.id] < loop_phase
                    and tuple(idx) == self.site(a)):
                return self.scratch_of[a.id]  # computed by an earlier row loop
            args = tuple(self.value(x, idx, out, loop_phase) for x in eqn.inputs)
            ref = Ref(self.local(), a.aval.dtype)
            out.append(Let(ref.local, eqn, args))
            self.scopes[-1][key] = ref
            return ref
        rule = view_rule(eqn.prim)
        assert rule is not None and kind != "reduction", \
            f"{eqn.prim.name} at {idx} is not available here"  # an ember bug
        result = None
        for preds, src in reversed(rule.gather(eqn, idx)):
            live = tuple(p for p in preds if p.value() is not True)
            if result is not None and any(p.value() is False for p in live):
                continue
            expr = src if not isinstance(src, tuple) else \
                self.value(eqn.inputs[src[0]], src[1], out, loop_phase)
            result = expr if result is None or not live else \
                Where(live, expr, result, a.aval.dtype)
        return result

    def is_link(self, eqn: Eqn) -> bool:
        return len(eqn.inputs) == 1 and same_site(eqn, self.full, self.reduced)

    def stores(self, outputs: list[tuple[int, Var]]) -> list[tuple[Var, tuple, int, Index]]:
        """For each output: (value stored, its site, output number, flat index written)."""
        out = []
        for k, v in outputs:
            eqn = self.producer[v.id]
            if eqn.prim.kind == "movement" and v.id in self.computed and not self.is_link(eqn):
                # A computed value written straight into a transposed/concatenated output.
                rule = view_rule(eqn.prim)
                assert rule is not None and rule.place is not None, eqn.prim.name
                for j, x in enumerate(eqn.inputs):
                    at = self.site(x)
                    out.append((x, at, k, flat_index(rule.place(eqn, j, at), _shape(v))))
            else:
                at = self.site(v)
                out.append((v, at, k, flat_index(at, _shape(v))))
        return out

    def build(self) -> LoopNest:
        graph = self.graph
        outputs = [(k, v) for k, v in enumerate(graph.outvars)]
        stores = self.stores(outputs)
        reductions = [e for e in graph.eqns if _accumulates(e)]
        n_phases = max(self.phase.values(), default=0) + 1
        # Which full values each row loop needs, from the last loop back: a computed full
        # value of an earlier phase is kept in scratch by its own loop.
        needs: dict[int, list[Any]] = {p: [] for p in range(n_phases)}
        for e in reductions:
            needs[self.phase[e.outputs[0].id] - 1].append(("update", e))
        for v, at, k, flat in stores:
            if self.in_row(v):
                needs[self.phase[v.id]].append(("store", (v, at, k, flat)))
        for p in reversed(range(n_phases)):
            for item in needs[p]:
                root = item[1].inputs[0] if item[0] == "update" else item[1][0]
                self._mark_cross(root, p, needs)
        body: list[Any] = []
        acc: dict[int, Ref] = {}
        for p in range(n_phases):
            # Per-row values of this phase: reductions just finished, what they feed.
            for e in graph.eqns:
                v = e.outputs[0]
                if self.phase[v.id] != p or self.in_row(v) or e.prim.kind != "elementwise" \
                        or site(_shape(v), self.full, self.reduced) is None:
                    continue
                self.value(v, self.site(v), body, None)
            for v, at, k, flat in stores:
                if not self.in_row(v) and self.phase[v.id] == p:
                    body.append(Store(k, flat, self.value(v, at, body, None)))
            updates = [e for e in reductions if self.phase[e.outputs[0].id] == p + 1]
            for e in updates:
                acc[e.outputs[0].id] = Ref(self.local(), e.outputs[0].aval.dtype)
                body.append(Init(acc[e.outputs[0].id].local, e))
                self.scopes[0][(e.outputs[0].id, self.site(e.outputs[0]))] = \
                    acc[e.outputs[0].id]
            if self.row and needs[p]:
                loop = RowLoop()
                self.scopes.append({})
                for what, item in needs[p]:
                    if what == "update":
                        x = item.inputs[0]
                        val = self.value(x, self.site(x), loop.body, p)
                        loop.body.append(Update(acc[item.outputs[0].id].local, item, val))
                    elif what == "store":
                        v, at, k, flat = item
                        loop.body.append(Store(k, flat, self.value(v, at, loop.body, p)))
                    else:
                        v, s = item
                        r_site = self.site(v)
                        loop.body.append(ScratchStore(
                            s.scratch, s.index, self.value(v, r_site, loop.body, p)))
                self.scopes.pop()
                body.append(loop)
        return LoopNest(self.outer, self.row, [v.aval for v in graph.invars],
                        [v.aval for v in graph.outvars], self.scratch, body)

    def _mark_cross(self, a: Any, p: int, needs: dict[int, list[Any]],
                    seen: set | None = None) -> None:
        """Walk the full values loop ``p`` computes; keep earlier-phase ones in scratch."""
        seen = set() if seen is None else seen
        if not isinstance(a, Var) or a.id in self.inputs or a.id in seen:
            return
        seen.add(a.id)
        eqn = self.producer[a.id]
        if eqn.prim.kind == "reduction" or \
                eqn.prim.kind == "elementwise" and not self.in_row(a):
            return  # accumulators and per-row values are locals of the outer point
        if eqn.prim.kind == "elementwise" and self.phase[a.id] < p:
            if a.id not in self.scratch_of:
                self.scratch.append(a.aval.dtype)
                r_idx = flat_index([self.site(a)[k] for k in self.reduced], self.row)
                self.scratch_of[a.id] = ScratchLoad(len(self.scratch) - 1, r_idx, a.aval.dtype)
                needs[self.phase[a.id]].append(("scratch", (a, self.scratch_of[a.id])))
            return
        for x in eqn.inputs:
            self._mark_cross(x, p, needs, seen)


# --- loops split at the divisions of their indices ---------------------------------------------

# Statements and expressions that hold indices, or other nodes that may (an equation does not).
_HOLDERS = (Load, IndexValue, Where, ScratchLoad, Let, Update, Store, ScratchStore, Pred)


def _parts(node: Any) -> dict[str, Any]:
    """A holder's fields but its equation (its ``__dict__``: fields() is slow on hot paths)."""
    return {k: v for k, v in vars(node).items() if k != "eqn"}


def _rewrite(node: Any, fn: Callable[[Index], Index]) -> Any:
    """``node`` (a statement, expression, or a list or tuple of them) with ``fn`` applied to
    every index in it."""
    if isinstance(node, Index):
        return fn(node)
    if isinstance(node, (list, tuple)):
        return type(node)(_rewrite(x, fn) for x in node)
    if isinstance(node, RowLoop):
        return RowLoop(_rewrite(node.body, fn))
    if isinstance(node, _HOLDERS):
        return replace(node, **{k: _rewrite(v, fn) for k, v in _parts(node).items()})
    return node


def _indices(node: Any) -> Iterator[Index]:
    """Every index in ``node`` (as :func:`_rewrite` visits them, without rebuilding)."""
    if isinstance(node, Index):
        yield node
    elif isinstance(node, (list, tuple, RowLoop)):
        for x in node.body if isinstance(node, RowLoop) else node:
            yield from _indices(x)
    elif isinstance(node, _HOLDERS):
        for x in _parts(node).values():
            yield from _indices(x)


def _divisions(idx: Index) -> Iterator[Div | Mod]:
    """The floor divisions and remainders in an index, nested ones included."""
    for a, _ in idx.terms:
        if not isinstance(a, Axis):
            yield a
            yield from _divisions(a.expr)


def _substitute(idx: Index, axes: dict[str, Index], memo: dict[Index, Index]) -> Index:
    """``idx`` with each loop variable named in ``axes`` replaced (and simplified again)."""
    if idx not in memo:
        out = Index.of(idx.const)
        for a, c in idx.terms:
            if isinstance(a, Axis):
                term = axes.get(a.name, Index(((a, 1),)))
            else:
                inner = _substitute(a.expr, axes, memo)
                term = inner // a.divisor if isinstance(a, Div) else inner % a.divisor
            out = out + term * c
        memo[idx] = out
    return memo[idx]


def _split_axis(nest: LoopNest, name: str, factor: int) -> LoopNest:
    """``nest`` with loop ``name`` (``o2``, ``r0``...) of size ``n`` run as two, ``n //
    factor`` by ``factor``: the same points in the same order."""
    kind, at = name[0], int(name[1:])
    shape = nest.outer if kind == "o" else nest.row
    n = shape[at]
    axes = {name: Index.axis(name, n // factor) * factor + Index.axis(f"{kind}{at + 1}", factor)}
    axes.update((f"{kind}{j}", Index.axis(f"{kind}{j + 1}", m))
                for j, m in enumerate(shape) if j > at)
    shape = (*shape[:at], n // factor, factor, *shape[at + 1:])
    memo: dict[Index, Index] = {}
    body = _rewrite(nest.body, lambda idx: _substitute(idx, axes, memo))
    outer, row = (shape, nest.row) if kind == "o" else (nest.outer, shape)
    return LoopNest(outer, row, nest.inputs, nest.outputs, nest.scratch, body)


def _factor_loops(nest: LoopNest) -> LoopNest:
    """Split loops at the divisions their indices make, while that removes some: an index
    ``(o2/64)*32768 + o1*64 + (o2%64)`` (an attention output moved back to [batch, seq,
    heads*dim]) becomes ``o2*32768 + o1*64 + o3`` over loops of 9 and 64. Division in the
    innermost loop keeps a compiler from vectorising it (each element is a gather); split,
    the innermost loop reads memory in order."""
    divisions = nest.divisions()
    while divisions:
        # With x = f*q + p (0 <= p < f), (c*x + rest) // (c*f) is q + (c*p + rest) // (c*f),
        # which simplifies to q when rest is small: candidates are the f that make c*f a divisor.
        splits = {(a.name, d.divisor // c) for d in divisions for a, c in d.expr.terms
                  if isinstance(a, Axis) and c > 0 and d.divisor % c == 0
                  and 1 < d.divisor // c < a.size and a.size % (d.divisor // c) == 0}
        trials = [(t, t.divisions()) for t in (_split_axis(nest, name, f)
                                                for name, f in sorted(splits))]
        best = min(trials, key=lambda trial: len(trial[1]), default=None)
        if best is None or len(best[1]) >= len(divisions):
            break
        nest, divisions = best
    return nest


def describe(eqn: Eqn) -> LoopNest:
    """The loop nest of a ``fused`` equation."""
    return _factor_loops(_Builder(eqn.params["body"]).build())
