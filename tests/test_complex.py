"""complex64/complex128: promotion, the NumPy functions against NumPy, what refuses complex,
gradients under JAX's convention, and Meta's Llama rotary embedding (a complex multiply)
ported from PyTorch.

The gradient convention: ``grad(f)(z)`` of a real-valued ``f`` is ``df/dx - i df/dy``
(``z = x + iy``), the conjugate of the steepest-ascent direction, as in JAX.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import ALL, COMPLEX, assert_close, check, rand

import ember
import ember.numpy as enp
from ember import dtypes, ops

RNG = np.random.default_rng(0)


def _z(shape=(3, 4), dtype=np.complex128, lo=-2.0, hi=2.0, seed=0):
    return rand(np.random.default_rng(seed), shape, dtype, lo, hi)


# --- dtypes and promotion --------------------------------------------------------------------

def _numpy_stand_in(dt):
    return np.float16 if dt == dtypes.bfloat16 else dt


@pytest.mark.parametrize("a,b", [(a, b) for a, b in itertools.product(ALL + COMPLEX, COMPLEX)],
                         ids=str)
def test_promotion_with_complex_matches_numpy(a, b):
    """Every dtype with each complex dtype (bfloat16 promotes as float16: bf16 + c64 -> c64)."""
    expected = np.result_type(_numpy_stand_in(a), b)
    assert enp.result_type(a, b) == expected == enp.result_type(b, a)
    out = enp.ones((2,), a) * enp.ones((2,), b)
    assert out.dtype == expected


@pytest.mark.parametrize("dt", ALL + COMPLEX, ids=str)
@pytest.mark.parametrize("scalar", [1j, -0.5 + 2j, complex(0, 0)], ids=repr)
def test_weak_complex_scalar_keeps_the_array_precision(dt, scalar):
    """``1j * float32_array -> complex64``; with integers NumPy's default complex128."""
    host = np.ones((3,), _numpy_stand_in(dt))
    expected = np.result_type(host, scalar)
    x = enp.ones((3,), dt)
    for fn in (lambda v: v * scalar, lambda v: scalar + v, ember.jit(lambda v: v - scalar)):
        assert fn(x).dtype == expected
    np.testing.assert_allclose(np.asarray(x * scalar), host.astype(expected) * scalar,
                               rtol=1e-6)


def test_python_complex_alone_and_with_other_scalars():
    assert enp.asarray(1j).dtype == np.complex128
    assert enp.result_type(1j, 1.5, 2) == np.complex128
    assert (enp.asarray(2.0) + 1j).dtype == np.complex128
    assert enp.complex64 is np.complex64 and enp.complex128 is np.complex128
    assert enp.dtype("complex64") == dtypes.complex64


def test_real_imag_conj_and_predicates():
    z = _z()
    x = enp.asarray(z)
    assert_close(x.real, z.real)
    assert_close(x.imag, z.imag)
    assert_close(x.conj(), np.conj(z))
    assert_close(enp.conjugate(x), np.conj(z))
    assert x.real.dtype == np.float64 and enp.asarray(z.astype(np.complex64)).imag.dtype == \
        np.float32
    r = enp.asarray(z.real)
    assert_close(r.real, z.real)
    assert_close(r.imag, np.zeros_like(z.real))
    assert_close(enp.conj(r), z.real)
    assert enp.iscomplexobj(x) and not enp.isrealobj(x)
    assert enp.isrealobj(r) and not enp.iscomplexobj(r)
    mixed = np.array([1 + 0j, 2j, 3.5])
    assert_close(enp.iscomplex(mixed), np.iscomplex(mixed))
    assert_close(enp.isreal(mixed), np.isreal(mixed))
    assert_close(enp.isreal(np.arange(3)), np.isreal(np.arange(3)))


# --- functions against NumPy -----------------------------------------------------------------

UNARY = {
    "exp": enp.exp, "expm1": enp.expm1, "log": enp.log, "log1p": enp.log1p, "log2": enp.log2,
    "log10": enp.log10, "sqrt": enp.sqrt, "square": enp.square, "reciprocal": enp.reciprocal,
    "sin": enp.sin, "cos": enp.cos, "tan": enp.tan, "arcsin": enp.arcsin,
    "arccos": enp.arccos, "arctan": enp.arctan, "sinh": enp.sinh, "cosh": enp.cosh,
    "tanh": enp.tanh, "arcsinh": enp.arcsinh, "arccosh": enp.arccosh, "arctanh": enp.arctanh,
    "negative": enp.negative, "positive": enp.positive, "absolute": enp.absolute,
    "sign": enp.sign, "angle": enp.angle, "real": enp.real, "imag": enp.imag,
    "conj": enp.conj, "rint": enp.rint, "isfinite": enp.isfinite, "isnan": enp.isnan,
    "isinf": enp.isinf, "sinc": enp.sinc, "exp2": enp.exp2,
}


