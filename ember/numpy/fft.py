"""``ember.numpy.fft``: the array API's ``fft`` extension (and NumPy's ``numpy.fft`` names).

Every transform is one ``fft`` primitive (see :mod:`ember.ops.fft`) over the trailing axes,
wrapped in ordinary primitives: the transformed axes are moved to the end, zero-padded or cut to
the requested lengths, and the result is scaled for ``norm`` and its axes moved back. So
gradients, ``vmap`` and ``jit`` of every function here come from those primitives' rules.

Dtypes: real inputs are accepted where NumPy accepts them. float32, float16 and bfloat16 compute
in single precision (complex64 / float32 results), float64, integers and bool in double
precision (complex128 / float64). ``rfft``, ``rfftn`` and ``ihfft`` refuse complex input.
Where the standard leaves a choice: ``s`` without ``axes`` transforms the last ``len(s)`` axes
(as NumPy and JAX do), and repeated axes are refused.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ember import dtypes
from ember.core.trace import aval_of, to_array
from ember.errors import DTypeError, EmberValueError, ShapeError, op_error
from ember.numpy._core import asarray, check_device, value
from ember.numpy._shape_more import roll
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops._checks import normalize_axes
from ember.ops.fft import fft as fft_op
from ember.ops.fft import half_spectrum

__all__ = ["fft", "ifft", "fftn", "ifftn", "rfft", "irfft", "rfftn", "irfftn", "hfft", "ihfft",
           "fftfreq", "rfftfreq", "fftshift", "ifftshift"]

Norm = Literal["backward", "ortho", "forward"]

# hfft and ihfft are irfft and rfft of the conjugate with the scaling run the other way.
_SWAPPED: dict[str, Norm] = {"backward": "forward", "ortho": "ortho", "forward": "backward"}


def fft(x: Any, /, n: int | None = None, axis: int = -1, norm: Norm | None = "backward") -> Any:
    """The one-dimensional discrete Fourier transform along ``axis``."""
    return _transform("fft", "fft", x, _one(n), (axis,), norm)


def ifft(x: Any, /, n: int | None = None, axis: int = -1, norm: Norm | None = "backward") -> Any:
    """The one-dimensional inverse discrete Fourier transform along ``axis``."""
    return _transform("ifft", "ifft", x, _one(n), (axis,), norm)


def fftn(x: Any, /, s: Sequence[int] | None = None, axes: Sequence[int] | None = None,
         norm: Norm | None = "backward") -> Any:
    """The n-dimensional discrete Fourier transform over ``axes`` (default: all)."""
    return _transform("fftn", "fft", x, s, axes, norm)


def ifftn(x: Any, /, s: Sequence[int] | None = None, axes: Sequence[int] | None = None,
          norm: Norm | None = "backward") -> Any:
    """The n-dimensional inverse discrete Fourier transform over ``axes`` (default: all)."""
    return _transform("ifftn", "ifft", x, s, axes, norm)


def rfft(x: Any, /, n: int | None = None, axis: int = -1, norm: Norm | None = "backward") -> Any:
    """The transform of a real signal: its ``n // 2 + 1`` non-negative frequencies."""
    return _transform("rfft", "rfft", x, _one(n), (axis,), norm)


def irfft(x: Any, /, n: int | None = None, axis: int = -1, norm: Norm | None = "backward") -> Any:
    """The inverse of ``rfft``: a real signal of length ``n`` (default ``2 * (m - 1)``)."""
    return _transform("irfft", "irfft", x, _one(n), (axis,), norm)


def rfftn(x: Any, /, s: Sequence[int] | None = None, axes: Sequence[int] | None = None,
          norm: Norm | None = "backward") -> Any:
    """The n-dimensional transform of a real signal (half spectrum along the last axis)."""
    return _transform("rfftn", "rfft", x, s, axes, norm)


def irfftn(x: Any, /, s: Sequence[int] | None = None, axes: Sequence[int] | None = None,
           norm: Norm | None = "backward") -> Any:
    """The inverse of ``rfftn``: a real signal of shape ``s`` over ``axes``."""
    return _transform("irfftn", "irfft", x, s, axes, norm)


