"""Collectives over MPI processes started by ``ember launch``, and what happens when one fails.

Each test launches a small script from ``tests/mpi_scripts/`` on real processes. The fault
tests check the promise of decision 0022: whatever one process does wrong (dies, raises,
skips a collective, stalls, passes another shape), every process ends with a non-zero exit
within the deadline, and the output names the rank and the collective. Skipped where mpi4py
or the mpich wheel's ``mpiexec`` is missing (``pip install 'ember[mpi]'``), except in CI.
"""

import re
import sys

import pytest
from helpers import require_mpi

from ember import cli
from ember.errors import EmberError
from ember.parallel import launch

TIMEOUT = 2.0  # EMBER_COLLECTIVE_TIMEOUT of the launched jobs

require_mpi()


@pytest.mark.parametrize("n,cli", [(2, True), (4, False)])
def test_every_collective_matches_numpy_and_the_thread_runtime(ember_launch, n, cli):
    status, output, _ = ember_launch(n, "collectives.py", cli=cli, timeout=TIMEOUT)
    assert status == 0, output
    for rank in range(n):
        assert f"rank {rank} of {n}: ok" in output, output


def test_collective_primitives_of_per_device_programs_run_over_mpi(ember_launch):
    """The partitioner's collectives, eager and compiled, on a 2 x 2 mesh of processes equal
    the lockstep simulator (a long deadline: each process may compile C first)."""
    status, output, _ = ember_launch(4, "primitives.py", timeout=120)
    assert status == 0, output
    for rank in range(4):
        assert f"process {rank}: ok" in output, output


# What the output must say in each case: the rank at fault and the collective.
FAULTS = {
    "skip": [r"collective mismatch in group 'world' of 3",
             r"rank 1 called all_gather\(axis=0\) #2 of float32\[2\]",
             r"ranks 0, 2 called all_reduce\(op='sum'\) #2 of float32\[4\]"],
    "shapes": [r"collective mismatch in group 'world' of 3",
               r"rank 1 called all_reduce\(op='sum'\) #2 of float32\[5\]",
               r"ranks 0, 2 called all_reduce\(op='sum'\) #2 of float32\[4\]"],
    "exit": [r"all_reduce\(op='sum'\) #2 of float32\[4\] in group 'world' of 3 timed out on "
             r"rank [02] after 2 s: rank 1 did not arrive"],
    "stall": [r"all_reduce\(op='sum'\) #2 of float32\[4\] in group 'world' of 3 timed out on "
              r"rank [02] after 2 s: rank 1 did not arrive"],
    "raise": [r"process 1 of 3 aborts the job: ValueError: rank 1 failed outside any "
              r"collective\n +at .*faults.py:33: raise ValueError"],
    # mpiexec kills the others at once; ember launch then says where each process was
    "kill": [r"Killed \(signal 9\)", r"no process reported an error",
             r"process [02]: waiting in all_reduce\(op='sum'\) #2 of float32\[4\] in group "
             r"'world' of 3, called at .*faults.py:40",
             r"process 1: running; its last collective was all_reduce\(op='sum'\) #1"],
}


@pytest.mark.parametrize("mode", sorted(FAULTS))
def test_a_failing_process_stops_every_process_within_the_deadline(ember_launch, mode):
    status, output, seconds = ember_launch(3, "faults.py", mode, timeout=TIMEOUT)
    assert status != 0, output
    assert "finished" not in output, output  # no process went on past the failure
    assert seconds < TIMEOUT + 20, output  # process start-up on a busy machine + the deadline
    for pattern in FAULTS[mode]:
        assert re.search(pattern, output), (pattern, output)
    # the reasons, printed again by ember launch once the job ended
    summary = output[output.index("ember launch: the job failed"):]
    assert re.search(FAULTS[mode][-1], summary), output
    if mode in ("skip", "shapes", "exit", "stall"):
        assert re.search(r"aborts the job: Collective\w+Error: .*\n +at .*faults.py:40: "
                         r"c.all_reduce\(np.ones\(shape, np.float32\)\)", output), output


def test_launch_without_a_command_or_with_a_bad_count_is_a_clear_error(capsys):
    for args, message in ((["-n", "2"], "ember launch: error: no command to run"),
                          (["-n", "0", "python", "x.py"],
                           "ember launch: error: argument -n: expected an integer >= 1")):
        assert cli.main(["launch", *args]) == 2
        assert message in capsys.readouterr().err


def test_launch_passes_ember_variables_and_runs_this_python(monkeypatch):
    monkeypatch.setenv("EMBER_CPU_DEVICES", "3")
    args, env = launch.command_line(2, ["python", "train.py"], timeout=7)
    assert args[0] == launch.find_mpiexec() and args[1:3] == ["-n", "2"]
    assert args[-2:] == [sys.executable, "train.py"]
    pairs = {args[i + 1]: args[i + 2] for i, a in enumerate(args) if a == "-genv"}
    assert pairs["EMBER_CPU_DEVICES"] == "3" and pairs["EMBER_COLLECTIVE_TIMEOUT"] == "7.0"
    assert env["EMBER_COLLECTIVE_TIMEOUT"] == "7.0"


def test_a_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmberError, match=r"pip install 'ember\[mpi\]'"):
        launch.find_mpiexec()


@pytest.mark.parametrize("user", [{}, {"EMBER_NUM_THREADS": "5"}, {"OMP_NUM_THREADS": "3,2"}])
def test_launch_gives_each_process_its_share_of_the_cores_unless_the_user_chose(
        monkeypatch, user):
    monkeypatch.setattr(launch, "available_cores", lambda: 8)
    for name in launch.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in user.items():
        monkeypatch.setenv(name, value)
    args, env = launch.command_line(3, ["python", "train.py"])
    pairs = {args[i + 1]: args[i + 2] for i, a in enumerate(args) if a == "-genv"}
    assert pairs.get("EMBER_NUM_THREADS") == env.get("EMBER_NUM_THREADS") == (
        user.get("EMBER_NUM_THREADS") or (None if user else "2"))  # 8 cores // 3 processes
    assert env.get("OMP_NUM_THREADS") == user.get("OMP_NUM_THREADS")


@pytest.mark.parametrize("user", [{}, {"OMP_NUM_THREADS": "3"}])
def test_launched_processes_run_the_default_threads_or_the_users(ember_launch, monkeypatch,
                                                                 user):
    for name in launch.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in user.items():
        monkeypatch.setenv(name, value)
    status, output, _ = ember_launch(2, "threads.py", timeout=TIMEOUT)
    assert status == 0, output
    threads = 3 if user else max(1, launch.available_cores() // 2)
    default = None if user else str(threads)
    for rank in range(2):
        assert (f"process {rank}: threads {threads} {{'EMBER_NUM_THREADS': {default!r}, "
                f"'OMP_NUM_THREADS': {user.get('OMP_NUM_THREADS')!r}}}") in output, output


def test_a_thread_count_that_is_not_a_number_is_a_clear_error(monkeypatch):
    from ember.backends.cpu.program import program_threads

    monkeypatch.delenv("EMBER_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")
    assert program_threads() == 4  # the outer level of a nested setting
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(EmberError, match="OMP_NUM_THREADS='many': expected a number of threads"):
        program_threads()
