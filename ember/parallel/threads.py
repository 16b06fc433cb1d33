"""Virtual devices in one process: one Python thread per device, collectives in shared memory.

Each collective has a slot, keyed by its sequence number, where every rank leaves its
signature and a copy of its input; once all have arrived each rank computes its own result
from the inputs in rank order (:func:`~.communicator.local_result`). One condition variable
guards every group of a run (the world and the groups ``split`` made from it), so a failure
anywhere wakes every waiting thread: a failed run records its first error, and every rank
then raises instead of waiting for peers that will never come.

The threads themselves are kept: a :class:`DevicePool` of n threads is made on first use and
reused by every later run of n devices, since starting n threads cost more than a small
sharded step (:func:`~ember.parallel.runtime.run_on_devices` has the numbers). So are their
communicators, while each run ends cleanly, and with them the groups a sharded program splits
from them (one split per mesh axis, each a collective, would otherwise run on every call).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ember.parallel.communicator import (
    CollectiveAbortedError,
    CollectiveMismatchError,
    Communicator,
    Handle,
    Signature,
    local_result,
    split_groups,
)


class _Run:
    """What every communicator of one run of virtual devices shares.

    One lock guards every group of the run (the world and the groups ``split`` made from it),
    so a failure anywhere wakes every waiting thread. A blocked device sleeps on its own wake
    lock, released once by whoever completes its slot (the last rank to arrive) or by a
    failure or a device that returned: a collective costs one wake-up per waiting rank, where
    a shared condition variable woke every waiting thread of the run on every change.
    """

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.failure: BaseException | None = None
        self.failed_device: int | None = None
        self.finished: set[int] = set()  # devices whose function returned
        # Each device's wake lock, held (acquired) while nobody is to be woken.
        self.wakers = [_held_lock() for _ in range(n)]
        self.sleeping: set[int] = set()  # devices blocked on their wake lock
        self.open_slots = 0  # collectives started by some rank and not yet taken by all
        # The communicators of the world and of the groups split from it (weakly: a group the
        # caller dropped is gone with it).
        self.comms: weakref.WeakSet[ThreadCommunicator] = weakref.WeakSet()

    def ended_cleanly(self) -> bool:
        """No device failed and every collective any device started was finished by all:
        the groups are in step, so a later run may use them again."""
        return self.failure is None and self.open_slots == 0

    def restart(self) -> None:
        """Ready for another run, after one that ended cleanly: no device has returned, and
        collectives count from 1 again in every group, as on new communicators."""
        self.finished.clear()
        for comm in list(self.comms):
            comm._seq = 0

    def wake(self, devices: Any) -> None:
        """Release the wake locks of those of ``devices`` that sleep (hold ``lock``)."""
        for d in devices:
            if d in self.sleeping:
                self.sleeping.discard(d)
                self.wakers[d].release()

    def fail(self, device: int, error: BaseException) -> None:
        """Record the first failure and wake every waiting thread."""
        with self.lock:
            if self.failure is None:
                self.failure, self.failed_device = error, device
            self.wake(list(self.sleeping))


def _held_lock() -> Any:
    lock = threading.Lock()
    lock.acquire()
    return lock


class _Group:
    """The shared state of one group: its devices and the slots of collectives in flight."""

    def __init__(self, run: _Run, devices: tuple[int, ...], name: str) -> None:
        self.run, self.devices, self.name = run, devices, name
        self.slots: dict[int, _Slot] = {}


class _Slot:
    def __init__(self, size: int, first: Signature) -> None:
        self.first = first  # every rank's signature must equal the first one's
        self.signatures: dict[int, Signature] = {}
        self.inputs: list[Any] = [None] * size
        self.arrived = 0
        self.taken = 0
        self.waiting: list[int] = []  # devices asleep until every rank has arrived
        self.shared: dict[int, _Group] = {}  # split: each color's new group, made once
        self.lock = threading.Lock()
        self.common: np.ndarray | None = None  # all_reduce: the one result every rank copies
        self.copies = 0  # all_reduce: results handed out so far (the last takes ``common``)

    def reduced(self, sig: Signature) -> np.ndarray:
        """An all-reduce's one result, computed by the first to ask (hold ``lock``)."""
        if self.common is None:
            self.common = local_result(sig, self.inputs, 0)
        return self.common


