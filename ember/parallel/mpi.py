"""Processes over MPI: the communicator of ``ember launch`` jobs, on mpi4py.

MPI's blocking collectives hang when a peer dies, stalls or calls something else, so every
operation here is non-blocking and polled against the deadline (``Test`` with a short
back-off). Before data moves, each rank sends its signature to every other rank (small
point-to-point messages, so a rank that did not arrive can be named) and compares what it
receives. Any failure prints the error, naming the rank and the collective, and aborts the
whole job (``MPI_Abort``): ``mpiexec`` then ends every process with a non-zero exit, and no
rank is left waiting.

Data moves as raw bytes (any dtype, bfloat16 included). Reductions never use MPI's own
reduction, whose order depends on the algorithm MPI picks: all-reduce is an all-to-all of
chunks, a sum in rank order, and an all-gather of the reduced chunks, so the bits equal the
in-process runtime's. A collective's data moves in steps, and a collective starts its steps
only once the one started before it is done, so every rank posts its MPI collectives in the
same order (which MPI requires) whatever order the program waits in.
"""

from __future__ import annotations

import ast
import hashlib
import os
import time
from collections.abc import Generator
from typing import Any, NoReturn

import numpy as np

from ember.errors import user_frame
from ember.parallel.communicator import (
    Communicator,
    Handle,
    Signature,
    reduce_in_rank_order,
    split_groups,
)
from ember.parallel.runtime import abort_job, mpi, record_state

# MPI guarantees tags up to 32767: signatures use the lower half, permute's data the upper.
_TAGS = 1 << 14
_SIGNATURE_BYTES = 4096
_SPIN, _FIRST_PAUSE, _LONGEST_PAUSE = 2e-3, 5e-5, 2e-3  # seconds


def _bytes(a: np.ndarray) -> np.ndarray:
    """A contiguous array's memory as bytes (a view: MPI writes into ``a`` through it)."""
    return a.reshape(-1).view(np.uint8)


