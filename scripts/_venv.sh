# Sourced by run.sh and test.sh (which set ROOT, the repository): ensure_venv makes
# $ROOT/.venv hold Ember with some extras plus some packages. It installs only when
# pyproject.toml or the request changed since its last install (a stamp file in .venv records
# a hash of both), so a script's every call after the first starts at once.
# Usage: ensure_venv EXTRAS "what is installed, in words" [PACKAGE...]
# (the packages are installed with --no-deps)
ensure_venv() {
  local extras="$1" what="$2"
  shift 2
  local venv="$ROOT/.venv" py="${PYTHON:-python3}"
  local stamp="$venv/.ember-installed-$extras" want
  want="$( (cat "$ROOT/pyproject.toml"; echo "$extras $*") | "$py" -c \
    'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "ember: creating a virtual environment in $venv with $py" >&2
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
  fi
  echo "ember: installing $what into $venv (once; again only when pyproject.toml" \
       "changes)" >&2
  "$venv/bin/python" -m pip install --quiet -e "$ROOT[$extras]"
  if [ "$#" -gt 0 ]; then
    "$venv/bin/python" -m pip install --quiet --no-deps "$@"
  fi
  echo "$want" > "$stamp"
}
