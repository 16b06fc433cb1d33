"""Backends, found by name (rule 7). A backend allocates, copies, runs primitives and programs."""

from ember.backends.base import (
    Backend,
    Device,
    default_backend,
    get_backend,
    register_backend,
    set_default_backend,
)

__all__ = ["Backend", "Device", "default_backend", "get_backend", "register_backend",
           "set_default_backend"]
