"""One test specification per primitive: how to call it, its NumPy reference, valid inputs.

``test_primitives`` runs every spec eagerly and under ``jit`` against the reference;
``test_grad_primitives`` reuses the same specs for jvp/vjp against finite differences and for
vmap against a Python loop. ``SPECS`` is checked against the primitive registry, so a new
primitive without a spec fails the coverage test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from helpers import ALL, COMPLEX, FLOATS, INEXACT, INTS, NUMBERS, rand, upcast

from ember import dtypes
from ember import ops as lax
from ember.ops.elementwise import stop_gradient_p

Gen = Callable[[np.random.Generator, np.dtype, tuple], np.ndarray]
ELEMENTWISE_SHAPES = ((3, 4), (), (0, 3))
ANY = ALL + COMPLEX

# Primitives owned by other modules (control flow, remat, custom rules, fusion's groups) have
# their own tests.
NOT_COVERED_HERE = ("cond", "while", "scan", "remat", "custom_", "checkpoint", "pjit", "call",
                    "shard", "collective", "all_", "reduce_scatter", "axis_index", "psum",
                    "ppermute", "fused")


@dataclass
class Spec:
    name: str                       # primitive name in the registry
    fn: Callable[..., Any]          # calls the primitive on Ember arrays
    ref: Callable[..., Any]         # the same on NumPy arrays
    args: Sequence[Gen]             # one generator per argument
    dtypes: Sequence[np.dtype]
    shapes: Sequence[tuple] = ((3, 4),)
    diff: tuple[int, ...] = ()      # argument positions to differentiate (float64, complex128)
    id: str = ""
    vmap: bool = True
    ref_dtype: Callable[[np.dtype], np.dtype] | None = None  # result dtype if not input's
    extra: dict = field(default_factory=dict)

    @property
    def case_id(self) -> str:
        return self.id or self.name


# --- input generators ------------------------------------------------------------------------

def uniform(lo: float = -3.0, hi: float = 3.0) -> Gen:
    """Values in [lo, hi]; for complex dtypes, both components are (a square of the plane,
    so ranges chosen to avoid a real function's singularities also avoid its branch cuts)."""
    def gen(rng, dt, shape):
        dt = np.dtype(dt)
        if dtypes.is_int(dt):
            info = np.iinfo(dt)
            a, b = max(math.floor(lo), info.min), min(math.ceil(hi), info.max)
            return rng.integers(a, b, size=shape, endpoint=True).astype(dt)
        return rand(rng, shape, dt, lo, hi)
    return gen


def away_from_zero(lo: float = 0.3, hi: float = 3.0) -> Gen:
    """Magnitudes in [lo, hi] with random sign (positive only for unsigned/bool; a random
    direction for complex)."""
    def gen(rng, dt, shape):
        dt = np.dtype(dt)
        if dt == dtypes.bool_:
            return np.ones(shape, bool)
        if dtypes.is_complex(dt):
            return (rng.uniform(lo, hi, size=shape)
                    * np.exp(1j * rng.uniform(-np.pi, np.pi, size=shape))).astype(dt)
        mag = uniform(max(lo, 1), hi)(rng, dt, shape) if dtypes.is_int(dt) else \
            uniform(lo, hi)(rng, dt, shape)
        if dt.kind == "u":
            return mag
        sign = np.where(rng.random(shape) < 0.5, -1, 1).astype(dt)
        return (mag * sign).astype(dt)
    return gen


def halves(rng, dt, shape):
    """Multiples of 0.5 (exercises round-half-to-even) plus noise-free integers."""
    parts = rng.integers(-8, 8, size=(2, *shape)) / 2
    return (parts[0] + 1j * parts[1] if dtypes.is_complex(dt) else parts[0]).astype(dt)


def with_specials(rng, dt, shape):
    """Random values with inf, -inf and nan first (complex: in either component)."""
    x = rand(rng, shape, dt)
    flat = x.reshape(-1)
    specials = [np.inf, -np.inf, np.nan]
    if dtypes.is_complex(dt):
        specials += [complex(1, np.inf), complex(np.nan, 1), complex(np.inf, np.nan)]
    n = min(len(specials), flat.size)
    flat[:n] = np.array(specials[:n]).astype(dt)
    return x


def fixed(value: Any, dtype: Any = None) -> Gen:
    return lambda rng, dt, shape: np.asarray(value, dtype=dtype)


def of_shape(shape: tuple, gen: Gen = uniform()) -> Gen:
    return lambda rng, dt, _shape: gen(rng, dt, shape)


def shifts(rng, dt, shape):
    return rng.integers(0, np.dtype(dt).itemsize * 8, size=shape).astype(dt)


# --- reference helpers -----------------------------------------------------------------------

def ew_ref(np_fn: Callable[..., Any], out: np.dtype | Callable[[np.dtype], np.dtype] | None = None
           ) -> Callable[..., Any]:
    """Reference for an elementwise op: half precision computed in float32, then rounded to
    ``out`` (a dtype, or a map from the input dtype; default: the input dtype)."""
    def ref(*xs):
        with np.errstate(all="ignore"):
            res = np_fn(*[upcast(x) for x in xs])
        dt = xs[-1].dtype
        return np.asarray(res).astype(out(dt) if callable(out) else out or dt)
    return ref


def _wide(x: np.ndarray) -> np.ndarray:
    """A reference computes floats in float64 and complex numbers in complex128."""
    if dtypes.is_complex(x.dtype):
        return x.astype(np.complex128)
    return upcast(x).astype(np.float64) if dtypes.is_float(x.dtype) else x


def _complex_ref(x, y):
    out = np.empty(x.shape, dtypes.complex_dtype(x.dtype))
    out.real, out.imag = upcast(x), upcast(y)
    return out


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


def _logistic(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def _int_floor_div(x, y):
    return np.floor_divide(x, y)


def _reduce_ref(np_fn, axes):
    def ref(x):
        res = np_fn(_wide(x), axis=axes)
        return np.asarray(res).astype(x.dtype)
    return ref


def _cum_ref(np_fn, axis, reverse):
    def ref(x):
        y = np.flip(x, axis) if reverse else x
        y = np_fn(_wide(y), axis=axis)
        y = np.asarray(y).astype(x.dtype)
        return np.flip(y, axis) if reverse else y
    return ref


def _dot_ref(dims):
    (lc, rc), (lb, rb) = dims

    def ref(x, y):
        xs, ys = _wide(x), _wide(y)
        letters = "abcdefghij"
        lhs = list(letters[: x.ndim])
        rhs = list(letters[x.ndim: x.ndim + y.ndim])
        for a, b in zip(lc + lb, rc + rb):
            rhs[b] = lhs[a]
        lfree = [lhs[i] for i in range(x.ndim) if i not in lc + lb]
        rfree = [rhs[i] for i in range(y.ndim) if i not in rc + rb]
        out = "".join([lhs[i] for i in lb] + lfree + rfree)
        res = np.einsum(f"{''.join(lhs)},{''.join(rhs)}->{out}", xs, ys)
        return np.asarray(res).astype(x.dtype)
    return ref


def _clamp_starts(shape, sizes, starts):
    return [int(np.clip(int(s), 0, n - k)) for s, n, k in zip(starts, shape, sizes)]


def _dynamic_slice_ref(sizes):
    def ref(x, *starts):
        b = _clamp_starts(x.shape, sizes, starts)
        return x[tuple(slice(s, s + k) for s, k in zip(b, sizes))]
    return ref


def _dus_ref(x, u, *starts):
    b = _clamp_starts(x.shape, u.shape, starts)
    out = x.copy()
    out[tuple(slice(s, s + k) for s, k in zip(b, u.shape))] = u
    return out


def _gather_ref(x, idx):
    k = idx.shape[-1]
    return x[tuple(np.clip(idx[..., i], 0, x.shape[i] - 1) for i in range(k))]


def _scatter_ref(mode):
    def ref(x, idx, upd):
        out = x.copy()
        k = idx.shape[-1]
        flat_idx = idx.reshape(-1, k)
        flat_upd = upd.reshape(flat_idx.shape[0], *x.shape[k:])
        for i, u in zip(flat_idx, flat_upd):
            if any(v < 0 or v >= n for v, n in zip(i, x.shape)):
                continue
            pos = tuple(i)
            if mode == "set":
                out[pos] = u
            elif mode == "add":
                out[pos] = out[pos] + u
            elif mode == "mul":
                out[pos] = out[pos] * u
            elif mode == "min":
                out[pos] = np.minimum(out[pos], u)
            else:
                out[pos] = np.maximum(out[pos], u)
        return out
    return ref


def _index_gen(shape_b: tuple, operand_shape: tuple, out_of_range: bool = True,
               unique: bool = False) -> Gen:
    """Index vectors (shape ``(*shape_b, k)``) into ``operand_shape[:k]``."""
    def gen(rng, dt, _shape):
        k = len(operand_shape)
        n = int(np.prod(shape_b))
        if unique:
            flat = rng.choice(int(np.prod(operand_shape)), size=n, replace=False)
            idx = np.stack(np.unravel_index(flat, operand_shape), -1)
        else:
            idx = np.stack([rng.integers(0, s, size=n) for s in operand_shape], -1)
        if out_of_range and n:
            idx[0, 0] = operand_shape[0] + 2
            idx[-1, -1] = -1
        return idx.reshape(*shape_b, k).astype(np.int64)
    return gen


def _sort_ref(axis, descending):
    def ref(x):
        order = np.argsort(-upcast(x).astype(np.float64) if descending else x, axis=axis,
                           kind="stable")
        return np.take_along_axis(x, order, axis)
    return ref


def _argsort_ref(axis, descending):
    def ref(x):
        key = -upcast(x).astype(np.float64) if descending else x
        return np.argsort(key, axis=axis, kind="stable").astype(np.int64)
    return ref


def _top_k_ref(k):
    def ref(x):
        order = np.argsort(-upcast(x).astype(np.float64), axis=-1, kind="stable")[..., :k]
        return [np.take_along_axis(x, order, -1), order.astype(np.int64)]
    return ref


def _pad_ref(lo, hi, interior):
    def ref(x, v):
        shape = [n + max(n - 1, 0) * i for n, i in zip(x.shape, interior)]
        spread = np.full(shape, v, dtype=x.dtype)
        spread[tuple(slice(None, None, i + 1) for i in interior)] = x
        out = spread
        for ax, (a, b) in enumerate(zip(lo, hi)):
            widths = [(0, 0)] * x.ndim
            widths[ax] = (max(a, 0), max(b, 0))
            out = np.pad(out, widths, constant_values=v)
            sl = [slice(None)] * x.ndim
            sl[ax] = slice(-min(a, 0), out.shape[ax] + min(b, 0))
            out = out[tuple(sl)]
        return out
    return ref


# --- the specs -------------------------------------------------------------------------------

# Defined on complex numbers by the array API; the rest of the unary table is real only.
_HOLOMORPHIC = ("exp", "exp2", "log", "log1p", "expm1", "sin", "cos", "tan", "asin", "acos",
                "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "sqrt")


def _unary_specs() -> list[Spec]:
    u = uniform()
    table = [
        ("exp", np.exp, u), ("exp2", np.exp2, u), ("log", np.log, uniform(0.1, 3)),
        ("log1p", np.log1p, uniform(-0.5, 3)), ("expm1", np.expm1, u), ("sin", np.sin, u),
        ("cos", np.cos, u), ("tan", np.tan, uniform(-1.2, 1.2)),
        ("asin", np.arcsin, uniform(-0.9, 0.9)), ("acos", np.arccos, uniform(-0.9, 0.9)),
        ("atan", np.arctan, u), ("sinh", np.sinh, u), ("cosh", np.cosh, u),
        ("tanh", np.tanh, u), ("asinh", np.arcsinh, u), ("acosh", np.arccosh, uniform(1.1, 3)),
        ("atanh", np.arctanh, uniform(-0.9, 0.9)), ("sqrt", np.sqrt, uniform(0.1, 3)),
        ("cbrt", np.cbrt, away_from_zero(0.2, 3)), ("erf", _erf, u),
        ("logistic", _logistic, uniform(-20, 20)),
    ]
    specs = [Spec(name, getattr(lax, name), ew_ref(ref), [gen],
                  INEXACT if name in _HOLOMORPHIC else FLOATS, ELEMENTWISE_SHAPES, diff=(0,))
             for name, ref, gen in table]
    specs += [
        Spec("neg", lax.neg, ew_ref(np.negative), [u], NUMBERS + COMPLEX, ELEMENTWISE_SHAPES,
             diff=(0,)),
        Spec("abs", lax.abs, ew_ref(np.abs, dtypes.real_dtype), [away_from_zero()],
             NUMBERS + COMPLEX, ELEMENTWISE_SHAPES, diff=(0,)),
        Spec("sign", lax.sign, ew_ref(np.sign), [u], NUMBERS, ELEMENTWISE_SHAPES, diff=(0,)),
        # Complex sign is z / |z|, smooth away from 0 (unlike real sign, piecewise constant).
        Spec("sign", lax.sign, ew_ref(np.sign), [away_from_zero()], COMPLEX, ELEMENTWISE_SHAPES,
             diff=(0,), id="sign_complex"),
        Spec("floor", lax.floor, ew_ref(np.floor), [u], FLOATS, ELEMENTWISE_SHAPES, diff=(0,)),
        Spec("ceil", lax.ceil, ew_ref(np.ceil), [u], FLOATS, ELEMENTWISE_SHAPES, diff=(0,)),
        Spec("round", lax.round, ew_ref(np.round), [halves], INEXACT, ELEMENTWISE_SHAPES),
        Spec("round", lax.round, ew_ref(np.round), [u], INEXACT, ELEMENTWISE_SHAPES, diff=(0,),
             id="round_random"),
        Spec("is_finite", lax.is_finite, ew_ref(np.isfinite, dtypes.bool_), [with_specials],
             INEXACT, ELEMENTWISE_SHAPES),
        Spec("not", lax.not_, ew_ref(np.invert), [u], INTS + (dtypes.bool_,),
             ELEMENTWISE_SHAPES),
        Spec("real", lax.real, ew_ref(np.real, dtypes.real_dtype), [u], COMPLEX,
             ELEMENTWISE_SHAPES, diff=(0,)),
        Spec("imag", lax.imag, ew_ref(np.imag, dtypes.real_dtype), [u], COMPLEX,
             ELEMENTWISE_SHAPES, diff=(0,)),
        Spec("conj", lax.conj, ew_ref(np.conj), [u], COMPLEX, ELEMENTWISE_SHAPES, diff=(0,)),
    ]
    return specs


def _binary_specs() -> list[Spec]:
    u = uniform()
    nz = away_from_zero()
    b = dtypes.bool_
    specs = [
        Spec("add", lax.add, ew_ref(np.add), [u, u], NUMBERS + COMPLEX, ELEMENTWISE_SHAPES,
             diff=(0, 1)),
        Spec("sub", lax.sub, ew_ref(np.subtract), [u, u], NUMBERS + COMPLEX, ELEMENTWISE_SHAPES,
             diff=(0, 1)),
        Spec("mul", lax.mul, ew_ref(np.multiply), [u, u], NUMBERS + COMPLEX, ELEMENTWISE_SHAPES,
             diff=(0, 1)),
        Spec("div", lax.div, ew_ref(np.true_divide), [u, nz], INEXACT, ELEMENTWISE_SHAPES,
             diff=(0, 1)),
        Spec("floor_div", lax.floor_div, ew_ref(_int_floor_div), [uniform(-20, 20), nz],
             NUMBERS, ELEMENTWISE_SHAPES),
        Spec("rem", lax.rem, ew_ref(np.remainder), [uniform(-20, 20), nz], NUMBERS,
             ELEMENTWISE_SHAPES),
        Spec("rem", lax.rem, ew_ref(np.remainder), [uniform(-5, 5), away_from_zero(0.7, 1.3)],
             (dtypes.float64,), diff=(0, 1), id="rem_grad"),
        Spec("pow", lax.pow, ew_ref(np.power), [uniform(0.5, 2), uniform(-2, 2)], INEXACT,
             ELEMENTWISE_SHAPES, diff=(0, 1)),
        Spec("pow", lax.pow, ew_ref(np.power), [uniform(0, 3), uniform(0, 3)], INTS,
             id="pow_int"),
        Spec("max", lax.max, ew_ref(np.maximum), [u, u], ALL, ELEMENTWISE_SHAPES, diff=(0, 1)),
        Spec("min", lax.min, ew_ref(np.minimum), [u, u], ALL, ELEMENTWISE_SHAPES, diff=(0, 1)),
        Spec("atan2", lax.atan2, ew_ref(np.arctan2), [nz, nz], FLOATS, ELEMENTWISE_SHAPES,
             diff=(0, 1)),
        # Exact in every float dtype (NumPy and ml_dtypes step half precision natively).
        Spec("nextafter", lax.nextafter, np.nextafter, [u, u], FLOATS, ELEMENTWISE_SHAPES,
             diff=(0, 1)),
        Spec("complex", lax.complex, _complex_ref, [u, u], FLOATS, ELEMENTWISE_SHAPES,
             diff=(0, 1)),
        Spec("shift_left", lax.shift_left, ew_ref(np.left_shift), [u, shifts], INTS),
        Spec("shift_right", lax.shift_right, ew_ref(np.right_shift), [uniform(-100, 100), shifts],
             INTS),
    ]
    for name, fn, ref in (("and", lax.and_, np.bitwise_and), ("or", lax.or_, np.bitwise_or),
                          ("xor", lax.xor, np.bitwise_xor)):
        specs.append(Spec(name, fn, ew_ref(ref),
                          [uniform(-100, 100), uniform(-100, 100)], INTS + (b,),
                          ELEMENTWISE_SHAPES))
    for name, ref in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                      ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)):
        specs.append(Spec(name, getattr(lax, name), ew_ref(ref, b), [uniform(-2, 2),
                                                                     uniform(-2, 2)],
                          ANY if name in ("eq", "ne") else ALL, ELEMENTWISE_SHAPES))
    return specs


def _pred(rng, dt, shape):
    return rng.random(shape) < 0.5


def _convert_specs() -> list[Spec]:
    specs = []
    for src in ANY:
        for dst in ANY:
            if dtypes.is_complex(src) and not dtypes.is_complex(dst) and dst != dtypes.bool_:
                continue  # refused: see test_complex
            gen = uniform(0, 100) if src != dtypes.bool_ else uniform()
            specs.append(Spec(
                "convert", lambda x, dst=dst: lax.convert(x, dst),
                lambda x, dst=dst: x.astype(dst), [gen], (src,), ELEMENTWISE_SHAPES,
                diff=(0,) if src == dst == dtypes.float64 else (),
                id=f"convert-{src}-{dst}"))
    for src, dst in ((dtypes.float64, dtypes.float32), (dtypes.float64, dtypes.complex128),
                     (dtypes.complex64, dtypes.complex128)):
        specs.append(Spec("convert", lambda x, dst=dst: lax.convert(x, dst),
                          lambda x, dst=dst: x.astype(dst), [uniform()], (src,), diff=(0,),
                          id=f"convert-grad-{dtypes.short_name(src)}-{dtypes.short_name(dst)}"))
    for src in ANY:
        for dst in ANY:
            if src.itemsize == dst.itemsize and dtypes.bool_ not in (src, dst) and src != dst:
                specs.append(Spec(
                    "bitcast_convert", lambda x, dst=dst: lax.bitcast_convert(x, dst),
                    lambda x, dst=dst: x.view(dst),
                    [with_specials if dtypes.is_inexact(src) else uniform()], (src,),
                    ELEMENTWISE_SHAPES,
                    id=f"bitcast_convert-{src}-{dst}"))
    return specs


def _structural_specs() -> list[Spec]:
    u = uniform()
    specs = [
        Spec("select", lax.select, lambda p, a, b: np.where(p, a, b), [_pred, u, u],
             ANY, ELEMENTWISE_SHAPES, diff=(1, 2)),
        Spec("copy", lax.copy, np.copy, [u], ANY, ELEMENTWISE_SHAPES, diff=(0,)),
        Spec("broadcast_in_dim", lambda x: lax.broadcast_in_dim(x, (2, 3, 4), (1, 2)),
             lambda x: np.broadcast_to(x, (2, 3, 4)), [of_shape((3, 1))], ANY, diff=(0,)),
        Spec("broadcast_in_dim", lambda x: lax.broadcast_in_dim(x, (3, 2), (0,)),
             lambda x: np.broadcast_to(x[:, None], (3, 2)), [of_shape((3,))], FLOATS,
             diff=(0,), id="broadcast_in_dim-leading"),
        Spec("broadcast_in_dim", lambda x: lax.broadcast_in_dim(x, (2, 0), ()),
             lambda x: np.broadcast_to(x, (2, 0)), [of_shape(())], FLOATS,
             id="broadcast_in_dim-empty"),
        Spec("reshape", lambda x: lax.reshape(x, (2, 6)), lambda x: x.reshape(2, 6), [u], ANY,
             diff=(0,)),
        Spec("reshape", lambda x: lax.reshape(x, (1, 1)), lambda x: x.reshape(1, 1),
             [of_shape(())], FLOATS, diff=(0,), id="reshape-0d"),
        Spec("reshape", lambda x: lax.reshape(x, (3, 0)), lambda x: x.reshape(3, 0),
             [of_shape((0, 3))], FLOATS, id="reshape-empty"),
        Spec("transpose", lambda x: lax.transpose(x, (2, 0, 1)),
             lambda x: np.transpose(x, (2, 0, 1)), [of_shape((2, 3, 4))], ANY, diff=(0,)),
        Spec("slice", lambda x: lax.slice(x, (1, 0), (5, 5), (2, 3)),
             lambda x: x[1:5:2, 0:5:3], [of_shape((5, 6))], ANY, diff=(0,)),
        Spec("slice", lambda x: lax.slice(x, (1, 2), (1, 4)), lambda x: x[1:1, 2:4],
             [of_shape((5, 6))], FLOATS, diff=(0,), id="slice-empty"),
        Spec("pad", lambda x, v: lax.pad(x, v, (1, -1), (-1, 2), (1, 0)),
             _pad_ref((1, -1), (-1, 2), (1, 0)), [of_shape((3, 4)), of_shape(())], ANY,
             diff=(0, 1)),
        Spec("pad", lambda x, v: lax.pad(x, v, (2,), (0,), (2,)), _pad_ref((2,), (0,), (2,)),
             [of_shape((0,)), of_shape(())], FLOATS, diff=(0, 1), id="pad-empty"),
        Spec("concatenate", lambda a, b, c: lax.concatenate([a, b, c], 0),
             lambda a, b, c: np.concatenate([a, b, c], 0),
             [of_shape((2, 3)), of_shape((1, 3)), of_shape((0, 3))], ANY, diff=(0, 1, 2)),
        Spec("concatenate", lambda a, b: lax.concatenate([a, b], 1),
             lambda a, b: np.concatenate([a, b], 1), [of_shape((2, 3)), of_shape((2, 1))],
             FLOATS, diff=(0, 1), id="concatenate-axis1"),
        Spec("rev", lambda x: lax.rev(x, (0, 1)), lambda x: x[::-1, ::-1], [u], ANY, diff=(0,)),
        Spec("rev", lambda x: lax.rev(x, (1,)), lambda x: x[:, ::-1], [of_shape((2, 3, 4))],
             FLOATS, diff=(0,), id="rev-middle"),
        Spec("dynamic_slice", lambda x, i, j: lax.dynamic_slice(x, [i, j], (2, 3)),
             _dynamic_slice_ref((2, 3)),
             [of_shape((5, 6)), fixed(1, np.int64), fixed(4, np.int32)], ANY, diff=(0,)),
        Spec("dynamic_slice", lambda x, i, j: lax.dynamic_slice(x, [i, j], (2, 3)),
             _dynamic_slice_ref((2, 3)),
             [of_shape((5, 6)), fixed(-3, np.int64), fixed(9, np.int64)], FLOATS, diff=(0,),
             id="dynamic_slice-clamped"),
        Spec("dynamic_update_slice", lambda x, v, i, j: lax.dynamic_update_slice(x, v, [i, j]),
             _dus_ref, [of_shape((5, 6)), of_shape((2, 3)), fixed(4, np.int64),
                        fixed(-2, np.int64)], ANY, diff=(0, 1)),
        Spec("dynamic_update_slice", lambda x, v, i, j: lax.dynamic_update_slice(x, v, [i, j]),
             _dus_ref, [of_shape((5, 6)), of_shape((2, 3)), fixed(1, np.int64),
                        fixed(2, np.int64)], FLOATS, diff=(0, 1), id="dynamic_update_slice-in"),
        Spec("iota", lambda: lax.iota(dtypes.int32, (3, 4), 1),
             lambda: np.broadcast_to(np.arange(4, dtype=np.int32), (3, 4)), [], (dtypes.int32,),
             vmap=False),
        Spec("stop_gradient", lambda x: stop_gradient_p.bind(x), lambda x: x, [u], ANY,
             ELEMENTWISE_SHAPES),
    ]
    for dt in NUMBERS:
        specs.append(Spec("iota", lambda dt=dt: lax.iota(dt, (2, 5), 1),
                          lambda dt=dt: np.broadcast_to(np.arange(5).astype(dt), (2, 5)), [],
                          (dt,), vmap=False, id=f"iota-{dt}"))
    return specs


def _reduce_specs() -> list[Spec]:
    u = uniform()
    specs = []
    for axes in ((0, 2), (1,), (0, 1, 2)):
        specs += [
            Spec("reduce_sum", lambda x, axes=axes: lax.reduce_sum(x, axes),
                 _reduce_ref(np.sum, axes), [of_shape((3, 4, 5))], NUMBERS + COMPLEX, diff=(0,),
                 id=f"reduce_sum-{axes}"),
            Spec("reduce_max", lambda x, axes=axes: lax.reduce_max(x, axes),
                 _reduce_ref(np.max, axes), [of_shape((3, 4, 5))], ALL, diff=(0,),
                 id=f"reduce_max-{axes}"),
            Spec("reduce_min", lambda x, axes=axes: lax.reduce_min(x, axes),
                 _reduce_ref(np.min, axes), [of_shape((3, 4, 5))], ALL, diff=(0,),
                 id=f"reduce_min-{axes}"),
            Spec("reduce_prod", lambda x, axes=axes: lax.reduce_prod(x, axes),
                 _reduce_ref(np.prod, axes), [of_shape((3, 4, 5), uniform(0.5, 1.5))],
                 NUMBERS + COMPLEX, diff=(0,), id=f"reduce_prod-{axes}"),
        ]
    specs += [
        Spec("reduce_sum", lambda x: lax.reduce_sum(x, (1,)), _reduce_ref(np.sum, (1,)),
             [of_shape((0, 3))], FLOATS + INTS, diff=(0,), id="reduce_sum-empty"),
        Spec("reduce_prod", lambda x: lax.reduce_prod(x, (0,)), _reduce_ref(np.prod, (0,)),
             [of_shape((0, 3))], FLOATS, diff=(0,), id="reduce_prod-empty"),
        Spec("reduce_prod", lambda x: lax.reduce_prod(x, (1,)), _reduce_ref(np.prod, (1,)),
             [fixed([[0.0, 2.0, 3.0], [0.0, 0.0, 1.5], [1.0, 2.0, 3.0]])], (dtypes.float64,),
             diff=(0,), id="reduce_prod-zeros"),
        Spec("reduce_max", lambda x: lax.reduce_max(x, (1,)), _reduce_ref(np.max, (1,)),
             [fixed([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])], (dtypes.float64,), diff=(0,),
             id="reduce_max-ties"),
    ]
    for name, np_fn in (("argmax", np.argmax), ("argmin", np.argmin)):
        for axis in (0, 1):
            specs.append(Spec(
                name, lambda x, name=name, axis=axis: getattr(lax, name)(x, axis),
                lambda x, np_fn=np_fn, axis=axis: np_fn(x, axis=axis).astype(np.int64),
                [uniform(-2, 2)], ALL, id=f"{name}-{axis}"))
        specs.append(Spec(
            name, lambda x, name=name: getattr(lax, name)(x, 0, dtypes.int32),
            lambda x, np_fn=np_fn: np_fn(x, axis=0).astype(np.int32), [u], FLOATS,
            id=f"{name}-int32"))
    for name, np_fn, dts, gen in (("cumsum", np.cumsum, NUMBERS + COMPLEX, u),
                                  ("cumprod", np.cumprod, NUMBERS + COMPLEX, uniform(0.5, 1.5)),
                                  ("cummax", np.maximum.accumulate, ALL, u),
                                  ("cummin", np.minimum.accumulate, ALL, u)):
        for axis in (0, 1):
            for reverse in (False, True):
                specs.append(Spec(
                    name, lambda x, name=name, axis=axis, reverse=reverse:
                    getattr(lax, name)(x, axis, reverse),
                    _cum_ref(np_fn, axis, reverse), [of_shape((3, 4), gen)], dts, diff=(0,),
                    id=f"{name}-{axis}-{'rev' if reverse else 'fwd'}"))
        specs.append(Spec(name, lambda x, name=name: getattr(lax, name)(x, 0),
                          _cum_ref(np_fn, 0, False), [of_shape((0, 2))], FLOATS,
                          id=f"{name}-empty"))
    return specs


def _linalg_specs() -> list[Spec]:
    cases = [
        ("matmul", ((1,), (0,)), ((), ()), (3, 4), (4, 5)),
        ("batched", ((2,), (1,)), ((0,), (0,)), (2, 3, 4), (2, 4, 5)),
        ("swapped", ((0,), (1,)), ((), ()), (4, 3), (5, 4)),
        ("two-contract", ((1, 2), (2, 0)), ((), ()), (3, 4, 2), (2, 5, 4)),
        ("batch-middle", ((0,), (2,)), ((1,), (0,)), (4, 2, 3), (2, 5, 4)),
        ("vector", ((0,), (0,)), ((), ()), (4,), (4,)),
        ("outer", ((), ()), ((), ()), (3,), (2,)),
        ("empty-k", ((1,), (0,)), ((), ()), (3, 0), (0, 2)),
    ]
    specs = []
    for label, contract, batch, sa, sb in cases:
        dims = (contract, batch)
        specs.append(Spec(
            "dot_general", lambda x, y, c=contract, b=batch: lax.dot_general(x, y, c, b),
            _dot_ref(dims), [of_shape(sa), of_shape(sb)], NUMBERS + COMPLEX, diff=(0, 1),
            id=f"dot_general-{label}"))
    return specs


def _indexing_specs() -> list[Spec]:
    specs = [
        Spec("gather", lax.gather, _gather_ref,
             [of_shape((5, 4, 3)), _index_gen((2, 3), (5, 4))], ANY, diff=(0,)),
        Spec("gather", lax.gather, _gather_ref,
             [of_shape((5, 4)), _index_gen((3,), (5,), out_of_range=False)], FLOATS, diff=(0,),
             id="gather-rows"),
        Spec("gather", lax.gather, _gather_ref,
             [of_shape((5, 4)), _index_gen((0,), (5,))], FLOATS, diff=(0,), id="gather-empty"),
    ]
    for mode in ("set", "add", "mul", "min", "max"):
        unique = mode in ("set", "mul")
        specs.append(Spec(
            "scatter", lambda x, i, u, mode=mode: lax.scatter(x, i, u, mode), _scatter_ref(mode),
            [of_shape((5, 4)), _index_gen((6,), (5, 4), out_of_range=not unique, unique=unique),
             of_shape((6,), uniform(0.5, 2) if mode == "mul" else uniform())],
            {"set": ANY, "add": NUMBERS + COMPLEX}.get(mode, NUMBERS), diff=(0, 2),
            id=f"scatter-{mode}"))
    specs.append(Spec(
        "scatter", lambda x, i, u: lax.scatter(x, i, u, "add"), _scatter_ref("add"),
        [of_shape((5, 4)), _index_gen((3,), (5,)), of_shape((3, 4))], FLOATS, diff=(0, 2),
        id="scatter-add-rows"))
    return specs


def _ties(rng, dt, shape):
    return uniform(-2, 2)(rng, dt, shape)


def _sort_specs() -> list[Spec]:
    specs = []
    for axis in (0, 1):
        for desc in (False, True):
            tag = f"{axis}-{'desc' if desc else 'asc'}"
            specs.append(Spec("sort", lambda x, a=axis, d=desc: lax.sort(x, a, d),
                              _sort_ref(axis, desc), [of_shape((3, 5), _ties)], NUMBERS,
                              diff=(0,), id=f"sort-{tag}"))
            specs.append(Spec("argsort", lambda x, a=axis, d=desc: lax.argsort(x, a, d),
                              _argsort_ref(axis, desc), [of_shape((3, 5), _ties)], NUMBERS,
                              id=f"argsort-{tag}"))
    for k in (0, 2, 6):
        specs.append(Spec("top_k", lambda x, k=k: list(lax.top_k(x, k)), _top_k_ref(k),
                          [of_shape((3, 6), _ties)], NUMBERS, diff=(0,) if k else (),
                          id=f"top_k-{k}"))
    return specs


# Known answers from the Random123 distribution (kat_vectors, threefry2x32_20).
THREEFRY_KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


def _threefry_spec() -> Spec:
    keys = np.array([k for k, _, _ in THREEFRY_KAT], np.uint32)
    ctrs = np.array([c for _, c, _ in THREEFRY_KAT], np.uint32)
    want = np.array([o for _, _, o in THREEFRY_KAT], np.uint32)

    def gen(col, table):
        return lambda rng, dt, shape: table[:, col].copy()

    return Spec("threefry2x32", lambda a, b, c, d: list(lax.threefry2x32(a, b, c, d)),
                lambda *_: [want[:, 0], want[:, 1]],
                [gen(0, keys), gen(1, keys), gen(0, ctrs), gen(1, ctrs)], (dtypes.uint32,))


def _extension_specs() -> list[Spec]:
    # Imported here, once the generators above exist: these modules build on them.
    import specs_attention
    import specs_fft
    import specs_linalg
    import specs_quantized

    return (specs_linalg.specs() + specs_fft.specs() + specs_attention.specs()
            + specs_quantized.specs())


SPECS: list[Spec] = (_unary_specs() + _binary_specs() + _convert_specs() + _structural_specs()
                     + _reduce_specs() + _linalg_specs() + _indexing_specs() + _sort_specs()
                     + [_threefry_spec()] + _extension_specs())


def make_args(spec: Spec, rng: np.random.Generator, dtype: np.dtype, shape: tuple
              ) -> list[np.ndarray]:
    return [np.asarray(g(rng, dtype, shape)) for g in spec.args]


def _representatives(dts: Sequence[np.dtype]) -> list[np.dtype]:
    """One real dtype (the last, usually float64) and complex128 where the spec has them;
    else the spec's last dtype."""
    real = [d for d in dts if not dtypes.is_complex(np.dtype(d))]
    chosen = real[-1:] + [d for d in dts if np.dtype(d) == dtypes.complex128]
    return chosen or list(dts[-1:])


def cases(filter_fn: Callable[[Spec], bool] = lambda s: True, all_dtypes: bool = True
          ) -> list[Any]:
    """pytest params ``(spec, dtype, shape)`` for every spec (and dtype/shape) selected."""
    import pytest

    out = []
    for spec in SPECS:
        if not filter_fn(spec):
            continue
        dts = spec.dtypes if all_dtypes else _representatives(spec.dtypes)
        for dt in dts:
            for shape in spec.shapes:
                out.append(pytest.param(spec, np.dtype(dt), shape,
                                        id=f"{spec.case_id}-{np.dtype(dt).name}-{shape}"))
    return out
