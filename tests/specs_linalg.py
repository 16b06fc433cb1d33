"""Primitive specs for the linear-algebra extension: the factorisations of
``ember.ops.decompositions`` (cholesky, lu, qr, eigh, svd, triangular_solve).

Collected by ``primitive_specs``. Inputs are well conditioned (SPD for cholesky, well separated
eigenvalues and singular values for eigh and svd, a dominant diagonal for triangular solves),
so finite differences are meaningful. Factors that are unique only up to signs (eigenvectors,
singular vectors, the columns of Q) are compared through functions of them that do not depend
on the signs: ``sum_i c_i v_i v_i^H`` for fixed distinct ``c_i``, or sign-normalised columns.
Every spec comes twice: for real dtypes and for complex ones (Hermitian, unitary factors).
"""

from __future__ import annotations

import numpy as np
from primitive_specs import Spec

import ember.numpy as enp
from ember import dtypes
from ember import ops as lax

REALS = (dtypes.float32, dtypes.float64)
COMPLEX = (dtypes.complex64, dtypes.complex128)
STACKS = ((3, 3), (2, 4, 4))


# --- input generators ------------------------------------------------------------------------

def _uniform(rng, dt, shape, lo=-2.0, hi=2.0):
    """Uniform in [lo, hi); for a complex dtype, both components."""
    if dtypes.is_complex(np.dtype(dt)):
        return rng.uniform(lo, hi, size=shape) + 1j * rng.uniform(lo, hi, size=shape)
    return rng.uniform(lo, hi, size=shape)


def _adjoint(x):
    return np.conj(np.swapaxes(x, -1, -2))


def _general(rng, dt, shape):
    return _uniform(rng, dt, shape).astype(dt)


def _spd(rng, dt, shape):
    a = _uniform(rng, dt, shape, -1, 1)
    return (a @ _adjoint(a) + 2 * shape[-1] * np.eye(shape[-1])).astype(dt)


def _triangular(rng, dt, shape):
    """Off-diagonal entries in [-1, 1], diagonal entries of magnitude 2 to 3."""
    n = shape[-1]
    a = _uniform(rng, dt, shape, -1, 1)
    diag = rng.uniform(2, 3, size=shape[:-1]) * rng.choice([-1, 1], size=shape[:-1])
    return (a * (1 - np.eye(n)) + diag[..., None] * np.eye(n)).astype(dt)


def _rhs(rng, dt, shape):
    return _uniform(rng, dt, (*shape[:-1], 2)).astype(dt)


def _unitary(rng, dt, shape):
    q, r = np.linalg.qr(_uniform(rng, dt, shape))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1).real)[..., None, :]


def _distinct_spectrum(rng, dt, shape):
    """Hermitian, eigenvalues at least 0.5 apart."""
    q = _unitary(rng, dt, shape)
    w = np.arange(shape[-1]) - 1.5 + rng.uniform(-0.25, 0.25, size=shape[:-1])
    return ((q * w[..., None, :]) @ _adjoint(q)).astype(dt)


def _diagonalizable(rng, dt, shape):
    """``S diag(w) S^-1`` with a well-conditioned ``S`` and eigenvalues at least 0.5 apart (real
    for a real dtype, with imaginary parts for a complex one)."""
    n = shape[-1]
    s = np.eye(n) + 0.3 * _uniform(rng, dt, shape, -1, 1)
    w = _uniform(rng, dt, shape[:-1], -0.2, 0.2) + np.arange(n) - 1.5
    return ((s * w[..., None, :]) @ np.linalg.inv(s)).astype(dt)


def _distinct_singular_values(rng, dt, shape):
    """Singular values 1, 2, 3... (plus noise), so gaps and the smallest are far from zero."""
    *batch, m, n = shape
    k = min(m, n)
    u = _unitary(rng, dt, (*batch, m, m))[..., :k]
    v = _unitary(rng, dt, (*batch, n, n))[..., :k]
    s = np.arange(1, k + 1) + rng.uniform(-0.25, 0.25, size=(*batch, k))
    return ((u * s[..., None, :]) @ _adjoint(v)).astype(dt)


# --- sign-free views of the factors ----------------------------------------------------------

def _weights(n, dtype):
    return np.arange(1, n + 1).astype(dtype)


def _weighted_outer(a, bh, xp):
    """``sum_i c_i a_i bh_i``: columns ``a_i`` of ``a`` times rows ``bh_i`` of ``bh``."""
    return (a * xp.asarray(_weights(a.shape[-1], a.dtype))) @ bh


def _enp_adjoint(x):
    return enp.conj(enp.matrix_transpose(x))


def _sym(x):
    return (x + _adjoint(x)) / 2


