"""Elementwise functions with NumPy's names, broadcasting and type promotion.

Complex numbers are accepted wherever the array API defines a function on them; the others
(ordering, rounding to integers, real-only special functions) raise a ``DTypeError`` naming
the function, instead of NumPy's lexicographic order or silently dropped imaginary parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.array import Array, Tracer
from ember.core.primitive import Primitive
from ember.core.trace import aval_of, bind
from ember.errors import DTypeError, EmberValueError, op_error
from ember.numpy._core import float_dtype, promote_args, refuse_complex, result_dtype, value
from ember.ops import elementwise as ew
from ember.ops import structural as st

__all__ = [
    "add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "remainder", "mod",
    "fmod", "power", "pow", "float_power", "negative", "positive", "abs", "absolute", "fabs",
    "sign", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "square", "cbrt",
    "reciprocal", "sin", "cos", "tan", "arcsin", "arccos", "arctan", "asin", "acos", "atan",
    "sinh", "cosh", "tanh", "arcsinh", "arccosh", "arctanh", "asinh", "acosh", "atanh",
    "arctan2", "atan2", "hypot", "floor", "ceil", "trunc", "rint", "round", "around", "fix",
    "maximum", "minimum", "fmax", "fmin", "clip", "where", "logaddexp", "logaddexp2",
    "equal", "not_equal", "less", "less_equal", "greater", "greater_equal", "logical_and",
    "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor",
    "bitwise_not", "invert", "bitwise_invert", "left_shift", "right_shift", "bitwise_left_shift",
    "bitwise_right_shift", "isfinite", "isinf", "isnan", "signbit", "copysign", "deg2rad",
    "rad2deg", "degrees", "radians", "sinc", "heaviside", "nan_to_num", "real", "imag", "conj",
    "conjugate", "angle", "iscomplexobj", "isrealobj", "iscomplex", "isreal", "nextafter",
    "isclose", "allclose", "array_equal", "divmod",
]


def _binary(name: str, op: Callable[[Any, Any], Any], kind: str = "number",
            on_bool: Callable[[Any, Any], Any] | None = None) -> Callable:
    """``on_bool`` replaces ``op`` for bool operands (NumPy's add/multiply are or/and)."""
    chosen: dict[np.dtype, Any] = {}  # per dtype, checked once: what to apply

    def fn(x1: Any, x2: Any, /) -> Any:
        a, b = promote_args(name, x1, x2)
        dt = a.aval.dtype
        target = chosen.get(dt)
        if target is None:
            _check_kind(name, dt, kind)
            target = chosen[dt] = _target(on_bool if on_bool and dt == dtypes.bool_ else op)
        if type(target) is Primitive:
            return bind(target, (a, b), {})
        return target(a, b)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"Elementwise ``numpy.{name}`` with broadcasting and NumPy promotion."
    return fn


def _target(op: Callable[..., Any]) -> Any:
    """The primitive itself when ``op`` is an ``ember.ops`` function that only binds it (it
    carries ``.prim``), so eager calls go straight to :func:`bind` (the hottest path of eager
    code; ``Primitive.bind`` adds a call layer and an import); else ``op``."""
    return getattr(op, "prim", op)


def _check_kind(name: str, dt: np.dtype, kind: str) -> None:
    if kind in ("real", "realnumber"):
        refuse_complex(name, dt)
    if kind in ("number", "realnumber") and dt == dtypes.bool_ and name not in (
            "add", "multiply", "maximum", "minimum"):
        raise op_error(DTypeError, name, "not supported for bool arrays; use logical_* instead")
    if kind == "intbool" and dtypes.is_float(dt):
        raise op_error(DTypeError, name, f"only defined for integer and bool arrays, got {dt}")
    if kind == "int" and not dtypes.is_int(dt):
        raise op_error(DTypeError, name, f"only defined for integer arrays, got {dt}")


add = _binary("add", ew.add, on_bool=ew.or_)
subtract = _binary("subtract", ew.sub)
multiply = _binary("multiply", ew.mul, on_bool=ew.and_)
maximum = _binary("maximum", ew.max, "real")
minimum = _binary("minimum", ew.min, "real")
fmax = _binary("fmax", lambda a, b: where(isnan(a), b, where(isnan(b), a, ew.max(a, b))),
               "real")
fmin = _binary("fmin", lambda a, b: where(isnan(a), b, where(isnan(b), a, ew.min(a, b))),
               "real")
floor_divide = _binary("floor_divide", ew.floor_div, "realnumber")
remainder = _binary("remainder", ew.rem, "realnumber")
mod = remainder
equal = _binary("equal", ew.eq, "any")
not_equal = _binary("not_equal", ew.ne, "any")
less = _binary("less", ew.lt, "real")
less_equal = _binary("less_equal", ew.le, "real")
greater = _binary("greater", ew.gt, "real")
greater_equal = _binary("greater_equal", ew.ge, "real")
bitwise_and = _binary("bitwise_and", ew.and_, "intbool")
bitwise_or = _binary("bitwise_or", ew.or_, "intbool")
bitwise_xor = _binary("bitwise_xor", ew.xor, "intbool")
left_shift = bitwise_left_shift = _binary("left_shift", ew.shift_left, "int")
right_shift = bitwise_right_shift = _binary("right_shift", ew.shift_right, "int")


def _to_float_args(name: str, *xs: Any, complex_ok: bool = True) -> list[Any]:
    """Promote, then compute integers in float (complex stays complex where ``complex_ok``)."""
    args = promote_args(name, *xs)
    dt = float_dtype(aval_of(args[0]).dtype)
    if not complex_ok:
        refuse_complex(name, dt)
    return [ew.convert(a, dt, weak=aval_of(a).weak) for a in args]


def true_divide(x1: Any, x2: Any, /) -> Any:
    """``x1 / x2``; integer operands give float64, as in NumPy."""
    a, b = promote_args("divide", x1, x2)
    dt = aval_of(a).dtype
    if not dtypes.is_inexact(dt):
        a, b = (ew.convert(v, dtypes.default_float, weak=aval_of(v).weak) for v in (a, b))
    return ew.div(a, b)


divide = true_divide


def power(x1: Any, x2: Any, /) -> Any:
    if isinstance(x2, int) and not isinstance(x2, bool) and x2 == 2:
        return square(x1)  # exact and cheaper, as NumPy's fast path
    a, b = promote_args("power", x1, x2)
    if dtypes.is_int(aval_of(a).dtype):
        _check_int_power(x2)
    return ew.pow(a, b)


def _check_int_power(exponent: Any) -> None:
    """NumPy's error for a known negative exponent (a traced one gives 1 // x**-n)."""
    if not isinstance(exponent, Tracer) and (np.asarray(exponent) < 0).any():
        raise op_error(EmberValueError, "power", "integers to negative integer powers are not "
                       "allowed")


pow = power  # noqa: A001


def float_power(x1: Any, x2: Any, /) -> Any:
    """``x1 ** x2`` in float64 (complex128 for complex operands)."""
    wide = dtypes.complex128 if dtypes.is_complex(result_dtype(x1, x2)) else dtypes.float64
    a, b = promote_args("float_power", x1, x2, dtype=wide)
    return ew.pow(a, b)


def nextafter(x1: Any, x2: Any, /) -> Any:
    """The next representable float after ``x1`` in the direction of ``x2``."""
    a, b = _to_float_args("nextafter", x1, x2, complex_ok=False)
    return ew.nextafter(a, b)


def fmod(x1: Any, x2: Any, /) -> Any:
    a, b = promote_args("fmod", x1, x2)
    refuse_complex("fmod", aval_of(a).dtype)
    r = ew.rem(a, b)
    # C fmod has the sign of the dividend; floor-mod has the divisor's: fix where they differ.
    zero = ew.zeros_like(r)
    fix = ew.and_(ew.ne(r, zero), ew.ne(ew.lt(r, zero), ew.lt(a, ew.zeros_like(a))))
    return where(fix, ew.sub(r, b), r)


def divmod(x1: Any, x2: Any, /) -> tuple[Any, Any]:  # noqa: A001
    return floor_divide(x1, x2), remainder(x1, x2)


def _unary_float(name: str, op: Callable[[Any], Any], complex_ok: bool = True
                 ) -> Callable[[Any], Any]:
    prim = _target(op)
    # Operands already of a float (or allowed complex) dtype go straight to the primitive.
    ready = frozenset(d for d in dtypes.SUPPORTED
                      if dtypes.is_float(d) or (complex_ok and dtypes.is_complex(d)))

    def fn(x: Any, /) -> Any:
        if not (isinstance(x, Array) and x.aval.dtype in ready):
            (x,) = _to_float_args(name, x, complex_ok=complex_ok)
        return bind(prim, (x,), {}) if type(prim) is Primitive else op(x)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"Elementwise ``numpy.{name}``; integer input is computed in float."
    return fn


exp = _unary_float("exp", ew.exp)
exp2 = _unary_float("exp2", ew.exp2)
expm1 = _unary_float("expm1", ew.expm1)
log = _unary_float("log", ew.log)
log1p = _unary_float("log1p", ew.log1p)
log2 = _unary_float("log2", lambda a: ew.div(ew.log(a), ew.full_like(a, np.log(2.0))))
log10 = _unary_float("log10", lambda a: ew.div(ew.log(a), ew.full_like(a, np.log(10.0))))
sqrt = _unary_float("sqrt", ew.sqrt)
cbrt = _unary_float("cbrt", ew.cbrt, complex_ok=False)
sin = _unary_float("sin", ew.sin)
cos = _unary_float("cos", ew.cos)
tan = _unary_float("tan", ew.tan)
arcsin = asin = _unary_float("arcsin", ew.asin)
arccos = acos = _unary_float("arccos", ew.acos)
arctan = atan = _unary_float("arctan", ew.atan)
sinh = _unary_float("sinh", ew.sinh)
cosh = _unary_float("cosh", ew.cosh)
tanh = _unary_float("tanh", ew.tanh)
arcsinh = asinh = _unary_float("arcsinh", ew.asinh)
arccosh = acosh = _unary_float("arccosh", ew.acosh)
arctanh = atanh = _unary_float("arctanh", ew.atanh)
deg2rad = radians = _unary_float("deg2rad", lambda a: ew.mul(a, ew.full_like(a, np.pi / 180)),
                                 complex_ok=False)
rad2deg = degrees = _unary_float("rad2deg", lambda a: ew.mul(a, ew.full_like(a, 180 / np.pi)),
                                 complex_ok=False)
reciprocal = _unary_float("reciprocal", lambda a: ew.div(ew.full_like(a, 1), a))


def arctan2(x1: Any, x2: Any, /) -> Any:
    a, b = _to_float_args("arctan2", x1, x2, complex_ok=False)
    return ew.atan2(a, b)


atan2 = arctan2


def hypot(x1: Any, x2: Any, /) -> Any:
    a, b = _to_float_args("hypot", x1, x2, complex_ok=False)
    return ew.sqrt(ew.add(ew.mul(a, a), ew.mul(b, b)))


def logaddexp(x1: Any, x2: Any, /) -> Any:
    """``log(exp(x1) + exp(x2))`` without overflow."""
    a, b = _to_float_args("logaddexp", x1, x2, complex_ok=False)
    hi = ew.max(a, b)
    diff = ew.neg(ew.abs(ew.sub(a, b)))
    out = ew.add(hi, ew.log1p(ew.exp(diff)))
    # Equal infinities: the difference is nan, the answer is that infinity.
    return where(ew.eq(a, b), ew.add(a, ew.full_like(a, np.log(2.0))), out)


def logaddexp2(x1: Any, x2: Any, /) -> Any:
    a, b = _to_float_args("logaddexp2", x1, x2, complex_ok=False)
    ln2 = ew.full_like(a, np.log(2.0))
    return ew.div(logaddexp(ew.mul(a, ln2), ew.mul(b, ln2)), ln2)


def negative(x: Any, /) -> Any:
    a = value(x)
    if aval_of(a).dtype == dtypes.bool_:
        raise op_error(DTypeError, "negative", "not supported for bool arrays; use ~ or "
                       "logical_not")
    return ew.neg(a)


def positive(x: Any, /) -> Any:
    return value(x)


def absolute(x: Any, /) -> Any:
    """``|x|``; for complex ``x`` the real modulus (``complex64 -> float32``)."""
    a = value(x)
    if aval_of(a).dtype == dtypes.bool_ or dtypes.is_unsigned(aval_of(a).dtype):
        return a
    return ew.abs(a)


abs = absolute  # noqa: A001
fabs = _unary_float("fabs", ew.abs, complex_ok=False)


def sign(x: Any, /) -> Any:
    """-1, 0 or 1; for complex ``z`` it is ``z / |z|`` (0 at 0), as in NumPy 2."""
    return ew.sign(value(x))


def square(x: Any, /) -> Any:
    a = value(x)
    return ew.mul(a, a)


def _rounding(name: str, op: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def fn(x: Any, /) -> Any:
        a = value(x)
        refuse_complex(name, aval_of(a).dtype)
        return op(a) if dtypes.is_float(aval_of(a).dtype) else a

    fn.__name__ = fn.__qualname__ = name
    return fn


floor = _rounding("floor", ew.floor)
ceil = _rounding("ceil", ew.ceil)


def rint(x: Any, /) -> Any:
    """Round half to even; unlike floor/ceil, NumPy returns floats for integer input."""
    (a,) = _to_float_args("rint", x)
    return ew.round(a)


trunc = fix = _rounding("trunc", lambda a: where(ew.lt(a, ew.zeros_like(a)), ew.ceil(a),
                                                 ew.floor(a)))


def round(x: Any, decimals: int = 0) -> Any:  # noqa: A001
    """Round half to even, as NumPy does, to ``decimals`` places (complex: each component)."""
    a = value(x)
    if not dtypes.is_inexact(aval_of(a).dtype):
        if decimals >= 0:
            return a
        # Half to even on the quotient, as NumPy: 15 -> 20, 25 -> 20, -15 -> -20.
        scale = ew.full_like(a, 10 ** (-decimals))
        q = ew.floor_div(a, scale)
        twice_r = ew.mul(ew.sub(a, ew.mul(q, scale)), ew.full_like(a, 2))
        odd = ew.ne(ew.rem(q, ew.full_like(q, 2)), ew.zeros_like(q))
        up = ew.or_(ew.gt(twice_r, scale), ew.and_(ew.eq(twice_r, scale), odd))
        return ew.mul(ew.add(q, ew.convert(up, aval_of(q).dtype)), scale)
    if decimals == 0:
        return ew.round(a)
    scale = ew.full_like(a, 10.0 ** decimals)
    return ew.div(ew.round(ew.mul(a, scale)), scale)


around = round


def clip(x: Any, /, min: Any = None, max: Any = None, *,  # noqa: A002
         a_min: Any = None, a_max: Any = None) -> Any:
    """Limit values to ``[min, max]`` (either bound may be None); ``a_min``/``a_max`` are
    NumPy's older names for them."""
    min = a_min if min is None else min  # noqa: A001
    max = a_max if max is None else max  # noqa: A001
    out = value(x)
    refuse_complex("clip", aval_of(out).dtype)
    if min is not None:
        out = maximum(out, min)
    if max is not None:
        out = minimum(out, max)
    return out


def where(condition: Any, x: Any = None, y: Any = None, /) -> Any:
    """``x`` where ``condition`` else ``y`` (the one-argument form is ``nonzero``)."""
    if x is None and y is None:
        from ember.numpy._search import nonzero

        return nonzero(condition)
    if x is None or y is None:
        raise op_error(DTypeError, "where", "either both or neither of x and y must be given")
    c = value(condition)
    if aval_of(c).dtype != dtypes.bool_:
        c = ew.ne(c, ew.zeros_like(c))
    a, b = promote_args("where", x, y)
    shape = np.broadcast_shapes(aval_of(c).shape, aval_of(a).shape)
    c, a, b = (st.broadcast_to_shape(v, shape) for v in (c, a, b))
    return ew.select(c, a, b)


def _logical(name: str, op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def fn(x1: Any, x2: Any, /) -> Any:
        a, b = promote_args(name, x1, x2, dtype=None)
        return op(_truth(a), _truth(b))

    fn.__name__ = fn.__qualname__ = name
    return fn


def _truth(a: Any) -> Any:
    return a if aval_of(a).dtype == dtypes.bool_ else ew.ne(a, ew.zeros_like(a))


logical_and = _logical("logical_and", ew.and_)
logical_or = _logical("logical_or", ew.or_)
logical_xor = _logical("logical_xor", ew.xor)


def logical_not(x: Any, /) -> Any:
    return ew.not_(_truth(value(x)))


def invert(x: Any, /) -> Any:
    a = value(x)
    _check_kind("invert", aval_of(a).dtype, "intbool")
    return ew.not_(a)


bitwise_not = bitwise_invert = invert


def isfinite(x: Any, /) -> Any:
    """Complex numbers are finite when both components are."""
    a = value(x)
    if not dtypes.is_inexact(aval_of(a).dtype):
        return ew.full_like(a, True, dtypes.bool_)
    return ew.is_finite(a)


def isnan(x: Any, /) -> Any:
    """Complex numbers are nan when either component is (nan never equals itself)."""
    a = value(x)
    if not dtypes.is_inexact(aval_of(a).dtype):
        return ew.full_like(a, False, dtypes.bool_)
    return ew.ne(a, a)


def isinf(x: Any, /) -> Any:
    """Complex numbers are infinite when either component is, even if the other is nan."""
    a = value(x)
    if dtypes.is_complex(aval_of(a).dtype):
        return ew.or_(isinf(ew.real(a)), isinf(ew.imag(a)))
    if not dtypes.is_float(aval_of(a).dtype):
        return ew.full_like(a, False, dtypes.bool_)
    return ew.and_(ew.not_(ew.is_finite(a)), ew.eq(a, a))


def signbit(x: Any, /) -> Any:
    a = value(x)
    refuse_complex("signbit", aval_of(a).dtype)
    if not dtypes.is_float(aval_of(a).dtype):
        return ew.lt(a, ew.zeros_like(a)) if aval_of(a).dtype != dtypes.bool_ else \
            ew.full_like(a, False, dtypes.bool_)
    # The sign bit itself (set for -0.0 and -NaN too, which no comparison can see): the top
    # bit of the same-width unsigned integer.
    bits = np.dtype(f"uint{8 * aval_of(a).dtype.itemsize}")
    as_int = ew.bitcast_convert(a, bits)
    return ew.ge(as_int, ew.full_like(as_int, 1 << (8 * bits.itemsize - 1)))


def copysign(x1: Any, x2: Any, /) -> Any:
    a, b = _to_float_args("copysign", x1, x2, complex_ok=False)
    mag = ew.abs(a)
    return where(signbit(b), ew.neg(mag), mag)


def sinc(x: Any, /) -> Any:
    (a,) = _to_float_args("sinc", x)
    pix = ew.mul(a, ew.full_like(a, np.pi))
    is_zero = ew.eq(a, ew.zeros_like(a))
    safe = where(is_zero, ew.full_like(a, 1), pix)
    return where(is_zero, ew.full_like(a, 1), ew.div(ew.sin(safe), safe))


def heaviside(x1: Any, x2: Any, /) -> Any:
    a, b = promote_args("heaviside", x1, x2)
    refuse_complex("heaviside", aval_of(a).dtype)
    zero = ew.zeros_like(a)
    return where(ew.lt(a, zero), zero, where(ew.gt(a, zero), ew.full_like(a, 1), b))


def nan_to_num(x: Any, copy: bool = True, nan: float = 0.0, posinf: float | None = None,
               neginf: float | None = None) -> Any:
    a = value(x)
    dt = aval_of(a).dtype
    if dtypes.is_complex(dt):  # each component on its own, as NumPy
        parts = (nan_to_num(part, copy, nan, posinf, neginf) for part in (ew.real(a), ew.imag(a)))
        return ew.complex(*parts)
    if not dtypes.is_float(dt):
        return a
    info = dtypes.finfo(dt)
    a = where(isnan(a), ew.full_like(a, nan), a)
    a = where(ew.eq(a, ew.full_like(a, np.inf)), ew.full_like(a, info.max if posinf is None
                                                              else posinf), a)
    return where(ew.eq(a, ew.full_like(a, -np.inf)), ew.full_like(a, info.min if neginf is None
                                                                  else neginf), a)


def real(x: Any, /) -> Any:
    """The real part (``complex64 -> float32``); a real array is returned unchanged."""
    a = value(x)
    return ew.real(a) if dtypes.is_complex(aval_of(a).dtype) else a


def imag(x: Any, /) -> Any:
    """The imaginary part (``complex64 -> float32``); zeros for a real array."""
    a = value(x)
    return ew.imag(a) if dtypes.is_complex(aval_of(a).dtype) else ew.zeros_like(a)


def conj(x: Any, /) -> Any:
    """The complex conjugate; a real array is returned unchanged."""
    a = value(x)
    return ew.conj(a) if dtypes.is_complex(aval_of(a).dtype) else a


conjugate = conj


def angle(z: Any, deg: bool = False) -> Any:
    """The argument of ``z`` in (-pi, pi] (degrees if ``deg``), as a real array."""
    (a,) = _to_float_args("angle", z)
    if dtypes.is_complex(aval_of(a).dtype):
        out = ew.atan2(ew.imag(a), ew.real(a))
    else:
        out = ew.atan2(ew.zeros_like(a), a)
    return ew.mul(out, ew.full_like(out, 180 / np.pi)) if deg else out


def iscomplexobj(x: Any) -> bool:
    """Whether ``x`` has a complex dtype (whatever its values)."""
    return dtypes.is_complex(aval_of(value(x)).dtype)


def isrealobj(x: Any) -> bool:
    return not iscomplexobj(x)


def iscomplex(x: Any) -> Any:
    """Elementwise: a non-zero imaginary part."""
    a = value(x)
    return ew.ne(imag(a), ew.zeros_like(imag(a)))


def isreal(x: Any) -> Any:
    """Elementwise: a zero imaginary part (every element of a real array)."""
    return logical_not(iscomplex(x))


def isclose(a: Any, b: Any, rtol: float = 1e-05, atol: float = 1e-08,
            equal_nan: bool = False) -> Any:
    x, y = promote_args("isclose", a, b)
    if not dtypes.is_inexact(aval_of(x).dtype):
        x, y = (ew.convert(v, dtypes.default_float) for v in (x, y))
    diff = ew.abs(ew.sub(x, y))
    size = ew.abs(y)  # real, also for complex operands
    tol = ew.add(ew.full_like(size, atol), ew.mul(ew.full_like(size, rtol), size))
    close = ew.or_(ew.le(diff, tol), ew.eq(x, y))
    if equal_nan:
        close = ew.or_(close, ew.and_(isnan(x), isnan(y)))
    return close


def allclose(a: Any, b: Any, rtol: float = 1e-05, atol: float = 1e-08,
             equal_nan: bool = False) -> Any:
    from ember.numpy._reductions import all as all_

    return all_(isclose(a, b, rtol, atol, equal_nan))


def array_equal(a1: Any, a2: Any, equal_nan: bool = False) -> Any:
    from ember.numpy._reductions import all as all_

    x, y = value(a1), value(a2)
    if aval_of(x).shape != aval_of(y).shape:
        return value(False)
    eq = equal(x, y)
    if equal_nan:
        eq = logical_or(eq, logical_and(isnan(x), isnan(y)))
    return all_(eq)
