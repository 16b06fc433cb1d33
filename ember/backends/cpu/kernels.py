"""C kernels for fused equations: one C function per distinct group.

:func:`render` turns a ``fused`` equation (:mod:`ember.compiler.fusion`) into a
:class:`Kernel`: the C function ``void NAME(void **args)`` where ``args`` are the outputs then
the inputs, each a pointer to a contiguous row-major buffer of its dtype (shapes are static and
baked into the code), outputs never overlapping inputs except the pairs ``Kernel.in_place``
names. ``NAME`` is a hash of the function's text, so the identical groups of 30 identical
layers are one function. The code follows the
group's loop description (:mod:`ember.compiler.loops`): nested loops over the outer axes,
split across cores with OpenMP when the work is big enough, with row loops for the reductions
inside; the innermost loops read contiguous memory through ``restrict`` pointers and are marked
``#pragma omp simd``.

Each elementwise primitive's C expression is registered on it with
``prim.def_lowering("c", rule)`` from this module (``rule(args, eqn) -> str | None``), each
reduction's as a :class:`CReduction`; a group using a primitive or dtype without a rule is not
rendered (``render`` returns None) and the backend runs it through NumPy.

Precision, against the NumPy reference:

- ``+ - * /``, ``sqrt``, comparisons, ``max``/``min`` (NaN-propagating, as NumPy), ``select``,
  casts, ``floor``/``ceil``/``round`` and every movement are exact, so results are bitwise those
  of the reference; integer arithmetic wraps as NumPy's does.
- float32 stays float32 (no promotion to double; no fused multiply-add, see the toolchain's
  ``-ffp-contract=off``, except inside ``ember_expf``, which calls ``fmaf`` where the CPU has
  it). bfloat16 and float16 are computed in float and rounded to their type after every
  operation, as ml_dtypes and NumPy do, so they are bitwise too.
- ``exp`` (and ``logistic``, ``erf``) in float32 is ember's own polynomial ``ember_expf``
  (:data:`HELPERS`): within 0.90 ulps of the true value (1.19 without FMA), 0 below
  ``2^-125``, and a loop calling it runs 16 lanes wide.
- Functions NumPy computes with its own vectorised routines (``log``, ``tanh``, ``sin``...)
  use the C library here, in vector form where glibc's libmvec has one (declared in
  :data:`HELPERS`, so loops calling them vectorise): results differ by a few ulps (measured on
  float32 against NumPy: log 6, sin/cos 2, tanh 1; the tests allow 8); after rounding
  to bfloat16/float16 they are nearly always equal.
- ``erf`` is the reference's own formula (``ember.ops._erf``) in C: bitwise where it needs
  no exponential (``|x| <= 1`` in float32), within the exponential's ulps elsewhere.
- A max/min reduction is exact, but a NaN operand gives the C ``NAN`` rather than that
  operand's own NaN bits (the NaN is tracked in a flag so the comparison loop vectorises).
- Sums and products accumulate sequentially in the operand's type (float for bfloat16 and
  float16, rounded once at the end), while NumPy sums pairwise (and bfloat16 per step): results
  agree to the rounding error of the sum, about ``n * eps`` relative to the sum of magnitudes.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember import dtypes
from ember.compiler.loops import (
    Axis,
    Const,
    Index,
    IndexValue,
    Init,
    Let,
    Load,
    LoopNest,
    Ref,
    RowLoop,
    ScratchLoad,
    ScratchStore,
    Store,
    Update,
    Where,
    describe,
    loads_of,
)
from ember.ir.graph import Eqn
from ember.ir.params import param_key

__all__ = ["Kernel", "CReduction", "render", "c_type", "translation_unit", "HELPERS"]

# Definitions every kernel may use; a translation unit includes them once.
HELPERS = r"""#include <stdint.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static inline float ember_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t ember_f32_to_bf16(float f) {  /* round to nearest even, quiet NaNs */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float ember_round_bf16(float f) { return ember_bf16_to_f32(ember_f32_to_bf16(f)); }
static inline float ember_round_f16(float f) { return (float)(_Float16)f; }
#if defined(__x86_64__) && defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 35)
/* glibc's vector math library (libmvec, linked through libm) has SIMD versions of these:
   declared so, the loops that call them vectorise (math.h declares them only for
   -ffast-math). */
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float log1pf(float);
#pragma omp declare simd notinbranch
float expm1f(float);
#pragma omp declare simd notinbranch
float tanhf(float);
#pragma omp declare simd notinbranch
float sinf(float);
#pragma omp declare simd notinbranch
float cosf(float);
#pragma omp declare simd notinbranch
double exp(double);
#pragma omp declare simd notinbranch
double log(double);
#pragma omp declare simd notinbranch
double tanh(double);
#endif
"""

# The float32 exponential every kernel calls (and the attention kernels: one function, in the
# helpers both include). glibc's expf vectorises only through libmvec (x86-64, glibc >= 2.35)
# and takes a scalar slow path for each lane outside about |x| < 87, such as the -inf of a
# masked softmax; this one is a fixed sequence of arithmetic that gcc vectorises anywhere.
# x = n ln2 + r with |r| <= ln2 / 2 (n by rounding with the 1.5 * 2^23 trick, r in two steps
# whose first product is exact), e^r by a degree-7 polynomial (Cephes's coefficients, doubled
# so that the result scaled by 2^(n - 1), a normal float for every n kept, gives 2 e^r 2^(n-1)
# in one rounding). Measured against float64 exp over every 7th float in [-110, 90]: at most
# 0.90 ulps with FMA, 1.19 without. Results below 2^-125 are 0 (no subnormals: producing one
# makes the CPU take a slow assist), above FLT_MAX inf; NaN stays NaN.
HELPERS += r"""
#if defined(__FMA__)
#define EMBER_MADD(a, b, c) fmaf(a, b, c)
#else
#define EMBER_MADD(a, b, c) ((a) * (b) + (c))
#endif
static inline float ember_expf(float x) {
    const float lo = -0x1.5a92d8p+6f, hi = 0x1.63p+6f;  /* ln 2^-125, just above ln FLT_MAX */
    const float c = x < lo ? lo : (x > hi ? hi : x);   /* a NaN x stays NaN */
    const float magic = 0x1.8p23f;
    const float t = EMBER_MADD(c, 0x1.715476p+0f, magic), n = t - magic;
    float r = EMBER_MADD(n, -0x1.62e4p-1f, c);          /* ln2's high bits: n * them is exact */
    r = EMBER_MADD(n, -0x1.7f7d1cp-20f, r);
    float p = 0x1.a0d2aap-12f;
    p = EMBER_MADD(p, r, 0x1.6e8790p-9f);
    p = EMBER_MADD(p, r, 0x1.110e2ep-6f);
    p = EMBER_MADD(p, r, 0x1.555450p-4f);
    p = EMBER_MADD(p, r, 0x1.55555ep-2f);
    p = EMBER_MADD(p, r, 1.0f);
    p = EMBER_MADD(p, r, 2.0f);
    const float twice = EMBER_MADD(p, r, 2.0f);  /* 2 e^r */
    uint32_t bits, magic_bits;
    memcpy(&bits, &t, 4);
    memcpy(&magic_bits, &magic, 4);
    const uint32_t scale_bits = (bits - magic_bits + 126u) << 23;  /* 2^(n - 1) */
    float scale;
    memcpy(&scale, &scale_bits, 4);
    return x < lo ? 0.0f : twice * scale;
}
"""


def _horner_c(coeffs: Iterable[float], u: str, suffix: str) -> str:
    """``((c_n * u + c_n-1) * u + ...) + c_0``, rounded after each step as NumPy's loop is."""
    cs = [float(c).hex() + suffix for c in coeffs]
    out = cs[-1]
    for c in cs[-2::-1]:
        out = f"({out} * {u} + {c})"
    return out