@pytest.mark.parametrize("dt", COMPLEX, ids=str)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_functions_match_numpy(name, dt):
    z = _z(dtype=dt)
    check(UNARY[name], getattr(np, name), z)


@pytest.mark.parametrize("dt", COMPLEX, ids=str)
@pytest.mark.parametrize("name", ["add", "subtract", "multiply", "divide", "power", "equal",
                                  "not_equal", "float_power"])
def test_binary_functions_match_numpy(name, dt):
    a, b = _z(dtype=dt, seed=1), _z(dtype=dt, seed=2)
    check(getattr(enp, name), getattr(np, name), a, b)
    check(getattr(enp, name), getattr(np, name), a, b[0].real.astype(dtypes.real_dtype(dt)))


def test_special_values_follow_numpy():
    inf, nan = np.inf, np.nan
    z = np.array([complex(inf, 0), complex(0, -inf), complex(nan, 1), complex(1, nan),
                  complex(inf, nan), complex(nan, inf), 1 + 1j, 0j])
    for fn in ("isfinite", "isnan", "isinf"):
        check(getattr(enp, fn), getattr(np, fn), z)
    check(enp.nan_to_num, np.nan_to_num, z)
    check(lambda v: enp.angle(v, deg=True), lambda v: np.angle(v, deg=True), z[-2:])
    check(enp.angle, np.angle, np.array([-2.0, 0.0, 3.0]))  # real input: 0 or pi


@pytest.mark.parametrize("dt", COMPLEX, ids=str)
@pytest.mark.parametrize("name,kwargs", [
    ("sum", {}), ("sum", {"axis": 0}), ("prod", {"axis": 1}), ("mean", {}),
    ("mean", {"axis": 1}), ("var", {}), ("var", {"axis": 0, "ddof": 1}), ("std", {"axis": 1}),
    ("cumsum", {"axis": 1}), ("cumprod", {"axis": 0}), ("nansum", {}),
])
def test_reductions_match_numpy(name, kwargs, dt):
    z = _z(dtype=dt)
    check(lambda v: getattr(enp, name)(v, **kwargs), lambda v: getattr(np, name)(v, **kwargs),
          z, dtype=dt)
    if name in ("var", "std"):  # real results of the components' precision
        assert getattr(enp, name)(enp.asarray(z), **kwargs).dtype == dtypes.real_dtype(dt)


@pytest.mark.parametrize("dt", COMPLEX, ids=str)
def test_matmul_einsum_and_friends_match_numpy(dt):
    a, b = _z((2, 3, 4), dt, seed=1), _z((2, 4, 5), dt, seed=2)
    check(enp.matmul, np.matmul, a, b, dtype=dt)
    check(lambda x, y: enp.einsum("bij,bjk->bik", x, y), np.matmul, a, b, dtype=dt)
    check(lambda x, y: enp.tensordot(x, y, ([1, 2], [0, 1])),
          lambda x, y: np.tensordot(x, y, ([1, 2], [0, 1])), a, _z((3, 4, 5), dt, seed=3),
          dtype=dt)
    real = rand(RNG, (4, 5), dtypes.real_dtype(dt))
    check(enp.matmul, np.matmul, a[0], real, dtype=dt)


def test_round_and_astype():
    z = np.array([1.25 + 2.5j, -0.5 - 1.5j, 2.675 + 0j])
    check(enp.round, np.round, z)
    check(lambda v: enp.round(v, 1), lambda v: np.round(v, 1), z)
    x = enp.asarray(np.array([0.5, -2.0], np.float32))
    assert_close(x.astype(enp.complex64), np.array([0.5, -2.0], np.complex64))
    assert_close(enp.asarray(z).astype(enp.complex64), z.astype(np.complex64))
    assert_close(enp.asarray(np.array([0j, 1e-30j])).astype(bool), np.array([False, True]))
    b16 = enp.asarray(np.array([1.5, -2.0], ml_dtypes.bfloat16))
    assert_close(b16.astype(enp.complex64), np.array([1.5, -2.0], np.complex64))


# --- what complex numbers are refused for ----------------------------------------------------

_Z = np.array([1 + 1j, 2 - 1j])


