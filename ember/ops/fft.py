"""``fft``: one primitive for the discrete Fourier transforms over the trailing axes.

As in XLA, one primitive with a ``kind`` covers the four transforms, and ``lengths`` gives the
logical transform size over the trailing ``len(lengths)`` axes:

- ``fft``, ``ifft``: complex to complex, same shape; ``ifft`` divides by ``prod(lengths)``.
- ``rfft``: real to complex; the last axis keeps the ``lengths[-1] // 2 + 1`` non-negative
  frequencies (the rest of a real signal's spectrum is their complex conjugate).
- ``irfft``: the inverse of ``rfft``, half spectrum to real signal of shape ``lengths``, divided
  by ``prod(lengths)``.

Everything NumPy's ``norm``, ``n``/``s`` and ``axis``/``axes`` arguments add (scaling, padding,
moving axes) is composed in :mod:`ember.numpy.fft` from other primitives, so it differentiates
for free. All four are linear (over the reals), so the derivative rules are transposes:

- The DFT matrix ``W[j, k] = exp(-2 pi i j k / n)`` is symmetric, so ``fft`` and ``ifft`` are
  their own transposes (Ember's complex convention, JAX's: the plain, non-conjugating
  transpose, paired with ``<a, b> = Re sum(a * b)``).
- ``rfft`` keeps half the bins of ``fft``; transposed, the missing bins are zeros and the result
  is the real part: ``Re fft(ct, zero-padded)``. Written with ``irfft`` instead (half the work),
  that is ``N * irfft(conj(ct) / c)``, where ``c[k]`` counts how often bin ``k`` appears in the
  full spectrum: 1 for bin 0 and, for even lengths, the Nyquist bin; 2 for the others.
- ``irfft`` of a half spectrum is ``sum_k c[k] Re(x[k] w^-jk) / N``, so its transpose is
  ``conj(rfft(ct)) * c / N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import Zero, aval_of, to_array
from ember.errors import DTypeError, EmberValueError, ShapeError, op_error
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops.structural import _linear_jvp

__all__ = ["fft"]

KINDS = ("fft", "ifft", "rfft", "irfft")

fft_p = Primitive("fft", kind="library")


def half_spectrum(lengths: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a real signal's spectrum as ``rfft`` keeps it: the last axis holds only
    the ``n // 2 + 1`` non-negative frequencies."""
    return (*lengths[:-1], lengths[-1] // 2 + 1)


@fft_p.def_abstract_eval
def _fft_rule(x: ArrayType, *, kind: str, lengths: tuple[int, ...]) -> ArrayType:
    if kind not in KINDS:
        raise op_error(EmberValueError, "fft", f"kind must be one of {KINDS}, got {kind!r}")
    if not 1 <= len(lengths) <= x.ndim or min(lengths) < 1:
        raise op_error(ShapeError, "fft", f"lengths {lengths} do not fit an operand of shape "
                       f"{x.shape} (1 to {x.ndim} positive lengths)")
    if kind == "rfft":
        if x.dtype not in (dtypes.float32, dtypes.float64):
            raise op_error(DTypeError, "fft", f"rfft needs float32 or float64, got {x.dtype}")
        out_dtype = dtypes.complex_dtype(x.dtype)
    else:
        if not dtypes.is_complex(x.dtype):
            raise op_error(DTypeError, "fft", f"{kind} needs a complex dtype, got {x.dtype}")
        out_dtype = dtypes.real_dtype(x.dtype) if kind == "irfft" else x.dtype
    batch = x.shape[:x.ndim - len(lengths)]
    expected = half_spectrum(lengths) if kind == "irfft" else lengths
    if x.shape[len(batch):] != expected:
        raise op_error(ShapeError, "fft", f"{kind} of lengths {lengths} needs trailing axes "
                       f"{expected}, got shape {x.shape}")
    return ArrayType((*batch, *(half_spectrum(lengths) if kind == "rfft" else lengths)),
                     out_dtype)


_NUMPY = {"fft": np.fft.fftn, "ifft": np.fft.ifftn, "rfft": np.fft.rfftn,
          "irfft": np.fft.irfftn}


def _fft_impl(x, *, kind, lengths):
    # NumPy 2 computes float32/complex64 transforms in single precision; the cast only drops a
    # float64 result of older versions back to the input's precision.
    out = _NUMPY[kind](x, s=lengths, axes=tuple(range(x.ndim - len(lengths), x.ndim)))
    if kind == "irfft":
        return out.astype(dtypes.real_dtype(x.dtype), copy=False)
    return out.astype(dtypes.complex_dtype(x.dtype), copy=False)


fft_p.def_impl(_fft_impl)
fft_p.def_jvp(_linear_jvp(fft_p))


def fft(x: Any, kind: str, lengths: Sequence[int]) -> Any:
    """The ``kind`` transform (fft, ifft, rfft, irfft) of sizes ``lengths`` over the trailing
    axes; only ``ifft`` and ``irfft`` scale (by ``1 / prod(lengths)``)."""
    return fft_p.bind(x, kind=kind, lengths=tuple(int(n) for n in lengths))


def _bin_weights(like: Any, lengths: tuple[int, ...], power: int) -> Any:
    """``(c / N) ** power`` along the last axis of the half spectrum ``like``, where ``c[k]``
    counts the appearances of bin ``k`` in the full spectrum and ``N = prod(lengths)``."""
    n = lengths[-1]
    counts = np.full(half_spectrum(lengths)[-1], 2.0)
    counts[0] = 1.0
    if n % 2 == 0:
        counts[-1] = 1.0
    aval = aval_of(like)
    w = to_array(((counts / float(np.prod(lengths))) ** power).astype(aval.dtype))
    return st.broadcast_in_dim(w, aval.shape, (aval.ndim - 1,))


@fft_p.def_transpose
def _fft_transpose(ct, x, *, kind, lengths):
    if isinstance(ct, Zero):
        return [Zero(x.aval)]
    if kind in ("fft", "ifft"):
        return [fft(ct, kind, lengths)]
    if kind == "rfft":
        spectrum = ew.conj(ct)
        return [fft(ew.mul(spectrum, _bin_weights(spectrum, lengths, -1)), "irfft", lengths)]
    spectrum = ew.conj(fft(ct, "rfft", lengths))
    return [ew.mul(spectrum, _bin_weights(spectrum, lengths, 1))]


@fft_p.def_batch
def _fft_batch(args, dims, *, kind, lengths):
    # The transform acts on the trailing axes: with the batch axis in front they are unchanged.
    return fft(st.moveaxis(args[0], dims[0], 0), kind, lengths), 0