def hfft(x: Any, /, n: int | None = None, axis: int = -1, norm: Norm | None = "backward") -> Any:
    """The transform of a Hermitian-symmetric signal given by its first half: a real result."""
    v = _convert("hfft", x, "irfft")
    return _transform("hfft", "irfft", ew.conj(v), _one(n), (axis,), _norm("hfft", norm, True))


def ihfft(x: Any, /, n: int | None = None, axis: int = -1, norm: Norm | None = "backward") -> Any:
    """The inverse of ``hfft``: the half spectrum of a real signal, conjugated."""
    return ew.conj(_transform("ihfft", "rfft", x, _one(n), (axis,),
                              _norm("ihfft", norm, True)))


def fftfreq(n: int, /, d: float = 1.0, *, dtype: Any = None, device: Any = None) -> Any:
    """Sample frequencies ``[0, 1, ..., -2, -1] / (d * n)`` of an ``n``-point transform."""
    n = _positive("fftfreq", n)
    cycles = np.concatenate([np.arange((n - 1) // 2 + 1), np.arange(-(n // 2), 0)])
    return _frequencies("fftfreq", cycles, n, d, dtype, device)


def rfftfreq(n: int, /, d: float = 1.0, *, dtype: Any = None, device: Any = None) -> Any:
    """Sample frequencies ``[0, 1, ..., n // 2] / (d * n)`` of an ``n``-point ``rfft``."""
    n = _positive("rfftfreq", n)
    return _frequencies("rfftfreq", np.arange(n // 2 + 1), n, d, dtype, device)


def fftshift(x: Any, /, axes: int | Sequence[int] | None = None) -> Any:
    """Move the zero frequency to the middle: roll each of ``axes`` by half its length."""
    return _shift(x, axes, 1)


def ifftshift(x: Any, /, axes: int | Sequence[int] | None = None) -> Any:
    """The inverse of ``fftshift`` (they differ by one sample on odd lengths)."""
    return _shift(x, axes, -1)


# --- the shared implementation ---------------------------------------------------------------

def _one(n: int | None) -> tuple[int | None] | None:
    return None if n is None else (n,)


def _convert(name: str, x: Any, kind: str) -> Any:
    """``x`` in the dtype ``kind`` transforms: complex for all but rfft, which needs real."""
    v = value(x)
    dt = aval_of(v).dtype
    target = dtypes.complex_dtype(dt)
    if kind == "rfft":
        if dtypes.is_complex(dt):
            raise op_error(DTypeError, name, f"needs a real input, got {dt} (use fft for "
                           "complex signals)")
        target = dtypes.real_dtype(target)
    return ew.convert(v, target) if dt != target else v


def _norm(name: str, norm: Any, swap: bool = False) -> Norm:
    if norm is None:  # NumPy's spelling of the default
        norm = "backward"
    if norm not in _SWAPPED:
        raise op_error(EmberValueError, name, f"norm must be 'backward', 'ortho' or 'forward', "
                       f"got {norm!r}")
    return _SWAPPED[norm] if swap else norm


def _axes_and_lengths(name: str, kind: str, shape: tuple[int, ...], s: Any, axes: Any
                      ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Normalised axes and the logical transform length along each (``s``, defaults filled)."""
    nd = len(shape)
    if axes is None:
        axes = range(nd) if s is None else range(nd - len(s), nd)
    axes = list(axes)
    if not axes and kind in ("rfft", "irfft"):
        raise op_error(ShapeError, name, "needs at least one axis to transform")
    if len(axes) > nd:
        raise op_error(ShapeError, name, f"{len(axes)} axes for an input of shape {shape}")
    axes = normalize_axes(name, [int(a) for a in axes], nd)
    if s is None:
        s = [None] * len(axes)
    if len(s) != len(axes):
        raise op_error(ShapeError, name, f"s={tuple(s)} and axes={axes} differ in length")
    lengths = []
    for i, (ax, n) in enumerate(zip(axes, s)):
        last_of_irfft = kind == "irfft" and i == len(axes) - 1
        if n is None or n == -1:
            n = 2 * (shape[ax] - 1) if last_of_irfft else shape[ax]
        lengths.append(_positive(name, n, f" along axis {ax} of an input of shape {shape}"))
    return axes, tuple(lengths)


def _positive(name: str, n: Any, where: str = "") -> int:
    """``n`` as a Python int, or an error naming the function if it is not a positive one."""
    try:
        count = operator.index(n)
    except TypeError:
        count = 0
    if count < 1 or isinstance(n, bool):
        raise op_error(EmberValueError, name, f"invalid number of data points {n!r}{where}")
    return count


def _resize(x: Any, sizes: tuple[int, ...]) -> Any:
    """Cut or zero-pad the trailing axes of ``x`` to ``sizes``."""
    shape = aval_of(x).shape
    lead = len(shape) - len(sizes)
    want = (*shape[:lead], *sizes)
    if want == shape:
        return x
    cut = st.slice(x, (0,) * len(shape), tuple(min(a, b) for a, b in zip(shape, want)))
    grow = [max(b - a, 0) for a, b in zip(shape, want)]
    if not any(grow):
        return cut
    return st.pad(cut, to_array(np.zeros((), aval_of(x).dtype)), [0] * len(shape), grow)


def _scale(y: Any, kind: str, lengths: tuple[int, ...], norm: Norm) -> Any:
    """Apply ``norm``: the primitive's ifft/irfft already divide by ``N``, fft/rfft do not."""
    exponent = {"backward": 0.0, "ortho": 0.5, "forward": 1.0}[norm]
    if exponent == 0.0:
        return y
    sign = 1 if kind in ("ifft", "irfft") else -1
    return ew.mul(y, ew.full_like(y, math.prod(lengths) ** (sign * exponent)))


def _transform(name: str, kind: str, x: Any, s: Any, axes: Any, norm: Any) -> Any:
    norm = _norm(name, norm)
    v = _convert(name, x, kind)
    shape = aval_of(v).shape
    axes, lengths = _axes_and_lengths(name, kind, shape, s, axes)
    if not axes:  # fftn over no axes: nothing to transform
        return v
    perm = (*[i for i in range(len(shape)) if i not in axes], *axes)
    in_place = perm == tuple(range(len(shape)))
    moved = v if in_place else st.transpose(v, perm)
    sizes = half_spectrum(lengths) if kind == "irfft" else lengths
    y = _scale(fft_op(_resize(moved, sizes), kind, lengths), kind, lengths, norm)
    return y if in_place else st.transpose(y, np.argsort(perm))


def _frequencies(name: str, cycles: np.ndarray, n: int, d: Any, dtype: Any, device: Any
                 ) -> Any:
    """``cycles / (d * n)`` in ``dtype`` (default float64); ``d`` may be an array, even traced."""
    check_device(name, device)
    dt = dtypes.canonicalize(dtype) if dtype is not None else dtypes.default_float
    if not dtypes.is_float(dt):
        raise op_error(DTypeError, name, f"dtype must be a real floating dtype, got {dt}")
    k = asarray(cycles.astype(dt))
    if dtypes.is_python_scalar(d):
        return ew.mul(k, ew.full_like(k, 1.0 / (n * d)))
    spacing = st.broadcast_to_shape(ew.convert(value(d), dt), aval_of(k).shape)
    return ew.div(k, ew.mul(spacing, ew.full_like(k, n)))


def _shift(x: Any, axes: Any, sign: int) -> Any:
    v = value(x)
    shape = aval_of(v).shape
    name = "fftshift" if sign > 0 else "ifftshift"
    if axes is None:
        axes = tuple(range(len(shape)))
    elif isinstance(axes, (int, np.integer)):
        axes = (int(axes),)
    axes = normalize_axes(name, [int(a) for a in axes], len(shape))
    if not axes:
        return v
    return roll(v, tuple(sign * (shape[a] // 2) for a in axes), axes)
