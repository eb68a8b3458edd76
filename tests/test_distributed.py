"""torchrun: sharded batches, the same weights as one process, outputs written once."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from kit.distributed import ShardedShuffleSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILE = "Smalltestmodel-sft-standalone.pth"
INFO_FILE = "Smalltestmodel-sft-standalone.json"


def test_shards_of_the_global_batches_match_the_chapters_batches():
    data = list(range(21))
    torch.manual_seed(123)
    chapter = [b.tolist() for b in DataLoader(data, batch_size=4, shuffle=True, drop_last=True)]
    shards = []
    for rank in range(2):
        torch.manual_seed(123)
        sampler = ShardedShuffleSampler(len(data), 4, rank, 2)
        shards.append([b.tolist() for b in DataLoader(data, batch_size=2, sampler=sampler,
                                                      drop_last=True)])
        assert len(sampler) == 10
    assert len(chapter) == len(shards[0]) == len(shards[1]) == 5
    for k, batch in enumerate(chapter):
        assert sorted(shards[0][k] + shards[1][k]) == sorted(batch)
    torch.manual_seed(123)
    alone = DataLoader(data, batch_size=4, drop_last=True,
                       sampler=ShardedShuffleSampler(len(data), 4, 0, 1))
    assert [b.tolist() for b in alone] == chapter  # one process: the chapter's exact order


def finetune(tmp_path, name, nproc, instruction_data_path, *flags):
    """Run the test-mode pipeline with `nproc` processes (0: plain python) and `flags`; return
    its folder and its stdout."""
    out = tmp_path / name
    launcher = ([sys.executable] if nproc == 0 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"])
    result = subprocess.run(
        [*launcher, os.path.join(REPO, "gpt_instruction_finetuning.py"), "--test_mode",
         "--data_path", str(instruction_data_path), "--batch_size", "4", "--max_new_tokens", "5",
         "--output_dir", str(out), *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, instruction_data_path):
    tmp_path = tmp_path_factory.mktemp("single")
    out, _ = finetune(tmp_path, "single", 0, instruction_data_path)
    return (torch.load(out / MODEL_FILE, weights_only=True),
            json.loads((out / INFO_FILE).read_text()))


def test_two_gloo_processes_give_the_single_process_weights(tmp_path, single_process,
                                                             instruction_data_path):
    out, stdout = finetune(tmp_path, "two", 2, instruction_data_path)
    weights = torch.load(out / MODEL_FILE, weights_only=True)
    single_weights, single_info = single_process
    for name, tensor in single_weights.items():
        assert torch.allclose(weights[name], tensor, atol=1e-6, rtol=0), name
    info = json.loads((out / INFO_FILE).read_text())
    # the tokens seen are the global batches' tokens, as one process counts them
    assert info["tokens_seen"] == single_info["tokens_seen"] > 0
    assert stdout.count("Training set length: 10") == 1  # only rank 0 prints
    assert "Device: cpu x 2 processes" in stdout
    assert stdout.count("Model saved as") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        INFO_FILE, MODEL_FILE, "instruction-data-with-response-standalone.json",
        "loss-plot-standalone.pdf", "metrics-standalone.csv"]


def test_torchrun_with_one_process_keeps_the_chapters_shuffling(tmp_path, single_process,
                                                               instruction_data_path):
    out, _ = finetune(tmp_path, "one", 1, instruction_data_path)
    weights = torch.load(out / MODEL_FILE, weights_only=True)
    for name, tensor in single_process[0].items():
        assert torch.equal(weights[name], tensor), name


def test_two_processes_with_micro_batches_give_the_single_process_weights(
        tmp_path, single_process, instruction_data_path):
    out, _ = finetune(tmp_path, "micro", 2, instruction_data_path, "--micro_batch_size", "1")
    weights = torch.load(out / MODEL_FILE, weights_only=True)
    for name, tensor in single_process[0].items():
        assert torch.allclose(weights[name], tensor, atol=1e-6, rtol=0), name


def test_two_processes_with_appendix_d_options_and_the_best_weights(tmp_path,
                                                                    instruction_data_path):
    """Warmup, cosine decay, clipping and --keep_best under torchrun: the weights, the best
    weights and the learning rates of one process, the best file written once, by rank 0."""
    flags = ["--warmup_steps", "1", "--lr_schedule", "cosine", "--grad_clip", "0.5", "--lr",
             "1e-3", "--keep_best"]
    single, _ = finetune(tmp_path, "single", 0, instruction_data_path, *flags)
    two, stdout = finetune(tmp_path, "two", 2, instruction_data_path, *flags)
    best_file = MODEL_FILE.replace(".pth", "-best.pth")
    for name in (MODEL_FILE, best_file):
        expected = torch.load(single / name, weights_only=True)
        got = torch.load(two / name, weights_only=True)
        for key, tensor in expected.items():
            assert torch.allclose(got[key], tensor, atol=1e-6, rtol=0), (name, key)
    rates = [line.split(",")[5] for line in
             (two / "metrics-standalone.csv").read_text().splitlines()[1:]]
    assert rates == [line.split(",")[5] for line in
                     (single / "metrics-standalone.csv").read_text().splitlines()[1:]]
    assert len(rates) == 4 and rates[0] == "3e-05"  # 2 epochs of 2 steps; the first warms up
    assert stdout.count("Lowest validation loss") == 1