class ThreadCommunicator(Communicator):
    """One virtual device's view of its group; every rank runs on its own thread."""

    def __init__(self, group: _Group, rank: int, timeout: float | None = None) -> None:
        super().__init__(rank, len(group.devices), group.name, group.devices, timeout)
        self._group = group
        group.run.comms.add(self)

    @classmethod
    def world(cls, n: int, timeout: float | None = None) -> list[ThreadCommunicator]:
        """The communicators of ``n`` new virtual devices, one per rank, to hand to n threads."""
        group = _Group(_Run(n), tuple(range(n)), "world")
        return [cls(group, rank, timeout) for rank in range(n)]

    def abort(self, error: BaseException) -> None:
        """This device failed outside a collective: every rank blocked in one stops."""
        self._group.run.fail(self.members[self.rank], error)

    def finish(self) -> None:
        """This device's function returned: ranks still waiting for it stop at once."""
        run = self._group.run
        with run.lock:
            run.finished.add(self.members[self.rank])
            run.wake(list(run.sleeping))

    @property
    def failure(self) -> BaseException | None:
        """The first error of the run, if any rank failed."""
        return self._group.run.failure

    def _start(self, sig: Signature, x: np.ndarray | None, keep: bool) -> Handle:
        # A copy, unless this is an all-reduce waited for at once: this rank's wait may
        # return, and its caller write x, before the slower peers have read it; an
        # all-reduce's inputs are all read (into its one result) before any rank's wait ends.
        if x is not None and (keep or sig.kind != "all_reduce"):
            x = np.array(x, copy=True)
        slot = self._arrive(sig, x)
        if keep and slot is not None and sig.kind == "all_reduce":
            # Started ahead of its wait (the overlap schedule): the last rank to arrive reduces
            # now, so the data is combined while the others compute and their waits only copy.
            with slot.lock:
                slot.reduced(sig)
        return _ThreadHandle(self, sig)

    def _split(self, sig: Signature, color: int, key: int) -> Communicator:
        self._arrive(sig, (color, key))
        inputs, slot = self._gather(sig)
        ranks = split_groups(tuple(inputs))[color]
        with self._group.run.lock:
            group = slot.shared.get(color)
            if group is None:
                devices = tuple(self.members[r] for r in ranks)
                group = slot.shared[color] = _Group(self._group.run, devices,
                                                     f"{self.name}/{color}")
        return ThreadCommunicator(group, ranks.index(self.rank), self._timeout)

    def _arrive(self, sig: Signature, payload: Any) -> _Slot | None:
        """Leave this rank's signature and input in ``sig``'s slot; the slot for the last rank
        to arrive (None for the others)."""
        run = self._group.run
        with run.lock:
            self._raise_if_failed(sig)
            slot = self._group.slots.get(sig.seq)
            if slot is None:
                slot = self._group.slots[sig.seq] = _Slot(self.size, sig)
                run.open_slots += 1
            slot.signatures[self.rank] = sig
            slot.inputs[self.rank] = payload
            if sig != slot.first:
                self._fail(self._mismatch_error(slot.signatures))
            slot.arrived += 1
            if slot.arrived == self.size:  # the last to arrive wakes the others
                run.wake(slot.waiting)
                return slot
            return None

    def _gather(self, sig: Signature) -> tuple[list[Any], _Slot]:
        """Wait until every rank arrived at ``sig``'s slot; their inputs in rank order."""
        run = self._group.run
        me = self.members[self.rank]
        deadline = None
        while True:
            with run.lock:
                self._raise_if_failed(sig)
                slot = self._group.slots[sig.seq]
                if slot.arrived == self.size:
                    slot.taken += 1
                    if slot.taken == self.size:
                        del self._group.slots[sig.seq]
                        run.open_slots -= 1
                    return slot.inputs, slot
                missing = [r for r in range(self.size) if r not in slot.signatures]
                gone = [r for r in missing if self.members[r] in run.finished]
                if gone:
                    self._fail(CollectiveMismatchError(
                        f"{self._where(sig)}: {self._ranks(gone)} returned without calling it "
                        f"(seen on rank {self.rank})"))
                now = time.monotonic()
                deadline = deadline or now + self.timeout
                if now >= deadline:
                    self._fail(self._timeout_error(sig, missing))
                run.sleeping.add(me)
                slot.waiting.append(me)
            if not run.wakers[me].acquire(timeout=deadline - now):
                with run.lock:  # no wake-up came: stop sleeping, unless one came just now
                    if me in run.sleeping:
                        run.sleeping.discard(me)
                    else:
                        run.wakers[me].acquire()

    def _fail(self, error: BaseException) -> None:
        """Record ``error`` as the run's failure and raise it (the caller holds the lock)."""
        run = self._group.run
        if run.failure is None:
            run.failure, run.failed_device = error, self.members[self.rank]
        run.wake(list(run.sleeping))
        raise error

    def _raise_if_failed(self, sig: Signature) -> None:
        run = self._group.run
        if run.failure is not None:
            raise CollectiveAbortedError(
                f"{self._where(sig)} abandoned on rank {self.rank}: device {run.failed_device} "
                f"failed: {type(run.failure).__name__}: {run.failure}") from run.failure


