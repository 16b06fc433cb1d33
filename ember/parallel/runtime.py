"""Which runtime this process runs under: how many processes the job has and which one this is.

A job is either one process (the default: any number of virtual devices, see ``EMBER_CPU_DEVICES``)
or several processes started by ``ember launch`` (MPI). The process count is read from MPI's
``COMM_WORLD`` when the process was started by an MPI launcher, and mpi4py is imported only
then, so ember imports and runs without it.
"""

from __future__ import annotations

import functools
import os

from ember.errors import EmberError

# Set by the process managers of MPICH/Intel MPI (hydra), Open MPI and PMIx launchers.
_MPI_LAUNCH_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class RuntimeUnavailableError(EmberError, RuntimeError):
    """A runtime the job needs (MPI) is not installed."""


def launched_under_mpi() -> bool:
    """True when an MPI launcher (``ember launch``, ``mpiexec``) started this process."""
    return any(name in os.environ for name in _MPI_LAUNCH_VARIABLES)


@functools.cache
def mpi_world():
    """mpi4py's ``COMM_WORLD`` (importing mpi4py initialises MPI, so this is done once, late)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeUnavailableError(
            "this process was started by an MPI launcher but mpi4py is not installed: "
            "pip install 'ember[mpi]'") from e
    return MPI.COMM_WORLD


def process_count() -> int:
    """The number of processes in the job: 1 unless launched under MPI."""
    return mpi_world().Get_size() if launched_under_mpi() else 1


def process_index() -> int:
    """This process's index in the job, from 0: its MPI rank, or 0 when not launched."""
    return mpi_world().Get_rank() if launched_under_mpi() else 0
