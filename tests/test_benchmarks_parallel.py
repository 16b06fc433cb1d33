"""benchmarks/parallel.py: its ``--quick`` path for one plan on 2 virtual devices prints a table
whose columns say what the per-device program does (the bytes and collectives of its
``explain()``, the parameters and moments each device holds) and whose losses agree."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
BENCH = ROOT / "benchmarks" / "parallel.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmarks_parallel", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    path = list(sys.path)
    spec.loader.exec_module(module)
    sys.path[:] = path  # it puts benchmarks/ first, whose module names must not shadow others
    return module


def parse_table(output: str, header: str) -> dict[str, dict[str, str]]:
    """The table's rows by plan: the fixed columns from the left, the memory from the right, the
    collectives (several words) between."""
    lines = output.splitlines()
    start = lines.index(header) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith("GEMM limit"):
            break
        words = line.split()
        assert len(words) >= 12, line
        rows[words[0]] = dict(zip(
            ["devices", "runtime", "threads", "step_ms", "vs_1", "tok_s", "pct"], words[1:8]),
            comm=words[8], collectives=" ".join(words[9:-3]), held=words[-3], prog=words[-2],
            rss=words[-1])
    return rows


def test_quick_run_reports_the_programs_bytes_and_collectives():
    bench = load_benchmark()
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--plans", "dp=2",
                           "--runtimes", "threads", "--peers", "none"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = parse_table(done.stdout, bench.HEADER)
    assert list(rows) == ["single", "dp=2"], done.stdout
    single, dp2 = rows["single"], rows["dp=2"]
    assert (single["devices"], single["runtime"], single["vs_1"], single["comm"],
            single["collectives"]) == ("1", "threads", "1.00", "0.00", "-")
    assert (dp2["devices"], dp2["runtime"], dp2["threads"]) == ("2", "threads", "2x1")

    # The same step, lowered here on 2 of this process's devices: its explain() is the column.
    size = bench.SIZES["quick"]
    model = bench.build(size)
    n_params = model.num_parameters()
    step, state, place = bench.recipe(model, "dp=2")
    batch = np.zeros((1, size.batch, size.seq), np.int32)
    explanation = step.lower(model, state, place(batch)).explain()
    assert explanation.total_bytes > 0
    assert abs(float(dp2["comm"]) - explanation.total_bytes / 2**20) <= 0.005
    assert dp2["collectives"] == bench._collectives(dict(explanation.counts()))
    # Data parallel: every device holds the parameters and both AdamW moments whole (float32).
    for row in (single, dp2):
        assert abs(float(row["held"]) - 3 * 4 * n_params / 2**20) <= 0.005
    step_ms = float(dp2["step_ms"])  # printed whole: tokens/s agrees up to that rounding
    assert abs(float(dp2["tok_s"]) * step_ms / 1e3 / size.tokens - 1) <= 0.5 / step_ms + 1e-3
    gap = re.search(r"every ember row within (\S+) of it", done.stdout)
    assert gap and float(gap.group(1)) < 1e-4, done.stdout


def test_gathered_parameters_of_zero3_with_recomputed_layers_are_one_layers():
    """The ZeRO-3 check's liveness count: a device's program holds the gathered parameters of
    at most one layer at a time (the largest: here a decoder layer), as docs/parallel.md
    says, with recomputed layers and without (the backward pass gathers them again)."""
    bench = load_benchmark()
    size = bench.SIZES["quick"]
    peaks = {}
    for plan in ("dp=4,zero=3,ckpt=1", "dp=4,zero=3"):
        model = bench.build(size, plan)
        step, state, place = bench.recipe(model, plan)
        batch = np.zeros((1, size.batch, size.seq), np.int32)
        lowered = step.lower(model, state, place(batch))
        peaks[plan] = bench.gathered_peak(lowered.sharded.partitioned.graph.graph)
    # A layer's weight matrices (its norms' vectors may stay whole on every device).
    layers = [sum(bench.nbytes(p) for p in layer.parameters() if len(p.shape) == 2)
              for layer in model.model.layers]
    embedding = bench.nbytes(model.model.embed_tokens.weight)
    one = max(*layers, embedding)
    assert one <= peaks["dp=4,zero=3,ckpt=1"] <= one + 64
    assert embedding <= peaks["dp=4,zero=3"] <= one + 64
