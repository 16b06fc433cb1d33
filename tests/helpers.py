"""Shared test helpers: random inputs per dtype, tolerant comparison, eager + jit runners."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ember
from ember import dtypes
from ember.backends.cpu import toolchain

# Tests of the compiled cpu backend skip where no C compiler is found (it would fall back to
# the NumPy backend, testing nothing new).
needs_cc = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")

FLOATS = (dtypes.float16, dtypes.bfloat16, dtypes.float32, dtypes.float64)
INTS = (dtypes.int8, dtypes.int16, dtypes.int32, dtypes.int64,
        dtypes.uint8, dtypes.uint16, dtypes.uint32, dtypes.uint64)
SIGNED = (dtypes.int8, dtypes.int16, dtypes.int32, dtypes.int64)
COMPLEX = (dtypes.complex64, dtypes.complex128)
INEXACT = FLOATS + COMPLEX
NUMBERS = INTS + FLOATS
ALL = (dtypes.bool_,) + NUMBERS

# rtol/atol for results computed in each dtype (against a float64 or float32 reference).
_TOL = {dtypes.float16: (2e-3, 2e-3), dtypes.bfloat16: (1.6e-2, 1.6e-2),
        dtypes.float32: (2e-5, 1e-6), dtypes.float64: (1e-10, 1e-12),
        dtypes.complex64: (2e-5, 1e-6), dtypes.complex128: (1e-10, 1e-12)}


def tol(dtype: np.dtype) -> tuple[float, float]:
    return _TOL.get(np.dtype(dtype), (0.0, 0.0))


def is_exact(dtype: np.dtype) -> bool:
    """Bool and integer results: an off-by-one is a bug whatever precision the inputs had."""
    return np.dtype(dtype).kind in "biu"


def rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any,
         low: float = -3.0, high: float = 3.0) -> np.ndarray:
    """Random values in ``[low, high)`` (clipped to the dtype's range) of ``dtype``."""
    dt = np.dtype(dtype)
    if dt == dtypes.bool_:
        return rng.random(shape) < 0.5
    if dtypes.is_int(dt):
        info = np.iinfo(dt)
        lo, hi = max(int(np.floor(low)), info.min), min(int(np.ceil(high)), info.max)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dt)
    if dtypes.is_complex(dt):  # both components in [low, high)
        parts = rng.uniform(low, high, size=(2, *shape))
        return (parts[0] + 1j * parts[1]).astype(dt)
    return rng.uniform(low, high, size=shape).astype(dt)


def to_np(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(to_np(v) for v in x)
    return np.asarray(x)


def assert_close(actual: Any, expected: Any, dtype: Any = None, rtol: float | None = None,
                 atol: float | None = None, check_dtype: bool = True, err_msg: str = "") -> None:
    """Compare an Ember (or NumPy) result with a NumPy reference: dtype, shape and values.

    Tolerances come from ``dtype`` (the inputs' dtype) or the expected dtype; bool and integer
    results are always compared exactly (argmax of bfloat16 input is still an exact index)."""
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), err_msg
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype, rtol, atol, check_dtype, err_msg)
        return
    a = np.asarray(actual)
    e = np.asarray(expected)
    if check_dtype:
        assert a.dtype == e.dtype, f"dtype {a.dtype} != expected {e.dtype} {err_msg}"
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape} {err_msg}"
    dt = np.dtype(dtype) if dtype is not None else e.dtype
    r, t = tol(dt)
    r, t = (rtol if rtol is not None else r), (atol if atol is not None else t)
    if is_exact(a.dtype) and is_exact(e.dtype):
        r = t = 0.0
    if a.dtype in (dtypes.bfloat16, dtypes.float16):
        a = a.astype(np.float32)
    if e.dtype in (dtypes.bfloat16, dtypes.float16):
        e = e.astype(np.float32)
    if r == 0 and t == 0:
        np.testing.assert_array_equal(a, e, err_msg=err_msg)
    else:
        np.testing.assert_allclose(a, e, rtol=r, atol=t, equal_nan=True, err_msg=err_msg)


def assert_equal_or_close(actual: Any, expected: Any, rtol: float = 1e-6,
                          atol: float = 0.0) -> None:
    """A jitted (or fused) result against the same computation run eagerly: bitwise when the
    default backend is NumPy (the same operations in the same order); within ``rtol``/``atol``
    when it compiles (the cpu backend's kernels call the C library's functions and sum in
    their own order)."""
    if ember.backends.default_backend().name == "numpy":
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
    else:
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol,
                                   atol=atol)


def eager_and_jit(fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """Run ``fn`` eagerly and under ``ember.jit`` on the same arguments."""
    return fn(*args), ember.jit(fn)(*args)


def jit_batched(calls: Sequence[tuple[Callable[..., Any], Sequence[Any]]], backend: str = "cpu"
                ) -> list[Any]:
    """Every ``fn(*args)`` of ``calls`` as one jitted program: one trace and one compile (on
    the cpu backend, one C compiler start) for all of them; each call's result, in order.

    Arguments may be pytrees of arrays; they become inputs of the program, not constants, so
    the program computes on them as it would on a user's."""
    flat, layouts = [], []
    for _, args in calls:
        leaves, treedef = ember.tree.tree_flatten(list(args))
        layouts.append((treedef, len(leaves)))
        flat.extend(ember.numpy.asarray(x) for x in leaves)

    def everything(*xs):
        outs, i = [], 0
        for (fn, _), (treedef, n) in zip(calls, layouts):
            outs.append(fn(*ember.tree.tree_unflatten(treedef, list(xs[i: i + n]))))
            i += n
        return outs

    return ember.jit(everything, backend=backend)(*flat)


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size`` (the cases of one batched program)."""
    return [items[i: i + size] for i in range(0, len(items), size)]


def check(fn: Callable[..., Any], ref: Callable[..., Any], *args: np.ndarray, dtype: Any = None,
          rtol: float | None = None, atol: float | None = None, check_dtype: bool = True) -> None:
    """``fn`` on Ember arrays, eager and jitted, equals ``ref`` on the NumPy arrays."""
    with np.errstate(all="ignore"):
        expected = ref(*args)
    ember_args = [ember.numpy.asarray(a) for a in args]
    eager, jitted = eager_and_jit(fn, *ember_args)
    assert_close(eager, expected, dtype, rtol, atol, check_dtype, "(eager)")
    assert_close(jitted, expected, dtype, rtol, atol, check_dtype, "(jit)")


def upcast(x: np.ndarray) -> np.ndarray:
    """Half-precision NumPy inputs computed in float32 for a reference."""
    if x.dtype in (dtypes.float16, dtypes.bfloat16):
        return x.astype(np.float32)
    return x


def bf16(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=ml_dtypes.bfloat16)


def numeric_grad(f: Callable[..., Any], x: Any, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function, one coordinate at a time."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (float(f(x + d)) - float(f(x - d))) / (2 * eps)
    return g


def require_mpi() -> None:
    """Skip the calling test (or module) where mpi4py or the mpich wheel's ``mpiexec`` is missing
    (``pip install 'ember[mpi]'``); in CI, which runs every test, fail instead."""
    from ember.errors import EmberError
    from ember.parallel import launch

    try:
        launch.find_mpiexec()
    except EmberError as e:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI runs the MPI tests, but: {e}", pytrace=False)
        pytest.skip(f"MPI is not installed: {e}", allow_module_level=True)
