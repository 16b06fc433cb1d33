"""Primitive specs for the linear-algebra extension: the factorisations of
``ember.ops.decompositions`` (cholesky, lu, qr, eigh, svd, triangular_solve).

Collected by ``primitive_specs``. Inputs are well conditioned (SPD for cholesky, well separated
eigenvalues and singular values for eigh and svd, a dominant diagonal for triangular solves),
so finite differences are meaningful. Factors that are unique only up to signs (eigenvectors,
singular vectors, the columns of Q) are compared through functions of them that do not depend
on the signs: ``sum_i c_i v_i v_i^T`` for fixed distinct ``c_i``, or sign-normalised columns.
"""

from __future__ import annotations

import numpy as np
from primitive_specs import Spec

import ember.numpy as enp
from ember import dtypes
from ember import ops as lax

FLOATS = (dtypes.float32, dtypes.float64)
STACKS = ((3, 3), (2, 4, 4))


# --- input generators ------------------------------------------------------------------------

def _general(rng, dt, shape):
    return rng.uniform(-2, 2, size=shape).astype(dt)


def _spd(rng, dt, shape):
    a = rng.uniform(-1, 1, size=shape)
    return (a @ np.swapaxes(a, -1, -2) + shape[-1] * np.eye(shape[-1])).astype(dt)


def _triangular(rng, dt, shape):
    """Off-diagonal entries in [-1, 1], diagonal entries of magnitude 2 to 3."""
    n = shape[-1]
    a = rng.uniform(-1, 1, size=shape)
    diag = rng.uniform(2, 3, size=shape[:-1]) * rng.choice([-1, 1], size=shape[:-1])
    return (a * (1 - np.eye(n)) + diag[..., None] * np.eye(n)).astype(dt)


def _rhs(rng, dt, shape):
    return rng.uniform(-2, 2, size=(*shape[:-1], 2)).astype(dt)


def _orthogonal(rng, shape):
    q, r = np.linalg.qr(rng.normal(size=shape))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _distinct_spectrum(rng, dt, shape):
    """Symmetric, eigenvalues at least 0.5 apart."""
    q = _orthogonal(rng, shape)
    w = np.arange(shape[-1]) - 1.5 + rng.uniform(-0.25, 0.25, size=shape[:-1])
    return ((q * w[..., None, :]) @ np.swapaxes(q, -1, -2)).astype(dt)


def _distinct_singular_values(rng, dt, shape):
    """Singular values 1, 2, 3... (plus noise), so gaps and the smallest are far from zero."""
    *batch, m, n = shape
    k = min(m, n)
    u = _orthogonal(rng, (*batch, m, m))[..., :k]
    v = _orthogonal(rng, (*batch, n, n))[..., :k]
    s = np.arange(1, k + 1) + rng.uniform(-0.25, 0.25, size=(*batch, k))
    return ((u * s[..., None, :]) @ np.swapaxes(v, -1, -2)).astype(dt)


# --- sign-free views of the factors ----------------------------------------------------------

def _weights(n, dtype):
    return np.arange(1, n + 1).astype(dtype)


def _weighted_outer(a, b, dtype):
    """``sum_i c_i a_i b_i^T`` over the columns ``a_i`` of ``a`` and ``b_i`` of ``b``."""
    return (a * _weights(a.shape[-1], dtype)) @ enp.matrix_transpose(b)


def _np_weighted_outer(a, b):
    return (a * _weights(a.shape[-1], a.dtype)) @ np.swapaxes(b, -1, -2)


def _sym(x):
    return (x + np.swapaxes(x, -1, -2)) / 2


def _positive_diagonal(q, r, xp):
    """Flip signs so that R has a non-negative diagonal (the unique QR of a full-rank x)."""
    k = min(r.shape[-2], r.shape[-1])
    diag = xp.diagonal(r[..., :k, :k], axis1=-2, axis2=-1)
    sign = xp.where(diag < 0, -1.0, 1.0).astype(q.dtype)
    pad = q.shape[-1] - k
    if pad:
        sign = xp.concatenate([sign, xp.ones((*sign.shape[:-1], pad), q.dtype)], axis=-1)
    return q * sign[..., None, :], r * sign[..., :, None]


