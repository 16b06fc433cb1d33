"""``ember.random``: reproducible random numbers from explicit keys, and a small global helper.

Why keys: a random draw is a pure function of a key, so it gives the same numbers eagerly, under
``jit`` (no hidden state baked into a compiled program), under ``vmap`` (map over split keys to
get independent draws per example) and on every backend. A key is a ``uint32[2]`` array
(``key(seed)``); ``split`` derives new independent keys, ``fold_in`` derives one from a number.
Never draw twice from the same key: split it first.

Everything is built on the ``threefry2x32`` counter-based hash (``ember.ops.random_bits``). A
key hashes a 64-bit counter; the counter's high word names a stream, so bits, splits and folds
made from one key never reuse a counter:

- stream 0: ``bits`` (and every distribution, which all start from ``bits``);
- stream 1: ``split``;
- stream 2: ``fold_in`` (the counter's low word is the folded data).

Floats take only as many random bits as the dtype's significand holds and scale them by a power
of two, so every value is exact and ``uniform`` stays in ``[minval, maxval)``; ``float64``
(NumPy's default, used when ``dtype`` is None) reads 53 bits of a 64-bit draw.

For quick scripts and PyTorch habits (``F.dropout(x, 0.1)`` with no key), ``seed(n)`` and
``rand``/``randn``/``random``/``next_key`` use a global key that each call advances
(reproducible after ``seed``). It is a :class:`ember.core.hidden_state.HiddenState`: ``jit``
passes it into the compiled program and stores the advanced key after each call, so a jitted
step draws fresh numbers every call, exactly as eagerly. Inside ``lax`` loop/branch bodies and
``checkpoint`` it cannot flow out: pass a key there.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.array import Array, Tracer
from ember.core.hidden_state import HiddenState
from ember.core.trace import aval_of, to_array
from ember.errors import DTypeError, EmberValueError, ShapeError, op_error
from ember.numpy._core import value
from ember.ops import elementwise as ew
from ember.ops import indexing as ix
from ember.ops import reduce as rd
from ember.ops import structural as st
from ember.ops.random_bits import threefry2x32
from ember.ops.sort import argsort, top_k

__all__ = ["key", "PRNGKey", "split", "fold_in", "bits", "uniform", "normal",
           "truncated_normal", "randint", "integers", "bernoulli", "gumbel", "categorical",
           "permutation", "choice", "seed", "next_key", "rand", "randn", "random"]

_BITS, _SPLIT, _FOLD = 0, 1, 2
_SIGNIFICAND_BITS = {dtypes.float64: 53, dtypes.float32: 24, dtypes.float16: 11,
                     dtypes.bfloat16: 8}
ShapeLike = int | Sequence[int] | None


# --- keys ------------------------------------------------------------------------------------

def key(seed: Any) -> Array:
    """A key from an integer seed (any 64-bit value, negative ones included; may be traced)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        s = int(seed)
        if not -2**63 <= s < 2**64:
            raise op_error(EmberValueError, "key", f"seed {s} does not fit in 64 bits")
        s %= 2**64
        return to_array(np.array([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32))
    s = value(seed)
    if not dtypes.is_int(aval_of(s).dtype) or aval_of(s).ndim:
        raise op_error(DTypeError, "key", f"seed must be a scalar integer, got {aval_of(s)}")
    wide = ew.convert(ew.convert(s, dtypes.int64), dtypes.uint64)
    hi = ew.convert(ew.shift_right(wide, ew.full_like(wide, 32)), dtypes.uint32)
    lo = ew.convert(ew.and_(wide, ew.full_like(wide, 0xFFFFFFFF)), dtypes.uint32)
    return st.concatenate([st.reshape(hi, (1,)), st.reshape(lo, (1,))], 0)


PRNGKey = key


def _check_key(op: str, k: Any) -> Any:
    k = k if isinstance(k, Array) else value(k)
    aval = aval_of(k)
    if aval.dtype != dtypes.uint32 or aval.shape != (2,):
        hint = (" (a batch of keys: map over it with ember.vmap)"
                if aval.dtype == dtypes.uint32 and aval.shape[-1:] == (2,) else "")
        raise op_error(EmberValueError, f"random.{op}", f"expected a key made by "
                       f"ember.random.key(seed) (uint32[2]), got {aval}{hint}")
    return k


def _hash(k: Any, counters: Any, stream: int) -> tuple[Any, Any]:
    """Threefry of the key on ``(stream, counter)`` for every uint32 ``counter``."""
    shape = aval_of(counters).shape
    k0, k1 = (st.broadcast_in_dim(st.index_in_dim(k, i), shape, ()) for i in (0, 1))
    return threefry2x32(k0, k1, counters, ew.full_like(counters, stream))


def _counters(n: int) -> Any:
    if n >= 2**32:
        raise op_error(EmberValueError, "random", f"cannot draw {n} values from one key at once "
                       "(the limit is 2**32 64-bit blocks); split the key")
    return st.iota(dtypes.uint32, (n,))


def split(key: Any, num: int = 2) -> Any:
    """``num`` new independent keys, as a ``uint32[num, 2]`` array."""
    a, b = _hash(_check_key("split", key), _counters(int(num)), _SPLIT)
    return st.concatenate([st.reshape(a, (int(num), 1)), st.reshape(b, (int(num), 1))], 1)


def fold_in(key: Any, data: Any) -> Any:
    """A new key derived from ``key`` and a 32-bit integer ``data`` (which may be traced)."""
    k = _check_key("fold_in", key)
    if isinstance(data, (int, np.integer)):
        d = to_array(np.uint32(int(data) % 2**32))
    else:
        d = value(data)
        if not dtypes.is_int(aval_of(d).dtype) or aval_of(d).ndim:
            raise op_error(DTypeError, "random.fold_in", f"data must be a scalar integer, got "
                           f"{aval_of(d)}")
        d = ew.convert(d, dtypes.uint32)
    a, b = _hash(k, st.reshape(d, (1,)), _FOLD)
    return st.concatenate([a, b], 0)


# --- raw bits --------------------------------------------------------------------------------

def _shape(op: str, shape: ShapeLike) -> tuple[int, ...]:
    if shape is None:
        return ()
    out = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in out):
        raise op_error(ShapeError, f"random.{op}", f"negative dimensions in shape {out}")
    return out


