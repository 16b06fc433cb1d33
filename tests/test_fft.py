"""``ember.numpy.fft`` against ``numpy.fft``: values, dtypes, every norm, n/axis/s/axes, errors;
gradients (complex tangents and cotangents, JAX's convention) against finite differences;
``jit`` and ``vmap`` against eager loops.

The primitive itself is covered by the spec table (``specs_fft.py``); these tests exercise the
user-level functions, which compose it with padding, slicing, transposes and scaling.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, check, numeric_grad
from hypothesis import given, settings
from hypothesis import strategies as hst

import ember
import ember.numpy as enp
from ember import dtypes
from ember import ops as lax
from ember.numpy import fft as efft

NORMS = ("backward", "ortho", "forward")
# float32 results are compared with NumPy's float32 transforms: both round differently.
_TOL = {np.complex64: (1e-5, 1e-5), np.float32: (1e-5, 1e-5), np.complex128: (1e-12, 1e-12),
        np.float64: (1e-12, 1e-12)}


def _signal(rng, shape, dtype):
    x = rng.uniform(-2, 2, size=shape)
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.uniform(-2, 2, size=shape)
    return x.astype(dtype)


def _check(fn, ref, x, **kw):
    expected = ref(x, **kw)
    rtol, atol = _TOL[expected.dtype.type]
    check(lambda a: fn(a, **kw), lambda a: expected, x, rtol=rtol, atol=atol)


# --- values against numpy.fft ----------------------------------------------------------------

ONE_D = [  # (function, input is complex, kwargs)
    ("fft", True, {}), ("fft", True, {"n": 7}), ("fft", True, {"n": 3, "axis": 0}),
    ("ifft", True, {}), ("ifft", True, {"n": 9, "axis": -2}), ("ifft", True, {"n": 2}),
    ("rfft", False, {}), ("rfft", False, {"n": 7}), ("rfft", False, {"n": 4, "axis": 0}),
    ("irfft", True, {}), ("irfft", True, {"n": 7}), ("irfft", True, {"n": 12, "axis": 0}),
    ("irfft", True, {"n": 1}),
    ("hfft", True, {}), ("hfft", True, {"n": 5}), ("hfft", True, {"n": 10, "axis": 0}),
    ("ihfft", False, {}), ("ihfft", False, {"n": 5}), ("ihfft", False, {"n": 8, "axis": 0}),
]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name,is_complex,kw", ONE_D,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ONE_D)])
@pytest.mark.parametrize("precision", ["single", "double"])
def test_one_dimensional_transforms_match_numpy(name, is_complex, kw, norm, precision):
    dtype = {("single", True): np.complex64, ("single", False): np.float32,
             ("double", True): np.complex128, ("double", False): np.float64}[
        (precision, is_complex)]
    x = _signal(np.random.default_rng(0), (4, 6), dtype)
    _check(getattr(efft, name), getattr(np.fft, name), x, norm=norm, **kw)


N_D = [  # (function, input is complex, shape, kwargs)
    ("fftn", True, (3, 4, 5), {}),
    ("fftn", True, (3, 4, 5), {"axes": (0, 2)}),
    ("fftn", True, (3, 4, 5), {"s": (6, 2), "axes": (2, 0)}),
    ("fftn", True, (3, 4, 5), {"s": (-1, 3), "axes": (1, 2)}),
    ("ifftn", True, (3, 4, 5), {}),
    ("ifftn", True, (3, 4, 5), {"s": (5, 5), "axes": (-1, 0)}),
    ("rfftn", False, (3, 4, 6), {}),
    ("rfftn", False, (3, 4, 6), {"axes": (2, 0)}),
    ("rfftn", False, (3, 4, 6), {"s": (5, 3), "axes": (0, 1)}),
    ("irfftn", True, (3, 4, 5), {}),
    ("irfftn", True, (3, 4, 5), {"axes": (0, 2)}),
    ("irfftn", True, (3, 4, 5), {"s": (4, 7), "axes": (2, 1)}),
    ("irfftn", True, (3, 4, 5), {"s": (2, 3, 6), "axes": (1, 2, 0)}),
]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name,is_complex,shape,kw", N_D,
                         ids=[f"{n}-{i}" for i, (n, _, _, _) in enumerate(N_D)])
def test_n_dimensional_transforms_match_numpy(name, is_complex, shape, kw, norm):
    x = _signal(np.random.default_rng(1), shape, np.complex128 if is_complex else np.float64)
    _check(getattr(efft, name), getattr(np.fft, name), x, norm=norm, **kw)


_COMPLEX_INPUT = {"fft": True, "ifft": True, "rfft": False, "irfft": True, "hfft": True,
                  "ihfft": False, "fftn": True, "ifftn": True, "rfftn": False, "irfftn": True}


@settings(max_examples=60, deadline=None)
@given(data=hst.data(), name=hst.sampled_from(sorted(_COMPLEX_INPUT)),
       norm=hst.sampled_from(NORMS), double=hst.booleans())
def test_random_shapes_lengths_and_axes_match_numpy(data, name, norm, double):
    shape = data.draw(hst.lists(hst.integers(1, 5), min_size=1, max_size=3).map(tuple))
    nd = len(shape)
    kw: dict = {"norm": norm}
    if name.endswith("n"):
        axes = data.draw(hst.none() | hst.permutations(range(nd)).flatmap(
            lambda p: hst.integers(1, nd).map(lambda k: p[:k])))
        if axes is not None:
            kw["axes"] = axes
            if data.draw(hst.booleans()):
                kw["s"] = [data.draw(hst.integers(1, 2 * shape[a] + 1)) for a in axes]
    else:
        kw["axis"] = data.draw(hst.integers(-nd, nd - 1))
        kw["n"] = data.draw(hst.none() | hst.integers(1, 9))
    dtype = {(True, True): np.complex128, (True, False): np.complex64,
             (False, True): np.float64, (False, False): np.float32}[
        (_COMPLEX_INPUT[name], double)]
    x = _signal(np.random.default_rng(data.draw(hst.integers(0, 2**16))), shape, dtype)
    try:
        expected = getattr(np.fft, name)(x, **kw)
    except ValueError:  # irfft of a length-1 axis without n: no data points
        with pytest.raises(ember.errors.EmberValueError, match="invalid number of data points"):
            getattr(efft, name)(enp.asarray(x), **kw)
        return
    rtol, atol = (1e-10, 1e-10) if double else (1e-4, 1e-4)
    assert_close(getattr(efft, name)(enp.asarray(x), **kw), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype,complex_result", [
    (np.float16, np.complex64), (np.float32, np.complex64), (np.float64, np.complex128),
    (np.int32, np.complex128), (np.uint8, np.complex128), (np.bool_, np.complex128),
    (dtypes.bfloat16, np.complex64),
])
def test_real_and_integer_inputs_compute_in_single_or_double_precision(dtype, complex_result):
    """As NumPy, except that half-precision irfft/hfft results are float32 (NumPy's float16)."""
    x = np.random.default_rng(2).uniform(0, 3, size=(2, 6)).astype(dtype)
    real_result = np.float32 if complex_result == np.complex64 else np.float64
    high = x.astype(np.float32 if complex_result == np.complex64 else np.float64)
    for name, out in (("fft", complex_result), ("ifft", complex_result),
                      ("rfft", complex_result), ("irfft", real_result),
                      ("hfft", real_result), ("ihfft", complex_result)):
        got = getattr(efft, name)(enp.asarray(x))
        assert got.dtype == out, name
        assert_close(got, getattr(np.fft, name)(high).astype(out), rtol=1e-5, atol=1e-5)


def test_round_trips_recover_the_signal():
    rng = np.random.default_rng(3)
    z = enp.asarray(_signal(rng, (3, 8), np.complex128))
    r = enp.asarray(_signal(rng, (3, 7), np.float64))
    close = lambda a, b: assert_close(a, np.asarray(b), rtol=1e-12, atol=1e-12)  # noqa: E731
    for norm in NORMS:
        close(efft.ifft(efft.fft(z, norm=norm), norm=norm), z)
        close(efft.ifftn(efft.fftn(z, norm=norm), norm=norm), z)
        close(efft.irfft(efft.rfft(r, norm=norm), n=7, norm=norm), r)
        close(efft.irfftn(efft.rfftn(r, norm=norm), s=(3, 7), axes=(0, 1), norm=norm), r)
        close(efft.hfft(efft.ihfft(r, norm=norm), n=7, norm=norm), r)


def test_s_without_axes_transforms_the_last_axes():
    """As NumPy (which deprecates it) and JAX do; the standard asks for both or neither."""
    x = _signal(np.random.default_rng(11), (3, 4, 5), np.complex128)
    _check(lambda a, **kw: efft.fftn(a, s=(2, 6), **kw),
           lambda a, **kw: np.fft.fftn(a, s=(2, 6), axes=(1, 2), **kw), x)
    _check(lambda a, **kw: efft.irfftn(a, s=(3, 4), **kw),
           lambda a, **kw: np.fft.irfftn(a, s=(3, 4), axes=(1, 2), **kw), x)


def test_numpy_positional_arguments_and_norm_none_work():
    """The standard's keyword arguments may also be given by position, as NumPy code does; so
    ``np.fft.*`` on Ember arrays (which dispatches here) takes NumPy's calls unchanged."""
    x = _signal(np.random.default_rng(12), (3, 6), np.float64)
    a = enp.asarray(x)
    assert_close(efft.rfft(a, 4, 0, None), np.fft.rfft(x, 4, 0, None))
    assert_close(efft.fftn(a, (2, 5), (1, 0), "ortho"), np.fft.fftn(x, (2, 5), (1, 0), "ortho"),
                 rtol=1e-12, atol=1e-12)
    assert_close(efft.fftfreq(5, 0.1), np.fft.fftfreq(5, 0.1))
    assert_close(efft.fftshift(a, 1), np.fft.fftshift(x, 1))
    through_numpy = np.fft.irfft(a, 7)
    assert isinstance(through_numpy, ember.Array)
    assert_close(through_numpy, np.fft.irfft(x, 7), rtol=1e-12, atol=1e-12)


def test_fftn_over_no_axes_returns_the_input_as_complex():
    x = np.arange(6.0).reshape(2, 3)
    out = efft.fftn(enp.asarray(x), axes=())
    assert_close(out, x.astype(np.complex128))


# --- frequencies and shifts ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("d", [1.0, 0.3, 2])
def test_sample_frequencies_match_numpy(n, d):
    assert_close(efft.fftfreq(n, d=d), np.fft.fftfreq(n, d=d))
    assert_close(efft.rfftfreq(n, d=d), np.fft.rfftfreq(n, d=d))
    f32 = efft.fftfreq(n, d=d, dtype=enp.float32)
    assert_close(f32, np.fft.fftfreq(n, d=d).astype(np.float32), rtol=1e-6, atol=1e-7)
    assert efft.rfftfreq(n, dtype=enp.float32, device="cpu:0").dtype == np.float32


def test_sample_spacing_may_be_a_traced_array():
    f = ember.jit(lambda d: efft.fftfreq(6, d=d))
    assert_close(f(enp.asarray(0.25)), np.fft.fftfreq(6, d=0.25))
    g = ember.grad(lambda d: enp.sum(efft.rfftfreq(6, d=d)))(enp.asarray(0.5))
    # sum(k / (6 d)) over k = 0..3 is 1 / d; its derivative is -1 / d**2.
    assert_close(g, np.asarray(-4.0))


@pytest.mark.parametrize("shape,axes", [((5,), None), ((4,), 0), ((4, 5, 3), None),
                                        ((4, 5, 3), -1), ((4, 5, 3), (0, 2)),
                                        ((4, 5, 3), [2, 1])])
def test_shifts_match_numpy(shape, axes):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    check(lambda a: efft.fftshift(a, axes=axes), lambda a: np.fft.fftshift(a, axes=axes), x)
    check(lambda a: efft.ifftshift(a, axes=axes), lambda a: np.fft.ifftshift(a, axes=axes), x)
    back = efft.ifftshift(efft.fftshift(enp.asarray(x), axes=axes), axes=axes)
    assert_close(back, x)


# --- errors ----------------------------------------------------------------------------------

Z = np.ones((2, 4), np.complex128)
R = np.ones((2, 4))


@pytest.mark.parametrize("call,kind,match", [
    (lambda: efft.rfft(Z), ember.errors.DTypeError, r"rfft: needs a real input, got complex128"),
    (lambda: efft.ihfft(Z), ember.errors.DTypeError, r"ihfft: needs a real input"),
    (lambda: efft.rfftn(Z), ember.errors.DTypeError, r"rfftn: needs a real input"),
    (lambda: efft.fft(R, norm="none"), ember.errors.EmberValueError,
     r"fft: norm must be 'backward', 'ortho' or 'forward', got 'none'"),
    (lambda: efft.fft(R, axis=2), ember.errors.ShapeError,
     r"fft: axis 2 is out of bounds for an array of dimension 2"),
    (lambda: efft.fft(np.float64(1.0)), ember.errors.ShapeError, r"fft: axis -1 is out"),
    (lambda: efft.ifft(R, n=0), ember.errors.EmberValueError,
     r"ifft: invalid number of data points 0 along axis 1 of an input of shape \(2, 4\)"),
    (lambda: efft.irfft(np.ones((2, 1), complex)), ember.errors.EmberValueError,
     r"irfft: invalid number of data points 0"),
    (lambda: efft.hfft(Z, n=-3), ember.errors.EmberValueError, r"hfft: invalid number"),
    (lambda: efft.fftn(R, s=(3,), axes=(0, 1)), ember.errors.ShapeError,
     r"fftn: s=\(3,\) and axes=\(0, 1\) differ in length"),
    (lambda: efft.ifftn(R, axes=(1, -1)), ember.errors.ShapeError,
     r"ifftn: repeated axis in \(1, -1\)"),
    (lambda: efft.fftn(R, axes=(0, 1, 0)), ember.errors.ShapeError, r"fftn: 3 axes"),
    (lambda: efft.irfftn(Z, axes=()), ember.errors.ShapeError,
     r"irfftn: needs at least one axis"),
    (lambda: efft.fftfreq(0), ember.errors.EmberValueError,
     r"fftfreq: invalid number of data points 0"),
    (lambda: efft.rfftfreq(2.5), ember.errors.EmberValueError,
     r"rfftfreq: invalid number of data points 2.5"),
    (lambda: efft.fft(R, n=4.0), ember.errors.EmberValueError,
     r"fft: invalid number of data points 4.0 along axis 1"),
    (lambda: efft.fftfreq(4, dtype=enp.int32), ember.errors.DTypeError,
     r"fftfreq: dtype must be a real floating dtype, got int32"),
    (lambda: efft.fftfreq(4, device="gpu:7"), ember.errors.EmberValueError,
     r"fftfreq: unsupported device 'gpu:7'"),
    (lambda: efft.fftshift(R, axes=3), ember.errors.ShapeError, r"fftshift: axis 3 is out"),
])
def test_bad_arguments_raise_errors_naming_the_function_and_the_line(call, kind, match):
    with pytest.raises(kind, match=match) as info:
        call()
    assert "test_fft.py" in str(info.value)


@pytest.mark.parametrize("operand,kind,lengths,error,match", [
    (R, "fft", (4,), ember.errors.DTypeError, r"fft: fft needs a complex dtype, got float64"),
    (Z, "rfft", (4,), ember.errors.DTypeError, r"fft: rfft needs float32 or float64"),
    (np.ones((2, 4), np.float16), "rfft", (4,), ember.errors.DTypeError, r"got float16"),
    (Z, "irfft", (4,), ember.errors.ShapeError,
     r"fft: irfft of lengths \(4,\) needs trailing axes \(3,\), got shape \(2, 4\)"),
    (Z, "ifft", (3, 4), ember.errors.ShapeError, r"needs trailing axes \(3, 4\)"),
    (Z, "fft", (), ember.errors.ShapeError, r"fft: lengths \(\) do not fit"),
    (Z, "fft", (2, 2, 4), ember.errors.ShapeError, r"lengths \(2, 2, 4\) do not fit"),
    (Z, "dft", (4,), ember.errors.EmberValueError, r"fft: kind must be one of"),
])
def test_primitive_rejects_bad_operands(operand, kind, lengths, error, match):
    fn = lambda a: lax.fft(a, kind, lengths)  # noqa: E731
    for runner in (fn, ember.jit(fn)):
        with pytest.raises(error, match=match) as info:
            runner(enp.asarray(operand))
        assert "test_fft.py" in str(info.value)


def test_errors_under_jit_name_the_users_line():
    with pytest.raises(ember.errors.DTypeError, match="rfft: needs a real input") as info:
        ember.jit(lambda z: efft.rfft(z))(enp.asarray(Z))
    assert "efft.rfft(z)" in str(info.value)


# --- gradients -------------------------------------------------------------------------------
#
# Ember follows JAX's convention for complex numbers: a tangent t and a cotangent c pair as
# Re(sum(c * t)), and grad(f)(z) of a real f is df/da - i df/db for z = a + ib. So for every
# direction t (complex for complex inputs):  Re(sum(grad * t)) == (f(z + e t) - f(z - e t)) / 2e.

def _pair(a, b) -> float:
    return float(np.sum(np.asarray(a) * np.asarray(b)).real)


def _directions(rng, x):
    return _signal(rng, x.shape, x.dtype)


GRAD_CASES = [  # (function, input is complex, kwargs)
    ("fft", True, {"n": 5, "norm": "ortho"}), ("ifft", True, {"n": 9, "axis": 0}),
    ("fftn", True, {"s": (3, 7), "axes": (1, 0), "norm": "forward"}),
    ("ifftn", True, {"axes": (0,)}),
    ("rfft", False, {}), ("rfft", False, {"n": 9, "axis": 0, "norm": "ortho"}),
    ("rfftn", False, {"s": (5, 4), "axes": (1, 0)}),
    ("irfft", True, {}), ("irfft", True, {"n": 7, "norm": "forward"}),
    ("irfftn", True, {"s": (4, 9), "axes": (0, 1), "norm": "ortho"}),
    ("hfft", True, {"n": 8}), ("hfft", True, {"n": 5, "axis": 0}),
    ("ihfft", False, {"n": 7, "norm": "ortho"}),
]
GRAD_IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(GRAD_CASES)]


