"""Atomic file writes (a file is either its old self or completely new, never truncated), and
the one reader of the JSON files that come with models and checkpoints.

Everything ember saves (weights, configs, tokenizers, checkpoints) goes through
:func:`atomic_write`: write a temporary sibling, fsync it, ``os.replace`` it over the target
(atomic on POSIX), then fsync the directory so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from typing import IO, Any

from ember.errors import EmberValueError

__all__ = ["atomic_write", "write_text_atomic", "read_json"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Create ``path`` with ``write(file)``; on any error the old file (if any) is untouched
    and no temporary file is left behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise EmberValueError(f"{path}: cannot write the file: {exc.strerror or exc}") from exc
        raise
    _fsync_directory(directory)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX); not possible, nor needed, on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file's contents; a clear error when it is unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise EmberValueError(f"{os.fspath(path)}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict):
        raise EmberValueError(f"{os.fspath(path)}: expected a JSON object, got "
                              f"{type(data).__name__}")
    return data
