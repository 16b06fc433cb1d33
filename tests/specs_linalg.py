"""Primitive specs for the linear-algebra extension (ember.numpy.linalg: cholesky, qr, svd...).

Collected by ``primitive_specs``.
"""

from __future__ import annotations

from primitive_specs import Spec


def specs() -> list[Spec]:
    return []