@pytest.mark.parametrize("name,fn", [
    ("less", lambda z: z < z), ("greater_equal", lambda z: enp.greater_equal(z, z)),
    ("maximum", lambda z: enp.maximum(z, z)), ("minimum", lambda z: enp.minimum(z, 1)),
    ("clip", lambda z: enp.clip(z, 0, 1)), ("floor", enp.floor), ("ceil", enp.ceil),
    ("trunc", enp.trunc), ("remainder", lambda z: z % 2), ("floor_divide", lambda z: z // 2),
    ("fmod", lambda z: enp.fmod(z, z)), ("arctan2", lambda z: enp.arctan2(z, z)),
    ("hypot", lambda z: enp.hypot(z, z)), ("logaddexp", lambda z: enp.logaddexp(z, z)),
    ("copysign", lambda z: enp.copysign(z, z)), ("signbit", enp.signbit), ("cbrt", enp.cbrt),
    ("fabs", enp.fabs), ("deg2rad", enp.deg2rad), ("heaviside", lambda z: enp.heaviside(z, z)),
    ("nextafter", lambda z: enp.nextafter(z, z)), ("erf", lambda z: enp.special.erf(z)),
    ("expit", lambda z: enp.special.expit(z)), ("softmax", lambda z: enp.special.softmax(z)),
    ("max", enp.max), ("min", lambda z: enp.min(z, axis=0)),
    ("reduce_max", lambda z: ops.reduce_max(z, (0,))), ("argmax", enp.argmax),
    ("cummax", lambda z: ops.cummax(z, 0)),
    ("convert", lambda z: z.astype(enp.float32)),
])
def test_functions_undefined_on_complex_raise_naming_the_function(name, fn):
    z = enp.asarray(_Z)
    for runner in (fn, ember.jit(fn)):
        with pytest.raises(ember.DTypeError, match=name) as info:
            runner(z)
        assert "complex" in str(info.value) and "test_complex.py" in str(info.value)


def test_complex_values_written_into_real_arrays_raise():
    x = enp.zeros(3)
    with pytest.raises(ember.DTypeError, match="at: cannot cast Python complex") as info:
        x[0] = 1j
    assert "test_complex.py" in str(info.value)
    with pytest.raises(ember.DTypeError, match="cannot cast complex128 to float64"):
        x.at[1].set(enp.asarray(2j))
    z = enp.zeros(2, dtype=enp.complex64)
    z[0] = 1.5  # real into complex is fine
    assert_close(z, np.array([1.5, 0], np.complex64))


def test_grad_needs_a_real_output():
    with pytest.raises(ember.DTypeError, match="real floating-point scalar"):
        ember.grad(lambda z: enp.sum(z * z))(enp.asarray(_Z))


# --- gradients: JAX's convention -------------------------------------------------------------

def _fd_grad(f, z, eps=1e-6):
    """df/dx - i df/dy of a real-valued f, by central differences on each component."""
    g = np.zeros(z.shape, np.complex128)
    for i in np.ndindex(z.shape):
        d = np.zeros(z.shape, np.complex128)
        d[i] = eps
        fx = (float(f(enp.asarray(z + d))) - float(f(enp.asarray(z - d)))) / (2 * eps)
        fy = (float(f(enp.asarray(z + 1j * d))) - float(f(enp.asarray(z - 1j * d)))) / (2 * eps)
        g[i] = fx - 1j * fy
    return g


def test_grad_of_abs_squared_is_twice_the_conjugate():
    """JAX's documented example: grad(lambda z: abs(z) ** 2)(3 + 4j) == 6 - 8j."""
    g = ember.grad(lambda z: enp.abs(z) ** 2)(enp.asarray(3 + 4j))
    assert abs(complex(np.asarray(g)) - (6 - 8j)) < 1e-12
    z = _z()
    g = ember.grad(lambda v: enp.sum(enp.abs(v) ** 2))(enp.asarray(z))
    assert_close(g, 2 * np.conj(z))
    assert_close(g, _fd_grad(lambda v: enp.sum(enp.abs(v) ** 2), z), rtol=1e-6, atol=1e-8)


def test_grad_of_real_part_of_a_product_is_the_other_factor():
    z, w = _z(seed=1), _z(seed=2)

    def f(a, b):
        return enp.sum(enp.real(a * b))

    gz, gw = ember.grad(f, (0, 1))(enp.asarray(z), enp.asarray(w))
    assert_close(gz, w)
    assert_close(gw, z)
    assert_close(gz, _fd_grad(lambda v: f(v, enp.asarray(w)), z), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name,f", [
    ("matmul", lambda a, b: enp.sum(enp.abs(a @ b) ** 2)),
    ("imag-exp", lambda a, b: enp.sum(enp.imag(enp.exp(a) * enp.conj(b.T)))),
    ("angle", lambda a, b: enp.sum(enp.angle(a * b.T))),
    ("var", lambda a, b: enp.var(a @ b) + enp.std(a)),
    ("mean-log", lambda a, b: enp.real(enp.mean(enp.log(a @ b + 10)))),
    ("abs-sqrt-cumprod", lambda a, b: enp.sum(enp.abs(enp.sqrt(enp.cumprod(a, axis=1))))),
    ("complex-from-parts", lambda a, b: enp.sum(enp.abs(ops.complex(a.real, b.T.imag)))),
])
def test_grad_of_real_functions_matches_finite_differences(name, f):
    a, b = _z((3, 4), seed=3), _z((4, 3), seed=4)
    g = ember.grad(f)(enp.asarray(a), enp.asarray(b))
    assert_close(g, _fd_grad(lambda v: f(v, enp.asarray(b)), a), rtol=1e-5, atol=1e-7)
    assert_close(ember.jit(ember.grad(f))(enp.asarray(a), enp.asarray(b)), np.asarray(g))


