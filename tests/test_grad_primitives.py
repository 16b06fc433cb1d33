"""Derivatives and batching of every primitive.

- forward mode (``ember.jvp``) against central finite differences, in float64 and, for
  primitives defined on complex numbers, complex128 with complex tangents;
- reverse mode (``ember.vjp``) against forward mode: ``<ct, J t> == <J^T ct, t>``, which with
  the first check ties the VJP to finite differences as well. The pairing is
  ``<u, v> = Re(sum(u * v))``, bilinear and not conjugated: JAX's convention, under which the
  transpose of a complex-linear map is its plain (non-conjugate) transpose;
- second derivatives for a few primitives (grad of grad, forward over reverse);
- ``ember.vmap`` of every primitive against a Python loop, for several ``in_axes`` mixes.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close
from primitive_specs import SPECS, cases, make_args

import ember
import ember.numpy as enp
from ember import dtypes
from ember import ops as lax

# Finite differences are meaningless at kinks; these cases sit on one by construction.
_NO_FINITE_DIFFERENCES = {"reduce_max-ties"}


def _diff_cases():
    return [p for p in cases(lambda s: bool(s.diff), all_dtypes=False)
            if dtypes.is_inexact(p.values[1])]


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _restrict(spec, args):
    """``spec.fn`` as a function of its differentiable arguments only."""
    def f(*diff_args):
        full = [enp.asarray(a) for a in args]
        for i, v in zip(spec.diff, diff_args):
            full[i] = v
        return spec.fn(*full)
    return f


def _normal(rng, like):
    """A random tangent or cotangent for ``like``: complex ones move in both components."""
    if dtypes.is_complex(like.dtype):
        return (rng.normal(size=like.shape) + 1j * rng.normal(size=like.shape)).astype(like.dtype)
    return rng.normal(size=like.shape).astype(like.dtype)


def _wide(x):
    """float64 or complex128, for comparisons."""
    x = np.asarray(x)
    return x.astype(np.complex128 if dtypes.is_complex(x.dtype) else np.float64)


def _pair(u, v):
    """Re(sum(u * v)): the real bilinear pairing that transposes are adjoint for."""
    return float(np.real(np.sum(_wide(u) * _wide(v))))


def _setup(spec, dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    args = make_args(spec, rng, dtype, shape)
    primals = [args[i] for i in spec.diff]
    tangents = [_normal(rng, p) for p in primals]
    return rng, args, primals, tangents


def _finite_difference(f, primals, tangents, eps):
    plus = f(*[enp.asarray(p + eps * t) for p, t in zip(primals, tangents)])
    minus = f(*[enp.asarray(p - eps * t) for p, t in zip(primals, tangents)])
    return [(_wide(a) - _wide(b)) / (2 * eps) for a, b in zip(_as_list(plus), _as_list(minus))]


@pytest.mark.parametrize("spec,dtype,shape", _diff_cases())
def test_jvp_matches_finite_differences(spec, dtype, shape):
    if spec.case_id in _NO_FINITE_DIFFERENCES:
        pytest.skip("kink")
    _, args, primals, tangents = _setup(spec, dtype, shape)
    f = _restrict(spec, args)
    out, t_out = ember.jvp(f, [enp.asarray(p) for p in primals],
                           [enp.asarray(t) for t in tangents])
    for o, t in zip(_as_list(out), _as_list(t_out)):
        assert t.shape == o.shape and t.dtype == o.dtype
    low_precision = any(v.dtype not in (dtypes.float64, dtypes.complex128)
                        for v in _as_list(out) + primals)
    eps = 1e-3 if low_precision else 1e-6
    expected = _finite_difference(f, primals, tangents, eps)
    for o, t, e in zip(_as_list(out), _as_list(t_out), expected):
        if dtypes.is_inexact(o.dtype):
            np.testing.assert_allclose(_wide(t), e, rtol=1e-3 if low_precision else 1e-6,
                                       atol=1e-6)


@pytest.mark.parametrize("spec,dtype,shape", _diff_cases())
def test_vjp_is_the_transpose_of_jvp(spec, dtype, shape):
    rng, args, primals, tangents = _setup(spec, dtype, shape)
    f = _restrict(spec, args)
    ember_primals = [enp.asarray(p) for p in primals]
    out, t_out = ember.jvp(f, ember_primals, [enp.asarray(t) for t in tangents])
    out2, vjp_fn = ember.vjp(f, *ember_primals)
    assert_close(out2, [np.asarray(o) for o in out] if isinstance(out, list) else out)
    cts = [_normal(rng, np.asarray(o)) if dtypes.is_inexact(o.dtype)
           else np.zeros(o.shape, o.dtype) for o in _as_list(out)]
    grads = vjp_fn([enp.asarray(c) for c in cts] if isinstance(out, list) else
                   enp.asarray(cts[0]))
    assert len(grads) == len(primals)
    for g, p in zip(grads, primals):
        assert g.shape == p.shape and g.dtype == p.dtype
    lhs = sum(_pair(c, t) for c, t in zip(cts, _as_list(t_out)))
    rhs = sum(_pair(g, t) for g, t in zip(grads, tangents))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("spec,dtype,shape", _diff_cases())
def test_grad_under_jit_matches_eager(spec, dtype, shape):
    rng, args, primals, _ = _setup(spec, dtype, shape)
    f = _restrict(spec, args)
    outs = _as_list(f(*[enp.asarray(p) for p in primals]))
    weights = [_normal(rng, np.asarray(o).astype(_wide(o).dtype)) for o in outs]

    def loss(*ps):
        total = enp.asarray(0.0)
        for o, w in zip(_as_list(f(*ps)), weights):
            if dtypes.is_inexact(o.dtype):
                wide = o.astype(enp.complex128 if enp.iscomplexobj(o) else enp.float64)
                total = total + enp.sum(enp.real(wide * w))
        return total

    argnums = tuple(range(len(primals)))
    eager = ember.grad(loss, argnums)(*[enp.asarray(p) for p in primals])
    jitted = ember.jit(ember.grad(loss, argnums))(*[enp.asarray(p) for p in primals])
    assert_close(jitted, [np.asarray(g) for g in eager])


# --- second order ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,fn,second", [
    ("sin", enp.sin, lambda x: -np.sin(x)),
    ("exp", enp.exp, np.exp),
    ("tanh", enp.tanh, lambda x: -2 * np.tanh(x) * (1 - np.tanh(x) ** 2)),
    ("logistic", lambda x: lax.logistic(x),
     lambda x: (s := 1 / (1 + np.exp(-x))) * (1 - s) * (1 - 2 * s)),
    ("log", enp.log, lambda x: -1 / x ** 2),
    ("sqrt", enp.sqrt, lambda x: -0.25 * x ** -1.5),
    ("pow3", lambda x: x ** 3.0, lambda x: 6 * x),
    ("erf", lambda x: lax.erf(x), lambda x: -4 * x / np.sqrt(np.pi) * np.exp(-x * x)),
    ("div", lambda x: 1.0 / x, lambda x: 2 / x ** 3),
    ("cumprod", lambda x: enp.cumprod(enp.stack([x, x, 2.0 * x]))[-1], lambda x: 12 * x),
])
def test_grad_of_grad(name, fn, second):
    x = np.array([0.3, 0.7, 1.9])
    g2 = ember.vmap(ember.grad(ember.grad(fn)))(enp.asarray(x))
    np.testing.assert_allclose(g2, second(x), rtol=1e-6, atol=1e-9)


def test_forward_over_reverse_hessian_vector_product():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 4))
    x, v = rng.normal(size=4), rng.normal(size=4)

    def f(x):
        y = enp.tanh(enp.asarray(a) @ x)
        return enp.sum(y * y) + enp.max(x) * enp.prod(x)

    _, hvp = ember.jvp(ember.grad(f), (enp.asarray(x),), (enp.asarray(v),))
    eps = 1e-5
    g = ember.grad(f)
    fd = (np.asarray(g(enp.asarray(x + eps * v))) - np.asarray(g(enp.asarray(x - eps * v)))) \
        / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=1e-5, atol=1e-7)


# --- vmap ------------------------------------------------------------------------------------

def _vmap_cases():
    out = []
    for p in cases(lambda s: s.vmap and bool(s.args), all_dtypes=False):
        spec, _, shape = p.values
        n = len(spec.args)
        variants = {"all0": [0] * n, "last": ["last"] * n}
        if n > 1:
            variants["first-only"] = [0] + [None] * (n - 1)
            variants["rest-axis1"] = [None] + [1] * (n - 1)
        for label, axes in variants.items():
            out.append(pytest.param(*p.values, axes, id=f"{p.id}-{label}"))
    return out


@pytest.mark.parametrize("spec,dtype,shape,axes", _vmap_cases())
def test_vmap_matches_loop(spec, dtype, shape, axes):
    size = 3
    per_example = [make_args(spec, np.random.default_rng(b), dtype, shape) for b in range(size)]
    in_axes = []
    for i, ax in enumerate(axes):
        nd = per_example[0][i].ndim
        if ax == "last":
            ax = -1
        elif ax == 1 and nd == 0:
            ax = 0
        in_axes.append(ax)
        if ax is None:
            for ex in per_example[1:]:
                ex[i] = per_example[0][i]
    batched = []
    for i, ax in enumerate(in_axes):
        if ax is None:
            batched.append(enp.asarray(per_example[0][i]))
        else:
            stacked = np.stack([ex[i] for ex in per_example], 0)
            batched.append(enp.asarray(np.moveaxis(stacked, 0, ax)))
    loop = [_as_list(spec.fn(*[enp.asarray(a) for a in ex])) for ex in per_example]
    expected = [np.stack([np.asarray(r[k]) for r in loop], 0) for k in range(len(loop[0]))]
    vf = ember.vmap(spec.fn, in_axes=tuple(in_axes))
    for runner in (vf, ember.jit(vf)):
        got = _as_list(runner(*batched))
        assert_close(got, expected)


def test_every_primitive_is_vmapped():
    names = {p.values[0].name for p in _vmap_cases()}
    expected = {s.name for s in SPECS if s.args}
    assert names == expected, expected - names


def test_vmap_of_grad_matches_per_example_gradients():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(3, 2))
    xs = rng.normal(size=(5, 3))

    def loss(w, x):
        return enp.sum(enp.tanh(x @ w) ** 2)

    per = ember.vmap(ember.grad(loss), in_axes=(None, 0))(enp.asarray(w), enp.asarray(xs))
    for i in range(5):
        np.testing.assert_allclose(per[i], ember.grad(loss)(enp.asarray(w), enp.asarray(xs[i])),
                                   rtol=1e-12)