def bits(key: Any, shape: ShapeLike = (), dtype: Any = dtypes.uint32) -> Any:
    """Uniformly random unsigned integers of ``dtype`` (uint8/16/32/64)."""
    k = _check_key("bits", key)
    shape = _shape("bits", shape)
    dt = dtypes.canonicalize(dtype)
    if not dtypes.is_unsigned(dt):
        raise op_error(DTypeError, "random.bits", f"dtype must be an unsigned integer, got {dt}")
    n = math.prod(shape)
    if dt == dtypes.uint64:
        a, b = _hash(k, _counters(n), _BITS)
        hi = ew.shift_left(ew.convert(a, dt), ew.full_like(ew.convert(a, dt), 32))
        return st.reshape(ew.or_(hi, ew.convert(b, dt)), shape)
    a, b = _hash(k, _counters((n + 1) // 2), _BITS)
    words = st.slice(st.concatenate([a, b], 0), (0,), (n,))
    return st.reshape(ew.convert(words, dt), shape)  # narrower dtypes keep the low bits


# --- floating-point distributions ------------------------------------------------------------

def _float_dtype(op: str, dtype: Any) -> np.dtype:
    dt = dtypes.default_float if dtype is None else dtypes.canonicalize(dtype)
    if not dtypes.is_float(dt):
        raise op_error(DTypeError, f"random.{op}", f"dtype must be a floating dtype, got {dt}")
    return dt


def _compute_dtype(dt: np.dtype) -> np.dtype:
    """Transcendental sampling (log, sqrt...) in half precision loses too much: use float32."""
    return dtypes.float32 if dt in (dtypes.float16, dtypes.bfloat16) else dt


def _unit(k: Any, shape: tuple[int, ...], dt: np.dtype, open_low: bool = False) -> Any:
    """Uniform floats in ``[0, 1)``, or ``(0, 1)`` with ``open_low``: a random ``m`` of as many
    bits as the significand holds, as ``m / 2**p`` (or ``(2m + 1) / 2**p``), exactly."""
    p = _SIGNIFICAND_BITS[dt]
    word = dtypes.uint64 if p > 32 else dtypes.uint32
    raw = bits(k, shape, word)
    m = ew.convert(ew.shift_right(raw, ew.full_like(raw, word.itemsize * 8 - p + open_low)), dt)
    if open_low:
        m = ew.add(ew.mul(m, ew.full_like(m, 2)), ew.full_like(m, 1))
    return ew.mul(m, ew.full_like(m, 2.0 ** -p))


def _bound(x: Any, dt: np.dtype, shape: tuple[int, ...], op: str) -> Any:
    v = ew.convert(value(x), dt)
    src = aval_of(v).shape
    if len(src) > len(shape) or any(n not in (1, m) for n, m in zip(src[::-1], shape[::-1])):
        raise op_error(ShapeError, f"random.{op}", f"bound of shape {src} does not broadcast "
                       f"to shape {shape}")
    return st.broadcast_to_shape(v, shape)


def uniform(key: Any, shape: ShapeLike = (), dtype: Any = None, minval: Any = 0.0,
            maxval: Any = 1.0) -> Any:
    """Floats uniform in ``[minval, maxval)`` (float64 when ``dtype`` is None, as NumPy).

    Where rounding ``minval + u * (maxval - minval)`` would reach ``maxval`` (possible only for
    the largest few ``u`` in low precision) the value is replaced by ``minval``.
    """
    k = _check_key("uniform", key)
    dt = _float_dtype("uniform", dtype)
    shape = _shape("uniform", shape)
    lo, hi = _bound(minval, dt, shape, "uniform"), _bound(maxval, dt, shape, "uniform")
    out = ew.add(ew.mul(_unit(k, shape, dt), ew.sub(hi, lo)), lo)
    return ew.select(ew.lt(out, hi), ew.max(out, lo), lo)


def normal(key: Any, shape: ShapeLike = (), dtype: Any = None) -> Any:
    """Standard normal samples (Box-Muller on pairs of uniforms; always finite)."""
    k = _check_key("normal", key)
    dt = _float_dtype("normal", dtype)
    shape = _shape("normal", shape)
    n = math.prod(shape)
    half = (n + 1) // 2
    ct = _compute_dtype(dt)
    u = _unit(k, (2, half), ct, open_low=True)
    u1, u2 = st.index_in_dim(u, 0), st.index_in_dim(u, 1)
    radius = ew.sqrt(ew.mul(ew.full_like(u1, -2.0), ew.log(u1)))
    angle = ew.mul(u2, ew.full_like(u2, 2 * math.pi))
    z = st.concatenate([ew.mul(radius, ew.cos(angle)), ew.mul(radius, ew.sin(angle))], 0)
    return ew.convert(st.reshape(st.slice(z, (0,), (n,)), shape), dt)


# Acklam's rational approximation of the inverse normal CDF (relative error below 1.2e-9):
# a central rational function of (p - 1/2) and a tail one of sqrt(-2 log p).
_CENTRAL_NUM = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
_CENTRAL_DEN = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                6.680131188771972e+01, -1.328068155288572e+01, 1.0)
_TAIL_NUM = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
             -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
_TAIL_DEN = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
             3.754408661907416e+00, 1.0)
