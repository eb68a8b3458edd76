"""gpt_instruction_finetuning.py: data, prompt, batching, the whole run, resume, bad input."""

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from functools import partial
from unittest import mock

import pytest
import torch
from helpers import run_in_process
from helpers import run_script as run_any_script

import gpt_instruction_finetuning as ft
from kit.checkpoint import epochs_to_train, fingerprint
from kit.cli import DEFAULT_EPOCHS, build_parser, eval_freq, max_new_tokens
from kit.data import warn_if_truncated
from kit.metrics_log import plot_losses_from_metrics, read_metrics
from kit.saved_model import load_finetuned_model
from previous_chapters import (
    GPTModel,
    generate,
    text_to_token_ids,
    token_ids_to_text,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


run_script = partial(run_any_script, "gpt_instruction_finetuning.py")  # as a user runs it


def test_split_of_the_chapter_dataset(instruction_data_path):
    data = ft.load_json_entries(instruction_data_path)
    train, test, val = ft.split_data(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == data[:935] and test == data[935:1045] and val == data[1045:]


def test_format_input_with_and_without_input():
    entry = {"instruction": "Identify the correct spelling of the following word.",
             "input": "Ocassion", "output": "The correct spelling is 'Occasion.'"}
    assert ft.format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nIdentify the correct spelling of the "
        "following word.\n\n### Input:\nOcassion")
    no_input = {"instruction": "What is an antonym of 'complicated'?", "input": "",
                "output": "An antonym of 'complicated' is 'simple'."}
    assert ft.format_input(no_input) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat is an antonym of 'complicated'?")


def test_instruction_dataset_tokenizes_prompt_and_response(tokenizer):
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    dataset = ft.InstructionDataset([entry, entry], tokenizer)
    assert len(dataset) == 2
    assert tokenizer.decode(dataset[0]) == ft.format_input(entry) + "\n\n### Response:\nHi!"


def test_collate_pads_shifts_and_masks():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    inputs, targets = ft.custom_collate_fn(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4],
                               [5, 6, 50256, 50256, 50256],
                               [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256],
                                [6, 50256, -100, -100, -100],
                                [8, 9, 50256, -100, -100]]
    assert batch == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # the dataset's lists are untouched


def test_collate_truncates_to_allowed_max_length():
    inputs, targets = ft.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100]]
    assert inputs.dtype == torch.long and targets.device.type == "cpu"


def test_truncation_warning_counts_long_entries(tokenizer, capsys):
    dataset = ft.InstructionDataset([{"instruction": "word " * 40, "input": "", "output": "x"},
                                     {"instruction": "short", "input": "", "output": "x"}],
                                    tokenizer)
    warn_if_truncated(dataset, 60, "training")
    assert capsys.readouterr().out == (
        "Warning: 1 of 2 training entries are longer than 60 tokens and will be truncated\n")
    warn_if_truncated(dataset, 1024, "training")
    assert capsys.readouterr().out == ""


def test_batched_responses_equal_one_at_a_time(tokenizer, instruction_data_path):
    torch.manual_seed(0)
    model = GPTModel(ft.TEST_MODE_CONFIG).eval()
    test_data = ft.load_json_entries(instruction_data_path)[935:941]
    batched = ft.generate_responses(model, test_data, tokenizer, 120, 30, batch_size=4)
    assert [e["model_response"] for e in batched] == [
        e["model_response"] for e in ft.generate_responses(model, test_data, tokenizer, 120, 30, 1)]
    for entry, answered in zip(test_data, batched, strict=True):  # the book's loop, recomputing
        input_text = ft.format_input(entry)
        token_ids = generate(model, text_to_token_ids(input_text, tokenizer), 30, 120,
                             eos_id=50256, use_cache=False)
        generated_text = token_ids_to_text(token_ids, tokenizer)
        expected = generated_text[len(input_text):].replace("### Response:", "").strip()
        assert answered == {**entry, "model_response": expected}


