"""Run under ``ember launch -n N``: ``python train_cli.py ARGS...`` is ``ember train ARGS...``
in every process (the command line's own code path, one device per process).
``python train_cli.py --log-dir DIR ARGS...`` writes each process's output (stdout and stderr)
to ``DIR/process-<index>.log`` instead, so a test can tell who printed what."""

import os
import sys

from ember import cli
from ember.parallel import process_index

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--log-dir"]:
        log = os.open(os.path.join(args[1], f"process-{process_index()}.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        args = args[2:]
    sys.exit(cli.main(["train", *args]))
