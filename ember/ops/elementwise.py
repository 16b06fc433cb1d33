"""Elementwise primitives: unary and binary math, comparisons, select and casts.

Operands of a binary primitive must have equal shapes and dtypes (the NumPy layer broadcasts and
promotes first). The result is weakly typed only if every operand is.

Complex numbers follow JAX's conventions for differentiation: a jvp rule is the ordinary
complex derivative (``t * f'(z)`` for a holomorphic ``f``) and a transpose rule is the plain,
non-conjugating transpose, so ``grad`` of a real-valued function of ``z`` is ``conj`` of the
steepest-ascent direction (``grad(lambda z: abs(z) ** 2)(z) == 2 * conj(z)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import UndefinedPrimal, Zero
from ember.errors import DTypeError, op_error
from ember.ir.types import ArrayType
from ember.ops._checks import same_dtypes, same_shapes
from ember.ops._erf import erf_numpy

__all__ = [
    "neg", "exp", "exp2", "log", "log1p", "expm1", "sin", "cos", "tan", "asin", "acos", "atan",
    "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "sqrt", "cbrt", "erf", "logistic",
    "abs", "sign", "floor", "ceil", "round", "is_finite", "not_", "add", "sub", "mul", "div",
    "floor_div", "rem", "pow", "max", "min", "atan2", "nextafter", "and_", "or_", "xor",
    "shift_left", "shift_right", "eq", "ne", "lt", "le", "gt", "ge", "real", "imag", "conj",
    "complex", "select", "convert", "bitcast_convert", "full_like", "zeros_like", "instantiate",
    "add_any", "stop_gradient",
]

# --- shape/dtype rules -----------------------------------------------------------------------

# Which operand dtypes each kind of primitive accepts. "real" kinds exclude complex numbers:
# they have no order (max, lt...), no integer part (floor, rem...) and no real-only special
# functions (erf, atan2...).
_KINDS = {
    "float": (dtypes.is_float, "a real floating dtype"),
    "inexact": (dtypes.is_inexact, "a floating or complex dtype"),
    "complex": (dtypes.is_complex, "a complex dtype"),
    "number": (lambda d: d != dtypes.bool_, "a numeric dtype"),
    "real": (lambda d: not dtypes.is_complex(d), "a real (non-complex) dtype"),
    "realnumber": (lambda d: d != dtypes.bool_ and not dtypes.is_complex(d),
                   "a real (non-complex) numeric dtype"),
    "int": (lambda d: dtypes.is_int(d), "an integer dtype"),
    "intbool": (lambda d: dtypes.is_int(d) or d == dtypes.bool_, "an integer or bool dtype"),
    "any": (lambda d: True, "any dtype"),
}

OutDtype = np.dtype | Callable[[np.dtype], np.dtype] | None


def _elementwise_rule(name: str, kind: str, out_dtype: OutDtype = None
                      ) -> Callable[..., ArrayType]:
    """Shape/dtype rule. ``out_dtype`` is a fixed result dtype (bool for a comparison), or a
    map from the operand dtype (``real_dtype`` for ``abs``), which keeps weak typing."""
    ok, what = _KINDS[kind]

    def rule(*avals: ArrayType) -> ArrayType:
        same_shapes(name, avals)
        same_dtypes(name, avals)
        dt = avals[0].dtype
        if not ok(dt):
            if dtypes.is_complex(dt):
                raise op_error(DTypeError, name, f"is not defined on complex numbers, got {dt} "
                               "(apply it to real(x), imag(x) or abs(x))")
            raise op_error(DTypeError, name, f"needs {what}, got {dt}")
        weak = all(a.weak for a in avals)
        if callable(out_dtype):
            return ArrayType(avals[0].shape, out_dtype(dt), weak=weak)
        if out_dtype is not None:
            return ArrayType(avals[0].shape, out_dtype)
        return ArrayType(avals[0].shape, dt, weak=weak)

    return rule


def _batch_elementwise(prim: Primitive) -> Callable[..., Any]:
    def rule(args, dims, **params):
        from ember.ops.structural import broadcast_in_dim, moveaxis

        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        moved = []
        for a, d in zip(args, dims):
            if d is None:
                shape = (size, *a.shape)
                moved.append(broadcast_in_dim(a, shape, tuple(range(1, len(shape)))))
            else:
                moved.append(moveaxis(a, d, 0))
        return prim.bind(*moved, **params), 0

    return rule


def _quiet(np_fn: Callable[..., Any]) -> Callable[..., Any]:
    """IEEE results (inf, nan) without NumPy's RuntimeWarnings: a compiled kernel cannot warn,
    so the reference backend does not either. ``errstate`` as a decorator costs half of a
    ``with errstate`` block per call (no context object is built), on every eager op."""
    impl = np.errstate(all="ignore")(np_fn)
    impl.unguarded = np_fn  # for programs that silence NumPy once around the whole run
    # A ufunc writes into a given buffer (``out=``): a program may reuse a dying operand's.
    impl.writes_out = isinstance(np_fn, np.ufunc)
    return impl


def _declare(name: str, np_fn: Callable[..., Any], kind: str, nargs: int,
             out_dtype: OutDtype = None) -> Primitive:
    prim = Primitive(name, kind="elementwise")
    prim.def_abstract_eval(_elementwise_rule(name, kind, out_dtype))
    prim.def_impl(_quiet(np_fn))
    prim.def_batch(_batch_elementwise(prim))
    return prim


# --- helpers that rules use ------------------------------------------------------------------

def full_like(x: Any, value: Any, dtype: np.dtype | None = None) -> Any:
    """An array shaped like ``x`` filled with ``value`` (a staged broadcast under tracing)."""
    from ember.core.trace import aval_of, to_array
    from ember.ops.structural import broadcast_in_dim

    aval = aval_of(x)
    scalar = to_array(np.asarray(value, dtype=dtype or aval.dtype))
    return broadcast_in_dim(scalar, aval.shape, ()) if aval.shape else scalar


def zeros_like(x: Any) -> Any:
    return full_like(x, 0)


def instantiate(t: Any) -> Any:
    """Materialise a symbolic :class:`Zero`."""
    return zeros_like(t) if isinstance(t, Zero) else t


def add_any(a: Any, b: Any) -> Any:
    """Add two tangents/cotangents, either of which may be a symbolic zero."""
    if isinstance(a, Zero):
        return b
    if isinstance(b, Zero):
        return a
    return add(a, b)


# --- unary -----------------------------------------------------------------------------------

def _unary(name: str, np_fn: Callable[..., Any], derivative: Callable[[Any, Any], Any] | None,
           kind: str = "inexact", out_dtype: OutDtype = None) -> Callable[[Any], Any]:
    """A unary primitive whose jvp is ``t * derivative(x, y)`` (holomorphic on complex)."""
    prim = _declare(name, np_fn, kind, 1, out_dtype)
    if derivative is not None:
        def jvp(primals, tangents):
            (x,), (t,) = primals, tangents
            y = prim.bind(x)
            if isinstance(t, Zero):
                return y, Zero(y.aval)
            return y, mul(t, derivative(x, y))

        prim.def_jvp(jvp)

    def fn(x: Any) -> Any:
        return prim.bind(x)

    fn.__name__ = name
    fn.prim = prim  # type: ignore[attr-defined]
    return fn


def _zero_derivative(name: str, np_fn: Callable[..., Any], kind: str,
                     out_dtype: OutDtype = None) -> Callable[[Any], Any]:
    """A piecewise-constant or non-float op: its tangent is zero."""
    prim = _declare(name, np_fn, kind, 1, out_dtype)

    def jvp(primals, tangents):
        y = prim.bind(*primals)
        return y, Zero(y.aval)

    prim.def_jvp(jvp)

    def fn(x: Any) -> Any:
        return prim.bind(x)

    fn.__name__ = name
    fn.prim = prim  # type: ignore[attr-defined]
    return fn


def _neg_impl(x):
    return np.negative(x) if x.dtype != np.bool_ else x


neg = _unary("neg", _neg_impl, None, kind="number")


def _neg_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return neg(x), t if isinstance(t, Zero) else neg(t)


neg.prim.def_jvp(_neg_jvp)
neg.prim.def_transpose(lambda ct, x: [Zero(x.aval) if isinstance(ct, Zero) else neg(ct)])

exp = _unary("exp", np.exp, lambda x, y: y)
exp2 = _unary("exp2", np.exp2, lambda x, y: mul(y, full_like(y, np.log(2.0))))
log = _unary("log", np.log, lambda x, y: div(full_like(x, 1), x))
log1p = _unary("log1p", np.log1p, lambda x, y: div(full_like(x, 1), add(x, full_like(x, 1))))
expm1 = _unary("expm1", np.expm1, lambda x, y: add(y, full_like(y, 1)))
sin = _unary("sin", np.sin, lambda x, y: cos(x))
cos = _unary("cos", np.cos, lambda x, y: neg(sin(x)))
tan = _unary("tan", np.tan, lambda x, y: add(full_like(y, 1), mul(y, y)))
asin = _unary("asin", np.arcsin,
              lambda x, y: div(full_like(x, 1), sqrt(sub(full_like(x, 1), mul(x, x)))))
acos = _unary("acos", np.arccos,
              lambda x, y: div(full_like(x, -1), sqrt(sub(full_like(x, 1), mul(x, x)))))
atan = _unary("atan", np.arctan, lambda x, y: div(full_like(x, 1), add(full_like(x, 1), mul(x, x))))
sinh = _unary("sinh", np.sinh, lambda x, y: cosh(x))
cosh = _unary("cosh", np.cosh, lambda x, y: sinh(x))
tanh = _unary("tanh", np.tanh, lambda x, y: sub(full_like(y, 1), mul(y, y)))
asinh = _unary("asinh", np.arcsinh,
               lambda x, y: div(full_like(x, 1), sqrt(add(mul(x, x), full_like(x, 1)))))
# sqrt(x - 1) * sqrt(x + 1), not sqrt(x*x - 1): the two differ in sign for complex x with a
# negative real part, and only the product is the derivative of the principal branch.
acosh = _unary("acosh", np.arccosh,
               lambda x, y: div(full_like(x, 1), mul(sqrt(sub(x, full_like(x, 1))),
                                                      sqrt(add(x, full_like(x, 1))))))
atanh = _unary("atanh", np.arctanh,
               lambda x, y: div(full_like(x, 1), sub(full_like(x, 1), mul(x, x))))
sqrt = _unary("sqrt", np.sqrt, lambda x, y: div(full_like(y, 0.5), y))
cbrt = _unary("cbrt", np.cbrt, lambda x, y: div(full_like(y, 1 / 3), mul(y, y)), kind="float")
erf = _unary("erf", erf_numpy,
             lambda x, y: mul(full_like(x, 2 / np.sqrt(np.pi)), exp(neg(mul(x, x)))),
             kind="float")


def _logistic_impl(x):
    # 1 / (1 + exp(-x)) is exact at both ends in IEEE arithmetic (exp overflowing to inf gives
    # 0, not NaN), so no branch is needed; in-place steps avoid three temporaries.
    out = np.negative(x, out=np.empty_like(x))  # an array even for 0-d input
    np.exp(out, out=out)
    out += 1
    return np.reciprocal(out, out=out)


logistic = _unary("logistic", _logistic_impl, lambda x, y: mul(y, sub(full_like(y, 1), y)),
                  kind="float")
# |z| of a complex z is real (float32 for complex64); sign(z) is z / |z| (0 at 0), as NumPy 2.
abs = _unary("abs", np.abs, None, kind="number", out_dtype=dtypes.real_dtype)  # noqa: A001
sign = _unary("sign", np.sign, None, kind="number")
floor = _zero_derivative("floor", np.floor, "float")
ceil = _zero_derivative("ceil", np.ceil, "float")
# Half to even, as NumPy; complex numbers round their two components.
round = _zero_derivative("round", np.round, "inexact")  # noqa: A001
is_finite = _zero_derivative("is_finite", np.isfinite, "inexact", dtypes.bool_)
not_ = _zero_derivative("not", np.invert, "intbool")


def _modulus_divisor(x):
    """For complex ``z``: where ``z == 0``, and ``|z|`` as a complex divisor that is 1 there.
    Built from differentiable primitives, so second derivatives through abs/sign are right."""
    r = abs(x)
    at_zero = eq(r, zeros_like(r))
    return at_zero, convert(select(at_zero, full_like(r, 1), r), x.aval.dtype)


def _abs_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = abs(x)
    if isinstance(t, Zero):
        return y, Zero(y.aval)
    if dtypes.is_complex(x.aval.dtype):
        # d|z| = Re(conj(z) dz) / |z|: |z| is real, so only the tangent's part along z counts.
        _, modulus = _modulus_divisor(x)
        return y, real(div(mul(conj(x), t), modulus))
    return y, mul(t, sign(x))


def _sign_jvp(primals, tangents):
    # Real sign is piecewise constant. Complex sign(z) = z / |z| moves with the tangent's part
    # across z: d(z / |z|) = (dz - s d|z|) / |z| (taken as 0 at z = 0).
    (x,), (t,) = primals, tangents
    s = sign(x)
    if isinstance(t, Zero) or not dtypes.is_complex(x.aval.dtype):
        return s, Zero(s.aval)
    at_zero, modulus = _modulus_divisor(x)
    d_modulus = convert(_abs_jvp(primals, tangents)[1], x.aval.dtype)
    ds = div(sub(t, mul(s, d_modulus)), modulus)
    return s, select(at_zero, zeros_like(ds), ds)


abs.prim.def_jvp(_abs_jvp)
sign.prim.def_jvp(_sign_jvp)


# --- binary ----------------------------------------------------------------------------------

def _binary(name: str, np_fn: Callable[..., Any], kind: str = "number",
            out_dtype: OutDtype = None) -> Callable[[Any, Any], Any]:
    prim = _declare(name, np_fn, kind, 2, out_dtype)

    def fn(x: Any, y: Any) -> Any:
        return prim.bind(x, y)

    fn.__name__ = name
    fn.prim = prim  # type: ignore[attr-defined]
    return fn


def _tangent_or_zero(y, *terms):
    """Sum the non-zero terms; a symbolic zero if there are none."""
    live = [t for t in terms if t is not None]
    if not live:
        return Zero(y.aval)
    out = live[0]
    for t in live[1:]:
        out = add(out, t)
    return out


add = _binary("add", np.add)
sub = _binary("sub", np.subtract)
mul = _binary("mul", np.multiply)
div = _binary("div", np.true_divide, kind="inexact")


def _pow_impl(x, y):
    if dtypes.is_int(x.dtype) and (y < 0).any():
        # NumPy raises here, a compiled program cannot: 1 / x**n truncated toward zero.
        neg = y < 0
        odd = (y % 2).astype(bool)
        inverse = np.where(x == 1, 1, np.where(x == -1, np.where(odd, -1, 1), 0))
        return np.where(neg, inverse, np.power(x, np.where(neg, 0, y))).astype(x.dtype)
    return np.power(x, y)


floor_div = _binary("floor_div", np.floor_divide, kind="realnumber")
rem = _binary("rem", np.remainder, kind="realnumber")
pow = _binary("pow", _pow_impl)  # noqa: A001
max = _binary("max", np.maximum, kind="real")  # noqa: A001
min = _binary("min", np.minimum, kind="real")  # noqa: A001
atan2 = _binary("atan2", np.arctan2, kind="float")
nextafter = _binary("nextafter", np.nextafter, kind="float")
and_ = _binary("and", np.bitwise_and, kind="intbool")
or_ = _binary("or", np.bitwise_or, kind="intbool")
xor = _binary("xor", np.bitwise_xor, kind="intbool")
shift_left = _binary("shift_left", np.left_shift, kind="int")
shift_right = _binary("shift_right", np.right_shift, kind="int")
eq = _binary("eq", np.equal, kind="any", out_dtype=dtypes.bool_)
ne = _binary("ne", np.not_equal, kind="any", out_dtype=dtypes.bool_)
lt = _binary("lt", np.less, kind="real", out_dtype=dtypes.bool_)
le = _binary("le", np.less_equal, kind="real", out_dtype=dtypes.bool_)
gt = _binary("gt", np.greater, kind="real", out_dtype=dtypes.bool_)
ge = _binary("ge", np.greater_equal, kind="real", out_dtype=dtypes.bool_)


def _linear_jvp(prim):
    def jvp(primals, tangents):
        y = prim.bind(*primals)
        tx, ty = tangents
        if isinstance(tx, Zero) and isinstance(ty, Zero):
            return y, Zero(y.aval)
        if isinstance(ty, Zero):  # no zeros array: it would only become a residual
            return y, tx
        if isinstance(tx, Zero):
            return y, ty if prim is add_p else neg(ty)
        return y, prim.bind(tx, ty)
    return jvp


add_p = add.prim
add.prim.def_jvp(_linear_jvp(add.prim))
sub.prim.def_jvp(_linear_jvp(sub.prim))


def _add_transpose(ct, x, y):
    return [ct if isinstance(x, UndefinedPrimal) else None,
            ct if isinstance(y, UndefinedPrimal) else None]


def _sub_transpose(ct, x, y):
    neg_ct = ct if isinstance(ct, Zero) else neg(ct)
    return [ct if isinstance(x, UndefinedPrimal) else None,
            neg_ct if isinstance(y, UndefinedPrimal) else None]


add.prim.def_transpose(_add_transpose)
sub.prim.def_transpose(_sub_transpose)


def _mul_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    out = mul(x, y)
    return out, _tangent_or_zero(
        out, None if isinstance(tx, Zero) else mul(tx, y),
        None if isinstance(ty, Zero) else mul(x, ty))


def _mul_transpose(ct, x, y):
    if isinstance(x, UndefinedPrimal) and isinstance(y, UndefinedPrimal):
        raise op_error(DTypeError, "mul", "transpose of a product of two linear values")
    if isinstance(ct, Zero):
        return [Zero(x.aval) if isinstance(x, UndefinedPrimal) else None,
                Zero(y.aval) if isinstance(y, UndefinedPrimal) else None]
    if isinstance(x, UndefinedPrimal):
        return [mul(ct, y), None]
    return [None, mul(x, ct)]


mul.prim.def_jvp(_mul_jvp)
mul.prim.def_transpose(_mul_transpose)


def _div_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    out = div(x, y)
    return out, _tangent_or_zero(
        out, None if isinstance(tx, Zero) else div(tx, y),
        None if isinstance(ty, Zero) else neg(mul(ty, div(out, y))))


def _div_transpose(ct, x, y):
    if isinstance(y, UndefinedPrimal):
        raise op_error(DTypeError, "div", "transpose with respect to the divisor")
    return [Zero(x.aval) if isinstance(ct, Zero) else div(ct, y), None]


div.prim.def_jvp(_div_jvp)
div.prim.def_transpose(_div_transpose)


def _rem_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    out = rem(x, y)
    return out, _tangent_or_zero(
        out, None if isinstance(tx, Zero) else tx,
        None if isinstance(ty, Zero) else neg(mul(ty, floor(div(x, y)))))


rem.prim.def_jvp(_rem_jvp)


def _pow_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    out = pow(x, y)
    dx = dy = None
    if not isinstance(tx, Zero):
        # y * x**(y-1), written so that x == 0 with y == 0 gives 0, not nan.
        ym1 = pow(x, sub(y, full_like(y, 1)))
        dx = mul(tx, select(eq(y, full_like(y, 0)), zeros_like(y), mul(y, ym1)))
    if not isinstance(ty, Zero):
        safe_log = select(eq(x, full_like(x, 0)), zeros_like(x), log(x))
        dy = mul(ty, mul(out, safe_log))
    return out, _tangent_or_zero(out, dx, dy)


pow.prim.def_jvp(_pow_jvp)


def _minmax_jvp(prim, pick):
    def jvp(primals, tangents):
        (x, y), (tx, ty) = primals, tangents
        out = prim.bind(x, y)
        if isinstance(tx, Zero) and isinstance(ty, Zero):
            return out, Zero(out.aval)
        tx, ty = instantiate(tx), instantiate(ty)
        # Ties split the tangent evenly, so the derivative is symmetric in x and y.
        half = full_like(x, 0.5)
        tie = mul(half, add(tx, ty))
        return out, select(eq(x, y), tie, select(pick(x, y), tx, ty))
    return jvp


max.prim.def_jvp(_minmax_jvp(max.prim, gt))
min.prim.def_jvp(_minmax_jvp(min.prim, lt))


def _atan2_jvp(primals, tangents):
    (y, x), (ty, tx) = primals, tangents
    out = atan2(y, x)
    denom = add(mul(x, x), mul(y, y))
    return out, _tangent_or_zero(
        out, None if isinstance(ty, Zero) else mul(ty, div(x, denom)),
        None if isinstance(tx, Zero) else neg(mul(tx, div(y, denom))))


atan2.prim.def_jvp(_atan2_jvp)


def _no_tangent(prim):
    def jvp(primals, tangents):
        out = prim.bind(*primals)
        return out, Zero(out.aval)
    return jvp


for _f in (floor_div, and_, or_, xor, shift_left, shift_right, eq, ne, lt, le, gt, ge):
    _f.prim.def_jvp(_no_tangent(_f.prim))


def _nextafter_jvp(primals, tangents):
    # nextafter(x, y) is x moved by one ulp toward y: the derivative of x + ulp, i.e. 1 in x
    # and 0 in y (JAX and PyTorch define none; this is what finite differences see).
    (x, y), (tx, _) = primals, tangents
    out = nextafter(x, y)
    return out, Zero(out.aval) if isinstance(tx, Zero) else tx


nextafter.prim.def_jvp(_nextafter_jvp)


# --- complex parts ---------------------------------------------------------------------------
# real, imag and conj are linear over the reals but not over the complex numbers, so each
# needs its own transpose. Under the non-conjugating convention a cotangent ``c`` pairs with a
# tangent ``t`` as Re(c * t); each transpose below is the adjoint for that pairing.

real = _unary("real", np.real, None, kind="complex", out_dtype=dtypes.real_dtype)
imag = _unary("imag", np.imag, None, kind="complex", out_dtype=dtypes.real_dtype)
conj = _unary("conj", np.conj, None, kind="complex")


def _complex_impl(x, y):
    # Not x + 1j * y: 1j * inf is nan + inf j, which would spoil an infinite real part.
    out = np.empty(x.shape, dtypes.complex_dtype(x.dtype))
    out.real, out.imag = x, y
    return out


complex = _binary("complex", _complex_impl, kind="float",  # noqa: A001
                  out_dtype=dtypes.complex_dtype)


def _linear_unary_jvp(fn):
    def jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        y = fn(x)
        return y, Zero(y.aval) if isinstance(t, Zero) else fn(t)
    return jvp


def _real_transpose(ct, x):
    if isinstance(ct, Zero):
        return [Zero(x.aval)]
    return [complex(ct, zeros_like(ct))]


def _imag_transpose(ct, x):
    if isinstance(ct, Zero):
        return [Zero(x.aval)]
    return [complex(zeros_like(ct), neg(ct))]  # Re(c * imag(t)) = Re(-i c * t)


def _conj_transpose(ct, x):
    return [Zero(x.aval) if isinstance(ct, Zero) else conj(ct)]


def _complex_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    out = complex(x, y)
    if isinstance(tx, Zero) and isinstance(ty, Zero):
        return out, Zero(out.aval)
    return out, complex(instantiate(tx), instantiate(ty))


def _complex_transpose(ct, x, y):
    if isinstance(ct, Zero):
        return [Zero(x.aval) if isinstance(x, UndefinedPrimal) else None,
                Zero(y.aval) if isinstance(y, UndefinedPrimal) else None]
    return [real(ct) if isinstance(x, UndefinedPrimal) else None,
            neg(imag(ct)) if isinstance(y, UndefinedPrimal) else None]


for _f, _transpose in ((real, _real_transpose), (imag, _imag_transpose),
                       (conj, _conj_transpose)):
    _f.prim.def_jvp(_linear_unary_jvp(_f))
    _f.prim.def_transpose(_transpose)
complex.prim.def_jvp(_complex_jvp)
complex.prim.def_transpose(_complex_transpose)


# --- select and convert ----------------------------------------------------------------------

select_p = Primitive("select", kind="elementwise")


@select_p.def_abstract_eval
def _select_rule(pred: ArrayType, a: ArrayType, b: ArrayType) -> ArrayType:
    same_shapes("select", (pred, a, b))
    same_dtypes("select", (a, b))
    if pred.dtype != dtypes.bool_:
        raise op_error(DTypeError, "select", f"the predicate must be bool, got {pred.dtype}")
    return ArrayType(a.shape, a.dtype, weak=a.weak and b.weak)


select_p.def_impl(np.where)
select_p.def_batch(_batch_elementwise(select_p))


def select(pred: Any, on_true: Any, on_false: Any) -> Any:
    """``on_true`` where ``pred`` else ``on_false``; all three of one shape."""
    return select_p.bind(pred, on_true, on_false)


@select_p.def_jvp
def _select_jvp(primals, tangents):
    pred, a, b = primals
    _, ta, tb = tangents
    out = select(pred, a, b)
    if isinstance(ta, Zero) and isinstance(tb, Zero):
        return out, Zero(out.aval)
    return out, select(pred, instantiate(ta), instantiate(tb))


@select_p.def_transpose
def _select_transpose(ct, pred, a, b):
    if isinstance(pred, UndefinedPrimal):
        raise op_error(DTypeError, "select", "transpose with respect to the predicate")
    if isinstance(ct, Zero):
        return [None, Zero(a.aval) if isinstance(a, UndefinedPrimal) else None,
                Zero(b.aval) if isinstance(b, UndefinedPrimal) else None]
    zeros = zeros_like(ct)
    return [None,
            select(pred, ct, zeros) if isinstance(a, UndefinedPrimal) else None,
            select(pred, zeros, ct) if isinstance(b, UndefinedPrimal) else None]


convert_p = Primitive("convert", kind="elementwise")


@convert_p.def_abstract_eval
def _convert_rule(x: ArrayType, *, dtype: np.dtype, weak: bool = False) -> ArrayType:
    # The array API forbids complex -> real casts (NumPy silently drops the imaginary part):
    # the user says which part they mean. Complex -> bool (x != 0) is allowed.
    if dtypes.is_complex(x.dtype) and not dtypes.is_complex(dtype) and dtype != dtypes.bool_:
        raise op_error(DTypeError, "convert", f"cannot cast {x.dtype} to {dtype}: take "
                       "real(x), imag(x) or abs(x) first")
    return ArrayType(x.shape, dtype, weak=weak)


def _convert_impl(x, *, dtype, weak=False):
    if dtypes.is_int(dtype) and dtypes.is_float(x.dtype):
        with np.errstate(invalid="ignore"):
            return x.astype(dtype)
    return x.astype(dtype)


convert_p.def_impl(_convert_impl)
convert_p.def_batch(lambda args, dims, **p: (convert_p.bind(args[0], **p), dims[0]))


def convert(x: Any, dtype: Any, weak: bool = False) -> Any:
    """Cast to ``dtype`` (a no-op when it already has it)."""
    from ember.core.trace import aval_of

    dtype = dtypes.canonicalize(dtype)
    aval = aval_of(x)
    if aval.dtype == dtype and aval.weak == weak:
        return x
    return convert_p.bind(x, dtype=dtype, weak=weak)


@convert_p.def_jvp
def _convert_jvp(primals, tangents, *, dtype, weak=False):
    (x,), (t,) = primals, tangents
    out = convert_p.bind(x, dtype=dtype, weak=weak)
    if isinstance(t, Zero) or not dtypes.is_inexact(dtype) or \
            not dtypes.is_inexact(x.aval.dtype):
        return out, Zero(out.aval)
    return out, convert_p.bind(t, dtype=dtype, weak=weak)


@convert_p.def_transpose
def _convert_transpose(ct, x, *, dtype, weak=False):
    if isinstance(ct, Zero):
        return [Zero(x.aval)]
    if dtypes.is_complex(dtype) and not dtypes.is_complex(x.aval.dtype):
        ct = real(ct)  # real -> complex embeds x as x + 0j; its adjoint keeps the real part
    return [convert_p.bind(ct, dtype=x.aval.dtype, weak=x.aval.weak)]


bitcast_convert_p = Primitive("bitcast_convert", kind="elementwise")


@bitcast_convert_p.def_abstract_eval
def _bitcast_rule(x: ArrayType, *, dtype: np.dtype) -> ArrayType:
    if x.dtype.itemsize != dtype.itemsize or dtypes.bool_ in (x.dtype, dtype):
        raise op_error(DTypeError, "bitcast_convert", f"needs two non-bool dtypes of one "
                       f"width, got {x.dtype} -> {dtype}")
    return ArrayType(x.shape, dtype)


bitcast_convert_p.def_impl(lambda x, *, dtype: x.view(dtype))
bitcast_convert_p.def_jvp(lambda primals, tangents, *, dtype: (
    (out := bitcast_convert_p.bind(*primals, dtype=dtype)), Zero(out.aval)))
bitcast_convert_p.def_batch(lambda args, dims, *, dtype: (
    bitcast_convert_p.bind(args[0], dtype=dtype), dims[0]))


def bitcast_convert(x: Any, dtype: Any) -> Any:
    """Reinterpret the bits of each element as ``dtype`` of the same width (a float's sign bit,
    exponent and mantissa as an unsigned integer...), as ``jax.lax.bitcast_convert_type``."""
    return bitcast_convert_p.bind(x, dtype=dtypes.canonicalize(dtype))


stop_gradient_p = Primitive("stop_gradient", kind="elementwise")
stop_gradient_p.def_abstract_eval(lambda x: x)
stop_gradient_p.def_impl(lambda x: x)
stop_gradient_p.def_jvp(lambda primals, tangents: (stop_gradient_p.bind(*primals),
                                                   Zero(primals[0].aval)))
stop_gradient_p.def_batch(lambda args, dims: (stop_gradient_p.bind(*args), dims[0]))


def stop_gradient(x: Any) -> Any:
    """The identity, with a derivative of zero."""
    return stop_gradient_p.bind(x)