def test_jvp_of_holomorphic_function_is_the_complex_derivative():
    z, t = _z(seed=5), _z(seed=6)
    out, tangent = ember.jvp(lambda v: enp.sin(v) * v, (enp.asarray(z),), (enp.asarray(t),))
    assert_close(out, np.sin(z) * z)
    assert_close(tangent, t * (np.cos(z) * z + np.sin(z)))


@pytest.mark.parametrize("name", ["exp", "log", "log1p", "expm1", "sqrt", "sin", "cos", "tan",
                                  "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
                                  "arcsinh", "arccosh", "arctanh", "reciprocal", "exp2"])
def test_holomorphic_derivatives_hold_over_the_whole_plane(name):
    """Points in all four quadrants (off the branch cuts), against NumPy's own function: the
    derivative must be that of NumPy's principal branch (for arccosh, 1/sqrt(z*z - 1) is not,
    where Re z < 0)."""
    z, t = _z((64,), lo=-2, hi=2, seed=11), _z((64,), seed=12)
    _, tangent = ember.jvp(getattr(enp, name), (enp.asarray(z),), (enp.asarray(t),))
    eps = 1e-7
    fd = (getattr(np, name)(z + eps * t) - getattr(np, name)(z - eps * t)) / (2 * eps)
    assert_close(tangent, fd, rtol=1e-6, atol=1e-6)


def test_vjp_of_holomorphic_function_does_not_conjugate():
    z, ct = _z(seed=7), _z(seed=8)
    out, vjp_fn = ember.vjp(enp.exp, enp.asarray(z))
    (g,) = vjp_fn(enp.asarray(ct))
    assert_close(g, ct * np.exp(z))


def test_grad_of_a_real_input_through_complex_intermediates_is_real():
    x = rand(RNG, (5,), np.float64)

    def f(v):
        return enp.sum(enp.abs(enp.exp(1j * v) * (v + 2j)) ** 2)

    g = ember.grad(f)(enp.asarray(x))
    assert g.dtype == np.float64
    assert_close(g, 2 * x)  # |exp(iv)|^2 |v + 2j|^2 = v^2 + 4


def _chain(v):
    c = v[0]
    for x in v[1:]:
        c = c * x + 0.5j
    return enp.abs(c) ** 2


def _chain_scan(v):
    c, ys = ember.lax.scan(lambda c, x: (c * x + 0.5j, enp.abs(c)), v[0], v[1:])
    return enp.abs(c) ** 2 + enp.sum(ys)


def _branches(v):
    return ember.lax.cond(enp.real(v[0]) > 0, lambda u: enp.sum(enp.abs(u * u)),
                          lambda u: enp.sum(enp.real(u) * enp.imag(u)), v)


@pytest.mark.parametrize("f", [_chain_scan, ember.checkpoint(_chain), _branches],
                         ids=["scan", "checkpoint", "cond"])
@pytest.mark.parametrize("seed", [13, 18])  # the first has Re z[0] > 0, the second < 0
def test_grad_through_control_flow_and_checkpoint_with_complex_values(f, seed):
    """Complex carries, residuals and branch outputs keep their tangents."""
    z = _z((4,), seed=seed)
    g = ember.grad(f)(enp.asarray(z))
    assert g.dtype == np.complex128
    assert_close(g, _fd_grad(f, z), rtol=1e-6, atol=1e-8)
    assert_close(ember.jit(ember.grad(f))(enp.asarray(z)), np.asarray(g))