_TAIL_START = 0.02425


def _poly(coeffs: Sequence[float], x: Any) -> Any:
    acc = ew.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        acc = ew.add(ew.mul(acc, x), ew.full_like(x, c))
    return acc


def _ndtri(p: Any) -> Any:
    """The standard normal quantile of ``p`` in (0, 1)."""
    q = ew.sub(p, ew.full_like(p, 0.5))
    r = ew.mul(q, q)
    central = ew.div(ew.mul(_poly(_CENTRAL_NUM, r), q), _poly(_CENTRAL_DEN, r))
    tail_p = ew.min(p, ew.sub(ew.full_like(p, 1), p))  # the lower tail, by symmetry
    t = ew.sqrt(ew.mul(ew.full_like(p, -2.0), ew.log(tail_p)))
    tail = ew.div(_poly(_TAIL_NUM, t), _poly(_TAIL_DEN, t))
    tail = ew.select(ew.lt(q, ew.zeros_like(q)), tail, ew.neg(tail))
    return ew.select(ew.lt(tail_p, ew.full_like(p, _TAIL_START)), tail, central)


def _normal_cdf(x: Any) -> Any:
    half = ew.full_like(x, 0.5)
    return ew.mul(half, ew.add(ew.full_like(x, 1), ew.erf(ew.mul(x, ew.full_like(x,
                                                                            math.sqrt(0.5))))))


