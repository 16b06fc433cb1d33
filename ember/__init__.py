"""Ember: NumPy as the language, eager to write, compiled to a static graph to run.

``import ember, ember.numpy as enp``; the transformations are ``ember.jit``, ``ember.grad``,
``ember.value_and_grad``, ``ember.vjp``, ``ember.jvp``, ``ember.linearize``, ``ember.vmap``,
``ember.checkpoint``, ``ember.custom_vjp`` and ``ember.stop_gradient``; control flow lives in
``ember.lax``; random numbers in ``ember.random``; pytrees in ``ember.tree``.
"""

from ember import numpy  # noqa: F401  (installs Array's NumPy methods)
from ember import tree  # noqa: F401
from ember.core.array import Array
from ember.errors import DTypeError, EmberError, ShapeError, TracerError, UnsupportedError
from ember.transforms.autodiff import grad, jvp, linearize, stop_gradient, value_and_grad, vjp
from ember.transforms.jit import jit
from ember.transforms.vmap import vmap

__version__ = "0.1.0"

__all__ = ["Array", "DTypeError", "EmberError", "ShapeError", "TracerError", "UnsupportedError",
           "grad", "jit", "jvp", "linearize", "stop_gradient", "value_and_grad", "vjp", "vmap",
           "__version__"]

from ember import random  # noqa: E402,F401
