"""Which runtime this process runs under, and the communicator of the device running now.

A job is either one process (the default: any number of virtual devices, see ``EMBER_CPU_DEVICES``)
or several processes started by ``ember launch`` (MPI). The process count is read from MPI's
``COMM_WORLD`` when the process was started by an MPI launcher, and mpi4py is imported only
then, so ember imports and runs without it.

Virtual devices run as threads (:func:`run_on_devices`); each thread sees its own device index
and communicator through :func:`local_device` and :func:`world`, so code written for one device
(a per-device program, a ``shard_map`` body) needs no extra arguments to find its peers.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from ember.errors import EmberError, EmberValueError, op_error
from ember.parallel.communicator import Communicator
from ember.parallel.threads import DevicePool, ThreadCommunicator

T = TypeVar("T")

# Set by the process managers of MPICH/Intel MPI (hydra), Open MPI and PMIx launchers.
_MPI_LAUNCH_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
_STATE_BYTES = 1024  # one fixed-size record, rewritten in place: see record_state


class RuntimeUnavailableError(EmberError, RuntimeError):
    """A runtime the job needs (MPI) is not installed."""


def launched_under_mpi() -> bool:
    """True when an MPI launcher (``ember launch``, ``mpiexec``) started this process."""
    return any(name in os.environ for name in _MPI_LAUNCH_VARIABLES)


@functools.cache
def mpi() -> Any:
    """mpi4py's ``MPI`` module, imported on first use (importing it initialises MPI).

    From then on an exception that reaches the top of this process aborts the whole job:
    otherwise its peers would wait for it until their collectives' deadline.
    """
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeUnavailableError(
            "MPI needs mpi4py and an MPI library: pip install 'ember[mpi]'") from e
    previous = sys.excepthook

    def abort_on_exception(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        previous(kind, error, tb)
        where = traceback.extract_tb(tb)[-1] if tb is not None else None
        at = f"\n  at {where.filename}:{where.lineno}: {where.line}" if where else ""
        abort_job(f"{kind.__name__}: {error}{at}")

    sys.excepthook = abort_on_exception
    return MPI


def abort_job(message: str) -> NoReturn:
    """Report why this process fails and end every process of the job (exit status 1).

    The message goes to stderr and, under ``ember launch``, to a file the launcher prints
    once the job has ended: mpiexec may kill a process before its last output is forwarded.
    """
    world = mpi().COMM_WORLD
    text = f"process {world.Get_rank()} of {world.Get_size()} aborts the job: {message}"
    print(f"ember: {text}", file=sys.stderr, flush=True)
    path = _launch_file("error")
    if path is not None:
        with open(path, "w") as f:
            f.write(text)
    time.sleep(0.2)  # let mpiexec forward the message before its clean-up kills the pipes
    world.Abort(1)
    os._exit(1)  # MPICH's Abort may return before its process manager kills this process


def record_state(text: Callable[[], str]) -> None:
    """Note what this process is doing (``waiting in all_reduce #3...``), so that when the job
    is killed from outside ``ember launch`` can say where each process was. ``text`` is only
    called under ``ember launch``."""
    fd = _state_file()
    if fd is not None:
        os.pwrite(fd, text().encode()[:_STATE_BYTES].ljust(_STATE_BYTES), 0)


@functools.cache
def _state_file() -> int | None:
    path = _launch_file("state")
    return None if path is None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def _launch_file(kind: str) -> str | None:
    """This process's report file of ``kind`` in the folder ``ember launch`` made, if any."""
    folder = os.environ.get("EMBER_LAUNCH_DIR")
    if not (folder and os.path.isdir(folder) and launched_under_mpi()):
        return None
    return os.path.join(folder, f"process-{process_index()}.{kind}")


def mpi_world() -> Any:
    """mpi4py's ``COMM_WORLD``."""
    return mpi().COMM_WORLD


def process_count() -> int:
    """The number of processes in the job: 1 unless launched under MPI."""
    return mpi_world().Get_size() if launched_under_mpi() else 1


def process_index() -> int:
    """This process's index in the job, from 0: its MPI rank, or 0 when not launched."""
    return mpi_world().Get_rank() if launched_under_mpi() else 0


_current = threading.local()  # .device, .world: set on the threads of run_on_devices


def local_device() -> int:
    """The index of the virtual device the calling thread runs, from 0 (0 outside
    :func:`run_on_devices`)."""
    return getattr(_current, "device", 0)


def world() -> Communicator:
    """The communicator over every device of the job, seen from the calling device: its
    virtual devices' group inside :func:`run_on_devices`, else the MPI processes when launched
    under MPI, else a group of one."""
    comm = getattr(_current, "world", None)
    if comm is not None:
        return comm
    return _mpi_communicator() if launched_under_mpi() else _single()


@functools.cache
def _single() -> Communicator:
    return ThreadCommunicator.world(1)[0]


@functools.cache
def _mpi_communicator() -> Communicator:
    from ember.parallel.mpi import MPICommunicator

    return MPICommunicator(mpi_world())


def run_on_devices(fn: Callable[[int], T], n: int, *,
                   timeout: float | None = None) -> list[T]:
    """Run ``fn(i)`` for ``i`` in ``range(n)``, each on its own thread as virtual device ``i``
    with its own :func:`world` communicator; return the results in device order.

    The threads are a :class:`~ember.parallel.threads.DevicePool` kept from one call to the
    next, and so are their communicators while every call ends cleanly (a failed call's are
    replaced): the groups a sharded program splits from them are split once, not per call. A
    call from inside a virtual device is an error rather than a run on another pool: which
    devices a nested run's collectives would span is not defined (``shard_map`` on a virtual
    device runs that device's block inline instead).
    Measured on 2 shared cores (best of 500, against the former thread-per-call version run
    side by side): a trivial ``fn`` costs 0.12 ms for n=2 and 0.43 ms for n=8 with new threads,
    0.03 and 0.08 ms with the pool; the 8-device (dp=8) MLP step of
    ``tests/test_parallel_jit.py`` on the cpu backend went from 4.4 to 3.2-4.3 ms (0.09 ms on
    one device), then, with collectives waking each rank once and the groups kept, to 2.7 ms
    (dp=2: 0.97 to 0.67 ms; dp=2 x tp=2: 2.3 to 1.3 ms; best of several runs on a busy
    machine): what remains is the devices' own work and handoffs, 8 threads on 2 cores.

    When a call raises, every device blocked in a collective stops at once with
    :class:`~ember.parallel.communicator.CollectiveAbortedError`; once every thread has
    stopped the first error is raised here (Ctrl-C is raised at once). ``timeout`` overrides
    ``EMBER_COLLECTIVE_TIMEOUT``.
    """
    if not isinstance(n, int) or n < 1:
        raise op_error(EmberValueError, "run_on_devices", f"n={n!r}: expected an int >= 1")
    if getattr(_current, "world", None) is not None:
        raise op_error(EmberValueError, "run_on_devices",
                       f"called on virtual device {local_device()}, inside another "
                       "run_on_devices: virtual devices do not nest")
    pool = DevicePool.take(n)
    comms = pool.communicators(timeout)
    results: list[Any] = [None] * n

    def device(i: int) -> None:
        _current.device, _current.world = i, comms[i]
        try:
            results[i] = fn(i)
        except BaseException as e:  # re-raised in the caller once every thread stopped
            comms[i].abort(e)
        else:
            comms[i].finish()
        finally:
            _current.device, _current.world = 0, None  # the pool thread idles as no device

    done = pool.start(device)
    try:
        done.acquire()
    except KeyboardInterrupt as e:
        # Ctrl-C: stop every device at its next collective and return to the user at once;
        # a thread still computing keeps its pool until it returns (later runs take another),
        # and is a daemon, so it cannot keep the program alive.
        comms[0].abort(e)
        raise
    failure = comms[0].failure
    if failure is not None:
        raise failure
    return results
