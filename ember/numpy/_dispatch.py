"""NumPy's dispatch protocols: ``np.sum(x)``, ``np.exp(x)``, ``np.add.reduce(x)`` on Ember arrays.

NumPy hands a call to ``__array_function__`` (functions) or ``__array_ufunc__`` (ufuncs and
their methods) when an argument is an Ember array. The rule, as a CuPy or Dask user expects:

- a function that ``ember.numpy`` has (same name, same submodule: ``np.linalg.det`` ->
  ``ember.numpy.linalg.det``) runs in Ember and returns Ember arrays, eagerly and under
  ``jit``/``grad``/``vmap`` alike, so staying in NumPy's namespace never leaves a trace;
- a NumPy argument Ember's version does not take is an error naming it (never silently dropped);
- a function Ember does not have runs in NumPy on host copies of the arrays and returns what
  NumPy returns (NumPy arrays): results leave Ember, visibly. Under a transformation that would
  silently freeze a traced value, so it is an error naming the function instead;
- ``out=`` cannot write into an Ember array (arrays are values): an error that says to use the
  result. ``out=`` NumPy arrays are filled from Ember's result.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from ember.core.array import Array, Tracer
from ember.errors import TracerError, UnsupportedError, user_frame
from ember.tree import tree_flatten, tree_unflatten

# ufunc.reduce / .accumulate as the Ember reductions that compute them.
_REDUCE = {"add": "sum", "multiply": "prod", "maximum": "max", "minimum": "min",
           "logical_and": "all", "logical_or": "any", "fmax": "nanmax", "fmin": "nanmin"}
_ACCUMULATE = {"add": "cumsum", "multiply": "cumprod"}
# NumPy ufuncs whose Ember function has another name.
_UFUNC_ALIASES = {"absolute": "abs", "conjugate": "conj", "bitwise_not": "invert",
                  "bitwise_invert": "invert"}


def array_function(self: Array, func: Callable[..., Any], types: tuple[type, ...],
                   args: tuple, kwargs: dict) -> Any:
    if not all(issubclass(t, (Array, np.ndarray)) for t in types):
        return NotImplemented  # another library's array: let it (or NumPy) decide
    name = _qualified_name(func)
    ours = _ember_function(name)
    if ours is None:
        return _in_numpy(name, func, args, kwargs)
    return _call(name, ours, args, kwargs)


def array_ufunc(self: Array, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
    name = ufunc.__name__
    out = kwargs.pop("out", None)
    if method == "__call__":
        target = _ember_function(_UFUNC_ALIASES.get(name, name))
        qualified = f"numpy.{name}"
    elif method == "reduce" and name in _REDUCE:
        target, qualified = _ember_function(_REDUCE[name]), f"numpy.{name}.reduce"
        kwargs.setdefault("axis", 0)  # ufunc.reduce reduces axis 0 by default, not all axes
    elif method == "accumulate" and name in _ACCUMULATE:
        target, qualified = _ember_function(_ACCUMULATE[name]), f"numpy.{name}.accumulate"
        kwargs.setdefault("axis", 0)
    elif method == "outer":
        fn = _ember_function(_UFUNC_ALIASES.get(name, name))
        target = None if fn is None else functools.partial(_outer, fn)
        qualified = f"numpy.{name}.outer"
    else:
        target, qualified = None, f"numpy.{name}.{method}"
    if method == "at" and isinstance(inputs[0], Array):
        raise UnsupportedError(f"{qualified}: ember arrays cannot be changed in place; use "
                               f"x = x.at[idx].add(v) (or .set, .multiply...)\n"
                               f"  at {user_frame()}")
    if kwargs.get("where", True) is not True:
        target = None  # masked ufuncs leave elements of `out` untouched: NumPy semantics only
    if target is None:
        call = getattr(ufunc, method)
        if out is not None:
            kwargs["out"] = out
        return _in_numpy(qualified, call, inputs, kwargs)
    result = _call(qualified, target, inputs, _drop_defaults(kwargs))
    return result if out is None else _fill(qualified, out, result)


def _qualified_name(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", "numpy") or "numpy"
    sub = module.split(".")[1] if module.startswith("numpy.") else ""
    # NumPy's public submodules that Ember mirrors; private ones (numpy._core...) are numpy.
    prefix = f"numpy.{sub}." if sub in ("linalg", "fft") else "numpy."
    return prefix + func.__name__


@functools.cache  # the namespace does not change: each NumPy name is resolved once
def _ember_function(name: str) -> Callable[..., Any] | None:
    import ember.numpy as enp

    namespace: Any = enp
    parts = name.removeprefix("numpy.").split(".")
    for part in parts[:-1]:
        namespace = getattr(namespace, part, None)
        if namespace is None:
            return None
    fn = getattr(namespace, parts[-1], None)
    return fn if callable(fn) and not isinstance(fn, type) else None


def _call(name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Run Ember's ``fn``; refuse arguments it does not take, naming them."""
    kwargs = {k: v for k, v in kwargs.items() if not (k == "out" and v is None)}
    if "out" in kwargs:
        out = kwargs.pop("out")
        return _fill(name, out, _call(name, fn, args, kwargs))
    signature = _signature(fn)
    if signature is not None and not (not kwargs and _takes_positional(fn, len(args))):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            raise UnsupportedError(f"{name}: ember.numpy's version does not take these "
                                   f"arguments ({e})\n  at {user_frame()}") from None
    return fn(*args, **kwargs)


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=1024)  # bounded: ufunc.outer makes a new partial per call
def _takes_positional(fn: Callable[..., Any], count: int) -> bool:
    """Whether ``fn`` accepts ``count`` positional arguments and nothing else (the common call,
    checked once per function and count instead of binding its signature every call)."""
    try:
        _signature(fn).bind(*range(count))
    except TypeError:
        return False
    return True


