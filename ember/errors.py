"""Ember's error types and the helper that finds the user's own source line.

Rule 6 of the brief: a mistake is reported in Python, early, naming the operation, the
shapes/dtypes involved and the line of *user* code that caused it. Every error raised for bad
input is an :class:`EmberError`, so ``except ember.EmberError`` catches them all.
"""

from __future__ import annotations

import os
import sys

_EMBER_DIR = os.path.dirname(os.path.abspath(__file__))


class EmberError(Exception):
    """Base class of every error Ember raises for bad input."""


class ShapeError(EmberError, ValueError):
    """Operand shapes do not fit the operation."""


class DTypeError(EmberError, TypeError):
    """Operand dtypes do not fit the operation."""


class EmberValueError(EmberError, ValueError):
    """An argument has the right type but a value the operation rejects."""


class TracerError(EmberError, TypeError):
    """A traced value was used where a concrete Python value is needed (``if``, ``int()``...)."""


class UnsupportedError(EmberError, NotImplementedError):
    """The operation exists in NumPy but Ember does not support it in this context."""


def user_frame() -> str:
    """Return ``file:line`` of the innermost stack frame outside the ``ember`` package."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_EMBER_DIR + os.sep):
            line = _source_line(path, frame.f_lineno)
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            return f"{where}: {line}" if line else where
        frame = frame.f_back
    return "<unknown>"


def _source_line(path: str, lineno: int) -> str:
    import linecache

    return linecache.getline(path, lineno).strip()


def op_error(kind: type[EmberError], op: str, message: str) -> EmberError:
    """Build an error that names the operation and the user's line."""
    return kind(f"{op}: {message}\n  at {user_frame()}")