def _chunks(n: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts and offsets of ``parts`` near-equal consecutive chunks of ``n`` elements."""
    counts = np.full(parts, n // parts, dtype=np.int64)
    counts[: n % parts] += 1
    return counts, np.concatenate([[0], np.cumsum(counts)[:-1]])


class MPICommunicator(Communicator):
    """One process's view of a group of MPI processes (by default all of them)."""

    def __init__(self, comm: Any = None, *, timeout: float | None = None, name: str = "world",
                 private: bool = False) -> None:
        """A communicator over ``comm`` (default ``COMM_WORLD``), which is duplicated first
        unless ``private`` (nothing else uses it), so the user's own MPI calls on ``comm``
        can never match ours. Every process of ``comm`` must create it."""
        self._mpi = mpi()
        world = self._mpi.COMM_WORLD
        comm = world if comm is None else comm
        members = self._mpi.Group.Translate_ranks(
            comm.Get_group(), list(range(comm.Get_size())), world.Get_group())
        super().__init__(comm.Get_rank(), comm.Get_size(), name, members, timeout)
        self._pending: list[_MPIHandle] = []
        if not private:
            comm, request = comm.Idup()
            self._poll([request], Signature(0, "create_communicator", "", ()), lambda: None)
        self._comm = comm

    def _start(self, sig: Signature, x: np.ndarray | None, keep: bool) -> Handle:
        # When this rank's wait returns its sends are complete, so only a started collective
        # whose input the caller may write in between needs a copy.
        if x is not None:
            x = np.array(x, order="C") if keep else np.asarray(x, order="C")
        handle = _MPIHandle(self, sig, x, None)
        self._pending.append(handle)
        self._progress()
        return handle

    def _split(self, sig: Signature, color: int, key: int) -> Communicator:
        handle = _MPIHandle(self, sig, None, (color, key))
        self._pending.append(handle)
        return handle.wait()

    def _progress(self) -> None:
        """Move started collectives on as far as they go without waiting, oldest first (at
        every start: MPI moves data only inside its own calls)."""
        while self._pending and self._pending[0].advance(block=False):
            self._pending.pop(0)

    def _finish_through(self, handle: _MPIHandle) -> None:
        """Finish every pending handle up to ``handle``, oldest first: a handle posts its data
        collectives only once the one before it is done, so every rank posts them in the same
        order (which MPI requires) whatever order it waits in."""
        while not handle.done:
            self._pending[0].advance(block=True)
            self._pending.pop(0)

    def _poll(self, requests: list, sig: Signature, missing: Any, where: str = "",
              spin: bool = False) -> None:
        """Wait for ``requests`` until the deadline; past it, fail naming ``missing()``.

        Tests run back to back at first, as MPI's own wait does: MPI makes progress only
        inside its calls, a large message moves in many pieces, and peers in step arrive
        within microseconds. Waiting for peers to arrive (not ``spin``) then sleeps between
        tests, longer and longer, so a rank that waits for a slow one leaves it the CPU.
        """
        now = time.monotonic()
        deadline, spin_until = now + self.timeout, now + (self.timeout if spin else _SPIN)
        pause = _FIRST_PAUSE
        while not self._mpi.Request.Testall(requests):
            now = time.monotonic()
            if now > deadline:
                self._abort(self._timeout_error(sig, missing()), where)
            # Give the core to another runnable process between tests: with more processes
            # than cores, a rank spinning here took the CPU from the peer it waits for (4
            # processes on 2 cores: a dp=4 step 1023 ms, 366 ms yielding); with a core each
            # there is nobody to yield to, and the call returns at once.
            os.sched_yield()
            if now > spin_until:
                time.sleep(pause)
                pause = min(2 * pause, _LONGEST_PAUSE)

    def _abort(self, error: Exception, where: str = "") -> NoReturn:
        """Report the error and end the job: every process, not only this one, must stop."""
        abort_job(f"{type(error).__name__}: {error}" + (f"\n  at {where}" if where else ""))


class _MPIHandle(Handle):
    """One collective: its signature exchange is posted at once; then its data moves in steps
    (a generator posting MPI operations and yielding their requests), each step posted once
    the previous one completed."""

    def __init__(self, comm: MPICommunicator, sig: Signature, x: np.ndarray | None,
                 payload: Any) -> None:
        self._comm, self._sig, self._x, self._payload = comm, sig, x, payload
        self.done, self._result = False, None
        self._where = user_frame()
        c, tag = comm._comm, sig.seq % _TAGS
        # The signature's text, then the payload's: equal signatures are equal bytes, so the
        # text is parsed only to describe a mismatch.
        signature = repr(sig.as_tuple()).encode()
        if len(signature) > _SIGNATURE_BYTES // 2:  # only huge permutations: send a digest
            digest = hashlib.sha256(signature).hexdigest()
            sig = Signature(sig.seq, sig.kind, sig.dtype, sig.shape, (("digest", digest),))
            signature = repr(sig.as_tuple()).encode()
        message = signature + b"\n" + repr(payload).encode()
        self._sent, self._signature = sig, signature
        self._message = message  # kept alive until the sends complete
        peers = [r for r in range(comm.size) if r != comm.rank]
        self._received = {r: np.zeros(_SIGNATURE_BYTES, np.uint8) for r in peers}
        self._sig_recvs = {r: c.Irecv(self._received[r], source=r, tag=tag) for r in peers}
        self._in_flight = [*self._sig_recvs.values(), *(c.Isend(message, dest=r, tag=tag)
                                                        for r in peers)]
        self._steps: Generator[list, None, Any] | None = None

    def wait(self) -> Any:
        if not self.done:
            what = lambda: f"{self._comm._where(self._sig)}, called at {self._where}"
            record_state(lambda: f"waiting in {what()}")
            self._comm._finish_through(self)
            record_state(lambda: f"running; its last collective was {what()}")
        return self._result

    def advance(self, block: bool) -> bool:
        """Post the next steps whose predecessors completed; True once the collective is done.
        ``block``: wait for each step (against the deadline) instead of returning."""
        if self._steps is None:  # still exchanging signatures: every peer must arrive
            missing = lambda: [r for r, q in self._sig_recvs.items() if not q.Test()]
            if not self._completed(block, missing, spin=False):
                return False
            self._steps = self._move_data(self._check_signatures())
            self._next_step()
        while not self.done:
            if not self._completed(block, lambda: [], spin=True):
                return False
            self._next_step()
        return True

    def _completed(self, block: bool, missing: Any, spin: bool) -> bool:
        if block:
            self._comm._poll(self._in_flight, self._sig, missing, self._where, spin)
            return True
        return self._comm._mpi.Request.Testall(self._in_flight)

    def _next_step(self) -> None:
        try:
            self._in_flight = next(self._steps)
        except StopIteration as finished:
            self._result, self.done = finished.value, True
            self._in_flight, self._x = [], None

    def _check_signatures(self) -> list:
        """Every rank's payload, in rank order, once every signature equals ours."""
        comm = self._comm
        texts = {rank: buffer.tobytes().rstrip(b"\0").split(b"\n", 1)
                 for rank, buffer in self._received.items()}
        if any(signature != self._signature for signature, _ in texts.values()):
            signatures = {rank: Signature(*ast.literal_eval(signature.decode()))
                          for rank, (signature, _) in texts.items()}
            comm._abort(comm._mismatch_error({**signatures, comm.rank: self._sent}),
                        self._where)
        if self._payload is None:
            return [None] * comm.size
        texts[comm.rank] = (self._signature, repr(self._payload).encode())
        return [ast.literal_eval(texts[r][1].decode()) for r in range(comm.size)]

    def _move_data(self, payloads: list) -> Generator[list, None, Any]:
        comm, sig, x = self._comm, self._sig, self._x
        c, n, p = comm._comm, comm.size, dict(sig.params)
        if sig.kind == "barrier":  # every rank's signature arrived: that is the barrier
            return None
        if sig.kind == "split":
            color, key = payloads[comm.rank]
            ranks = split_groups(tuple(payloads))[color]
            # Blocking, but every rank has just shown it is here and calling it.
            new = c.Split(color, key)
            assert new.Get_rank() == ranks.index(comm.rank), "ember bug: MPI split order"
            return MPICommunicator(new, timeout=comm._timeout, name=f"{comm.name}/{color}",
                                   private=True)
        if sig.kind == "all_gather":
            out = np.empty((n, *x.shape), x.dtype)
            yield [c.Iallgather(_bytes(x), _bytes(out))]
            if p["axis"] == 0:  # already in place: rank blocks one after the other
                return out.reshape(n * x.shape[0], *x.shape[1:])
            return np.concatenate(list(out), axis=p["axis"])
        if sig.kind in ("reduce_scatter", "all_to_all"):
            axis = p.get("axis", p.get("split_axis"))
            blocks = np.ascontiguousarray(np.stack(np.split(x, n, axis=axis)))
            received = np.empty_like(blocks)
            yield [c.Ialltoall(_bytes(blocks), _bytes(received))]
            if sig.kind == "reduce_scatter":
                return reduce_in_rank_order(list(received), p["op"])
            return np.concatenate(list(received), axis=p["concat_axis"])
        if sig.kind == "all_reduce":
            return (yield from self._all_reduce(c, n, p["op"]))
        if sig.kind == "permute":
            tag = _TAGS + sig.seq % _TAGS
            sources = [src for src, dst in p["pairs"] if dst == comm.rank]
            out = np.empty_like(x) if sources else np.zeros_like(x)
            yield [*(c.Isend(_bytes(x), dest=dst, tag=tag)
                     for src, dst in p["pairs"] if src == comm.rank),
                   *(c.Irecv(_bytes(out), source=src, tag=tag) for src in sources)]
            return out
        if sig.kind == "broadcast":
            out = x if comm.rank == p["root"] else np.empty_like(x)
            yield [c.Ibcast(_bytes(out), root=p["root"])]
            return out
        raise AssertionError(f"ember bug: MPI has no data movement for {sig.kind!r}")

    def _all_reduce(self, c: Any, n: int, op: str) -> Generator[list, None, np.ndarray]:
        """Reduce-scatter (all-to-all of chunks, summed in rank order), then all-gather."""
        x = self._x
        item = x.dtype.itemsize
        counts, offsets = _chunks(x.size, n)
        mine = int(counts[self._comm.rank])
        received = np.empty((n, mine), x.dtype)
        yield [c.Ialltoallv([_bytes(x), ((counts * item).tolist(), (offsets * item).tolist())],
                            [_bytes(received), ([mine * item] * n,
                                                [r * mine * item for r in range(n)])])]
        reduced = np.ascontiguousarray(reduce_in_rank_order(list(received), op))
        out = np.empty(x.shape, x.dtype)
        yield [c.Iallgatherv(_bytes(reduced), [_bytes(out), ((counts * item).tolist(),
                                                              (offsets * item).tolist())])]
        return out