def _grad_case(seed, name, is_complex, kw):
    """A random input, a tangent direction, the function, and its jvp there."""
    rng = np.random.default_rng(seed)
    x = _signal(rng, (4, 6), np.complex128 if is_complex else np.float64)
    t = _directions(rng, x)
    f = lambda a: getattr(efft, name)(a, **kw)  # noqa: E731
    out, tangent = ember.jvp(f, (enp.asarray(x),), (enp.asarray(t),))
    assert tangent.dtype == out.dtype and tangent.shape == out.shape
    return rng, x, t, f, out, tangent


@pytest.mark.parametrize("name,is_complex,kw", GRAD_CASES, ids=GRAD_IDS)
def test_jvp_matches_finite_differences(name, is_complex, kw):
    _, x, t, f, _, tangent = _grad_case(4, name, is_complex, kw)
    eps = 1e-6
    fd = (np.asarray(f(enp.asarray(x + eps * t))) - np.asarray(f(enp.asarray(x - eps * t)))) \
        / (2 * eps)
    np.testing.assert_allclose(np.asarray(tangent), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name,is_complex,kw", GRAD_CASES, ids=GRAD_IDS)
def test_vjp_is_the_transpose_of_jvp_with_complex_cotangents(name, is_complex, kw):
    rng, x, t, f, out, tangent = _grad_case(5, name, is_complex, kw)
    ct = enp.asarray(_signal(rng, out.shape, out.dtype))
    pullback = lambda a, c: ember.vjp(f, a)[1](c)  # noqa: E731
    for run in (pullback, ember.jit(pullback)):
        (g,) = run(enp.asarray(x), ct)
        assert g.dtype == x.dtype and g.shape == x.shape
        np.testing.assert_allclose(_pair(g, t), _pair(ct, tangent), rtol=1e-10)


def _log_power_loss(x, target):
    """A spectral loss: squared distance between log power spectra, as audio models use."""
    spectrum = efft.rfft(x, n=16, norm="ortho")
    power = enp.real(spectrum) ** 2 + enp.imag(spectrum) ** 2
    return enp.mean((enp.log(power + 1e-3) - target) ** 2)


def test_spectral_loss_gradient_matches_finite_differences_and_jit():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 12))
    target = enp.asarray(rng.normal(size=(2, 9)))
    loss = lambda a: _log_power_loss(a, target)  # noqa: E731
    g = ember.grad(loss)(enp.asarray(x))
    expected = numeric_grad(lambda a: loss(enp.asarray(a)), x)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-6, atol=1e-8)
    assert_close(ember.jit(ember.grad(loss))(enp.asarray(x)), np.asarray(g))