def test_test_mode_end_to_end(tmp_path, instruction_data_path):
    result = run_script("--test_mode", "--data_path", str(instruction_data_path),
                        "--output_dir", str(tmp_path), "--max_new_tokens", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("matplotlib version: ") and lines[5] == 50 * "-"
    for expected in ["Training set length: 10", "Validation set length: 10",
                     "Test set length: 10", "Device: cpu", "Loaded model: Small test model",
                     "Initial losses", "Generating responses",
                     f"Plot saved as {tmp_path}/loss-plot-standalone.pdf",
                     f"Responses saved as {tmp_path}/"
                     "instruction-data-with-response-standalone.json",
                     f"Model saved as {tmp_path}/Smalltestmodel-sft-standalone.pth"]:
        assert expected in lines
    assert any(line.startswith("Ep 1 (Step 000000): Train loss ") for line in lines)
    bar = re.split(r"[\r\n]", result.stderr)  # the bar's redraws on stderr
    assert any(re.match(r"Training: 100%.*\| 2/2 \[\d\d:\d\d<00:00", part) for part in bar)
    assert "Training:" not in result.stdout
    assert any(line.startswith("Training completed in ") and line.endswith(" minutes.")
               for line in lines)

    responses = json.loads((tmp_path / "instruction-data-with-response-standalone.json")
                           .read_text())
    dataset = json.loads(instruction_data_path.read_text())
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in responses] == \
        dataset[935:945]
    assert all(isinstance(e["model_response"], str) for e in responses)

    state = torch.load(tmp_path / "Smalltestmodel-sft-standalone.pth", weights_only=True)
    model = GPTModel(ft.TEST_MODE_CONFIG)
    model.load_state_dict(state)  # strict: every weight present, nothing extra
    assert (tmp_path / "loss-plot-standalone.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # the finished run's checkpoint
        "Smalltestmodel-sft-standalone.json", "Smalltestmodel-sft-standalone.pth",  # is gone
        "instruction-data-with-response-standalone.json", "loss-plot-standalone.pdf",
        "metrics-standalone.csv"]
    assert (f"Removed {tmp_path}/checkpoint-Smalltestmodel-standalone.pth: the run is "
            "complete (--keep_checkpoint keeps it)") in lines

    info = json.loads((tmp_path / "Smalltestmodel-sft-standalone.json").read_text())
    progress = [line for line in lines if line.startswith("Ep ")]
    assert info == {
        "model_name": "Small test model", "config": ft.TEST_MODE_CONFIG,
        "prompt_style": "alpaca", "experiment": "standalone", "run_name": "standalone",
        "weights": "last", "epochs": 2, "steps": 2, "seed": 123,
        "tokens_seen": info["tokens_seen"],
        "train_loss": info["train_loss"], "val_loss": info["val_loss"],
        "losses_step": 1,  # test mode evaluates after each of its two steps
        "schedule": {"lr_schedule": "constant", "peak_lr": 5e-5, "warmup_steps": 0,
                     "initial_lr": 3e-5, "min_lr": 1e-6, "total_steps": 2, "grad_clip": None},
        "settings": {"--model": "Small test model", "--seed": 123, "--lr": 5e-5,
                     "--weight_decay": 0.1, "--batch_size": 8, "--precision": "fp32",
                     "--warmup_steps": 0, "--initial_lr": 3e-5, "--lr_schedule": "constant",
                     "--min_lr": 1e-6, "--grad_clip": None, "--keep_best": False,
                     "training data": fingerprint(dataset[:10]),
                     "validation data": fingerprint(dataset[1045:1055]),
                     "test data": fingerprint(dataset[935:945]),
                     "experiment": "standalone"},
        "data_path": str(instruction_data_path), "max_new_tokens": 20,
        "train_overlap": {"test": 2, "val": 4},  # the chapter's split repeats training entries
    }
    assert f"Train loss {info['train_loss']:.3f}, Val loss {info['val_loss']:.3f}" \
        in progress[-1]
    metrics = (tmp_path / "metrics-standalone.csv").read_text().splitlines()
    assert metrics[0] == "epoch,step,tokens_seen,train_loss,val_loss,lr,seconds"
    logged = [row.split(",") for row in metrics[1:]]
    assert [f"Ep {r[0]} (Step {int(r[1]):06d}): Train loss {float(r[3]):.3f}, "
            f"Val loss {float(r[4]):.3f}" for r in logged] == progress
    assert [r[1] for r in logged] == ["0", "1"] and [r[5] for r in logged] == ["5e-05"] * 2
    assert 0 < int(logged[0][2]) < int(logged[1][2]) == info["tokens_seen"]
    with mock.patch("kit.metrics_log.plot_losses") as plot:
        plot_losses_from_metrics(str(tmp_path / "metrics-standalone.csv"), "again.pdf")
    epochs_seen, tokens_seen, train_losses, val_losses = plot.call_args.args
    assert epochs_seen.tolist() == [0.0, 2.0]  # a curve: steps 0 and 1 of 2 epochs
    assert (tokens_seen, plot.call_args.kwargs) == ([int(r[2]) for r in logged],
                                                    {"save_path": "again.pdf"})
    assert [f"{v:.3f}" for v in train_losses + val_losses] == \
        [f"{float(r[3]):.3f}" for r in logged] + [f"{float(r[4]):.3f}" for r in logged]
    assert all(float(r[6]) >= 0 for r in logged)
    # 10 entries, batches of 8: one step per epoch, 8 rows padded to the longest (at most 120)
    assert info["tokens_seen"] % 8 == 0 and 2 * 8 * 20 < info["tokens_seen"] <= 2 * 8 * 120