def _erf_helpers() -> str:
    """C versions of the reference ``erf`` (``ember.ops._erf``), the same operations in the
    same order: bitwise equal where it uses no ``exp`` (``|x| <= 1`` in float32), within the
    exponential's ulps elsewhere."""
    from ember.ops import _erf as ref

    clamp = f"{float(ref._CLAMP).hex()}f"
    return f"""
static inline float ember_erff(float x) {{
    const float z = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
    const float u = z * z;
    const float inner = {_horner_c(ref._P, "u", "f")} * z / {_horner_c(ref._Q, "u", "f")};
    /* A comparison, not fminf: gcc vectorises no loop calling fminf without -ffast-math
       (its NaN rule), so one fminf kept every erf loop scalar. A NaN x returns inner. */
    const float ax = fabsf(x), a = ax < {clamp} ? ax : {clamp};
    const float erfc = ember_expf(-a * a) * {_horner_c(ref._TAIL_P, "a", "f")}
                       / {_horner_c(ref._TAIL_Q, "a", "f")};
    return fabsf(x) > {float(ref._SPLIT).hex()}f ? copysignf(1.0f - erfc, x) : inner;
}}
static inline double ember_erf(double x) {{
    const double z = fabs(x);
    const double near = z < {ref._SWITCH!r} ? z : {ref._SWITCH!r}, x2 = near * near;
    double term = near, total = near;
    for (int n = 1; n < {ref._SERIES_TERMS}; n++) {{
        term = term * (2 * x2) / (2 * n + 1);
        total = total + term;
    }}
    const double small = {float(2 / np.sqrt(np.pi)).hex()} * exp(-x2) * total;
    const double far = z > {ref._SWITCH!r} ? z : {ref._SWITCH!r};
    double fraction = far;
    for (int k = {ref._FRACTION_TERMS}; k > 0; k--) fraction = far + (k / 2.0) / fraction;
    const double large = 1.0 - exp(-far * far) / {float(np.sqrt(np.pi)).hex()} / fraction;
    return x != x ? NAN : copysign(z < {ref._SWITCH!r} ? small : large, x);
}}
"""


HELPERS += _erf_helpers()

# Below this many points of the domain a kernel runs on one thread: waking the others costs
# more than the loop.
PARALLEL_MIN = 1 << 15


@dataclass(frozen=True)
class Kernel:
    """One C function: ``void name(void **args)`` (outputs, then inputs).

    ``in_place`` lists ``(output, input)`` positions that may be passed the same buffer (an
    update written over a donated operand); every other output must not overlap any input.
    """

    name: str
    source: str
    helpers: tuple[str, ...] = (HELPERS,)
    in_place: tuple[tuple[int, int], ...] = ()


def translation_unit(kernels: Iterable[Kernel]) -> str:
    """C source defining every distinct kernel once, after the helpers they use."""
    helpers: list[str] = []
    bodies: dict[str, str] = {}
    for k in kernels:
        helpers += [h for h in k.helpers if h not in helpers]
        bodies.setdefault(k.name, k.source)
    return "\n".join([*helpers, *bodies.values()])


# --- types -----------------------------------------------------------------------------------

_STORAGE = {np.dtype(np.bool_): "bool", np.dtype(np.float32): "float",
            np.dtype(np.float64): "double", np.dtype(np.float16): "_Float16",
            dtypes.bfloat16: "uint16_t"}
for _t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
    _STORAGE[np.dtype(_t)] = f"{_t}_t"


def c_type(dtype: np.dtype) -> str | None:
    """The C type of one element of a buffer of ``dtype`` (None: not supported here)."""
    return _STORAGE.get(np.dtype(dtype))


