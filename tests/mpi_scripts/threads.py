"""Run under ``ember launch -n N``: each process prints the thread count its compiled programs
use, and the variables that chose it, for the test to compare with what launch promised."""

import os

from ember.backends.cpu.program import program_threads
from ember.parallel import runtime


def main() -> None:
    chosen = {name: os.environ.get(name) for name in ("EMBER_NUM_THREADS", "OMP_NUM_THREADS")}
    print(f"process {runtime.process_index()}: threads {program_threads()} {chosen}", flush=True)


if __name__ == "__main__":
    main()
