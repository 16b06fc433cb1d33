"""Forward mode: the JVP trace carries a tangent beside every primal value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ember import dtypes
from ember.core.array import Array, Tracer
from ember.core.primitive import Primitive
from ember.core.trace import Trace, Zero, aval_of, full_lower, new_main
from ember.errors import UnsupportedError, op_error
from ember.ir.types import ArrayType


class JVPTracer(Tracer):
    __slots__ = ("primal", "tangent")

    def __init__(self, trace: JVPTrace, primal: Any, tangent: Any):
        self._trace = trace
        self.primal = primal
        self.tangent = tangent

    @property
    def aval(self) -> ArrayType:
        return aval_of(self.primal)

    def full_lower(self) -> Any:
        # A value with no tangent is not differentiated: handing back its primal keeps it
        # usable after this trace ends (the random key a jitted call returns under ``grad``).
        return full_lower(self.primal) if isinstance(self.tangent, Zero) else self

    def concrete_value(self) -> Array | None:
        p = self.primal
        return p.concrete_value() if isinstance(p, Tracer) else p


def _tangent_for(primal: Any, tangent: Any) -> Any:
    """Only floating and complex values have tangents; others get a symbolic zero."""
    aval = aval_of(primal)
    if not dtypes.is_inexact(aval.dtype):
        return Zero(aval)
    return tangent


class JVPTrace(Trace):
    def pure(self, value: Any) -> JVPTracer:
        return JVPTracer(self, value, Zero(aval_of(value)))

    def process_primitive(self, prim: Primitive, tracers: list[JVPTracer],
                          params: dict[str, Any]) -> Any:
        primals = [t.primal for t in tracers]
        tangents = [t.tangent for t in tracers]
        if all(isinstance(t, Zero) for t in tangents):
            out = prim.bind(*primals, **params)
            outs = out if prim.multiple_results else [out]
            wrapped = [JVPTracer(self, o, Zero(aval_of(o))) for o in outs]
            return wrapped if prim.multiple_results else wrapped[0]
        if prim.jvp is None:
            raise op_error(UnsupportedError, prim.name, "this operation is not differentiable")
        out, t_out = prim.jvp(primals, tangents, **params)
        if prim.multiple_results:
            return [JVPTracer(self, o, _tangent_for(o, t)) for o, t in zip(out, t_out)]
        return JVPTracer(self, out, _tangent_for(out, t_out))


def jvp_flat(fun: Callable[..., Sequence[Any]], primals: Sequence[Any],
             tangents: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Run ``fun`` on (primal, tangent) pairs; returns output primals and tangents."""
    with new_main(JVPTrace) as main:
        trace = main.trace
        ins = [JVPTracer(trace, p, _tangent_for(p, t)) for p, t in zip(primals, tangents)]
        outs = [trace.full_raise(o) for o in fun(*ins)]
        return [o.primal for o in outs], [o.tangent for o in outs]
