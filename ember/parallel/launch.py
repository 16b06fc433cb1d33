"""``ember launch -n N <command>``: run a command as N MPI processes on this machine.

It runs the ``mpiexec`` of the ``mpich`` wheel (installed beside this Python by
``pip install 'ember[mpi]'``), so the processes use the MPI library mpi4py was built against,
not whichever MPI happens to be first on ``PATH``. ``EMBER_*`` variables reach every process
(``--timeout`` sets ``EMBER_COLLECTIVE_TIMEOUT``), and a command starting with ``python`` runs
this Python, the one ember is installed in.

The processes share this machine's cores: unless the user chose a thread count
(``EMBER_NUM_THREADS`` or ``OMP_NUM_THREADS``), each gets ``EMBER_NUM_THREADS`` = cores / N (at
least 1), as torchrun sets one OpenMP thread, so N processes never start N x cores threads.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from ember.backends.cpu.program import available_cores
from ember.errors import EmberValueError
from ember.parallel.runtime import RuntimeUnavailableError

INSTALL_HINT = "pip install 'ember[mpi]'"


# A user's thread count in either of these wins over launch's default.
THREAD_VARIABLES = ("EMBER_NUM_THREADS", "OMP_NUM_THREADS")


def default_threads(n: int) -> int:
    """Each of ``n`` processes' share of the cores this process may run on (at least 1)."""
    return max(1, available_cores() // n)


def find_mpiexec() -> str:
    """The ``mpiexec`` that belongs to this Python's mpi4py; a clear error when missing."""
    if importlib.util.find_spec("mpi4py") is None:
        raise RuntimeUnavailableError(f"ember launch needs mpi4py and mpich: {INSTALL_HINT}")
    here = os.path.dirname(sys.executable)
    found = shutil.which("mpiexec", path=here) or shutil.which("mpiexec")
    if found is None:
        raise RuntimeUnavailableError(
            f"ember launch found mpi4py but no mpiexec (next to {sys.executable} or on PATH): "
            f"{INSTALL_HINT}")
    return found


def command_line(n: int, command: Sequence[str], timeout: float | None = None,
                 variables: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``mpiexec`` argument list and environment that run ``command`` on ``n`` processes
    (``variables``: more ``EMBER_*`` settings for them)."""
    if n < 1:
        raise EmberValueError(f"-n {n}: expected at least 1 process")
    if not command:
        raise EmberValueError("no command to run, as in: ember launch -n 2 python train.py")
    env = {**os.environ, **(variables or {})}
    if not any(env.get(name) for name in THREAD_VARIABLES):
        env["EMBER_NUM_THREADS"] = str(default_threads(n))
    if timeout is not None:
        env["EMBER_COLLECTIVE_TIMEOUT"] = repr(float(timeout))
    program = list(command)
    if program[0] in ("python", "python3"):
        program[0] = sys.executable
    passed = [arg for name in sorted(env) if name.startswith("EMBER_")
              for arg in ("-genv", name, env[name])]
    return [find_mpiexec(), "-n", str(n), *passed, *program], env


def launch(n: int, command: Sequence[str], timeout: float | None = None) -> int:
    """Run ``command`` as ``n`` MPI processes and return mpiexec's exit status (non-zero when
    any process failed: a failing process aborts the job).

    A process that aborts the job also writes why into a folder made for this run
    (``EMBER_LAUNCH_DIR``); those reasons are printed again once the job has ended, last, where
    they cannot be lost among (or cut off from) mpiexec's own messages.
    """
    with tempfile.TemporaryDirectory(prefix="ember-launch-") as folder:
        args, env = command_line(n, command, timeout, {"EMBER_LAUNCH_DIR": folder})
        status = subprocess.run(args, env=env, check=False).returncode
        if status:
            _report(pathlib.Path(folder), status)
        return status


def _report(folder: pathlib.Path, status: int) -> None:
    """Say why the job failed: the processes' own reasons, or, when none gave one (a process
    was killed from outside, and mpiexec then killed the rest), where each process was."""
    def by_rank(kind: str) -> list[tuple[int, str]]:
        found = [(int(p.stem.split("-")[1]), p.read_text().strip())
                 for p in folder.glob(f"process-*.{kind}")]
        return sorted(found)

    reasons = by_rank("error")
    if reasons:
        print(f"ember launch: the job failed (mpiexec exit status {status}):", file=sys.stderr)
        lines = [text for _, text in reasons]
    else:
        print(f"ember launch: the job failed (mpiexec exit status {status}) and no process "
              "reported an error: one was killed (see mpiexec's message above). Where each "
              "process was:", file=sys.stderr)
        lines = [f"process {rank}: {text}" for rank, text in by_rank("state")]
    for line in lines:
        print("  " + line.replace("\n", "\n  "), file=sys.stderr)

