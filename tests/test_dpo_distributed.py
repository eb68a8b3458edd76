"""dpo_finetuning.py under torchrun: 2 gloo processes on the CPU train the weights of one
process, print and log its numbers, and write every file once."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import SHARED_DATA
from helpers import REPO, random_model, run_in_process, save

import dpo_finetuning as dpo
from kit.saved_model import TEST_MODE_CONFIG

SFT = "Smalltestmodel-sft-standalone.pth"
OUT = "Smalltestmodel-sft-standalone-dpo.pth"
# 10 training entries in global batches of 4: 2 steps per epoch, each rank 2 entries a step;
# evaluations over 2 training batches, so that the ranks' shares of both are averaged
FLAGS = ["--test_mode", "--data_path", str(SHARED_DATA / "instruction-data-with-preference.json"),
         "--lr", "1e-4", "--beta", "0.5", "--batch_size", "4", "--epochs", "2", "--eval_iter",
         "2", "--max_new_tokens", "2", "--keep_best"]


def metrics(path):
    """The metrics CSV's rows as dicts of floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def printed_numbers(stdout):
    """The lines that carry the run's numbers: the initial losses and every evaluation."""
    lines = stdout.splitlines()
    start = lines.index("Initial losses")
    return lines[start:start + 5] + [line for line in lines if line.startswith("Ep ")]


def test_two_gloo_processes_give_the_single_process_run(tmp_path, capsys):
    sft = save(random_model(TEST_MODE_CONFIG), tmp_path / SFT, TEST_MODE_CONFIG)
    code, single_out, err = run_in_process(
        dpo.main, [sft, *FLAGS, "--output_dir", str(tmp_path / "single")], capsys)
    assert code == 0, err
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(REPO, "dpo_finetuning.py"), sft, *FLAGS, "--output_dir",
         str(tmp_path / "two")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    single, two = tmp_path / "single", tmp_path / "two"

    for name in (OUT, OUT.replace(".pth", "-best.pth")):
        expected = torch.load(single / name, weights_only=True)
        got = torch.load(two / name, weights_only=True)
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.allclose(got[key], tensor, atol=1e-5, rtol=0), (name, key)
    rows, single_rows = metrics(two / "metrics-dpo.csv"), metrics(single / "metrics-dpo.csv")
    assert [(r["step"], r["tokens_seen"]) for r in rows] == [
        (r["step"], r["tokens_seen"]) for r in single_rows] and len(rows) == 4
    for row, single_row in zip(rows, single_rows, strict=True):
        assert row == pytest.approx(single_row, abs=1e-5, rel=0)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    stdout = result.stdout
    assert printed_numbers(stdout) == printed_numbers(single_out)
    assert "   Training loss: 0.6931471824645996" in stdout.splitlines()
    assert "Device: cpu x 2 processes" in stdout
    for line in ("Training set length: 10", "Reference log-probabilities of 20 entries computed",
                 "Lowest validation DPO loss", "Model saved as"):
        assert stdout.count(line) == 1, line  # only rank 0 prints and writes
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in single.iterdir()) == [
        OUT.replace(".pth", "-best.json"), OUT.replace(".pth", "-best.pth"),
        OUT.replace(".pth", ".json"), OUT, "instruction-data-with-response-dpo.json",
        "loss-plot-dpo.pdf", "metrics-dpo.csv"]
