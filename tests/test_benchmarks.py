"""benchmarks/bench_gpu.py and bench_dpo.py --quick: each benchmark's whole path, on the CPU, so it
cannot rot."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ["load", "initial losses", "training", "evaluation", "answers"]


def quick_table(script):
    """Run benchmarks/`script` --quick; return its table's rows as lists of cells, after
    checking that it succeeded and that its first line names the torch version."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script),
                             "--quick"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("torch ")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_gpu_benchmark_quick_prints_one_table_of_every_phase_and_count():
    rows = quick_table("bench_gpu.py")
    assert rows[0] == ["GPT-2 2-layer, 1 epoch(s), 4 new tokens at most", "book", "fp32",
                       "fp32+compile"]
    table = {row[0]: row[1:] for row in rows[2:]}
    assert list(table) == [
        *(f"{phase} (s)" for phase in PHASES), "whole job (s)",
        *(f"{phase}: peak resident (GiB)" for phase in PHASES), "median step (ms)",
        "initial losses", "operations per step", "syncs per step", "compiled graphs",
        "graph breaks", "CUDA graph recordings", "distinct step lengths"]
    for phase in PHASES:
        assert all(float(cell) > 0 for cell in table[f"{phase} (s)"]), phase
        assert all(float(cell) > 0 for cell in table[f"{phase}: peak resident (GiB)"]), phase
    for column in range(3):  # the whole job is the sum of its phases (each rounded)
        phases = sum(float(table[f"{phase} (s)"][column]) for phase in PHASES)
        assert abs(float(table["whole job (s)"][column]) - phases) < 0.03
    book, fp32, compiled = table["initial losses"]
    assert book == fp32 == compiled  # the same weights and batches give the book's numbers
    # The GPU path: no waits in a step, one graph for every length, no break, no recording.
    assert table["syncs per step"] == ["-", "0", "-"]
    assert int(table["operations per step"][1]) > 0
    assert table["compiled graphs"] == ["-", "0", "1"]
    assert table["graph breaks"] == ["-", "0", "0"]
    assert table["CUDA graph recordings"] == ["-", "0", "0"]
    assert table["distinct step lengths"][1:] == ["2", "2"]


def test_dpo_benchmark_quick_prints_both_paths_and_the_ratio():
    rows = quick_table("bench_dpo.py")
    assert rows[0] == ["GPT-2 2-layer, 64 wide, batch 8, 1 steps, CPU", "median step",
                       "peak resident"]
    table = {row[0]: row[1:] for row in rows[2:]}
    assert list(table) == ["notebook (two models, four passes)",
                           "script (precomputed reference, one pass)", "speed-up / memory ratio",
                           "reference precompute, per entry (once)",
                           "script step + its batch's precompute",
                           "speed-up with the precompute (one epoch)"]
    book, ours = (float(table[name][0].rstrip(" s")) for name in list(table)[:2])
    assert_ratio(table["speed-up / memory ratio"][0], book, ours)
    per_entry = float(table["reference precompute, per entry (once)"][0].rstrip(" s"))
    charged = float(table["script step + its batch's precompute"][0].rstrip(" s"))
    assert abs(charged - (ours + 8 * per_entry)) <= 0.01 + 8 * 0.0005
    assert_ratio(table["speed-up with the precompute (one epoch)"][0], book, charged)


def assert_ratio(shown, numerator, denominator, half_step=0.005):
    """`shown` ("1.53x") is numerator / denominator, both printed to 2 decimals: the ratio of
    the unrounded times lies between the ratios of the rounding's extremes."""
    low = (numerator - half_step) / (denominator + half_step)
    high = (numerator + half_step) / (denominator - half_step)
    assert shown.endswith("x") and low - 0.005 <= float(shown[:-1]) <= high + 0.005, shown