def test_hessian_vector_product_through_complex_values():
    z, v = _z((5,), seed=14), _z((5,), seed=15)

    def f(u):
        return enp.sum(enp.abs(enp.sin(u)) ** 2)

    g = ember.grad(f)
    _, hvp = ember.jvp(g, (enp.asarray(z),), (enp.asarray(v),))
    eps = 1e-6
    fd = (np.asarray(g(enp.asarray(z + eps * v))) - np.asarray(g(enp.asarray(z - eps * v)))) / (
        2 * eps)
    assert_close(hvp, fd, rtol=1e-6, atol=1e-7)


def test_jit_matches_eager_and_prints_complex_types():
    z = _z(dtype=np.complex64)

    def f(v):
        return enp.sum(enp.abs(v @ v.T.conj()) + enp.real(v).sum() * 1j)

    assert_close(ember.jit(f)(enp.asarray(z)), np.asarray(f(enp.asarray(z))))
    text = str(ember.jit(f).lower(enp.asarray(z)))
    assert "c64[3,4]" in text.replace(" ", "") and "conj" in text


def test_vmap_over_complex_inputs():
    z = _z((4, 3))
    out = ember.vmap(lambda v: enp.abs(enp.sum(v * v.conj())))(enp.asarray(z))
    assert_close(out, np.abs(np.sum(z * np.conj(z), axis=1)))


# --- Meta's Llama rotary embedding, ported from PyTorch --------------------------------------

def _torch_precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def _torch_apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    shape = [d if i in (1, xq_.ndim - 1) else 1 for i, d in enumerate(xq_.shape)]
    freqs_cis = freqs_cis.view(*shape)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (enp.arange(0, dim, 2)[: (dim // 2)].astype(enp.float32) / dim))
    t = enp.arange(end, dtype=enp.float32)
    freqs = enp.outer(t, freqs)
    return enp.ones_like(freqs) * enp.exp(1j * freqs)  # torch.polar(ones, freqs)


def _view_as_complex(x):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return pairs[..., 0] + 1j * pairs[..., 1]


def _view_as_real(z):
    return enp.stack([z.real, z.imag], axis=-1)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_, xk_ = _view_as_complex(xq.astype(enp.float32)), _view_as_complex(xk.astype(enp.float32))
    shape = [d if i in (1, xq_.ndim - 1) else 1 for i, d in enumerate(xq_.shape)]
    freqs_cis = freqs_cis.reshape(shape)
    xq_out = _view_as_real(xq_ * freqs_cis).reshape(*xq.shape[:3], -1)
    xk_out = _view_as_real(xk_ * freqs_cis).reshape(*xk.shape[:3], -1)
    return xq_out.astype(xq.dtype), xk_out.astype(xk.dtype)


def test_llama_rotary_embedding_matches_pytorch():
    batch, seq, heads, head_dim = 2, 7, 3, 8
    rng = np.random.default_rng(9)
    xq = rng.normal(size=(batch, seq, heads, head_dim)).astype(np.float32)
    xk = rng.normal(size=(batch, seq, heads, head_dim)).astype(np.float32)
    ref_freqs = _torch_precompute_freqs_cis(head_dim, seq)
    freqs = precompute_freqs_cis(head_dim, seq)
    assert freqs.dtype == np.complex64
    assert_close(freqs, ref_freqs.numpy(), rtol=1e-5, atol=1e-6)

    tq, tk = torch.tensor(xq, requires_grad=True), torch.tensor(xk, requires_grad=True)
    ref_q, ref_k = _torch_apply_rotary_emb(tq, tk, ref_freqs)
    for fn in (apply_rotary_emb, ember.jit(apply_rotary_emb)):
        q, k = fn(enp.asarray(xq), enp.asarray(xk), freqs)
        assert_close(q, ref_q.detach().numpy(), rtol=1e-5, atol=1e-6)
        assert_close(k, ref_k.detach().numpy(), rtol=1e-5, atol=1e-6)

    # Gradients of a real loss with respect to the real inputs agree with torch's autograd.
    wq, wk = rng.normal(size=xq.shape).astype(np.float32), rng.normal(size=xk.shape).astype(
        np.float32)
    (ref_q * torch.tensor(wq)).sum().add((ref_k * torch.tensor(wk)).sum()).backward()

    def loss(q, k):
        oq, ok = apply_rotary_emb(q, k, freqs)
        return enp.sum(oq * wq) + enp.sum(ok * wk)

    gq, gk = ember.grad(loss, (0, 1))(enp.asarray(xq), enp.asarray(xk))
    assert_close(gq, tq.grad.numpy(), rtol=1e-5, atol=1e-5)
    assert_close(gk, tk.grad.numpy(), rtol=1e-5, atol=1e-5)