def test_gradient_of_a_real_loss_of_a_complex_input_follows_jax_convention():
    """Parseval: sum |fft(z)|^2 = N sum |z|^2, whose JAX gradient is 2 N conj(z)."""
    rng = np.random.default_rng(7)
    z = _signal(rng, (3, 5), np.complex128)

    def energy(a):
        spectrum = efft.fftn(a, s=(3, 5), axes=(0, 1))
        return enp.sum(enp.real(spectrum) ** 2 + enp.imag(spectrum) ** 2)

    g = ember.grad(energy)(enp.asarray(z))
    assert_close(g, 2 * 15 * np.conj(z), rtol=1e-12, atol=1e-12)
    t = _directions(rng, z)
    eps = 1e-6
    fd = (float(energy(enp.asarray(z + eps * t))) - float(energy(enp.asarray(z - eps * t)))) \
        / (2 * eps)
    np.testing.assert_allclose(_pair(g, t), fd, rtol=1e-7)


def test_hessian_vector_product_through_rfft_and_irfft():
    """Second order: forward mode over reverse mode transposes the transpose rules."""
    rng = np.random.default_rng(8)
    x, v = rng.normal(size=10), rng.normal(size=10)
    kernel = enp.asarray(_signal(rng, (6,), np.complex128))

    def smooth(a):
        filtered = efft.irfft(efft.rfft(a) * kernel, n=10)
        return enp.sum(enp.tanh(filtered) ** 2)

    _, hvp = ember.jvp(ember.grad(smooth), (enp.asarray(x),), (enp.asarray(v),))
    eps = 1e-5
    grad = ember.grad(smooth)
    fd = (np.asarray(grad(enp.asarray(x + eps * v))) - np.asarray(grad(enp.asarray(x - eps * v)))
          ) / (2 * eps)
    np.testing.assert_allclose(np.asarray(hvp), fd, rtol=1e-5, atol=1e-7)


