"""Run under ``ember launch -n N``: rank 1 misbehaves in the way argv[1] names.

Every rank does one good all-reduce first (the job is up), then rank 1:
  kill    kills itself with SIGKILL while the others are in an all-reduce
  raise   raises ValueError outside any collective
  skip    skips the all-reduce and calls the next collective (an all-gather)
  exit    skips the all-reduce and returns (the others wait for it)
  stall   sleeps far past the deadline before the all-reduce
  shapes  passes a different shape to the all-reduce
Each case must end every process with a non-zero exit, quickly, naming rank and collective.
"""

import os
import signal
import sys
import time

import numpy as np

from ember.parallel import runtime


def main(mode: str) -> None:
    runtime.mpi_world().Barrier()  # start-up may take longer than the test's short deadline
    c = runtime.world()
    c.all_reduce(np.ones(4, np.float32))
    print(f"rank {c.rank}: first all_reduce done", flush=True)
    if c.rank == 1:
        if mode == "kill":
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "raise":
            raise ValueError("rank 1 failed outside any collective")
        if mode == "exit":
            return
        if mode == "stall":
            time.sleep(60)
    shape = (5,) if c.rank == 1 and mode == "shapes" else (4,)
    if not (c.rank == 1 and mode == "skip"):
        c.all_reduce(np.ones(shape, np.float32))
    c.all_gather(np.ones(2, np.float32))
    print(f"rank {c.rank}: finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
