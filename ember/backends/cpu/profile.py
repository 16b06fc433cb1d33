"""Where a compiled program spends its time: one timer per equation, a table by kind.

A whole decode, prefill or training step is one C function called once, so nothing outside it
can say which of its hundreds of equations cost what. A program compiled for profiling
(``Program(..., profile=True)``, reached through ``Compiled.profile``) is the same C with a
clock read before and after each statement, accumulated in a static array the program reads
back; equations run through NumPy are timed in Python. That C is a different source, hence
a different library and cache entry: the default build has no timer in it.

This module turns those counts into a :class:`Profile`: one :class:`Entry` per equation with
its kind (BLAS product, fused kernel, attention, quantised product, indexing, NumPy) and what
it does (a product's batch and M, N, K and FLOPs; a kernel's operations and the bytes its
operands and results occupy), and a table that aggregates them by kind and by identical
equations (the 30 layers of a model), with the rate each reached and the time the timers did
not see (the Python call, binding the inputs) so the parts add up to the measured total.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ember.compiler.fusion import fused_p
from ember.ir.graph import Eqn

__all__ = ["Entry", "Profile", "classify", "nbytes"]

# The order kinds are listed in a table; a kind not here (a future C rule) comes after them.
KINDS = ("product", "attention", "quantised product", "fused kernel", "indexing", "numpy",
         "empty")
_INDEXING = frozenset(("dynamic_slice", "dynamic_update_slice", "gather", "scatter"))
_QUANT = frozenset(("quant_matmul", "dequantize"))


@dataclass(frozen=True)
class Entry:
    """One equation's share of a run: ``seconds`` per run, the ``flops`` it does (products and
    attention) or ``None``, and the bytes of its operands and results."""

    index: int
    kind: str
    what: str
    seconds: float
    flops: float | None
    nbytes: int

    def rate(self) -> str:
        """GFLOP/s for arithmetic-bound kinds, GB/s of operands and results for the rest."""
        return _rate(self.flops, self.nbytes, self.seconds)


def _rate(flops: float | None, nbytes: int, seconds: float) -> str:
    if seconds <= 0:
        return ""
    if flops is not None:
        return f"{flops / seconds / 1e9:.1f} GFLOP/s"
    return f"{nbytes / seconds / 1e9:.1f} GB/s"


@dataclass(frozen=True)
class Profile:
    """Timings of a compiled program, averaged over ``runs`` calls after a warm-up call.

    ``total`` is each call's wall time as the caller sees it; ``entries`` (one per equation,
    in program order) add up to it less :attr:`untimed`, the time no timer covers (the Python
    call, binding inputs and outputs, the foreign calls).
    """

    entries: tuple[Entry, ...]
    total: float
    runs: int
    by_kind: dict[str, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        sums: dict[str, float] = {}
        for e in self.entries:
            sums[e.kind] = sums.get(e.kind, 0.0) + e.seconds
        order = {k: i for i, k in enumerate(KINDS)}
        ranked = sorted(sums, key=lambda k: (order.get(k, len(KINDS)), k))
        object.__setattr__(self, "by_kind", {k: sums[k] for k in ranked})

    @property
    def timed(self) -> float:
        """Seconds per run inside the equations' timers."""
        return math.fsum(e.seconds for e in self.entries)

    @property
    def untimed(self) -> float:
        """Seconds per run outside every equation's timer."""
        return self.total - self.timed

    def grouped(self) -> list[tuple[Entry, int, float]]:
        """``(first entry, count, seconds)`` of each set of identical equations (same kind
        and description), the most expensive first."""
        groups: dict[tuple[str, str], list] = {}
        for e in self.entries:
            g = groups.setdefault((e.kind, e.what), [e, 0, 0.0])
            g[1] += 1
            g[2] += e.seconds
        return sorted((tuple(g) for g in groups.values()), key=lambda g: -g[2])

    def table(self, top: int = 20) -> str:
        """The report: time by kind, then the ``top`` most expensive groups of equations."""
        def share(s: float) -> str:
            return f"{100 * s / self.total:5.1f}%" if self.total > 0 else "    -"

        lines = [f"{1e3 * self.total:.3f} ms per call (mean of {self.runs}), "
                 f"{len(self.entries)} equations",
                 f"{'kind':<20}{'ms':>10}{'share':>8}{'eqns':>7}  rate"]
        for kind, seconds in self.by_kind.items():
            members = [e for e in self.entries if e.kind == kind]
            flops = [e.flops for e in members if e.flops is not None]
            rate = _rate(math.fsum(flops) if flops else None, sum(e.nbytes for e in members),
                         seconds)
            lines.append(f"{kind:<20}{1e3 * seconds:10.3f}{share(seconds):>8}"
                         f"{len(members):7d}  {rate}")
        lines.append(f"{'untimed (calls)':<20}{1e3 * self.untimed:10.3f}"
                     f"{share(self.untimed):>8}")
        lines.append(f"{'total':<20}{1e3 * self.total:10.3f}{share(self.total):>8}"
                     f"{len(self.entries):7d}")
        lines += ["", f"{'ms':>9}{'share':>8}{'count':>6}  {'kind':<18}what, rate"]
        for entry, n, seconds in self.grouped()[:top]:
            flops = None if entry.flops is None else entry.flops * n
            lines.append(f"{1e3 * seconds:9.3f}{share(seconds):>8}{n:6d}  {entry.kind:<18}"
                         f"{entry.what}  {_rate(flops, entry.nbytes * n, seconds)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def classify(eqn: Eqn, code: str | None) -> tuple[str, str, float | None]:
    """``(kind, description, flops)`` of an equation that runs as C ``code`` (None: through
    NumPy). FLOPs are the dense products' multiply-adds times two; causal attention counts
    the half of the scores it computes."""
    name = eqn.prim.name
    if all(v.aval.size == 0 for v in eqn.outputs):  # the program skips it
        return "empty", f"{name} -> {_shapes(eqn.outputs)}", None
    if code is None:
        return "numpy", f"{name} -> {_shapes(eqn.outputs)}", None
    if eqn.prim is fused_p:
        ops = dict.fromkeys(e.prim.name for e in eqn.params["body"].graph.eqns)
        listed = ",".join(list(ops)[:6]) + (",..." if len(ops) > 6 else "")
        return "fused kernel", f"[{listed}] -> {_shapes(eqn.outputs)}", None
    if name == "dot_general":
        return _product(eqn, code)
    if name in ("attention", "attention_bwd"):
        return _attention(eqn)
    if name in _QUANT:
        x = eqn.inputs[0].aval
        if name == "dequantize":
            return "quantised product", f"dequantize -> {_shapes(eqn.outputs)}", None
        out = eqn.outputs[0].aval
        k = x.shape[-1]
        return ("quantised product",
                f"{eqn.params['format']} {out.size // max(out.shape[-1], 1)}x{out.shape[-1]}"
                f"x{k}", 2.0 * out.size * k)
    if name in _INDEXING:
        return "indexing", f"{name} -> {_shapes(eqn.outputs)}", None
    return eqn.prim.kind, f"{name} -> {_shapes(eqn.outputs)}", None


def _product(eqn: Eqn, code: str) -> tuple[str, str, float]:
    lhs, rhs = eqn.inputs[0].aval, eqn.inputs[1].aval
    (lc, rc), (lb, _) = eqn.params["dims"]
    batch = math.prod(lhs.shape[i] for i in lb)
    k = math.prod(lhs.shape[i] for i in lc)
    m = lhs.size // max(batch * k, 1)
    n = rhs.size // max(batch * k, 1)
    # The routine the statement calls (BLAS, or one of the backend's own product kernels).
    routine = re.search(r"(cblas_\w+|ember_\w*gem[mv]\w*)", code)
    via = routine.group(1).replace("scipy_", "") if routine else "C"
    size = f"{batch}x " if batch > 1 else ""
    return "product", f"{size}{m}x{n}x{k} {lhs.dtype} {via}", 2.0 * batch * m * n * k


def _attention(eqn: Eqn) -> tuple[str, str, float]:
    q, k, v = (a.aval for a in eqn.inputs[:3])
    heads = math.prod(q.shape[:-2])  # leading axes x query heads
    length, keys, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    visible = 0.5 if eqn.params.get("causal") else 1.0  # kv_len and q_offset are runtime
    backward = eqn.prim.name == "attention_bwd"
    # Forward: scores (d) and weighted values (dv); backward recomputes the scores and forms
    # dV, dP, dQ and dK: 3 products of d and 2 of dv.
    per_score = 2 * (3 * d + 2 * dv) if backward else 2 * (d + dv)
    flops = visible * heads * length * keys * per_score
    what = f"{'backward' if backward else 'forward'} {heads} heads x {length}x{keys}, d={d}"
    return "attention", what, float(flops)


def _shapes(values: Sequence) -> str:
    return ", ".join(str(v.aval) for v in values)


def nbytes(eqn: Eqn) -> int:
    """Bytes of an equation's array operands and results (what a kernel streams at least)."""
    return sum(a.aval.size * a.aval.dtype.itemsize for a in [*eqn.inputs, *eqn.outputs])
