"""Primitive specs for the FFT extension (``ember.numpy.fft``); collected by ``primitive_specs``.

One ``fft`` primitive with four kinds; each case transforms the trailing axes of a batch, with
even and odd lengths (the Nyquist bin of ``rfft``/``irfft`` exists only for even ones).
"""

from __future__ import annotations

import numpy as np
from helpers import COMPLEX
from primitive_specs import Spec, of_shape

from ember import dtypes
from ember import ops as lax

REALS = (dtypes.float32, dtypes.float64)

_NUMPY = {"fft": np.fft.fftn, "ifft": np.fft.ifftn, "rfft": np.fft.rfftn, "irfft": np.fft.irfftn}


def signal(rng: np.random.Generator, dt: np.dtype, shape: tuple) -> np.ndarray:
    """Uniform values in [-3, 3), with an independent imaginary part for complex dtypes."""
    x = rng.uniform(-3, 3, size=shape)
    if dtypes.is_complex(np.dtype(dt)):
        x = x + 1j * rng.uniform(-3, 3, size=shape)
    return x.astype(dt)


def _ref(kind: str, lengths: tuple[int, ...]):
    def ref(x):
        axes = tuple(range(x.ndim - len(lengths), x.ndim))
        out = _NUMPY[kind](x, s=lengths, axes=axes)
        real = dtypes.real_dtype(dtypes.complex_dtype(x.dtype))
        return out.astype(real if kind == "irfft" else dtypes.complex_dtype(x.dtype))
    return ref


def _spec(kind: str, lengths: tuple[int, ...], shape: tuple[int, ...], label: str) -> Spec:
    return Spec("fft", lambda x: lax.fft(x, kind, lengths), _ref(kind, lengths),
                [of_shape(shape, signal)], REALS if kind == "rfft" else COMPLEX, diff=(0,),
                id=f"fft-{kind}-{label}")


def specs() -> list[Spec]:
    return [
        _spec("fft", (8,), (3, 8), "1d"),
        _spec("fft", (3, 5), (2, 3, 5), "2d"),
        _spec("fft", (4,), (0, 4), "empty-batch"),
        _spec("ifft", (6,), (2, 6), "1d"),
        _spec("ifft", (2, 3, 4), (2, 3, 4), "3d"),
        _spec("rfft", (8,), (3, 8), "even"),
        _spec("rfft", (7,), (3, 7), "odd"),
        _spec("rfft", (4, 6), (2, 4, 6), "2d"),
        _spec("rfft", (1,), (3, 1), "length1"),
        _spec("irfft", (8,), (3, 5), "even"),
        _spec("irfft", (7,), (3, 4), "odd"),
        _spec("irfft", (3, 6), (2, 3, 4), "2d-even"),
        _spec("irfft", (4, 5), (4, 3), "2d-odd"),
    ]
