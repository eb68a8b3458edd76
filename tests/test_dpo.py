"""dpo_finetuning.py against an independent implementation of the book's DPO notebook.

The notebook's formulas are written out below in plain torch on the book's own GPTModel (two
copies, four forward passes, full logits), with its seeds and loader order; the script's
printed numbers, metrics log and final weights must equal them within 1e-5, with the reference
precomputed or live, and after a resume."""

import contextlib
import csv
import io
import json
import math
import signal
from functools import partial

import pytest
import tiktoken
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from helpers import assert_error, random_model, run_in_process, save, signal_at
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from llms_from_scratch.ch07 import format_input
from torch.utils.data import DataLoader

import dpo_finetuning as dpo
from kit.data import PROMPT_STYLES
from kit.dpo_data import PreferenceDataset, custom_collate_fn, header_newlines
from kit.dpo_training import DPOTraining
from kit.saved_model import TEST_MODE_CONFIG

PREFERENCE_DATA = SHARED_DATA / "instruction-data-with-preference.json"
LR, BETA, BATCH, EPOCHS, EVAL_ITER = 1e-4, 0.5, 3, 2, 1
FLAGS = ["--test_mode", "--data_path", str(PREFERENCE_DATA), "--lr", str(LR), "--beta",
         str(BETA), "--batch_size", str(BATCH), "--epochs", str(EPOCHS), "--eval_iter",
         str(EVAL_ITER), "--max_new_tokens", "2"]
SFT = "Smalltestmodel-sft-standalone.pth"
OUT = "Smalltestmodel-sft-standalone-dpo.pth"


#####################################
# The notebook, written out independently
#####################################


def notebook_collate(batch, allowed_max_length):
    """The notebook's padding (longest + 1), masks (prompt + 2 newlines, padding) and cut."""
    longest = max(len(item[key]) + 1 for item in batch for key in ("chosen", "rejected"))
    out = {}
    for key in ("chosen", "rejected"):
        rows, masks = [], []
        for item in batch:
            padded = item[key] + [50256] * (longest - len(item[key]))
            mask = torch.ones(len(padded)).bool()
            mask[len(item[key]):] = False
            mask[:len(item["prompt"]) + 2] = False
            rows.append(torch.tensor(padded))
            masks.append(mask)
        out[key] = torch.stack(rows)[:, :allowed_max_length]
        out[f"{key}_mask"] = torch.stack(masks)[:, :allowed_max_length]
    return out


