"""The communicator interface every runtime implements (decision record 0022).

A communicator connects the ``size`` ranks of one group (all devices of a job, or the devices
along one mesh axis, from :meth:`Communicator.split`). Collectives take a NumPy array and return
a new one; inputs are never written. Each collective is described by a :class:`Signature` that
every rank compares before any data moves, so ranks that call different collectives, or the same
one with different shapes, stop with :class:`CollectiveMismatchError` instead of exchanging
garbage or hanging. Every wait has a deadline (``EMBER_COLLECTIVE_TIMEOUT``), and reductions
add in rank order, so every rank and every runtime gets the same bits.

This module holds what runtimes share: validation, signatures, errors, the deadline and the
per-rank arithmetic of each collective. Runtimes only move data (:mod:`.threads`, :mod:`.mpi`).
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.errors import EmberError, EmberValueError, op_error

DEFAULT_TIMEOUT = 300.0
REDUCE_OPS: dict[str, Callable[..., np.ndarray]] = {
    "sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}


class CollectiveError(EmberError, RuntimeError):
    """A collective could not complete; every rank of the group stops with one of these."""


class CollectiveTimeoutError(CollectiveError):
    """Some ranks did not reach a collective before the deadline."""


class CollectiveMismatchError(CollectiveError):
    """Ranks called different collectives, or one with different shapes, dtypes or parameters."""


class CollectiveAbortedError(CollectiveError):
    """Another rank failed, so this rank's collective was abandoned."""


def collective_timeout() -> float:
    """The deadline of one wait, in seconds: ``EMBER_COLLECTIVE_TIMEOUT``, default 300."""
    text = os.environ.get("EMBER_COLLECTIVE_TIMEOUT", "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise EmberValueError(
            f"EMBER_COLLECTIVE_TIMEOUT={text!r}: expected a positive number of seconds")
    return seconds


@dataclass(frozen=True)
class Signature:
    """What one rank asks of a collective; every rank's must be equal before data moves.

    ``params`` are the arguments that must agree across ranks (reduction op, axes, pairs);
    arguments that differ by rank by design (``split``'s color) travel as the payload instead.
    """

    seq: int
    kind: str
    dtype: str
    shape: tuple[int, ...]
    params: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        data = f" of {self.dtype}{list(self.shape)}" if self.dtype else ""
        return f"{self.kind}({args}) #{self.seq}{data}"

    def as_tuple(self) -> tuple:
        return (self.seq, self.kind, self.dtype, self.shape, self.params)


def reduce_in_rank_order(arrays: Sequence[np.ndarray], op: str) -> np.ndarray:
    """Combine rank 0's value with rank 1's, then rank 2's...: the same bits on every rank."""
    out = np.array(arrays[0], copy=True)
    combine = REDUCE_OPS[op]
    for a in arrays[1:]:
        combine(out, a, out=out)
    return out


def local_result(sig: Signature, inputs: Sequence[np.ndarray], rank: int) -> np.ndarray:
    """This rank's result of a collective, given every rank's input in rank order.

    The in-process runtime sees all inputs and calls this directly; the MPI runtime moves
    only what each rank needs and uses the same reduction, so both give the same bits.
    """
    p = dict(sig.params)
    n = len(inputs)
    if sig.kind == "all_reduce":
        return reduce_in_rank_order(inputs, p["op"])
    if sig.kind == "all_gather":
        return np.concatenate(inputs, axis=p["axis"])
    if sig.kind == "reduce_scatter":
        return reduce_in_rank_order([np.split(x, n, p["axis"])[rank] for x in inputs], p["op"])
    if sig.kind == "all_to_all":
        parts = [np.split(x, n, p["split_axis"])[rank] for x in inputs]
        return np.concatenate(parts, axis=p["concat_axis"])
    if sig.kind == "permute":
        source = {dst: src for src, dst in p["pairs"]}.get(rank)
        return np.zeros_like(inputs[rank]) if source is None else inputs[source].copy()
    if sig.kind == "broadcast":
        return inputs[p["root"]].copy()
    raise AssertionError(f"ember bug: no local result for collective {sig.kind!r}")