def _half(dtype: np.dtype) -> bool:
    return np.dtype(dtype) in (dtypes.bfloat16, np.dtype(np.float16))


def _calc(dtype: np.dtype) -> str:
    """The C type arithmetic on ``dtype`` is done in (float for 16-bit floats)."""
    return "float" if _half(dtype) else _STORAGE[np.dtype(dtype)]


def _unsigned(dtype: np.dtype) -> str:
    return f"uint{np.dtype(dtype).itemsize * 8}_t"


def _round(expr: str, dtype: np.dtype) -> str:
    """``expr`` (computed in float) rounded to a 16-bit float type, as the reference rounds."""
    if np.dtype(dtype) == dtypes.bfloat16:
        return f"ember_round_bf16({expr})"
    if np.dtype(dtype) == np.dtype(np.float16):
        return f"ember_round_f16({expr})"
    return expr


def _literal(value: object, dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    v = np.asarray(value).astype(dtype).item() if dtype != dtypes.bfloat16 else \
        float(np.asarray(value).astype(dtype).astype(np.float32))
    if dtype == np.bool_:
        return "1" if v else "0"
    if dtypes.is_int(dtype):
        if dtype == np.int64 and v == -2**63:
            return "((int64_t)(-9223372036854775807LL - 1))"
        suffix = "ULL" if dtype.kind == "u" else "LL"
        return f"(({_STORAGE[dtype]}){v}{suffix})"
    f = "f" if _calc(dtype) == "float" else ""
    if math.isnan(v):
        return f"(({_calc(dtype)})NAN)"
    if math.isinf(v):
        return f"(({_calc(dtype)}){'-' if v < 0 else ''}INFINITY)"
    text = f"{float(v).hex()}{f}"
    return f"({text})" if text.startswith("-") else text


# --- elementwise rules -----------------------------------------------------------------------

Rule = Callable[[list[str], Eqn], "str | None"]


def _in(eqn: Eqn, k: int = 0) -> np.dtype:
    return np.dtype(eqn.inputs[k].aval.dtype)


def _libm(name: str) -> Rule:
    """A C library function: ``expf`` for float32 (and the 16-bit floats), ``exp`` for
    float64."""
    def rule(args: list[str], eqn: Eqn) -> str | None:
        dt = _in(eqn)
        if not dtypes.is_float(dt):
            return None
        return f"{name}{'' if dt == np.float64 else 'f'}({', '.join(args)})"
    return rule


def _arith_code(op: str, bool_op: str | None, dt: np.dtype, a: str, b: str) -> str | None:
    if dt == np.bool_:
        return f"({a} {bool_op} {b})" if bool_op else None
    if dtypes.is_int(dt):  # wrap around as NumPy does (signed overflow is undefined in C)
        u = _unsigned(dt)
        return f"(({_STORAGE[dt]})(({u}){a} {op} ({u}){b}))"
    return f"({a} {op} {b})" if dtypes.is_float(dt) else None


def _extremum_code(op: str, dt: np.dtype, a: str, b: str) -> str | None:
    if dtypes.is_float(dt):  # NaN wins, as in np.maximum
        return f"(({a} {op}= {b} || {a} != {a}) ? {a} : {b})"
    if dtypes.is_int(dt) or dt == np.bool_:
        return f"({a} {op} {b} ? {a} : {b})"
    return None


def _arith(op: str, bool_op: str | None = None) -> Rule:
    return lambda args, eqn: _arith_code(op, bool_op, _in(eqn), *args)


def _extremum(op: str) -> Rule:
    return lambda args, eqn: _extremum_code(op, _in(eqn), *args)


def _real(template: str, ints: bool = False) -> Rule:
    def rule(args: list[str], eqn: Eqn) -> str | None:
        dt = _in(eqn)
        if dtypes.is_float(dt) or (ints and (dtypes.is_int(dt) or dt == np.bool_)):
            return template.format(*args)
        return None
    return rule


def _neg(args: list[str], eqn: Eqn) -> str | None:
    dt = _in(eqn)
    if dt == np.bool_:
        return args[0]
    if dtypes.is_int(dt):
        return f"(({_STORAGE[dt]})(0 - ({_unsigned(dt)}){args[0]}))"
    return f"(-{args[0]})" if dtypes.is_float(dt) else None


def _abs(args: list[str], eqn: Eqn) -> str | None:
    dt, a = _in(eqn), args[0]
    if dtypes.is_int(dt):  # abs of the most negative value wraps to itself, as in NumPy
        t = _STORAGE[dt]
        return a if dt.kind == "u" else f"({a} < 0 ? ({t})(0 - ({_unsigned(dt)}){a}) : {a})"
    return _libm("fabs")(args, eqn)


def _logistic(args: list[str], eqn: Eqn) -> str | None:
    dt = _in(eqn)
    if not dtypes.is_float(dt):
        return None
    if dt == np.float64:
        return f"(1.0 / (1.0 + exp(-{args[0]})))"
    # The reference rounds after each step (the negation is exact); the division is rounded
    # as every result is.
    e = _round(f"ember_expf(-{args[0]})", dt)
    return f"(1.0f / {_round(f'(1.0f + {e})', dt)})"


def _exp(args: list[str], eqn: Eqn) -> str | None:
    dt = _in(eqn)
    if not dtypes.is_float(dt):
        return None
    return f"exp({args[0]})" if dt == np.float64 else f"ember_expf({args[0]})"


def _erf(args: list[str], eqn: Eqn) -> str | None:
    dt = _in(eqn)
    if not dtypes.is_float(dt):
        return None
    # 16-bit floats: computed in float32 and rounded once, as the reference does.
    return f"ember_erf({args[0]})" if dt == np.float64 else f"ember_erff({args[0]})"


def _sign(args: list[str], eqn: Eqn) -> str | None:
    a, dt = args[0], _in(eqn)
    if dtypes.is_float(dt):
        return f"({a} > 0 ? 1 : ({a} < 0 ? -1 : ({a} == 0 ? 0 : {a})))"
    if dtypes.is_int(dt):
        return f"(({_STORAGE[dt]})(({a} > 0) - ({a} < 0)))"
    return None


def _not(args: list[str], eqn: Eqn) -> str | None:
    dt = _in(eqn)
    if dt == np.bool_:
        return f"(!{args[0]})"
    return f"(({_STORAGE[dt]})~{args[0]})" if dtypes.is_int(dt) else None


def _bitwise(op: str) -> Rule:
    def rule(args: list[str], eqn: Eqn) -> str | None:
        dt = _in(eqn)
        return f"({args[0]} {op} {args[1]})" if dtypes.is_int(dt) or dt == np.bool_ else None
    return rule


def _compare(op: str) -> Rule:
    def rule(args: list[str], eqn: Eqn) -> str | None:
        return None if dtypes.is_complex(_in(eqn)) else f"({args[0]} {op} {args[1]})"
    return rule


def _convert(args: list[str], eqn: Eqn) -> str | None:
    src, dst = _in(eqn), np.dtype(eqn.outputs[0].aval.dtype)
    if c_type(src) is None or c_type(dst) is None:
        return None
    if dst == np.bool_:
        return f"({args[0]} != 0)"
    if dst == np.float16 and src == np.float64:  # one rounding, as NumPy's double -> half
        return f"((float)(_Float16){args[0]})"
    return f"(({_calc(dst)}){args[0]})"  # the result is rounded to a 16-bit type after


def _select(args: list[str], eqn: Eqn) -> str | None:
    return f"({args[0]} ? {args[1]} : {args[2]})"


def identity(args: list[str], eqn: Eqn) -> str | None:
    """The C rule of a value passed on unchanged (a copy, a gradient stop; higher layers
    register it for their own such primitives)."""
    return args[0]


@dataclass(frozen=True)
class CReduction:
    """How a reduction accumulates in C: its start value, ``combine(acc, x)``, and the OpenMP
    ``simd reduction`` operator that may reorder it (None: keep the order).

    ``nan_wins``: for floats, a NaN operand makes the result NaN whatever ``combine`` does
    (a flag kept beside the accumulator), so a max can be a plain comparison that
    vectorises; the result is then the C ``NAN``, not the NaN operand itself.
    ``identity``: ``init`` is the result over no elements; a max or min has none (its start
    value is only a bound), so over an empty axis it runs through NumPy, which raises the
    operation's error.
    """

    init: Callable[[np.dtype], str | None]
    combine: Callable[[str, str, np.dtype], str | None]
    simd: str | None = None
    nan_wins: bool = False
    identity: bool = True

    def tracks_nan(self, dtype: np.dtype) -> bool:
        return self.nan_wins and dtypes.is_float(dtype)


def _int_limit(dtype: np.dtype, low: bool) -> str:
    info = np.iinfo(dtype)
    return _literal(info.min if low else info.max, dtype)


def _extreme_init(low: bool) -> Callable[[np.dtype], str | None]:
    """-inf for a max, +inf for a min (the type's limits for integers)."""
    def init(dt: np.dtype) -> str | None:
        if dt == np.bool_:
            return "0" if low else "1"
        if dtypes.is_int(dt):
            return _int_limit(dt, low)
        return f"({'-' if low else ''}INFINITY)" if dtypes.is_float(dt) else None
    return init


def _numeric(dt: np.dtype) -> bool:
    return dtypes.is_int(dt) or dtypes.is_float(dt)


_REDUCTIONS = {
    "reduce_sum": CReduction(lambda dt: "0" if _numeric(dt) else None,
                             lambda acc, x, dt: _arith_code("+", None, dt, acc, x), "+"),
    "reduce_prod": CReduction(lambda dt: "1" if _numeric(dt) else None,
                              lambda acc, x, dt: _arith_code("*", None, dt, acc, x), "*"),
    "reduce_max": CReduction(_extreme_init(True),
                             lambda acc, x, dt: f"({x} > {acc} ? {x} : {acc})", "max", True,
                             identity=False),
    "reduce_min": CReduction(_extreme_init(False),
                             lambda acc, x, dt: f"({x} < {acc} ? {x} : {acc})", "min", True,
                             identity=False),
}

_ELEMENTWISE: dict[str, Rule] = {
    "add": _arith("+", "|"), "sub": _arith("-"), "mul": _arith("*", "&"),
    "div": _real("({0} / {1})"), "max": _extremum(">"), "min": _extremum("<"),
    "neg": _neg, "sign": _sign, "erf": _erf, "logistic": _logistic, "select": _select,
    "convert": _convert, "copy": identity, "stop_gradient": identity, "not": _not,
    "and": _bitwise("&"), "or": _bitwise("|"), "xor": _bitwise("^"),
    "eq": _compare("=="), "ne": _compare("!="), "lt": _compare("<"), "le": _compare("<="),
    "gt": _compare(">"), "ge": _compare(">="), "is_finite": _real("isfinite({0})"),
    "abs": _abs, "floor": _libm("floor"), "ceil": _libm("ceil"),
    "round": _libm("nearbyint"), "sqrt": _libm("sqrt"), "cbrt": _libm("cbrt"),
    "exp": _exp, "exp2": _libm("exp2"), "expm1": _libm("expm1"), "log": _libm("log"),
    "log1p": _libm("log1p"), "sin": _libm("sin"), "cos": _libm("cos"), "tan": _libm("tan"),
    "asin": _libm("asin"), "acos": _libm("acos"), "atan": _libm("atan"),
    "sinh": _libm("sinh"), "cosh": _libm("cosh"), "tanh": _libm("tanh"),
    "asinh": _libm("asinh"), "acosh": _libm("acosh"), "atanh": _libm("atanh"),
    "atan2": _libm("atan2"), "pow": _libm("pow"),
}


def _register() -> None:
    from ember.core.primitive import REGISTRY
    from ember.ops import elementwise, reduce, structural  # noqa: F401  (declare them)

    for name, rule in {**_ELEMENTWISE, **_REDUCTIONS}.items():
        REGISTRY[name].def_lowering("c", rule)


_register()


# --- rendering -------------------------------------------------------------------------------

class _UnsupportedError(Exception):
    """The group uses a primitive or dtype without C: the backend runs it through NumPy."""


def _index(idx: Index) -> str:
    return idx.format()


# Primitives whose float32 C is ember_expf: a loop evaluating one is bound by arithmetic, and
# gcc's 8 lanes (its preference for 256-bit vectors) keep it below memory speed; with 16 lanes
# (simdlen) the SiLU of a Llama MLP ran 1.3x faster, at nearly a copy's speed.
_EXPONENTIAL = frozenset({"exp", "logistic", "erf"})


def _lets(body: Iterable[Any]) -> Iterable[Let]:
    for s in body:
        if isinstance(s, RowLoop):
            yield from _lets(s.body)
        elif isinstance(s, Let):
            yield s


class _Renderer:
    def __init__(self, nest: LoopNest):
        self.nest = nest
        for aval in [*nest.inputs, *nest.outputs]:
            if c_type(aval.dtype) is None:
                raise _UnsupportedError(aval.dtype)
        wide = any(s.eqn.prim.name in _EXPONENTIAL and _in(s.eqn) != np.float64
                   for s in _lets(nest.body))
        self.lanes = " simdlen(16)" if wide else ""

    def expr(self, e) -> str:
        if isinstance(e, Load):
            ref = f"in{e.input}[{_index(e.index)}]"
            if np.dtype(e.dtype) == dtypes.bfloat16:
                return f"ember_bf16_to_f32({ref})"
            return f"((float){ref})" if _half(e.dtype) else ref
        if isinstance(e, Const):
            if c_type(e.dtype) is None:
                raise _UnsupportedError(e.dtype)
            return _literal(e.value, e.dtype)
        if isinstance(e, IndexValue):
            return _round(f"(({_calc(e.dtype)})({_index(e.index)}))", e.dtype)
        if isinstance(e, Where):
            cond = " && ".join(self.pred(p) for p in e.preds)
            return f"(({cond}) ? {self.expr(e.then)} : {self.expr(e.other)})"
        if isinstance(e, Ref):
            return f"v{e.local}"
        if isinstance(e, ScratchLoad):
            return f"s{e.scratch}[{_index(e.index)}]"
        raise AssertionError(f"unknown expression {e!r}")  # an ember bug

    @staticmethod
    def pred(p) -> str:
        x = _index(p.expr)
        parts = []
        if p.lo is not None:
            parts.append(f"{x} >= {p.lo}")
        if p.hi is not None:
            parts.append(f"{x} < {p.hi}")
        if p.step != 1:
            parts.append(f"({x}) % {p.step} == 0")
        return " && ".join(parts) or "1"

    def statement(self, s, lines: list[str], pad: str, accs: dict[int, Eqn]) -> None:
        if isinstance(s, Let):
            out = np.dtype(s.eqn.outputs[0].aval.dtype)
            rule = s.eqn.prim.lowerings.get("c")
            code = rule([self.expr(a) for a in s.args], s.eqn) if callable(rule) else None
            if code is None or c_type(out) is None:
                raise _UnsupportedError(s.eqn.prim.name)
            lines.append(f"{pad}const {_calc(out)} v{s.local} = {_round(code, out)};")
        elif isinstance(s, Init):
            red, dt = self.reduction(s.eqn)
            init = red.init(dt)
            if init is None:
                raise _UnsupportedError(s.eqn.prim.name)
            accs[s.local] = s.eqn
            lines.append(f"{pad}{_calc(dt)} v{s.local} = {init};")
            if red.tracks_nan(dt):
                lines.append(f"{pad}int v{s.local}_nan = 0;")
        elif isinstance(s, Update):
            red, dt = self.reduction(s.eqn)
            x = f"u{s.local}"
            code = red.combine(f"v{s.local}", x, dt)
            if code is None:
                raise _UnsupportedError(s.eqn.prim.name)
            lines.append(f"{pad}const {_calc(dt)} {x} = {self.expr(s.value)};")
            lines.append(f"{pad}v{s.local} = {code};")
            if red.tracks_nan(dt):
                lines.append(f"{pad}v{s.local}_nan |= {x} != {x};")
        elif isinstance(s, Store):
            dt = np.dtype(self.nest.outputs[s.output].dtype)
            value = self.expr(s.value)
            if dt == dtypes.bfloat16:
                value = f"ember_f32_to_bf16({value})"
            lines.append(f"{pad}out{s.output}[{_index(s.index)}] = ({c_type(dt)}){value};")
        elif isinstance(s, ScratchStore):
            lines.append(f"{pad}s{s.scratch}[{_index(s.index)}] = {self.expr(s.value)};")
        else:
            raise AssertionError(f"unknown statement {s!r}")  # an ember bug

    @staticmethod
    def reduction(eqn: Eqn) -> tuple[CReduction, np.dtype]:
        red = eqn.prim.lowerings.get("c")
        aval = eqn.inputs[0].aval
        dt = np.dtype(aval.dtype)
        if not isinstance(red, CReduction) or c_type(dt) is None:
            raise _UnsupportedError(eqn.prim.name)
        if not red.identity and any(aval.shape[a] == 0 for a in eqn.params["axes"]):
            raise _UnsupportedError(f"{eqn.prim.name} over an empty axis")
        return red, dt

    def row_loop(self, loop: RowLoop, lines: list[str], pad: str, accs: dict[int, Eqn],
                 first: tuple[str, str] | None = None, finish: bool = True) -> None:
        """The loops over the row for ``loop``'s statements; ``first``: the bounds of the
        first row axis instead of the whole axis (a chunk); ``finish``: then set each
        accumulator that saw a NaN to NaN and round it to its type."""
        axes = [(k, n) for k, n in enumerate(self.nest.row) if n != 1]
        updated = {s.local: s.eqn for s in loop.body if isinstance(s, Update)}
        by_op: dict[str | None, list[str]] = {}
        for local, e in updated.items():
            red, dt = self.reduction(e)
            by_op.setdefault(red.simd, []).append(f"v{local}")
            if red.tracks_nan(dt):
                by_op.setdefault("|", []).append(f"v{local}_nan")
        inner: list[str] = []
        for depth, (k, n) in enumerate(axes):
            if depth == len(axes) - 1 and None not in by_op:
                # Accumulators may be split into vector lanes (sums reordered).
                clause = "".join(f" reduction({op}:{', '.join(vs)})"
                                 for op, vs in sorted(by_op.items()))
                inner.append(f"{pad}{'  ' * depth}#pragma omp simd{self.lanes}{clause}")
            lo, hi = first if depth == 0 and first else ("0", str(n))
            inner.append(f"{pad}{'  ' * depth}for (long r{k} = {lo}; r{k} < {hi}; r{k}++) {{")
        body_pad = pad + "  " * len(axes)
        for s in loop.body:
            self.statement(s, inner, body_pad, accs)
        inner += [f"{pad}{'  ' * d}}}" for d in reversed(range(len(axes)))]
        lines.extend(inner)
        if finish:
            for local in updated:
                self.finish(local, accs[local], lines, pad)

    def finish(self, local: int, eqn: Eqn, lines: list[str], pad: str) -> None:
        """An accumulator's final value: NaN if it saw one, rounded to its type."""
        dt = np.dtype(eqn.outputs[0].aval.dtype)
        if self.reduction(eqn)[0].tracks_nan(dt):
            lines.append(f"{pad}if (v{local}_nan) v{local} = NAN;")
        if _half(dt):
            lines.append(f"{pad}v{local} = {_round(f'v{local}', dt)};")

    def whole_reduction(self) -> list[str] | None:
        """The body of a big reduction to one value (a gradient's sum of squares for
        clipping), cut along its first row axis into chunks that the threads share; each
        chunk's accumulators go to a table that is combined in chunk order, so the result
        does not depend on the thread count. None for any other kernel."""
        nest = self.nest
        loops = [s for s in nest.body if isinstance(s, RowLoop)]
        axes = [n for n in nest.row if n != 1]
        if any(n != 1 for n in nest.outer) or nest.scratch or len(loops) != 1 or not axes:
            return None
        at = nest.body.index(loops[0])
        inits, loop, after = nest.body[:at], loops[0], nest.body[at + 1:]
        rows = math.prod(nest.row)
        chunks = 1
        while (chunks < _COLUMN_ITEMS and 2 * chunks <= axes[0]
               and rows // (2 * chunks) >= _CHUNK_MIN_POINTS):
            chunks *= 2
        if rows < PARALLEL_MIN or chunks == 1 or \
                not all(isinstance(s, Init) for s in inits):
            return None
        per = -(-axes[0] // chunks)
        accs: dict[int, Eqn] = {}
        carried = []  # (C name, C type) of each accumulator and NaN flag
        for s in inits:
            red, dt = self.reduction(s.eqn)
            carried.append((f"v{s.local}", _calc(dt)))
            if red.tracks_nan(dt):
                carried.append((f"v{s.local}_nan", "int"))
        lines = [f"  {t} part_{var}[{chunks}];" for var, t in carried]
        lines += ["  #pragma omp parallel for schedule(dynamic, 1)",
                  f"  for (long chunk = 0; chunk < {chunks}; chunk++) {{",
                  f"    const long lo = chunk * {per}, hi = lo + {per} < {axes[0]} ? "
                  f"lo + {per} : {axes[0]};"]
        for s in inits:
            self.statement(s, lines, "    ", accs)
        self.row_loop(loop, lines, "    ", accs, first=("lo", "hi"), finish=False)
        lines += [f"    part_{var}[chunk] = {var};" for var, _ in carried]
        lines.append("  }")
        lines += [f"  {t} {var} = part_{var}[0];" for var, t in carried]
        lines.append(f"  for (long c = 1; c < {chunks}; c++) {{")
        for local, e in accs.items():
            red, dt = self.reduction(e)
            lines.append(f"    v{local} = {red.combine(f'v{local}', f'part_v{local}[c]', dt)};")
            if red.tracks_nan(dt):
                lines.append(f"    v{local}_nan |= part_v{local}_nan[c];")
        lines.append("  }")
        for local, e in accs.items():
            self.finish(local, e, lines, "  ")
        for s in after:
            self.statement(s, lines, "  ", accs)
        return lines + ["}"]

    def function(self, name: str, in_place: tuple[tuple[int, int], ...] = ()) -> str:
        nest = self.nest
        lines = [f"void {name}(void **args) {{"]
        # Buffers that may be shared are not ``restrict``: the compiler must keep their order.
        shared_out = {k for k, _ in in_place}
        shared_in = {j for _, j in in_place}
        for k, aval in enumerate(nest.outputs):
            t = c_type(aval.dtype)
            q = "" if k in shared_out else "restrict "
            lines.append(f"  {t} *{q}out{k} = ({t} *)args[{k}];")
        for k, aval in enumerate(nest.inputs):
            t = c_type(aval.dtype)
            at = len(nest.outputs) + k
            q = "" if k in shared_in else "restrict "
            lines.append(f"  const {t} *{q}in{k} = (const {t} *)args[{at}];")
        if self.columnar():
            return "\n".join(lines + self.columns()) + "\n"
        whole = self.whole_reduction()
        if whole is not None:
            return "\n".join(lines + whole) + "\n"
        outer = [(k, n) for k, n in enumerate(nest.outer) if n != 1]
        points = math.prod(nest.outer) * math.prod(nest.row)
        # A map kernel keeps its innermost axis as the vectorised loop; a row kernel
        # vectorises its row loops and spreads whole rows over the threads.
        spread = outer[:-1] if not nest.row and len(outer) > 1 else outer
        parallel = points >= PARALLEL_MIN and bool(spread)
        scratch = [f"{_calc(dt)} *s{k} = malloc({math.prod(nest.row)} * sizeof({_calc(dt)}));"
                   for k, dt in enumerate(nest.scratch)]
        pad = "  "
        if parallel:
            lines.append(f"{pad}#pragma omp parallel")
        lines.append(f"{pad}{{")
        pad += "  "
        lines += [pad + s for s in scratch]
        for depth, (k, n) in enumerate(outer):
            simd = not nest.row and depth == len(outer) - 1
            if depth == 0 and parallel:
                collapse = f" collapse({len(spread)})" if len(spread) > 1 else ""
                lines.append(f"{pad}#pragma omp for{' simd' + self.lanes if simd else ''}"
                             f"{collapse}")
            elif simd:
                lines.append(f"{pad}#pragma omp simd{self.lanes}")
            lines.append(f"{pad}for (long o{k} = 0; o{k} < {n}; o{k}++)")
        lines.append(f"{pad}{{")
        body_pad = pad + "  "
        accs: dict[int, Eqn] = {}
        for s in nest.body:
            if isinstance(s, RowLoop):
                self.row_loop(s, lines, body_pad, accs)
            else:
                self.statement(s, lines, body_pad, accs)
        lines.append(f"{pad}}}")
        lines += [f"{pad}free(s{k});" for k in range(len(nest.scratch))]
        lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"


    def columnar(self) -> bool:
        """Whether this is a reduction down columns (over leading axes, a bias gradient):
        one row loop (of updates and full results), whose operands are contiguous along the
        outer axes. Such a
        kernel runs the row loop outside and a vectorised loop over a block of columns inside,
        reading memory in order instead of with the row's stride."""
        nest = self.nest
        loops = [s for s in nest.body if isinstance(s, RowLoop)]
        outer = [f"o{k}" for k, n in enumerate(nest.outer) if n != 1]
        if len(loops) != 1 or nest.scratch or not outer:
            return False
        first = nest.body.index(loops[0])
        if not all(isinstance(s, Init) for s in nest.body[:first]) or \
                not all(isinstance(s, (Let, Update, Store)) for s in loops[0].body):
            return False
        innermost = outer[-1]
        return any(isinstance(a, Axis) and a.name == innermost and c == 1
                   for st in loops[0].body for load in loads_of(st) for a, c in load.index.terms)

    def columns(self) -> list[str]:
        """The body of a column kernel (see :meth:`columnar`).

        Work items are blocks of columns, each over a chunk of the rows: a few hundred
        columns (a norm weight's gradient) would otherwise give two threads three items. With
        several chunks, each writes its partial results to a table that one pass then
        combines in chunk order. The chunks depend on the shape only, so the sums are the
        same bits on any number of threads."""
        nest = self.nest
        first = next(i for i, s in enumerate(nest.body) if isinstance(s, RowLoop))
        inits, loop, after = nest.body[:first], nest.body[first], nest.body[first + 1:]
        n_out, rows = math.prod(nest.outer), math.prod(nest.row)
        block = min(_COLUMN_BLOCK, n_out)
        blocks = -(-n_out // block)
        parallel = n_out * rows >= PARALLEL_MIN
        chunks = _row_chunks(blocks, block, rows) if parallel else 1
        per_chunk = -(-rows // chunks)
        accs: dict[int, Eqn] = {}
        carried = []  # the accumulators' C names, types and start values
        for s in inits:
            red, dt = self.reduction(s.eqn)
            init = red.init(dt)
            if init is None:
                raise _UnsupportedError(s.eqn.prim.name)
            accs[s.local] = s.eqn
            carried.append((f"v{s.local}", _calc(dt), init))
            if red.tracks_nan(dt):
                carried.append((f"v{s.local}_nan", "int", "0"))
        lines = [f"  {t} *part_{var} = malloc({chunks * n_out} * sizeof({t}));"
                 for var, t, _ in carried if chunks > 1]
        if parallel and blocks * chunks > 1:
            lines.append("  #pragma omp parallel")
        lines.append("  {")
        if parallel and blocks * chunks > 1:
            lines.append("  #pragma omp for collapse(2) schedule(dynamic, 1)")
        lines.append(f"  for (long blk = 0; blk < {blocks}; blk++)")
        lines.append(f"  for (long chunk = 0; chunk < {chunks}; chunk++) {{")
        lines.append(f"    const long lo = blk * {block}, hi = lo + {block} < {n_out} ? "
                     f"lo + {block} : {n_out};")
        for var, t, init in carried:
            lines.append(f"    {t} col_{var}[{block}];")
            lines.append(f"    for (long i = 0; i < hi - lo; i++) col_{var}[i] = {init};")
        pad = "    "
        lines.append(f"{pad}const long row_hi = chunk * {per_chunk} + {per_chunk} < {rows} ? "
                     f"chunk * {per_chunk} + {per_chunk} : {rows};")
        lines.append(f"{pad}for (long rf = chunk * {per_chunk}; rf < row_hi; rf++) {{")
        lines += self._flat_indices("rf", nest.row, "r", pad + "  ")
        lines.append(f"{pad}  #pragma omp simd{self.lanes}")
        lines.append(f"{pad}  for (long of = lo; of < hi; of++) {{")
        lines += self._flat_indices("of", nest.outer, "o", pad + "    ")
        lines += [f"{pad}    {t} {var} = col_{var}[of - lo];" for var, t, _ in carried]
        for s in loop.body:
            self.statement(s, lines, pad + "    ", accs)
        lines += [f"{pad}    col_{var}[of - lo] = {var};" for var, _, _ in carried]
        lines += [f"{pad}  }}", f"{pad}}}"]
        if chunks > 1:  # the partial results, then (all items done) their combination
            lines += [f"{pad}for (long of = lo; of < hi; of++) part_{var}[chunk * {n_out} + of]"
                      f" = col_{var}[of - lo];" for var, _, _ in carried]
            lines.append("  }")
            if parallel:
                lines.append("  #pragma omp for")
            lines.append(f"  for (long of = 0; of < {n_out}; of++) {{")
            lines += [f"    {t} col_{var} = part_{var}[of];" for var, t, _ in carried]
            lines.append(f"    for (long c = 1; c < {chunks}; c++) {{")
            for local, e in accs.items():
                red, dt = self.reduction(e)
                part = f"part_v{local}[c * {n_out} + of]"
                lines.append(f"      col_v{local} = {red.combine(f'col_v{local}', part, dt)};")
                if red.tracks_nan(dt):
                    lines.append(f"      col_v{local}_nan |= part_v{local}_nan[c * {n_out} + of];")
            lines.append("    }")
            column = "col_{}"
            pad = "  "
        else:
            column = "col_{}[of - lo]"
            lines.append(f"{pad}for (long of = lo; of < hi; of++) {{")
        lines += self._flat_indices("of", nest.outer, "o", pad + "  ")
        for local, e in accs.items():
            dt = np.dtype(e.outputs[0].aval.dtype)
            value = column.format(f"v{local}")
            if self.reduction(e)[0].tracks_nan(dt):
                value = f"({column.format(f'v{local}_nan')} ? NAN : {value})"
            lines.append(f"{pad}  const {_calc(dt)} v{local} = {_round(value, dt)};")
        for s in after:
            self.statement(s, lines, pad + "  ", accs)
        lines.append(f"{pad}}}")
        lines += ["  }"] * (1 if chunks > 1 else 2)  # (the chunk loop) and the block
        lines += [f"  free(part_{var});" for var, _, _ in carried if chunks > 1]
        return lines + ["}"]

    @staticmethod
    def _flat_indices(flat: str, shape: tuple[int, ...], prefix: str, pad: str) -> list[str]:
        """``o0, o1...`` (``prefix`` o) of the axes of ``shape`` from its flat index (0 for
        an empty shape: its loop never runs)."""
        lines, stride, first = [], math.prod(shape), True
        if stride == 0:
            return [f"{pad}const long {prefix}{k} = 0;" for k, n in enumerate(shape) if n != 1]
        for k, n in enumerate(shape):
            stride //= n
            if n != 1:
                index = flat if stride == 1 else f"{flat} / {stride}"
                lines.append(f"{pad}const long {prefix}{k} = "
                             f"{index if first else f'({index}) % {n}'};")
                first = False
        return lines


# Columns a column kernel accumulates at once: whole rows up to this width (read in order, as
# they lie in memory: measured 1.7-2x faster than blocks of 256 columns of 576- and 2048-wide
# rows), with partial sums small enough to stay in L1.
_COLUMN_BLOCK = 2048
# A parallel column kernel cuts its rows into chunks until it has this many work items (blocks
# of columns times chunks of rows), keeping at least _CHUNK_MIN_POINTS points in each.
_COLUMN_ITEMS = 16
_CHUNK_MIN_POINTS = 1 << 13


def _row_chunks(blocks: int, block: int, rows: int) -> int:
    """How many chunks a parallel column kernel cuts its ``rows`` into: a power of two,
    from the shape alone (the order partial results are combined in never depends on the
    thread count)."""
    chunks = 1
    while (blocks * chunks < _COLUMN_ITEMS and rows >= 2 * chunks
           and block * rows // (2 * chunks) >= _CHUNK_MIN_POINTS):
        chunks *= 2
    return chunks

# Kernels rendered in this process, by the structure of their group (the 30 layers of a model
# are 30 equal bodies): most recent last, at most _MEMO_SIZE.
_MEMO: OrderedDict[Any, Kernel | None] = OrderedDict()
_MEMO_SIZE = 4096


def render(eqn: Eqn) -> Kernel | None:
    """The C kernel of a ``fused`` equation, or None when it uses a primitive or dtype this
    module has no C for (the backend then runs the equation's body through NumPy)."""
    try:
        key = param_key(eqn.params["body"])
    except TypeError:  # a param without a canonical key: render it every time
        key = object()
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    try:
        nest = describe(eqn)
        in_place = nest.in_place()
        text = _Renderer(nest).function("EMBER_KERNEL", in_place)
        name = "ember_k" + hashlib.sha256(text.encode()).hexdigest()[:16]
        kernel: Kernel | None = Kernel(name, text.replace("EMBER_KERNEL", name),
                                       in_place=in_place)
    except _UnsupportedError:
        kernel = None
    _MEMO[key] = kernel
    if len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return kernel