def truncated_normal(key: Any, lower: Any, upper: Any, shape: ShapeLike = None,
                     dtype: Any = None) -> Any:
    """Standard normal samples conditioned on ``lower <= x <= upper`` (inverse CDF method).

    Bounds above zero are mirrored to the lower tail first, where the CDF keeps its precision.
    Bounds beyond about 5 standard deviations (float32; 8 in float64) lose precision in the CDF,
    and samples there gather toward the nearer bound.
    """
    k = _check_key("truncated_normal", key)
    dt = _float_dtype("truncated_normal", dtype)
    ct = _compute_dtype(dt)
    lo, hi = ew.convert(value(lower), ct), ew.convert(value(upper), ct)
    if shape is None:
        shape = tuple(np.broadcast_shapes(aval_of(lo).shape, aval_of(hi).shape))
    shape = _shape("truncated_normal", shape)
    lo, hi = _bound(lo, ct, shape, "truncated_normal"), _bound(hi, ct, shape, "truncated_normal")
    mirror = ew.gt(lo, ew.zeros_like(lo))
    a = ew.select(mirror, ew.neg(hi), lo)
    b = ew.select(mirror, ew.neg(lo), hi)
    pa, pb = _normal_cdf(a), _normal_cdf(b)
    p = ew.add(pa, ew.mul(_unit(k, shape, ct, open_low=True), ew.sub(pb, pa)))
    info = dtypes.finfo(ct)
    p = ew.min(ew.max(p, ew.full_like(p, info.tiny)), ew.full_like(p, 1 - info.epsneg))
    x = _ndtri(p)
    x = ew.select(mirror, ew.neg(x), x)
    return ew.convert(ew.min(ew.max(x, lo), hi), dt)


def gumbel(key: Any, shape: ShapeLike = (), dtype: Any = None) -> Any:
    """Standard Gumbel samples ``-log(-log(u))`` with ``u`` in the open interval (0, 1)."""
    k = _check_key("gumbel", key)
    dt = _float_dtype("gumbel", dtype)
    u = _unit(k, _shape("gumbel", shape), _compute_dtype(dt), open_low=True)
    return ew.convert(ew.neg(ew.log(ew.neg(ew.log(u)))), dt)


# --- discrete distributions ------------------------------------------------------------------

def _as_uint64(op: str, bound: Any, dt: np.dtype) -> tuple[Any, Any]:
    """A bound as (its two's-complement uint64 form, itself as a 64-bit integer array)."""
    if isinstance(bound, (int, np.integer)) and not isinstance(bound, bool):
        b = int(bound)
        info = np.iinfo(dt)
        if not info.min <= b <= info.max + 1:
            raise op_error(EmberValueError, f"random.{op}", f"bound {b} is out of range for "
                           f"{dt}")
        wide = to_array(np.uint64(b % 2**64)) if b >= 2**63 else to_array(np.int64(b))
    else:
        v = value(bound)
        if not dtypes.is_int(aval_of(v).dtype):
            raise op_error(DTypeError, f"random.{op}", f"bounds must be integers, got "
                           f"{aval_of(v).dtype}")
        wide = ew.convert(v, dtypes.uint64 if aval_of(v).dtype == dtypes.uint64
                          else dtypes.int64)
    return ew.convert(wide, dtypes.uint64), wide