@functools.cache
def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)``, which NumPy computes in Python on every call (7 us: a third of a small
    collective's cost on the thread runtime)."""
    return str(dtype)


def _axis(op: str, x: np.ndarray, axis: int, name: str) -> int:
    if not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
        raise op_error(EmberValueError, op,
                       f"{name}={axis!r} is out of range for an array of shape {x.shape}")
    return int(axis) % x.ndim


def _reduce_op(collective: str, op: str) -> str:
    if op not in REDUCE_OPS:
        raise op_error(EmberValueError, collective,
                       f"op={op!r}; expected one of {sorted(REDUCE_OPS)}")
    return op


class Handle(ABC):
    """A collective started with ``start_<op>``: :meth:`wait` gives its result."""

    @abstractmethod
    def wait(self) -> np.ndarray | None:
        """Block until the collective finished (or its deadline passed) and return the result."""


class Communicator(ABC):
    """The ``size`` ranks of one group, seen from rank ``rank``.

    Every rank of the group must call the same collectives in the same order (the sequence
    check enforces it). ``name`` says which group errors talk about ("world", "world/1"...).
    """

    rank: int
    size: int
    name: str

    def __init__(self, rank: int, size: int, name: str, members: Sequence[int],
                 timeout: float | None) -> None:
        self.rank, self.size, self.name = rank, size, name
        self.members = tuple(members)  # each rank's rank in the whole job, for messages
        self._timeout = timeout
        self._seq = 0
        self._in_call = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={self.name!r}, rank={self.rank}, size={self.size})"

    @property
    def timeout(self) -> float:
        """Seconds one wait may take before :class:`CollectiveTimeoutError`."""
        return self._timeout if self._timeout is not None else collective_timeout()

    # -- the collectives: each validates, builds its signature and hands it to the runtime --

    def start_all_reduce(self, x: Any, op: str = "sum") -> Handle:
        """Start reducing ``x`` over the group (``op``: sum, prod, max or min)."""
        return self._begin("all_reduce", np.asarray(x), (("op", _reduce_op("all_reduce", op)),))

    def start_all_gather(self, x: Any, axis: int = 0) -> Handle:
        """Start concatenating every rank's ``x`` along ``axis``, in rank order."""
        x = np.asarray(x)
        return self._begin("all_gather", x, (("axis", _axis("all_gather", x, axis, "axis")),))

    def start_reduce_scatter(self, x: Any, axis: int = 0, op: str = "sum") -> Handle:
        """Start reducing ``x`` over the group and keeping block ``rank`` of ``axis``."""
        x = np.asarray(x)
        axis = _axis("reduce_scatter", x, axis, "axis")
        self._check_divides("reduce_scatter", x, axis, "axis")
        op = _reduce_op("reduce_scatter", op)
        return self._begin("reduce_scatter", x, (("axis", axis), ("op", op)))

    def start_all_to_all(self, x: Any, split_axis: int, concat_axis: int) -> Handle:
        """Start sending block ``j`` of ``split_axis`` to rank ``j``; received blocks are
        concatenated along ``concat_axis`` in rank order."""
        x = np.asarray(x)
        split_axis = _axis("all_to_all", x, split_axis, "split_axis")
        concat_axis = _axis("all_to_all", x, concat_axis, "concat_axis")
        self._check_divides("all_to_all", x, split_axis, "split_axis")
        return self._begin("all_to_all", x, (("split_axis", split_axis),
                                             ("concat_axis", concat_axis)))

    def start_permute(self, x: Any, pairs: Sequence[tuple[int, int]]) -> Handle:
        """Start sending ``x`` from ``src`` to ``dst`` for each pair; a rank no pair sends to
        receives zeros (as JAX's ``ppermute``)."""
        x = np.asarray(x)
        try:
            pairs = tuple((int(s), int(d)) for s, d in pairs)
        except (TypeError, ValueError):
            raise op_error(EmberValueError, "permute",
                           f"pairs={pairs!r}: expected (source, destination) rank pairs") from None
        for what, column in (("source", 0), ("destination", 1)):
            ranks = [pair[column] for pair in pairs]
            bad = [r for r in ranks if not 0 <= r < self.size]
            if bad or len(set(ranks)) != len(ranks):
                raise op_error(EmberValueError, "permute",
                               f"pairs={list(pairs)}: every {what} must be a distinct rank "
                               f"in 0..{self.size - 1}")
        return self._begin("permute", x, (("pairs", pairs),))

    def start_broadcast(self, x: Any, root: int = 0) -> Handle:
        """Start sending rank ``root``'s ``x`` to every rank (all ranks pass the same shape)."""
        x = np.asarray(x)
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise op_error(EmberValueError, "broadcast",
                           f"root={root!r} is not a rank of a group of {self.size}")
        return self._begin("broadcast", x, (("root", int(root)),))

    def start_barrier(self) -> Handle:
        """Start a barrier: its wait returns once every rank has started it."""
        return self._begin("barrier", None, ())

    def all_reduce(self, x: Any, op: str = "sum") -> np.ndarray:
        return self._now(self.start_all_reduce, x, op)

    def all_gather(self, x: Any, axis: int = 0) -> np.ndarray:
        return self._now(self.start_all_gather, x, axis)

    def reduce_scatter(self, x: Any, axis: int = 0, op: str = "sum") -> np.ndarray:
        return self._now(self.start_reduce_scatter, x, axis, op)

    def all_to_all(self, x: Any, split_axis: int, concat_axis: int) -> np.ndarray:
        return self._now(self.start_all_to_all, x, split_axis, concat_axis)

    def permute(self, x: Any, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        return self._now(self.start_permute, x, pairs)

    def broadcast(self, x: Any, root: int = 0) -> np.ndarray:
        return self._now(self.start_broadcast, x, root)

    def barrier(self) -> None:
        self.start_barrier().wait()

    def _now(self, start: Callable[..., Handle], *args: Any) -> Any:
        """Start a collective and wait for it: the caller cannot write its input in between,
        so a runtime need not copy it (``_start``'s ``keep``)."""
        self._in_call = True
        try:
            handle = start(*args)
        finally:
            self._in_call = False
        return handle.wait()

    def split(self, color: int, key: int | None = None) -> Communicator:
        """The group of the ranks that pass the same ``color``, ordered by ``key`` (default:
        this rank), as MPI's ``Comm_split``. Every rank of this group must call it."""
        if not isinstance(color, (int, np.integer)) or color < 0:
            raise op_error(EmberValueError, "split", f"color={color!r}: expected an int >= 0")
        key = self.rank if key is None else key
        if not isinstance(key, (int, np.integer)):
            raise op_error(EmberValueError, "split", f"key={key!r}: expected an int")
        return self._split(self._signature("split", None, ()), int(color), int(key))

    # -- what every runtime shares: signatures and the errors' wording --

    def _signature(self, kind: str, x: np.ndarray | None,
                   params: tuple[tuple[str, Any], ...]) -> Signature:
        self._seq += 1
        if x is None:
            return Signature(self._seq, kind, "", (), params)
        return Signature(self._seq, kind, _dtype_name(x.dtype), x.shape, params)

    def _begin(self, kind: str, x: np.ndarray | None,
               params: tuple[tuple[str, Any], ...]) -> Handle:
        if x is not None and x.dtype.kind in "OSUMm":  # only numbers (ml_dtypes' are kind "V")
            raise op_error(EmberValueError, kind,
                           f"expected a numeric array, got dtype {x.dtype} of shape {x.shape}")
        return self._start(self._signature(kind, x, params), x, keep=not self._in_call)

    def _check_divides(self, op: str, x: np.ndarray, axis: int, name: str) -> None:
        if x.shape[axis] % self.size:
            raise op_error(EmberValueError, op,
                           f"{name}={axis}: dimension {x.shape[axis]} of shape {x.shape} does "
                           f"not divide evenly over the {self.size} ranks of group {self.name!r}")

    def _ranks(self, ranks: Sequence[int]) -> str:
        """``ranks 1, 3`` of this group, with their job-wide ranks when those differ."""
        ranks = sorted(ranks)
        text = (f"rank {ranks[0]}" if len(ranks) == 1
                else "ranks " + ", ".join(map(str, ranks)))
        job = [self.members[r] for r in ranks]
        return text if job == ranks else f"{text} (job-wide {', '.join(map(str, job))})"

    def _where(self, sig: Signature) -> str:
        return f"{sig.describe()} in group {self.name!r} of {self.size}"

    def _mismatch_error(self, signatures: dict[int, Signature]) -> CollectiveMismatchError:
        """Name each rank's call; ranks that agree are listed together."""
        by_call: dict[str, list[int]] = {}
        for rank, sig in sorted(signatures.items()):
            by_call.setdefault(sig.describe(), []).append(rank)
        calls = "; ".join(f"{self._ranks(r)} called {call}" for call, r in by_call.items())
        return CollectiveMismatchError(
            f"collective mismatch in group {self.name!r} of {self.size}, seen on rank "
            f"{self.rank}: {calls}")

    def _timeout_error(self, sig: Signature,
                       missing: Sequence[int] | None) -> CollectiveTimeoutError:
        """``missing``: the ranks that did not arrive; empty: all did; None: not known."""
        if missing is None:
            who = "some ranks did not arrive"
        else:
            who = (f"{self._ranks(missing)} did not arrive" if missing
                   else "every rank arrived but the data exchange did not finish")
        return CollectiveTimeoutError(
            f"{self._where(sig)} timed out on rank {self.rank} after {self.timeout:g} s: "
            f"{who} (deadline: EMBER_COLLECTIVE_TIMEOUT)")

    # -- what a runtime provides --

    @abstractmethod
    def _start(self, sig: Signature, x: np.ndarray | None, keep: bool) -> Handle:
        """Post the collective described by ``sig`` (``x`` is this rank's input; ``keep``: the
        caller may write ``x`` before the wait, so the runtime must keep a copy of it)."""

    @abstractmethod
    def _split(self, sig: Signature, color: int, key: int) -> Communicator:
        """Exchange (color, key) under ``sig`` and return this rank's new group."""


def split_groups(colors_keys: tuple[tuple[int, int], ...]) -> dict[int, tuple[int, ...]]:
    """Each color's member ranks ordered by (key, rank), from every rank's (color, key)."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for rank, (color, key) in enumerate(colors_keys):
        groups.setdefault(color, []).append((key, rank))
    return {color: tuple(rank for _, rank in sorted(members))
            for color, members in groups.items()}