class _ThreadHandle(Handle):
    def __init__(self, comm: ThreadCommunicator, sig: Signature) -> None:
        self._comm, self._sig = comm, sig
        self._done, self._result = False, None

    def wait(self) -> np.ndarray | None:
        if not self._done:
            inputs, slot = self._comm._gather(self._sig)
            if self._sig.kind == "all_reduce":
                # Every rank's result is the same: reduce once, not once per rank (n - 1
                # passes instead of n (n - 1)); each rank gets its own copy to write, the last
                # one the reduced array itself.
                with slot.lock:
                    common = slot.reduced(self._sig)
                    slot.copies += 1
                    last = slot.copies == self._comm.size
                    self._result = common if last else common.copy()
            elif self._sig.kind != "barrier":
                self._result = local_result(self._sig, inputs, self._comm.rank)
            self._done = True
        return self._result


class DevicePool:
    """n daemon threads, one per virtual device, each waiting for the next task.

    :meth:`take` gives a free pool of n threads (made if none is free), :meth:`communicators`
    its devices' communicators for a run, and :meth:`start` hands ``task(i)`` to thread ``i``
    and returns a held lock, released once every thread has returned from its task (a bare
    lock: an Event's condition variable costs more, and acquiring a lock is interrupted by
    Ctrl-C as well). A pool busy with one run is not handed to another: concurrent runs (two
    user threads, or a run whose caller left on Ctrl-C while its devices still compute) each
    take their own pool, so no run waits for threads held by another. The last thread to
    finish puts its pool back on the free list, before the lock is released, so the next run
    of the same caller reuses it.
    There are as many pools of n threads as runs of n devices ever ran at once.
    """

    _free: dict[int, list[DevicePool]] = {}
    _lock = threading.Lock()

    def __init__(self, n: int) -> None:
        self.n = n
        self._inboxes: list[queue.SimpleQueue[Callable[[], None]]] = [
            queue.SimpleQueue() for _ in range(n)]
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._done: Any  # the held lock of the current run, made by start
        # The last run's communicators, while it ended cleanly: with them, the groups split
        # from them (a sharded program's mesh axes) serve the next run without a split.
        self._comms: list[ThreadCommunicator] | None = None
        self._timeout: float | None = None
        for i, inbox in enumerate(self._inboxes):
            threading.Thread(target=self._serve, args=(i, inbox), name=_idle_name(i),
                             daemon=True).start()

    @classmethod
    def take(cls, n: int) -> DevicePool:
        """A free pool of ``n`` threads, made if none is free; :meth:`start` must follow."""
        with cls._lock:
            free = cls._free.setdefault(n, [])
            pool = free.pop() if free else None
        return cls(n) if pool is None else pool

    def communicators(self, timeout: float | None) -> list[ThreadCommunicator]:
        """The communicators of a run on this pool: the last run's when it ended cleanly
        with the same ``timeout``, else new ones (a failed run's may be out of step)."""
        comms = self._comms
        if comms is None or self._timeout != timeout or not comms[0]._group.run.ended_cleanly():
            comms = self._comms = ThreadCommunicator.world(self.n, timeout)
            self._timeout = timeout
        else:
            comms[0]._group.run.restart()
        return comms

    def start(self, task: Callable[[int], None]) -> Any:
        """Run ``task(i)`` on thread ``i``. ``task`` must not raise: a device's error belongs
        in its communicator."""
        done = self._done = _held_lock()
        self._pending = self.n
        for i, inbox in enumerate(self._inboxes):
            inbox.put(functools.partial(task, i))
        return done

    def _serve(self, i: int, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        me = threading.current_thread()
        while True:
            job = inbox.get()
            me.name = f"ember-device-{i}"  # as a fresh thread per run was named (py-spy, tests)
            try:
                job()
            finally:
                me.name = _idle_name(i)
                self._finished()

    def _finished(self) -> None:
        with self._pending_lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            done = self._done
            with DevicePool._lock:
                DevicePool._free[self.n].append(self)
            done.release()


def _forget_pools() -> None:
    """A child made by fork has none of its parent's threads (and maybe a lock held by one of
    them): it starts its own pools."""
    DevicePool._free, DevicePool._lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def _idle_name(i: int) -> str:
    return f"ember-idle-device-{i}"