def randint(key: Any, shape: ShapeLike = (), minval: Any = 0, maxval: Any = None,
            dtype: Any = None) -> Any:
    """Integers uniform in ``[minval, maxval)`` (int64 when ``dtype`` is None, as NumPy).

    A 64-bit draw is reduced modulo the range size: exactly uniform when that size is a power
    of two and otherwise biased by at most ``size / 2**64``. Where a traced ``maxval`` is not
    above ``minval`` the result is ``minval``.
    """
    k = _check_key("randint", key)
    if maxval is None:
        minval, maxval = 0, minval
    shape = _shape("randint", shape)
    dt = dtypes.default_int if dtype is None else dtypes.canonicalize(dtype)
    if not dtypes.is_int(dt):
        raise op_error(DTypeError, "random.randint", f"dtype must be an integer dtype, got {dt}")
    concrete = (int, np.integer)
    if isinstance(minval, concrete) and isinstance(maxval, concrete) and maxval <= minval:
        raise op_error(EmberValueError, "random.randint", f"maxval ({maxval}) must be greater "
                       f"than minval ({minval})")
    lo_u, lo = _as_uint64("randint", minval, dt)
    hi_u, hi = _as_uint64("randint", maxval, dt)
    lo_u, hi_u = st.broadcast_to_shape(lo_u, shape), st.broadcast_to_shape(hi_u, shape)
    span = ew.sub(hi_u, lo_u)  # wraps to 0 only for the full 2**64 range
    whole = ew.eq(span, ew.zeros_like(span))
    raw = bits(k, shape, dtypes.uint64)
    offset = ew.select(whole, raw, ew.rem(raw, ew.select(whole, ew.full_like(span, 1), span)))
    out = ew.convert(ew.add(lo_u, offset), dt)  # wrapping conversion back to dt
    if isinstance(lo, Tracer) or isinstance(hi, Tracer):
        common = dtypes.promote((aval_of(lo).dtype, False), (aval_of(hi).dtype, False))
        ok = st.broadcast_to_shape(ew.gt(ew.convert(hi, common), ew.convert(lo, common)), shape)
        out = ew.select(ok, out, ew.convert(st.broadcast_to_shape(lo_u, shape), dt))
    return out


integers = randint


def bernoulli(key: Any, p: Any = 0.5, shape: ShapeLike = None) -> Any:
    """Booleans that are True with probability ``p``."""
    k = _check_key("bernoulli", key)
    prob = value(p)
    dt = aval_of(prob).dtype if dtypes.is_float(aval_of(prob).dtype) else dtypes.default_float
    shape = aval_of(prob).shape if shape is None else _shape("bernoulli", shape)
    return ew.lt(uniform(k, shape, dt), _bound(prob, dt, shape, "bernoulli"))


def categorical(key: Any, logits: Any, axis: int = -1, shape: ShapeLike = None) -> Any:
    """Indices drawn with probabilities ``softmax(logits)`` along ``axis`` (Gumbel-max).

    ``shape`` defaults to ``logits``' shape without ``axis``; a longer shape draws several
    samples per distribution (it must end with that batch shape).
    """
    k = _check_key("categorical", key)
    lg = value(logits)
    if not dtypes.is_float(aval_of(lg).dtype):
        lg = ew.convert(lg, dtypes.default_float)
    nd = aval_of(lg).ndim
    if nd == 0:
        raise op_error(ShapeError, "random.categorical", "logits must be at least 1-d")
    ax = axis % nd if -nd <= axis < nd else None
    if ax is None:
        raise op_error(ShapeError, "random.categorical", f"axis {axis} out of range for logits "
                       f"of shape {aval_of(lg).shape}")
    lg = st.moveaxis(lg, ax, nd - 1)
    batch = aval_of(lg).shape[:-1]
    shape = batch if shape is None else _shape("categorical", shape)
    if len(shape) < len(batch) or any(b not in (1, s) for b, s in zip(batch[::-1], shape[::-1])):
        raise op_error(ShapeError, "random.categorical", f"shape {shape} must end with the "
                       f"logits' batch shape {batch}")
    full = (*shape, aval_of(lg).shape[-1])
    noisy = ew.add(st.broadcast_to_shape(lg, full), gumbel(k, full, aval_of(lg).dtype))
    return rd.argmax(noisy, len(shape))


def _sort_keys(k: Any, shape: tuple[int, ...]) -> Any:
    """64-bit random sort keys: ties (which would bias a permutation) have odds ~n^2 / 2^65."""
    return bits(k, shape, dtypes.uint64)


def permutation(key: Any, x: Any, axis: int = 0, independent: bool = False) -> Any:
    """A random ordering of ``range(x)`` (for an integer ``x``) or of ``x`` along ``axis``;
    ``independent`` shuffles every 1-d slice along ``axis`` separately."""
    k = _check_key("permutation", key)
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        n = int(x)
        if n < 0:
            raise op_error(EmberValueError, "random.permutation", f"x must be >= 0, got {n}")
        return argsort(_sort_keys(k, (n,)))
    arr = value(x)
    shape = aval_of(arr).shape
    if not shape:
        raise op_error(ShapeError, "random.permutation", "x must be an integer or at least "
                       "1-d")
    ax = _normalize_axis("permutation", axis, len(shape))
    if independent:
        return ix.take_along_axis(arr, argsort(_sort_keys(k, shape), ax), ax)
    return _take(arr, argsort(_sort_keys(k, (shape[ax],))), ax)


