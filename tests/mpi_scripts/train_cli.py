"""Run under ``ember launch -n N``: ``python train_cli.py ARGS...`` is ``ember train ARGS...``
in every process (the command line's own code path, one device per process)."""

import sys

from ember import cli

if __name__ == "__main__":
    sys.exit(cli.main(["train", *sys.argv[1:]]))