def _lu_product(packed, perm, xp):
    """``P^T L U``: the matrix the factors were computed from."""
    n = packed.shape[-1]
    low = xp.tril(packed, -1) + xp.eye(n, dtype=packed.dtype)
    prod = low @ xp.triu(packed)
    inverse = xp.argsort(perm, axis=-1)
    index = xp.broadcast_to(inverse[..., :, None], prod.shape)
    return xp.take_along_axis(prod, index, axis=-2)


# --- specs -----------------------------------------------------------------------------------

def _triangular_solve_specs() -> list[Spec]:
    specs = []
    for lower in (True, False):
        for transpose_a in (False, True):
            def ref(a, b, lower=lower, transpose_a=transpose_a):
                tri = np.tril(a) if lower else np.triu(a)
                return np.linalg.solve(np.swapaxes(tri, -1, -2) if transpose_a else tri, b)

            specs.append(Spec(
                "triangular_solve",
                lambda a, b, lo=lower, t=transpose_a: lax.triangular_solve(a, b, lo, t), ref,
                [_triangular, _rhs], FLOATS, STACKS, diff=(0, 1),
                id=f"triangular_solve-{'lower' if lower else 'upper'}{'-t' * transpose_a}"))
    return specs


def _factorisation_specs() -> list[Spec]:
    specs = [
        Spec("cholesky", lax.cholesky, lambda x: np.linalg.cholesky(_sym(x)), [_spd], FLOATS,
             STACKS, diff=(0,)),
        Spec("lu", lambda x: _lu_product(*lax.lu(x), enp), lambda x: x, [_general], FLOATS,
             STACKS, diff=(0,)),
        Spec("eigh", lambda x: (lambda w, v: [w, _weighted_outer(v, v, w.dtype)])(*lax.eigh(x)),
             lambda x: (lambda w, v: [w, _np_weighted_outer(v, v)])(*np.linalg.eigh(_sym(x))),
             [_distinct_spectrum], FLOATS, STACKS, diff=(0,)),
    ]
    for full in (False, True):
        shapes = ((4, 3), (3, 5), (2, 3, 3)) if not full else ((3, 3), (4, 3))

        def svd_fn(x, full=full):
            u, s, vh = lax.svd(x, full)
            k = s.shape[-1]
            return [s, _weighted_outer(u[..., :k], enp.matrix_transpose(vh[..., :k, :]),
                                       s.dtype)]

        def svd_ref(x, full=full):
            u, s, vh = np.linalg.svd(x, full_matrices=full)
            k = s.shape[-1]
            return [s, _np_weighted_outer(u[..., :k], np.swapaxes(vh[..., :k, :], -1, -2))]

        for shape in shapes:
            differentiable = not full or shape[-1] == shape[-2]
            specs.append(Spec("svd", svd_fn, svd_ref, [_distinct_singular_values], FLOATS,
                              (shape,), diff=(0,) if differentiable else (),
                              id=f"svd-{'full' if full else 'reduced'}-{shape}"))
        for shape in shapes if not full else ((4, 3), (3, 4)):
            differentiable = not full or shape[-1] >= shape[-2]
            specs.append(Spec(
                "qr", lambda x, full=full: list(_positive_diagonal(*lax.qr(x, full), enp)),
                lambda x, full=full: list(_positive_diagonal(
                    *np.linalg.qr(x, mode="complete" if full else "reduced"), np)),
                [_general], FLOATS, (shape,), diff=(0,) if differentiable else (),
                id=f"qr-{'complete' if full else 'reduced'}-{shape}"))
    return specs


def specs() -> list[Spec]:
    return _triangular_solve_specs() + _factorisation_specs()
