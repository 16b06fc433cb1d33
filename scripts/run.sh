#!/usr/bin/env bash
# Set up a virtual environment with Ember and run the main job (``ember demo``; pass other
# ``ember`` subcommands as arguments, e.g. ``bash scripts/run.sh info``).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e .
if [ "$#" -eq 0 ]; then
  set -- demo
fi
exec .venv/bin/ember "$@"