def test_resume_after_an_epoch_gives_the_uninterrupted_weights(tmp_path, instruction_data_path):
    common = ["--test_mode", "--data_path", str(instruction_data_path), "--max_new_tokens", "5",
              "--batch_size", "2", "--eval_freq", "2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_script(*common, "--epochs", "2", "--output_dir", str(straight),
                      cwd=tmp_path).returncode == 0
    assert run_script(*common, "--epochs", "1", "--output_dir", str(stopped),
                      "--keep_checkpoint", cwd=tmp_path).returncode == 0
    resumed = run_script(*common, "--epochs", "2", "--output_dir", str(stopped), "--resume",
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from " + str(stopped) in resumed.stdout
    assert "Initial losses" not in resumed.stdout
    name = "Smalltestmodel-sft-standalone.pth"
    expected = torch.load(straight / name, weights_only=True)
    got = torch.load(stopped / name, weights_only=True)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert (json.loads((straight / "instruction-data-with-response-standalone.json").read_text())
            == json.loads((stopped / "instruction-data-with-response-standalone.json").read_text()))


def test_resume_alone_trains_to_the_interrupted_runs_own_epochs(tmp_path, instruction_data_path):
    common = ["--test_mode", "--data_path", str(instruction_data_path), "--max_new_tokens", "5",
              "--batch_size", "4", "--eval_freq", "1", "--eval_iter", "1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_script(*common, "--epochs", "3", "--output_dir", str(straight),
                      cwd=tmp_path).returncode == 0
    # A run of 3 epochs stopped after its first: its checkpoint as that run leaves it
    assert run_script(*common, "--epochs", "1", "--output_dir", str(stopped),
                      "--keep_checkpoint", cwd=tmp_path).returncode == 0
    checkpoint = stopped / "checkpoint-Smalltestmodel-standalone.pth"
    saved = torch.load(checkpoint, weights_only=True)
    saved["progress"]["num_epochs"] = 3
    torch.save(saved, checkpoint)

    resumed = run_script(*common, "--output_dir", str(stopped), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {checkpoint}: epoch 2 of 3, 2 steps done" in resumed.stdout
    name = "Smalltestmodel-sft-standalone"
    expected = torch.load(straight / f"{name}.pth", weights_only=True)
    got = torch.load(stopped / f"{name}.pth", weights_only=True)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    info = json.loads((stopped / f"{name}.json").read_text())
    assert (info["epochs"], info["steps"]) == (3, 6)  # 10 entries, batches of 4: 2 steps each
    assert info == json.loads((straight / f"{name}.json").read_text())
    metrics = (stopped / "metrics-standalone.csv").read_text()
    assert metrics.splitlines()[1:] and [line.split(",")[:5] for line in metrics.splitlines()] \
        == [line.split(",")[:5]
            for line in (straight / "metrics-standalone.csv").read_text().splitlines()]
    assert not checkpoint.exists()


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, instruction_data_path,
                                                         capsys):
    common = ["--test_mode", "--data_path", str(instruction_data_path), "--max_new_tokens", "5",
              "--output_dir", str(tmp_path)]
    ft.main([*common, "--epochs", "2", "--keep_checkpoint"])
    capsys.readouterr()
    checkpoint = tmp_path / "checkpoint-Smalltestmodel-standalone.pth"
    with pytest.raises(SystemExit) as exit_info:
        ft.main([*common, "--epochs", "1", "--resume"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"Error: --epochs 1: {checkpoint} has already trained 2 epochs; pass "
                   "--epochs 2 or more, or leave --epochs out to finish its 2\n")


def test_a_rerun_says_it_replaces_an_unfinished_runs_checkpoint(tmp_path, instruction_data_path,
                                                                capsys):
    common = ["--test_mode", "--data_path", str(instruction_data_path), "--max_new_tokens", "5",
              "--epochs", "1", "--output_dir", str(tmp_path)]
    ft.main([*common, "--keep_checkpoint"])
    capsys.readouterr()
    ft.main(common)
    lines = capsys.readouterr().out.splitlines()
    checkpoint = tmp_path / "checkpoint-Smalltestmodel-standalone.pth"
    note = (f"Note: {checkpoint} holds an earlier run's progress; this run starts over and "
            "replaces it at its first epoch end. To continue that run instead, stop now "
            "(Ctrl-C) and run the same command with --resume.")
    assert lines.index(note) < lines.index("Initial losses")
    assert not checkpoint.exists()  # this run finished: its checkpoint is removed


def test_lines_printed_during_training_stay_whole_above_the_bar(tmp_path, instruction_data_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "gpt_instruction_finetuning.py"), "--test_mode",
         "--data_path", str(instruction_data_path), "--output_dir", str(tmp_path),
         "--max_new_tokens", "5", "--batch_size", "2", "--eval_freq", "2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    segments = re.split(r"[\r\n]", result.stdout)  # one terminal: bar redraws and lines
    logged = [part for part in segments if "Train loss" in part]
    assert len(logged) == 5 and all(part.startswith("Ep ") for part in logged)
    assert all(part.startswith("Training:") or "Training:" not in part for part in segments)


def test_ctrl_c_during_training_exits_130_with_a_hint(tmp_path, instruction_data_path, capsys):
    with mock.patch.object(ft, "train_model_simple", side_effect=KeyboardInterrupt), \
            pytest.raises(SystemExit) as exit_info:
        ft.main(["--test_mode", "--data_path", str(instruction_data_path),
                 "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ("Interrupted; nothing of this run was saved: run the same "
                                       "command to start again.\n")


BAD_INPUTS = [
    ("[not json", "not valid JSON (Expecting value: line 1 column 2 (char 1))"),
    ("{not json", "line 1 is not valid JSON (Expecting property name enclosed in double "
                  "quotes: line 1 column 2 (char 1))"),
    ('{"instruction": "x"}', "line 1 has no 'output' field"),
    ('"text"', "expected a JSON list of entries (or JSON Lines, one entry a line), got str"),
    ("[]", "the dataset is empty"),
    ('[{"instruction": "a", "input": "", "output": "b"}, 3]', "entry 1 is not an object"),
    ('[{"input": "a", "output": "b"}]', "entry 0 has no 'instruction' field"),
    ('[{"instruction": "a", "input": 5, "output": "b"}]',
     "entry 0 field 'input' must be a string, got int"),
    (json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 9),
     "9 entries are too few to split 85/10/5 into non-empty training, test and validation sets "
     "(at least 10 are needed)"),
]


@pytest.mark.parametrize(("content", "message"), BAD_INPUTS)
def test_bad_data_gives_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    argv = ["--test_mode", "--data_path", str(path), "--output_dir", str(tmp_path)]
    code, _, err = run_in_process(ft.main, argv, capsys)
    assert (code, err) == (2, f"Error: {path}: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_missing_data_file_and_too_few_for_a_batch(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ft.main(["--data_path", str(tmp_path / "nope.json")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"Error: {tmp_path}/nope.json: file not found (--data_path)\n")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 10))
    with pytest.raises(SystemExit):
        ft.main(["--test_mode", "--data_path", str(path), "--batch_size", "9",
                 "--output_dir", str(tmp_path)])
    assert capsys.readouterr().err == (
        f"Error: {path}: 8 training entries are fewer than one batch of 9\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_bad_data_through_the_command_line_has_no_traceback(tmp_path):
    (tmp_path / "data.json").write_text("[1, 2]")
    result = run_script("--test_mode", "--data_path", "data.json", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "Error: data.json: entry 0 is not an object\n"


@pytest.fixture
def data_server(tmp_path):
    """Serve `tmp_path/served` over HTTP on 127.0.0.1; yield the base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_dataset_is_downloaded_when_missing(tmp_path, data_server):
    served, base_url = data_server
    entries = [{"instruction": "a", "input": "", "output": "b"}]
    (served / "instruction-data.json").write_text(json.dumps(entries))
    target = tmp_path / "instruction-data.json"
    assert ft.download_and_load_file(str(target), base_url + "/instruction-data.json") == entries
    assert json.loads(target.read_text()) == entries
    (served / "instruction-data.json").unlink()  # present locally: no second download
    assert ft.download_and_load_file(str(target), base_url + "/instruction-data.json") == entries


def test_dataset_download_failure_is_one_clear_error(tmp_path, data_server):
    _, base_url = data_server
    target = tmp_path / "instruction-data.json"
    with pytest.raises(ft.DataError) as exc_info:
        ft.download_and_load_file(str(target), base_url + "/missing.json")
    assert str(exc_info.value) == (
        f"{target}: not found, and downloading it from {base_url}/missing.json failed "
        "(File not found); place the file there by hand or pass --data_path")
    assert not target.exists()


def test_help_explains_every_flag():
    text = build_parser().format_help()
    for flag in ["--model", "--models_dir", "--data_path", "--output_dir", "--epochs",
                 "--batch_size", "--lr", "--weight_decay", "--seed", "--eval_freq", "--eval_iter",
                 "--max_new_tokens", "--gen_batch_size", "--device", "--resume", "--test_mode",
                 "--weights", "--warmup_steps", "--initial_lr", "--min_lr", "--lr_schedule",
                 "--grad_clip", "--keep_best", "--early_stopping", "--run_name"]:
        assert flag in text
    flat = " ".join(text.split())  # argparse wraps the lines
    for default in ["(default: 355M)", "(default: 5e-05)", "(default: tf)", "(default: auto)",
                    "(default: 3e-05)", "(default: 1e-06)", "(default: constant)",
                    "(default: standalone, the book's;"]:
        assert flat.count(default) == 1, default
    assert "default: None" not in flat and "default: False" not in flat
    args = build_parser().parse_args([])
    assert (args.model, args.epochs, args.lr, args.weight_decay, args.seed, args.eval_freq,
            args.eval_iter, max_new_tokens(args)) == ("355M", None, 5e-5, 0.1, 123, None, 5,
                                                          256)
    test_mode = build_parser().parse_args(["--test_mode"])
    assert eval_freq(args) == 5 and eval_freq(test_mode) == 1
    assert max_new_tokens(test_mode) == 20
    assert max_new_tokens(build_parser().parse_args(
        ["--test_mode", "--max_new_tokens", "256"])) == 256
    assert "(default: 256, the chapter's; 20 with --test_mode" in flat
    assert (args.warmup_steps, args.lr_schedule, args.grad_clip, args.keep_best,
            args.early_stopping, args.run_name) == (0, "constant", None, False, None, None)
    assert "training epochs (default: 2; with --resume, the interrupted run's own)" in flat
    assert epochs_to_train(args.epochs, "checkpoint.pth", None, DEFAULT_EPOCHS) == 2
    assert DEFAULT_EPOCHS == 2  # the chapter's


def test_help_groups_the_flags():
    """--help lists the flags under six titled groups, in this order, each flag once."""
    groups = {group.title: [action.option_strings[0] for action in group._group_actions]
              for group in build_parser()._action_groups}
    assert groups == {
        "positional arguments": [],
        "options": ["-h"],
        "model and data": ["--model", "--models_dir", "--weights", "--data_path", "--test_mode"],
        "training": ["--epochs", "--batch_size", "--micro_batch_size", "--lr", "--weight_decay",
                     "--seed", "--eval_freq", "--eval_iter"],
        "Appendix D": ["--warmup_steps", "--initial_lr", "--lr_schedule", "--min_lr",
                       "--grad_clip", "--keep_best", "--early_stopping"],
        "answers": ["--max_new_tokens", "--gen_batch_size"],
        "device and precision": ["--device", "--precision", "--compile"],
        "resume and outputs": ["--output_dir", "--run_name", "--resume", "--keep_checkpoint"],
    }
    text = build_parser().format_help()
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and line[0] != " "]
    assert titles == list(groups)[1:]


def saved_tiny_model(tmp_path, cfg, info=None):
    """Save a random GPTModel as a finetuned model (with `info` as its JSON when given)."""
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    path = tmp_path / "model.pth"
    if info is None:
        torch.save(model.state_dict(), path)
    else:
        ft.save_finetuned_model(model, str(path), info)
    return model, str(path)


def test_finetuned_model_loads_with_its_json(tmp_path):
    cfg = {**ft.BASE_CONFIG, **ft.MODEL_CONFIGS["124M"][1], "n_layers": 1}
    model, path = saved_tiny_model(tmp_path, cfg, {"config": cfg, "prompt_style": "phi3"})
    assert json.loads((tmp_path / "model.json").read_text()) == {
        "config": cfg, "prompt_style": "phi3"}
    loaded, info, prompt_style = load_finetuned_model(path)
    assert info["config"] == cfg and prompt_style.name == "phi3"
    assert not loaded.training
    idx = torch.randint(0, 50257, (1, 7))
    assert torch.equal(loaded(idx), model(idx))


def test_bare_pth_loads_with_config_read_off_its_shapes(tmp_path):
    model, path = saved_tiny_model(tmp_path, ft.TEST_MODE_CONFIG)
    loaded, info, prompt_style = load_finetuned_model(path)
    assert info == {"config": ft.TEST_MODE_CONFIG, "prompt_style": "alpaca"}
    assert prompt_style is ft.ALPACA
    idx = torch.randint(0, 50257, (2, 5))
    assert torch.equal(loaded(idx), model(idx))


def test_finetuned_model_that_cannot_load_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ft.DataError, match=f"^{missing}: file not found; finetune first"):
        load_finetuned_model(str(missing))

    _, path = saved_tiny_model(tmp_path, ft.TEST_MODE_CONFIG)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # a copy cut short
    with pytest.raises(ft.DataError, match=f"^{path}: damaged or not a PyTorch weight file "
                                           r"\(.*\); finetune again or copy the file anew$"):
        load_finetuned_model(path)

    _, path = saved_tiny_model(tmp_path, ft.TEST_MODE_CONFIG,
                               {"config": {**ft.TEST_MODE_CONFIG, "emb_dim": 16},
                                "prompt_style": "alpaca"})
    with pytest.raises(ft.DataError, match=f"^{path}: the weights do not fit the model "
                                           f"described by {tmp_path}/model.json"):
        load_finetuned_model(path)

    (tmp_path / "model.json").write_text('{"config": {}, "prompt_style": "chatml"}')
    with pytest.raises(ft.DataError, match="model.json: needs a 'config' object and a "
                                           "'prompt_style' of alpaca, phi3; delete it"):
        load_finetuned_model(path)


def test_gitignore_covers_every_file_a_run_writes(tmp_path, instruction_data_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(open(os.path.join(REPO, ".gitignore")).read())
    result = run_script("--test_mode", "--data_path", str(instruction_data_path),
                        "--max_new_tokens", "5", "--epochs", "1", "--keep_checkpoint",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in tmp_path.iterdir() if p.name not in (".git", ".gitignore"))
    assert len(written) == 6  # weights, JSON, checkpoint, responses, plot, metrics
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout
    assert status == "?? .gitignore\n", written


#####################################
# Appendix D options, the best weights, early stopping, named runs
#####################################


def overfitting_data(path):
    """A dataset whose test-mode split trains on one answer ("apple") and validates on another
    ("zebra"): a high rate soon lowers the validation loss, then raises it."""
    entries = ([{"instruction": "Name a fruit.", "input": "", "output": "apple apple apple"}] * 95
               + [{"instruction": "Name an animal.", "input": "", "output": "zebra zebra"}] * 5)
    path.write_text(json.dumps(entries))
    return path


def metrics_rows(path):
    """The metrics CSV's rows as dicts of numbers."""
    return read_metrics(str(path))


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    """(folder, flags, completed process) of a run with --keep_best --early_stopping 2 on
    `overfitting_data`, its checkpoint kept."""
    folder = tmp_path_factory.mktemp("early")
    flags = ["--test_mode", "--data_path", str(overfitting_data(folder / "data.json")),
             "--epochs", "12", "--lr", "0.2", "--eval_iter", "1", "--max_new_tokens", "3",
             "--output_dir", str(folder)]
    result = run_script(*flags, "--keep_best", "--early_stopping", "2", "--run_name", "es",
                        "--keep_checkpoint", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, flags, result


def test_early_stopping_ends_after_k_evaluations_without_a_new_best(early_stopped):
    folder, _, result = early_stopped
    rows = metrics_rows(folder / "metrics-es.csv")
    best = min(range(len(rows)), key=lambda i: rows[i]["val_loss"])
    assert 0 < best and len(rows) == best + 3 < 12  # the best, then 2 evaluations without
    lines = result.stdout.splitlines()
    assert (f"Early stopping after step {best + 2}: the validation loss has not improved for "
            f"2 evaluations (lowest {rows[best]['val_loss']:.3f}, at step {best})") in lines
    best_path = folder / "Smalltestmodel-sft-es-best.pth"
    assert lines[-1] == (f"Lowest validation loss {rows[best]['val_loss']:.3f} at step {best} "
                         f"(epoch {best + 1}): saved as {best_path}")
    info = json.loads(best_path.with_suffix(".json").read_text())
    assert (info["weights"], info["steps"], info["losses_step"], info["run_name"]) == (
        "best", best + 1, best, "es")
    assert (info["train_loss"], info["val_loss"]) == (rows[best]["train_loss"],
                                                      rows[best]["val_loss"])
    last = json.loads((folder / "Smalltestmodel-sft-es.json").read_text())
    assert (last["weights"], last["steps"], last["losses_step"]) == ("last", best + 3, best + 2)
    plot = folder / "loss-plot-es.pdf"
    assert plot.read_bytes().startswith(b"%PDF")


def test_the_best_weights_are_those_of_a_run_that_ends_at_the_best_step(early_stopped):
    """The same run with --epochs at the best step (one step an epoch) ends with the weights
    that --keep_best kept; they load into the book's GPTModel, chat.py answers with them, and
    both exports take them."""
    folder, flags, _ = early_stopped
    rows = metrics_rows(folder / "metrics-es.csv")
    best = min(range(len(rows)), key=lambda i: rows[i]["val_loss"])
    flags = [flag if flag != "12" else str(best + 1) for flag in flags]
    result = run_script(*flags, "--run_name", "upto", cwd=folder)
    assert result.returncode == 0, result.stderr
    kept = torch.load(folder / "Smalltestmodel-sft-es-best.pth", weights_only=True)
    expected = torch.load(folder / "Smalltestmodel-sft-upto.pth", weights_only=True)
    assert kept.keys() == expected.keys()
    assert all(torch.equal(kept[key], expected[key]) for key in kept)

    from llms_from_scratch.ch04 import GPTModel as BookGPTModel
    book_cfg = {key: ft.TEST_MODE_CONFIG[key] for key in ("vocab_size", "context_length",
                                                          "emb_dim", "n_heads", "n_layers",
                                                          "drop_rate", "qkv_bias")}
    BookGPTModel(book_cfg).load_state_dict(kept)  # strict
    best = str(folder / "Smalltestmodel-sft-es-best.pth")
    chat = run_any_script("chat.py", best, "--prompt", "Name a fruit.", "--max_new_tokens", "3",
                          cwd=folder)
    assert chat.returncode == 0, chat.stderr
    for script in ("export_hf.py", "export_gguf.py"):
        export = run_any_script(script, best, str(folder / script[:-3]), cwd=folder)
        assert export.returncode == 0, export.stderr


def test_resuming_an_early_stopped_run_writes_its_outputs_without_training(early_stopped):
    folder, flags, _ = early_stopped
    checkpoint = folder / "checkpoint-Smalltestmodel-es.pth"
    step = torch.load(checkpoint, weights_only=True)["progress"]["global_step"]
    before = torch.load(folder / "Smalltestmodel-sft-es.pth", weights_only=True)
    result = run_script(*flags, "--keep_best", "--early_stopping", "2", "--run_name", "es",
                        "--resume", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert (f"Resuming from {checkpoint}: training stopped early after step {step}, so this "
            "run writes the outputs") in result.stdout.splitlines()
    assert not any(line.startswith("Ep ") for line in result.stdout.splitlines())
    after = torch.load(folder / "Smalltestmodel-sft-es.pth", weights_only=True)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_two_named_runs_in_one_folder_keep_all_their_files(tmp_path, instruction_data_path):
    common = ["--test_mode", "--data_path", str(instruction_data_path), "--max_new_tokens",
              "3", "--eval_iter", "1", "--output_dir", str(tmp_path)]
    assert run_script(*common, "--run_name", "first", cwd=tmp_path).returncode == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_script(*common, "--lr", "1e-4", "--run_name", "second.try", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    outputs = ["Smalltestmodel-sft-{}.json", "Smalltestmodel-sft-{}.pth",
               "instruction-data-with-response-{}.json", "loss-plot-{}.pdf", "metrics-{}.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        name.format(run) for run in ("first", "second.try") for name in outputs)
    assert {name: (tmp_path / name).read_bytes() for name in first} == first
    assert json.loads((tmp_path / "Smalltestmodel-sft-second.try.json").read_text())[
        "settings"]["--lr"] == 1e-4


def test_resuming_a_cosine_schedule_with_other_epochs_is_refused(tmp_path,
                                                                 instruction_data_path, capsys):
    common = ["--test_mode", "--data_path", str(instruction_data_path), "--max_new_tokens",
              "3", "--eval_iter", "1", "--output_dir", str(tmp_path), "--lr_schedule", "cosine"]
    ft.main([*common, "--epochs", "2", "--keep_checkpoint"])
    capsys.readouterr()
    code, out, err = run_in_process(ft.main, [*common, "--epochs", "3", "--resume"], capsys)
    checkpoint = tmp_path / "checkpoint-Smalltestmodel-standalone.pth"
    assert code == 2
    assert err == (f"Error: {checkpoint}: its cosine schedule spans 2 steps and this run's 3; "
                   "resume with the --epochs it was started with (leave --epochs out)\n")


def test_more_warmup_steps_than_the_run_has_are_refused():
    args = build_parser().parse_args(["--warmup_steps", "5"])
    with pytest.raises(ft.DataError) as exc_info:
        ft.learning_rate_schedule(args, total_steps=2)
    assert str(exc_info.value) == ("--warmup_steps 5 is more than this run's 2 training steps; "
                                   "pass fewer")
    assert ft.learning_rate_schedule(args, total_steps=5).warmup_steps == 5


def test_test_mode_cuts_a_longer_warmup_to_its_steps(tmp_path, instruction_data_path, capsys):
    code, out, err = run_in_process(ft.main, [
        "--test_mode", "--data_path", str(instruction_data_path), "--output_dir",
        str(tmp_path), "--warmup_steps", "5", "--max_new_tokens", "2"], capsys)
    assert code == 0, err
    assert "Test mode: --warmup_steps 5 cut to this run's 2 training steps\n" in out
    assert out.index("cut to this run's") < out.index("Initial losses")
    info = json.loads((tmp_path / "Smalltestmodel-sft-standalone.json").read_text())
    assert info["schedule"]["warmup_steps"] == 2


@pytest.mark.parametrize("name", ["gpt2-medium", "gpt2-medium (355M)", "355M"])
def test_model_accepts_the_names_the_script_prints(name):
    assert build_parser().parse_args(["--model", name]).model == "355M"
