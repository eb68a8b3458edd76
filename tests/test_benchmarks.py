"""benchmarks/bench_gpu.py --quick: the GPU benchmark's whole path, on the CPU, so it cannot rot."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_quick_prints_one_table_of_every_phase():
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_gpu.py"),
                             "--quick"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("torch ")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    assert rows[0] == ["GPT-2 124M, 1 epoch(s), 4 new tokens at most", "book", "fp32", "bf16"]
    assert [row[0] for row in rows[2:]] == [
        "load (s)", "initial losses (s)", "training (s)", "answers (s)", "whole job (s)",
        "peak resident (GiB)", "median step (ms)", "initial losses"]
    for row in rows[2:9]:
        assert all(float(cell) > 0 for cell in row[1:]), row
    for column in (1, 2, 3):  # the whole job is the sum of its phases (each rounded)
        phases = sum(float(row[column]) for row in rows[2:6])
        assert abs(float(rows[6][column]) - phases) < 0.03
    book, fp32, bf16 = rows[9][1:]
    assert book == fp32  # the same weights and batches give the book's numbers
    assert bf16 != fp32 and abs(float(bf16.split(" / ")[0]) - float(fp32.split(" / ")[0])) < 0.1
