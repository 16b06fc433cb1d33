"""Ember: NumPy as the language, eager to write, compiled to a static graph to run.

``import ember, ember.numpy as enp``; the transformations are ``ember.jit``, ``ember.grad``,
``ember.value_and_grad``, ``ember.vjp``, ``ember.jvp``, ``ember.linearize``, ``ember.vmap``,
``ember.checkpoint``, ``ember.custom_vjp`` and ``ember.stop_gradient``; control flow lives in
``ember.lax``; random numbers in ``ember.random``; pytrees in ``ember.tree``; PyTorch-shaped
modules and optimizers in ``ember.nn`` and ``ember.optim``. The built-in models
(``ember.models.llama``) and file formats (``ember.io``) are imported on demand.
"""

# ember.numpy first: importing it installs Array's NumPy methods.
from ember import numpy  # noqa: I001
from ember import lax, nn, optim, random, tree
from ember.backends.base import register_lazy_backend
from ember.core.array import Array
from ember.errors import DTypeError, EmberError, ShapeError, TracerError, UnsupportedError
from ember.transforms.autodiff import grad, jvp, linearize, stop_gradient, value_and_grad, vjp
from ember.transforms.checkpoint import checkpoint, checkpoint_policies, remat
from ember.transforms.custom_vjp import custom_vjp
from ember.transforms.jit import jit
from ember.transforms.vmap import vmap

# The compiled CPU backend sits above the compiler layer; it is imported when first named.
register_lazy_backend("cpu", "ember.backends.cpu.backend")

__version__ = "0.1.0"

__all__ = ["Array", "DTypeError", "EmberError", "ShapeError", "TracerError", "UnsupportedError",
           "checkpoint", "checkpoint_policies", "custom_vjp", "grad", "jit", "jvp", "lax",
           "linearize", "nn", "numpy", "optim", "random", "remat", "stop_gradient", "tree",
           "value_and_grad", "vjp", "vmap", "__version__"]