def _positive_diagonal(q, r, xp):
    """Flip signs so that R has a non-negative diagonal (the unique QR of a full-rank x; R's
    diagonal is real also for complex x)."""
    k = min(r.shape[-2], r.shape[-1])
    diag = xp.real(xp.diagonal(r[..., :k, :k], axis1=-2, axis2=-1))
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

def _triangular_solve_specs(dts, tag) -> list[Spec]:
    specs = []
    for lower in (True, False):
        for transpose_a in (False, True):
            def ref(a, b, lower=lower, transpose_a=transpose_a):
                tri = np.tril(a) if lower else np.triu(a)
                return np.linalg.solve(np.swapaxes(tri, -1, -2) if transpose_a else tri, b)

            specs.append(Spec(
                "triangular_solve",
                lambda a, b, lo=lower, t=transpose_a: lax.triangular_solve(a, b, lo, t), ref,
                [_triangular, _rhs], dts, STACKS, diff=(0, 1),
                id=f"triangular_solve-{'lower' if lower else 'upper'}{'-t' * transpose_a}{tag}"))
    return specs


def _eigh_fn(x):
    w, v = lax.eigh(x)
    return [w, _weighted_outer(v, _enp_adjoint(v), enp)]


def _eigh_ref(x):
    w, v = np.linalg.eigh(_sym(x))
    return [w, _weighted_outer(v, _adjoint(v), np)]


def _eig_fn(x):
    w, v = lax.eig(x)
    return [w, _weighted_outer(v, enp.linalg.inv(v), enp), enp.abs(v)]


def _eig_ref(x):
    w, v = np.linalg.eig(x)
    out = dtypes.complex_dtype(x.dtype)
    w, v = w.astype(out), v.astype(out)
    return [w, _weighted_outer(v, np.linalg.inv(v), np), np.abs(v)]


def _svd_fn(x, full):
    u, s, vh = lax.svd(x, full)
    k = s.shape[-1]
    return [s, _weighted_outer(u[..., :k], vh[..., :k, :], enp)]


def _svd_ref(x, full):
    u, s, vh = np.linalg.svd(x, full_matrices=full)
    k = s.shape[-1]
    return [s, _weighted_outer(u[..., :k], vh[..., :k, :], np)]


def _factorisation_specs(dts, tag) -> list[Spec]:
    specs = [
        Spec("cholesky", lax.cholesky, lambda x: np.linalg.cholesky(_sym(x)), [_spd], dts,
             STACKS, diff=(0,), id=f"cholesky{tag}"),
        Spec("lu", lambda x: _lu_product(*lax.lu(x), enp), lambda x: x, [_general], dts,
             STACKS, diff=(0,), id=f"lu{tag}"),
        Spec("det", lax.det, np.linalg.det, [_general], dts, ((3, 3), (2, 4, 4), (1, 1), (0, 0)),
             diff=(0,), id=f"det{tag}"),
        Spec("eigh", _eigh_fn, _eigh_ref, [_distinct_spectrum], dts, STACKS, diff=(0,),
             id=f"eigh{tag}"),
        # Eigenvectors are unique up to a phase: compare sum_i c_i v_i w_i^T (w_i the rows of
        # V^-1) and |V|, which also checks that the derivative keeps each |v_i| = 1.
        Spec("eig", _eig_fn, _eig_ref, [_diagonalizable], dts, STACKS, diff=(0,),
             id=f"eig{tag}"),
    ]
    for full in (False, True):
        mode = "full" if full else "reduced"
        for shape in ((4, 3), (3, 5), (2, 3, 3)) if not full else ((3, 3), (4, 3)):
            specs.append(Spec(
                "svd", lambda x, full=full: _svd_fn(x, full),
                lambda x, full=full: _svd_ref(x, full),
                [_distinct_singular_values], dts, (shape,),
                diff=(0,) if not full or shape[-1] == shape[-2] else (),
                id=f"svd-{mode}-{shape}{tag}"))
        for shape in ((4, 3), (3, 5), (2, 3, 3)) if not full else ((4, 3), (3, 4)):
            specs.append(Spec(
                "qr", lambda x, full=full: list(_positive_diagonal(*lax.qr(x, full), enp)),
                lambda x, full=full: list(_positive_diagonal(
                    *np.linalg.qr(x, mode="complete" if full else "reduced"), np)),
                [_general], dts, (shape,), diff=(0,) if not full or shape[-1] >= shape[-2] else (),
                id=f"qr-{mode}-{shape}{tag}"))
    return specs


def specs() -> list[Spec]:
    return [spec for dts, tag in ((REALS, ""), (COMPLEX, "-complex"))
            for spec in _triangular_solve_specs(dts, tag) + _factorisation_specs(dts, tag)]