# --- batching --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,is_complex,kw,in_axis", [
    ("fft", True, {"n": 6}, 0), ("ifft", True, {"axis": 0}, 1), ("rfft", False, {"n": 5}, 1),
    ("irfft", True, {"n": 7, "axis": 0}, 2), ("rfftn", False, {}, 0),
    ("irfftn", True, {"s": (3, 4), "axes": (1, 0)}, 2), ("hfft", True, {}, 0),
    ("ihfft", False, {"norm": "forward"}, 1),
])
def test_vmap_matches_a_loop(name, is_complex, kw, in_axis):
    rng = np.random.default_rng(9)
    batch = _signal(rng, (3, 4, 5), np.complex128 if is_complex else np.float64)
    f = lambda a: getattr(efft, name)(a, **kw)  # noqa: E731
    expected = np.stack([np.asarray(f(enp.asarray(np.take(batch, i, in_axis))))
                         for i in range(batch.shape[in_axis])])
    vf = ember.vmap(f, in_axes=in_axis)
    assert_close(vf(enp.asarray(batch)), expected)
    assert_close(ember.jit(vf)(enp.asarray(batch)), expected)


def test_vmap_of_grad_gives_per_example_gradients():
    rng = np.random.default_rng(10)
    xs = rng.normal(size=(4, 12))
    target = enp.asarray(rng.normal(size=9))
    per = ember.vmap(ember.grad(lambda a: _log_power_loss(a, target)))(enp.asarray(xs))
    for i in range(4):
        assert_close(per[i], np.asarray(ember.grad(lambda a: _log_power_loss(a, target))(
            enp.asarray(xs[i]))), rtol=1e-12, atol=1e-14)