def notebook_logprobs(model, ids, mask):
    """Mean log-probability of the masked labels (the inputs shifted by one)."""
    log_probs = F.log_softmax(model(ids)[:, :-1, :], dim=-1)
    selected = torch.gather(log_probs, -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (selected * mask[:, 1:]).sum(-1) / mask[:, 1:].sum(-1)


def notebook_loss(batch, policy, reference):
    """(loss, chosen reward, rejected reward) of a batch."""
    pc = notebook_logprobs(policy, batch["chosen"], batch["chosen_mask"])
    pr = notebook_logprobs(policy, batch["rejected"], batch["rejected_mask"])
    rc = notebook_logprobs(reference, batch["chosen"], batch["chosen_mask"])
    rr = notebook_logprobs(reference, batch["rejected"], batch["rejected_mask"])
    loss = -F.logsigmoid(BETA * ((pc - pr) - (rc - rr))).mean()
    return loss, (pc - rc).detach().mean(), (pr - rr).detach().mean()


def notebook_evaluate(policy, reference, loaders):
    """[train (loss, chosen, rejected), val (...)] over EVAL_ITER batches each."""
    policy.eval()
    results = []
    with torch.no_grad():
        for loader in loaders:
            num_batches = min(EVAL_ITER, len(loader))
            totals = [0.0, 0.0, 0.0]
            for i, batch in enumerate(loader):
                if i >= num_batches:
                    break
                totals = [t + v.item() for t, v in
                          zip(totals, notebook_loss(batch, policy, reference), strict=True)]
            results.append([t / num_batches for t in totals])
    policy.train()
    return results


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder holding a test-mode SFT model saved as the chapter script saves it."""
    path = tmp_path_factory.mktemp("dpo")
    save(random_model(TEST_MODE_CONFIG), path / SFT, TEST_MODE_CONFIG)
    return path


@pytest.fixture(scope="module")
def notebook(folder):
    """(initial evaluation, every step's evaluation, final state dict) of the notebook's run."""
    data = json.loads(PREFERENCE_DATA.read_text(encoding="utf-8"))
    train_end, test_end = int(len(data) * 0.85), int(len(data) * 0.85) + int(len(data) * 0.1)
    splits = data[:train_end][:10], data[test_end:][:10]
    tokenizer = tiktoken.get_encoding("gpt2")

    def encode(entry):
        prompt = format_input(entry)
        return {key: tokenizer.encode(prompt + ("" if key == "prompt" else
                                                f"\n\n### Response:\n{entry[key]}"))
                for key in ("prompt", "chosen", "rejected")}

    state = torch.load(folder / SFT, weights_only=True)
    policy, reference = BookGPTModel(TEST_MODE_CONFIG), BookGPTModel(TEST_MODE_CONFIG)
    policy.load_state_dict(state)
    reference.load_state_dict(state)
    policy.eval()
    reference.eval()
    collate = partial(notebook_collate, allowed_max_length=TEST_MODE_CONFIG["context_length"])
    torch.manual_seed(123)
    train_loader = DataLoader([encode(e) for e in splits[0]], batch_size=BATCH, shuffle=True,
                              drop_last=True, collate_fn=collate, num_workers=0)
    val_loader = DataLoader([encode(e) for e in splits[1]], batch_size=BATCH, shuffle=False,
                            drop_last=False, collate_fn=collate, num_workers=0)
    torch.manual_seed(123)
    initial = notebook_evaluate(policy, reference, (train_loader, val_loader))
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.01)
    evaluations = []
    for _ in range(EPOCHS):
        policy.train()
        for batch in train_loader:
            optimizer.zero_grad()
            notebook_loss(batch, policy, reference)[0].backward()
            optimizer.step()
            evaluations.append(notebook_evaluate(policy, reference, (train_loader, val_loader)))
    return initial, evaluations, policy.state_dict()


#####################################
# The script's runs
#####################################


def run_dpo(folder, capsys, *flags, output="out"):
    """Run the script in-process in `folder` on the SFT model; return (code, out, err)."""
    return run_in_process(dpo.main, [str(folder / SFT), *FLAGS, *flags, "--output_dir",
                                     str(folder / output)], capsys)


@pytest.fixture(scope="module")
def precompute_run(folder):
    """The default run (reference precomputed): its folder and stdout (a module fixture has
    no capsys)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        dpo.main([str(folder / SFT), *FLAGS, "--output_dir", str(folder / "precompute")])
    return folder / "precompute", printed.getvalue()


def metrics(path):
    """The metrics CSV's rows as dicts of floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_matches_notebook(rows, notebook_evaluations):
    """Each metrics row's loss and rewards equal the notebook's evaluation within 1e-5."""
    assert len(rows) == len(notebook_evaluations) == EPOCHS * (10 // BATCH)
    for row, (train, val) in zip(rows, notebook_evaluations, strict=True):
        for split, values in (("train", train), ("val", val)):
            ours = [row[f"{split}_loss"], row[f"{split}_chosen_reward"],
                    row[f"{split}_rejected_reward"]]
            assert ours == pytest.approx(values, abs=1e-5), (row["step"], split)


def test_initial_losses_are_ln2_and_margins_zero(precompute_run, notebook):
    _, out = precompute_run
    lines = out.splitlines()
    start = lines.index("Initial losses")
    assert lines[start + 1:start + 5] == [
        "   Training loss: 0.6931471824645996", "   Validation loss: 0.6931471824645996",
        "   Train reward margin: 0.0", "   Val reward margin: 0.0"]
    assert math.log(2) == pytest.approx(0.6931471824645996)
    assert notebook[0][0][0] == notebook[0][1][0] == 0.6931471824645996


def test_losses_rewards_and_weights_equal_the_notebooks(precompute_run, notebook):
    folder, out = precompute_run
    rows = metrics(folder / "metrics-dpo.csv")
    assert list(rows[0]) == ["step", "tokens_seen", "train_loss", "val_loss",
                             "train_chosen_reward", "train_rejected_reward",
                             "val_chosen_reward", "val_rejected_reward"]
    assert [row["step"] for row in rows] == list(range(EPOCHS * 10 // BATCH))
    assert_matches_notebook(rows, notebook[1])
    first = rows[0]
    assert (f"Ep 1 (Step 000000): Train loss {first['train_loss']:.3f}, Val loss "
            f"{first['val_loss']:.3f}, Train reward margins "
            f"{first['train_chosen_reward'] - first['train_rejected_reward']:.3f}, "
            f"Val reward margins {first['val_chosen_reward'] - first['val_rejected_reward']:.3f}"
            in out.splitlines())
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # the policy learns the preferences
    weights = torch.load(folder / OUT, weights_only=True)
    for name, value in notebook[2].items():
        if not name.endswith(".mask"):  # the causal masks: constant buffers
            assert torch.allclose(weights[name], value, atol=1e-5), name
    book = BookGPTModel(TEST_MODE_CONFIG)
    book.load_state_dict(weights)  # strictly
    info = json.loads((folder / OUT.replace(".pth", ".json")).read_text())
    assert info["config"] == TEST_MODE_CONFIG and info["prompt_style"] == "alpaca"
    answers = json.loads((folder / "instruction-data-with-response-dpo.json").read_text())
    assert len(answers) == 10 and all("model_response" in e and "chosen" in e for e in answers)
    assert (folder / "loss-plot-dpo.pdf").stat().st_size > 0


def test_live_reference_gives_the_same_numbers(folder, capsys, notebook):
    code, out, err = run_dpo(folder, capsys, "--reference", "live", output="live")
    assert code == 0, err
    assert_matches_notebook(metrics(folder / "live" / "metrics-dpo.csv"), notebook[1])
    assert "   Training loss: 0.6931471824645996" in out.splitlines()


def test_resume_after_ctrl_c_ends_with_the_uninterrupted_weights(folder, capsys,
                                                                 precompute_run):
    with signal_at(DPOTraining, "dpo_loss", signal.SIGINT, call=2):  # mid-epoch
        code, _, err = run_dpo(folder, capsys, "--keep_best", output="resumed")
    assert code == 130
    assert "the training so far (2 steps) is saved in" in err
    code, out, err = run_dpo(folder, capsys, "--keep_best", "--resume", output="resumed")
    assert code == 0, err
    assert "Reference log-probabilities" not in err  # kept by the checkpoint
    resumed = torch.load(folder / "resumed" / OUT, weights_only=True)
    whole = torch.load(precompute_run[0] / OUT, weights_only=True)
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    assert metrics(folder / "resumed" / "metrics-dpo.csv") == metrics(
        precompute_run[0] / "metrics-dpo.csv")
    assert any(line.startswith("Lowest validation DPO loss") for line in out.splitlines())
    assert (folder / "resumed" / OUT.replace(".pth", "-best.pth")).exists()


@pytest.mark.parametrize("flags, parts", [
    (["--beta", "0"], ["--beta must be a finite number above 0"]),
    (["--reference", "live", "--eval_iter", "0"], ["--eval_iter must be at least 1"]),
    (["--data_path", "missing.json"], ["missing.json: file not found (--data_path)"]),
    (["--run_name", "dpo-best"], ["--run_name dpo-best: a name may not end in '-best', which the "
                                  "script adds to the files of run 'dpo' (its best weights)"]),
    (["--run_name", "dpo.Partial"], ["--run_name dpo.Partial: a name may not end in '.partial'"]),
    (["--run_name", "a/b"], ["--run_name 'a/b': use letters, digits"]),
])
def test_bad_flags_end_in_one_line(folder, capsys, flags, parts):
    code, _, err = run_dpo(folder, capsys, *flags, output="bad")
    assert code == 2
    assert_error(err, *parts)


def test_a_dataset_without_preferences_or_a_missing_model_is_refused(folder, capsys):
    plain = folder / "plain.json"
    plain.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 12))
    code, _, err = run_dpo(folder, capsys, "--data_path", str(plain), output="bad")
    assert code == 2
    assert_error(err, f"{plain}: entry 0 has no 'chosen' field")
    code, _, err = run_in_process(dpo.main, [str(folder / "none.pth")], capsys)
    assert code == 2
    assert_error(err, "none.pth: file not found (SFT_MODEL)")


def test_the_mask_keeps_the_response_header_after_the_prompts_newlines():
    tokenizer = tiktoken.get_encoding("gpt2")
    entry = {"instruction": "Name a color.", "input": "", "output": "Red.", "chosen": "Red.",
             "rejected": "Red, obviously."}
    for style, newlines, header in (("alpaca", 2, "### Response:\n"),
                                    ("phi3", 1, "<|assistant|>:\n")):
        prompt_style = PROMPT_STYLES[style]
        assert header_newlines(prompt_style) == newlines
        item = PreferenceDataset([entry], tokenizer, prompt_style)[0]
        batch = custom_collate_fn([item], header_tokens=newlines)
        assert batch["chosen"].shape == batch["rejected"].shape == (1, len(item["rejected"]) + 1)
        kept = batch["rejected"][0][batch["rejected_mask"][0]].tolist()
        assert tokenizer.decode(kept) == header + "Red, obviously."
