"""Derivatives and batching of every primitive.

- forward mode (``ember.jvp``) against central finite differences, in float64 and, for
  primitives defined on complex numbers, complex128 with complex tangents;
- reverse mode (``ember.vjp``) against forward mode: ``<ct, J t> == <J^T ct, t>``, which with
  the first check ties the VJP to finite differences as well. The pairing is
  ``<u, v> = Re(sum(u * v))``, bilinear and not conjugated: JAX's convention, under which the
  transpose of a complex-linear map is its plain (non-conjugate) transpose;
- second derivatives for a few primitives (grad of grad, forward over reverse);
- ``ember.vmap`` of every primitive against a Python loop, for several ``in_axes`` mixes.

The first-order and vmap checks run eagerly (the default backend), and again on the compiled
cpu backend, many cases per program, against the same references with the same tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from helpers import assert_close, chunks, jit_batched, needs_cc
from primitive_specs import SPECS, Spec, cases, make_args

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


def _eager(arrays):
    return [enp.asarray(a) for a in arrays]


def _pair(u, v):
    """Re(sum(u * v)): the real bilinear pairing that transposes are adjoint for."""
    return float(np.real(np.sum(_wide(u) * _wide(v))))


@dataclass
class _Point:
    """One differentiable case: the spec's arguments, a tangent per differentiable argument, a
    cotangent and a loss weight per output (drawn from the eager outputs' shapes)."""
    spec: Spec
    args: list[np.ndarray]
    tangents: list[np.ndarray]
    cts: list[np.ndarray]
    weights: list[np.ndarray]

    @property
    def primals(self) -> list[np.ndarray]:
        return [self.args[i] for i in self.spec.diff]

    @property
    def what(self) -> str:
        return f"{self.spec.case_id} {[a.dtype.name for a in self.args]}"


def _setup(spec, dtype, shape, seed=0) -> _Point:
    rng = np.random.default_rng(seed)
    args = make_args(spec, rng, dtype, shape)
    tangents = [_normal(rng, args[i]) for i in spec.diff]
    outs = [np.asarray(o) for o in _as_list(spec.fn(*_eager(args)))]
    cts = [_normal(rng, o) if dtypes.is_inexact(o.dtype) else np.zeros(o.shape, o.dtype)
           for o in outs]
    weights = [_normal(rng, o.astype(_wide(o).dtype)) for o in outs]
    return _Point(spec, args, tangents, cts, weights)


def _finite_difference(f, primals, tangents, eps):
    plus = f(*[enp.asarray(p + eps * t) for p, t in zip(primals, tangents)])
    minus = f(*[enp.asarray(p - eps * t) for p, t in zip(primals, tangents)])
    return [(_wide(a) - _wide(b)) / (2 * eps) for a, b in zip(_as_list(plus), _as_list(minus))]


# Each check is a traceable computation (run eagerly, or batched into one jitted program on the
# cpu backend) and a comparison of its results with a reference, the same on both backends.

def _jvp_and_vjp(spec, args, tangents, cts):
    """Outputs and tangents (forward mode), outputs and gradients for ``cts`` (reverse mode)."""
    f = _restrict(spec, args)
    primals = [args[i] for i in spec.diff]
    out, t_out = ember.jvp(f, primals, tangents)
    out2, vjp_fn = ember.vjp(f, *primals)
    grads = vjp_fn(list(cts) if isinstance(out, list) else cts[0])
    return _as_list(out), _as_list(t_out), _as_list(out2), list(grads)


def _check_jvp(point, out, t_out):
    """Tangents against central finite differences of the eager function."""
    for o, t in zip(out, t_out):
        assert t.shape == o.shape and t.dtype == o.dtype, point.what
    if point.spec.case_id in _NO_FINITE_DIFFERENCES:
        return
    low_precision = any(v.dtype not in (dtypes.float64, dtypes.complex128)
                        for v in out + point.primals)
    eps = 1e-3 if low_precision else 1e-6
    expected = _finite_difference(_restrict(point.spec, point.args), point.primals,
                                  point.tangents, eps)
    for o, t, e in zip(out, t_out, expected):
        if dtypes.is_inexact(o.dtype):
            np.testing.assert_allclose(_wide(t), e, rtol=1e-3 if low_precision else 1e-6,
                                       atol=1e-6, err_msg=point.what)


def _check_vjp(point, out, t_out, out2, grads):
    """The VJP is the transpose of the JVP: ``<ct, J t> == <J^T ct, t>``."""
    assert_close(out2, [np.asarray(o) for o in out], err_msg=point.what)
    assert len(grads) == len(point.primals), point.what
    for g, p in zip(grads, point.primals):
        assert g.shape == p.shape and g.dtype == p.dtype, point.what
    lhs = sum(_pair(c, t) for c, t in zip(point.cts, t_out))
    rhs = sum(_pair(g, t) for g, t in zip(grads, point.tangents))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-6, atol=1e-8, err_msg=point.what)