def _normalize_axis(op: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise op_error(ShapeError, f"random.{op}", f"axis {axis} out of range for {ndim}-d input")
    return axis % ndim


def _take(arr: Any, index: Any, axis: int) -> Any:
    """``arr`` at the 1-d ``index`` along ``axis``."""
    moved = st.moveaxis(arr, axis, 0)
    n = aval_of(index).shape[0]
    return st.moveaxis(ix.gather(moved, st.reshape(index, (n, 1))), 0, axis)


def choice(key: Any, a: Any, shape: ShapeLike = (), replace: bool = True, p: Any = None,
           axis: int = 0) -> Any:
    """Random samples of ``range(a)`` (integer ``a``) or of ``a``'s entries along ``axis``,
    with or without replacement, uniformly or with probabilities ``p``."""
    k = _check_key("choice", key)
    shape = _shape("choice", shape)
    if isinstance(a, (int, np.integer)) and not isinstance(a, bool):
        arr, n = None, int(a)
    else:
        arr = value(a)
        if not aval_of(arr).shape:
            raise op_error(ShapeError, "random.choice", "a must be an integer or at least 1-d")
        axis = _normalize_axis("choice", axis, aval_of(arr).ndim)
        n = aval_of(arr).shape[axis]
    count = math.prod(shape)
    if n <= 0 and count:
        raise op_error(EmberValueError, "random.choice", "a cannot be empty unless no samples "
                       "are taken")
    if not replace and count > n:
        raise op_error(EmberValueError, "random.choice", f"cannot take {count} samples from "
                       f"{n} without replacement")
    logp = None
    if p is not None:
        prob = value(p)
        if aval_of(prob).shape != (n,):
            raise op_error(ShapeError, "random.choice", f"p must have shape ({n},), got "
                           f"{aval_of(prob).shape}")
        prob = ew.convert(prob, dtypes.default_float) \
            if not dtypes.is_float(aval_of(prob).dtype) else prob
        positive = ew.gt(prob, ew.zeros_like(prob))
        logp = ew.select(positive, ew.log(ew.select(positive, prob, ew.full_like(prob, 1))),
                         ew.full_like(prob, -np.inf))
    if replace:
        idx = (randint(k, shape, 0, n) if logp is None
               else categorical(k, logp, shape=shape))
    elif logp is None:
        idx = st.reshape(st.slice(permutation(k, n), (0,), (count,)), shape)
    else:  # Gumbel-top-k: the k largest perturbed log-probabilities, without replacement
        noisy = ew.add(logp, gumbel(k, (n,), aval_of(logp).dtype))
        idx = st.reshape(top_k(noisy, count)[1], shape)
    if arr is None:
        return idx
    picked = _take(arr, st.reshape(idx, (count,)), axis)
    rest = aval_of(picked).shape
    return st.reshape(picked, (*rest[:axis], *shape, *rest[axis + 1:]))


# --- the global convenience generator --------------------------------------------------------

_GLOBAL_KEY = HiddenState(
    "ember.random's global generator", lambda: key(secrets.randbits(64)),
    "Pass a key instead: ember.random.normal(key, shape), with key = ember.random.key(seed) "
    "split as needed (or draw the key before the loop and pass it in).")


def seed(seed: int | None = None) -> None:
    """Reset the global generator: the same seed gives the same sequence of draws; None picks
    a fresh seed from the operating system."""
    _GLOBAL_KEY.set(key(secrets.randbits(64) if seed is None else seed))


def next_key() -> Array:
    """A fresh key from the global generator (advancing it)."""
    keys = split(_GLOBAL_KEY.get())
    _GLOBAL_KEY.set(st.index_in_dim(keys, 0))
    return st.index_in_dim(keys, 1)


def _size(args: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def rand(*shape: int) -> Array:
    """Uniform float64 samples in [0, 1) of the given shape, from the global generator."""
    return uniform(next_key(), _size(shape))


def randn(*shape: int) -> Array:
    """Standard normal float64 samples of the given shape, from the global generator."""
    return normal(next_key(), _size(shape))


def random(size: ShapeLike = None) -> Array:
    """Uniform float64 samples in [0, 1) (``numpy.random.random``), from the global generator."""
    return uniform(next_key(), size)
