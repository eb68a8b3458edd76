"""Bad flags, paths and files end before any work with one 'Error:' line; nothing finished is lost.

Flags are refused right after parsing (nothing printed, nothing downloaded or loaded), paths
before training, damaged or mismatched checkpoints before they are used. A write that fails
after training exits 1 and leaves a checkpoint that --resume finishes from without training.
"""

import json
import os
import random
import shutil
from functools import partial
from unittest import mock

import pytest
import torch
from helpers import assert_error, finished_run_folder, quick_run_flags, run_in_process
from helpers import run_script as run_any_script

import exercise_experiments as ex
import gpt_instruction_finetuning as ft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = "checkpoint-Smalltestmodel-standalone.pth"
OUTPUTS = ["Smalltestmodel-sft-standalone.json", "Smalltestmodel-sft-standalone.pth",
           "instruction-data-with-response-standalone.json", "loss-plot-standalone.pdf",
           "metrics-standalone.csv"]


#####################################
# Helpers
#####################################


run_script = partial(run_any_script, "gpt_instruction_finetuning.py")  # as a user runs it


def files(folder):
    """The files under `folder`, as sorted relative paths: what a run left behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_no_temporary_files(folder):
    assert not list(folder.rglob(".tmp-*")), files(folder)


def ran_training(out):
    """True when the run printed a training step line."""
    return any(line.startswith("Ep ") for line in out.splitlines())


def no_download():
    """Make reaching the GPT-2 download fail the test: checks must come before it."""
    return mock.patch.object(ft, "download_and_load_gpt2",
                             side_effect=AssertionError("the download was reached"))


@pytest.fixture
def common(instruction_data_path):
    return quick_run_flags(instruction_data_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, instruction_data_path):
    """The folder of one finished test-mode run with the `common` flags, checkpoint kept."""
    return finished_run_folder(tmp_path_factory, "finished", quick_run_flags(instruction_data_path))


#####################################
# Flags: refused right after parsing
#####################################


FLAG_CASES = [
    (["--epochs", "0"], "--epochs", "0"),
    (["--epochs", "-1"], "--epochs", "-1"),
    (["--batch_size", "0"], "--batch_size", "0"),
    (["--gen_batch_size", "0"], "--gen_batch_size", "0"),
    (["--eval_freq", "0"], "--eval_freq", "0"),
    (["--eval_iter", "0"], "--eval_iter", "0"),
    (["--lr", "0.0"], "--lr", "0.0"),
    (["--lr", "-0.5"], "--lr", "-0.5"),
    (["--weight_decay", "-0.1"], "--weight_decay", "-0.1"),
    (["--max_new_tokens", "-1"], "--max_new_tokens", "-1"),
    (["--device", "tpu"], "--device", "tpu"),
    (["--warmup_steps", "-1"], "--warmup_steps", "-1"),
    (["--initial_lr", "nan"], "--initial_lr", "nan"),
    (["--min_lr=-1e-6"], "--min_lr", "-1e-06"),
    (["--lr_schedule", "cosine", "--min_lr", "0.1"], "--min_lr", "0.1"),
    (["--grad_clip", "0"], "--grad_clip", "0.0"),
    (["--grad_clip", "inf"], "--grad_clip", "inf"),
    (["--early_stopping", "0"], "--early_stopping", "0"),
    (["--run_name", "../elsewhere"], "--run_name", "elsewhere"),
    (["--run_name", ""], "--run_name", "only"),
]


@pytest.mark.parametrize(("flags", "flag", "value"), FLAG_CASES,
                         ids=[" ".join(case[0]) for case in FLAG_CASES])
def test_bad_flag_is_refused_before_anything_runs(tmp_path, capsys, instruction_data_path,
                                                  flags, flag, value):
    assert_refused_before_work(ft.main, tmp_path, capsys, instruction_data_path, flags, flag,
                               value)


def assert_refused_before_work(entry_point, tmp_path, capsys, data_path, flags, flag, value):
    """Run a non-test-mode command with `flags`: exit 2, one line naming `flag` and `value`,
    nothing printed, downloaded or written."""
    argv = ["--model", "124M", "--models_dir", str(tmp_path / "gpt2"),
            "--data_path", str(data_path), "--output_dir", str(tmp_path / "out"), *flags]
    with no_download():
        code, out, err = run_in_process(entry_point, argv, capsys)
    assert code == 2
    assert out == ""
    assert_error(err, flag, values=[value])
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_cuda_names_the_cpu(tmp_path, capsys, instruction_data_path):
    argv = ["--model", "124M", "--models_dir", str(tmp_path / "gpt2"), "--device", "cuda",
            "--data_path", str(instruction_data_path), "--output_dir", str(tmp_path / "out")]
    with no_download(), mock.patch("torch.cuda.is_available", return_value=False):
        code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 2
    assert out == ""
    assert_error(err, "--device cuda", "--device cpu")
    assert list(tmp_path.iterdir()) == []


def test_zero_eval_freq_through_the_command_line(tmp_path, instruction_data_path):
    result = run_script("--test_mode", "--data_path", str(instruction_data_path),
                        "--eval_freq", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert_error(result.stderr, "--eval_freq", values=["0"])
    assert list(tmp_path.iterdir()) == []


#####################################
# Paths: refused before training
#####################################


@pytest.mark.parametrize("is_folder", [False, True], ids=["missing", "a folder"])
def test_unusable_data_path(tmp_path, capsys, common, is_folder):
    data_path = tmp_path / "data.json"
    if is_folder:
        data_path.mkdir()
    code, out, err = run_in_process(
        ft.main, [*common, "--data_path", str(data_path), "--output_dir", str(tmp_path / "out")],
        capsys)
    assert code == 2
    assert_error(err, "--data_path", str(data_path))
    assert not ran_training(out)
    assert files(tmp_path) == []


def test_output_dir_that_is_a_file_is_refused_before_training(tmp_path, capsys, common):
    in_the_way = tmp_path / "results"
    in_the_way.write_text("not a folder")
    code, out, err = run_in_process(ft.main, [*common, "--output_dir", str(in_the_way)], capsys)
    assert code == 2
    assert_error(err, "--output_dir", str(in_the_way))
    assert not ran_training(out)
    assert files(tmp_path) == ["results"]
    assert in_the_way.read_text() == "not a folder"


def test_output_dir_under_a_file_is_refused_before_training(tmp_path, capsys, common):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    code, out, err = run_in_process(ft.main, [*common, "--output_dir", str(blocker / "out")],
                                    capsys)
    assert code == 2
    assert_error(err, "--output_dir", str(blocker))
    assert not ran_training(out)
    assert files(tmp_path) == ["blocker"]


def test_output_dir_that_is_a_file_through_the_command_line(tmp_path, instruction_data_path):
    (tmp_path / "results").write_text("not a folder")
    result = run_script("--test_mode", "--data_path", str(instruction_data_path),
                        "--output_dir", "results", cwd=tmp_path)
    assert result.returncode == 2
    assert_error(result.stderr, "--output_dir", "results")
    assert not ran_training(result.stdout)
    assert files(tmp_path) == ["results"]
    assert (tmp_path / "results").read_text() == "not a folder"


def test_models_dir_that_is_a_file(tmp_path, capsys, instruction_data_path):
    models_dir = tmp_path / "gpt2"
    models_dir.write_text("not a folder")
    argv = ["--model", "124M", "--models_dir", str(models_dir),
            "--data_path", str(instruction_data_path), "--output_dir", str(tmp_path / "out")]
    with no_download():
        code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 2
    assert_error(err, "--models_dir", str(models_dir))
    assert not ran_training(out)
    assert files(tmp_path) == ["gpt2"]


#####################################
# --resume: damaged, foreign or mismatched checkpoints
#####################################


def damaged_checkpoints(finished):
    """name -> bytes of a file at the checkpoint's place that cannot be resumed from."""
    whole = (finished / CHECKPOINT).read_bytes()
    return {
        "empty": b"",
        "cut short": whole[:len(whole) // 2],
        "random bytes": random.Random(0).randbytes(4096),
        "a JSON file": json.dumps([{"instruction": "a", "input": "", "output": "b"}]).encode(),
        "finetuned weights": (finished / "Smalltestmodel-sft-standalone.pth").read_bytes(),
    }


@pytest.mark.parametrize("kind", ["empty", "cut short", "random bytes", "a JSON file",
                                  "finetuned weights"])
def test_damaged_or_foreign_checkpoint(tmp_path, capsys, common, finished_run, kind):
    content = damaged_checkpoints(finished_run)[kind]
    checkpoint = tmp_path / CHECKPOINT
    checkpoint.write_bytes(content)
    code, out, err = run_in_process(
        ft.main, [*common, "--output_dir", str(tmp_path), "--resume"], capsys)
    assert code == 2
    assert_error(err, str(checkpoint), "--resume")
    assert not ran_training(out)
    assert files(tmp_path) == [CHECKPOINT]
    assert checkpoint.read_bytes() == content  # left for the user to delete


@pytest.mark.parametrize(("flag", "value"), [("--lr", "1e-4"), ("--seed", "7"),
                                             ("--batch_size", "4")])
def test_checkpoint_of_other_settings(tmp_path, capsys, common, finished_run, flag, value):
    checkpoint = tmp_path / CHECKPOINT
    shutil.copyfile(finished_run / CHECKPOINT, checkpoint)
    content = checkpoint.read_bytes()
    code, out, err = run_in_process(
        ft.main, [*common, flag, value, "--output_dir", str(tmp_path), "--resume"], capsys)
    assert code == 2
    assert_error(err, str(checkpoint), "--resume", flag)
    assert not ran_training(out)
    assert files(tmp_path) == [CHECKPOINT]
    assert checkpoint.read_bytes() == content


def test_checkpoint_of_other_training_data(tmp_path, capsys, instruction_data_path,
                                           finished_run):
    checkpoint = tmp_path / CHECKPOINT
    shutil.copyfile(finished_run / CHECKPOINT, checkpoint)
    data = json.loads(instruction_data_path.read_text())
    data[3]["output"] += " Edited."  # one training entry changed, the count the same
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    flags = quick_run_flags(edited)
    code, out, err = run_in_process(
        ft.main, [*flags, "--output_dir", str(tmp_path), "--resume"], capsys)
    assert code == 2
    assert_error(err, str(checkpoint), "--resume", "was saved with training data ")
    assert not ran_training(out)
    assert files(tmp_path) == sorted([CHECKPOINT, "edited.json"])


#####################################
# Nothing finished is lost
#####################################


def test_keep_checkpoint_keeps_it_beside_the_outputs(finished_run):
    assert files(finished_run) == sorted([CHECKPOINT, *OUTPUTS])


def test_failed_write_after_training_leaves_a_checkpoint_to_resume(tmp_path, capsys, common,
                                                                   finished_run):
    argv = [*common, "--output_dir", str(tmp_path)]
    with mock.patch("gpt_instruction_finetuning.save_json",
                    side_effect=OSError(28, "No space left on device")):
        code, out, err = run_in_process(ft.main, argv, capsys)
    assert ran_training(out)
    assert code == 1
    assert_error(err, str(tmp_path / CHECKPOINT), "--resume")
    assert (tmp_path / CHECKPOINT).is_file()
    assert not (tmp_path / "instruction-data-with-response-standalone.json").exists()
    assert_no_temporary_files(tmp_path)

    code, out, err = run_in_process(ft.main, [*argv, "--resume"], capsys)
    assert code == 0, err
    assert not ran_training(out)
    assert files(tmp_path) == OUTPUTS  # all written: the checkpoint has served its purpose
    weights = "Smalltestmodel-sft-standalone.pth"
    expected = torch.load(finished_run / weights, weights_only=True)
    got = torch.load(tmp_path / weights, weights_only=True)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    responses = "instruction-data-with-response-standalone.json"
    assert (json.loads((tmp_path / responses).read_text())
            == json.loads((finished_run / responses).read_text()))


#####################################
# exercise_experiments.py
#####################################


EXERCISE_CASES = [
    (["--exercise_solution", "lora", "--lora_rank", "0"],
     "--lora_rank must be at least 1, got 0"),
    (["--exercise_solution", "lora", "--lora_alpha", "0"],
     "--lora_alpha must be above 0, got 0.0"),
    (["--exercise_solution", "lora", "--lora_alpha", "-1.5"],
     "--lora_alpha must be above 0, got -1.5"),
    (["--merge_lora"], "--merge_lora needs the lora exercise (--exercise_solution lora)"),
    (["--exercise_solution", "lora,foo"],
     "unknown exercise 'foo'; choose from baseline, mask_instructions, alpaca_52k, phi3_prompt, "
     "lora"),
    (["--exercise_solution", "mask_instructions,phi3_prompt"],
     "mask_instructions cannot be combined with phi3_prompt: exercises 7.1 and 7.2 are each "
     "compared with the Alpaca-prompt baseline; run them one at a time"),
]


@pytest.mark.parametrize(("flags", "message"), EXERCISE_CASES,
                         ids=[" ".join(case[0]) for case in EXERCISE_CASES])
def test_bad_exercise_flag_is_refused_before_anything_runs(tmp_path, capsys,
                                                           instruction_data_path, flags, message):
    argv = ["--model", "124M", "--models_dir", str(tmp_path / "gpt2"),
            "--data_path", str(instruction_data_path), "--output_dir", str(tmp_path / "out"),
            *flags]
    with no_download():
        code, out, err = run_in_process(ex.run_exercises, argv, capsys)
    assert code == 2
    assert (out, err) == ("", f"Error: {message}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flags", "flag", "value"), [
    (["--exercise_solution", "lora", "--eval_freq", "0"], "--eval_freq", "0"),
    (["--exercise_solution", "alpaca_52k", "--batch_size", "0"], "--batch_size", "0"),
])
def test_shared_flags_are_checked_for_the_exercises_too(tmp_path, capsys, instruction_data_path,
                                                        flags, flag, value):
    assert_refused_before_work(ex.run_exercises, tmp_path, capsys, instruction_data_path, flags,
                               flag, value)