def _loss_grads(spec, args, weights):
    """Gradients of a real scalar that weighs every inexact output."""
    f = _restrict(spec, args)

    def loss(*ps):
        total = enp.asarray(0.0)
        for o, w in zip(_as_list(f(*ps)), weights):
            if dtypes.is_inexact(o.dtype):
                wide = o.astype(enp.complex128 if enp.iscomplexobj(o) else enp.float64)
                total = total + enp.sum(enp.real(wide * w))
        return total

    return ember.grad(loss, tuple(range(len(spec.diff))))(*[args[i] for i in spec.diff])


@pytest.mark.parametrize("spec,dtype,shape", _diff_cases())
def test_jvp_matches_finite_differences(spec, dtype, shape):
    point = _setup(spec, dtype, shape)
    out, t_out, _, _ = _jvp_and_vjp(spec, _eager(point.args), _eager(point.tangents),
                                    _eager(point.cts))
    _check_jvp(point, out, t_out)


@pytest.mark.parametrize("spec,dtype,shape", _diff_cases())
def test_vjp_is_the_transpose_of_jvp(spec, dtype, shape):
    point = _setup(spec, dtype, shape)
    _check_vjp(point, *_jvp_and_vjp(spec, _eager(point.args), _eager(point.tangents),
                                    _eager(point.cts)))


@pytest.mark.parametrize("spec,dtype,shape", _diff_cases())
def test_grad_under_jit_matches_eager(spec, dtype, shape):
    point = _setup(spec, dtype, shape)
    eager = _loss_grads(spec, _eager(point.args), _eager(point.weights))
    # The NumPy backend per case; the cpu backend runs the same cases batched (below).
    jitted = ember.jit(lambda a, w: _loss_grads(spec, a, w), backend="numpy")(point.args,
                                                                            point.weights)
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


def _vmap_setup(spec, dtype, shape, axes):
    """``in_axes``, the batched arguments, and the stacked results of a Python loop."""
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
    return tuple(in_axes), batched, expected


@pytest.mark.parametrize("spec,dtype,shape,axes", _vmap_cases())
def test_vmap_matches_loop(spec, dtype, shape, axes):
    in_axes, batched, expected = _vmap_setup(spec, dtype, shape, axes)
    vf = ember.vmap(spec.fn, in_axes=in_axes)
    for runner in (vf, ember.jit(vf, backend="numpy")):  # cpu: batched, below
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


# --- the same checks on the cpu backend --------------------------------------------------------
# Cases are batched into one jitted program per chunk: one trace and one C compile for all of
# them (a program per case would start the compiler thousands of times). Results are compared
# with the same references and tolerances as above.

CHUNK = 150


def _chunk_ids(items):
    return range(len(chunks(items, CHUNK)))


_DIFF = [p.values for p in _diff_cases()]
_VMAP = [p.values for p in _vmap_cases()]


@needs_cc
@pytest.mark.parametrize("chunk", _chunk_ids(_DIFF))
def test_derivatives_on_the_cpu_backend(chunk):
    points = [_setup(*case) for case in chunks(_DIFF, CHUNK)[chunk]]

    def derivatives(spec):
        return lambda args, tangents, cts, weights: (
            _jvp_and_vjp(spec, args, tangents, cts), _loss_grads(spec, args, weights))

    results = jit_batched([(derivatives(p.spec), (p.args, p.tangents, p.cts, p.weights))
                           for p in points])
    for p, ((out, t_out, out2, grads), loss_grads) in zip(points, results):
        _check_jvp(p, out, t_out)
        _check_vjp(p, out, t_out, out2, grads)
        eager = _loss_grads(p.spec, _eager(p.args), _eager(p.weights))
        assert_close(loss_grads, [np.asarray(g) for g in eager], err_msg=p.what)


@needs_cc
@pytest.mark.parametrize("chunk", _chunk_ids(_VMAP))
def test_vmap_on_the_cpu_backend(chunk):
    chosen = chunks(_VMAP, CHUNK)[chunk]
    setups = [_vmap_setup(*case) for case in chosen]
    results = jit_batched([(ember.vmap(spec.fn, in_axes=in_axes), batched)
                           for (spec, *_), (in_axes, batched, _) in zip(chosen, setups)])
    for (spec, dtype, shape, axes), (_, _, expected), got in zip(chosen, setups, results):
        assert_close(_as_list(got), expected, err_msg=f"{spec.case_id}-{dtype}-{shape}-{axes}")
