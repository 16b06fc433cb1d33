"""Primitive specs for the FFT extension (``ember.numpy.fft``); collected by ``primitive_specs``."""

from __future__ import annotations

from primitive_specs import Spec


def specs() -> list[Spec]:
    return []