_UFUNC_DEFAULTS = {"casting": "same_kind", "order": "K", "subok": True, "where": True,
                   "signature": None, "dtype": None}
_MISSING = object()


def _drop_defaults(kwargs: dict) -> dict:
    """ufunc keywords that only restate NumPy's defaults carry no meaning for Ember."""
    def default(k: str, v: Any) -> bool:
        d = _UFUNC_DEFAULTS.get(k, _MISSING)
        return v is d or (isinstance(v, str) and v == d)
    return {k: v for k, v in kwargs.items() if not default(k, v)}


def _outer(fn: Callable[..., Any], a: Any, b: Any, **kwargs: Any) -> Any:
    import ember.numpy as enp

    a, b = enp.asarray(a), enp.asarray(b)
    return fn(enp.reshape(a, a.shape + (1,) * b.ndim), b, **kwargs)


def _in_numpy(name: str, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Run a NumPy function Ember does not have, on host copies of the Ember arrays."""
    leaves, tree = tree_flatten((args, kwargs))
    traced = [x for x in leaves if isinstance(x, Tracer)]
    if traced:
        raise TracerError(
            f"{name} is not in ember.numpy, so it would run in NumPy, outside the traced "
            f"program, on a traced value ({traced[0].aval}).\n  at {user_frame()}\n"
            f"Write it with ember.numpy functions, or call it outside jit/grad/vmap.")
    if any(isinstance(o, Array) for o in _as_tuple(kwargs.get("out"))):
        raise _no_out(name)
    host_args, host_kwargs = tree_unflatten(
        tree, [np.asarray(x) if isinstance(x, Array) else x for x in leaves])
    return call(*host_args, **host_kwargs)


def _fill(name: str, out: Any, result: Any) -> Any:
    """Write Ember's result into NumPy ``out=`` arrays (Ember arrays cannot be written)."""
    outs, results = _as_tuple(out), _as_tuple(result)
    if any(isinstance(o, Array) for o in outs):
        raise _no_out(name)
    for o, r in zip(outs, results):
        o[...] = np.asarray(r)
    return out[0] if isinstance(out, tuple) and len(out) == 1 else out


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _no_out(name: str) -> UnsupportedError:
    return UnsupportedError(f"{name}: out= cannot be an ember array (ember arrays are values "
                            f"and never written in place); use the result instead: "
                            f"y = {name.removeprefix('numpy.')}(...)\n  at {user_frame()}")
