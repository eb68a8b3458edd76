"""Faults never lose saved work: interrupts at any moment, real signals, a second run in the
folder, what a killed save left, full disks, numbers that are not finite, damaged checkpoints
and metrics. Each ends in one line that says what is saved and how to go on."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from functools import partial
from unittest import mock

import pytest
import torch
from helpers import (
    assert_error,
    finished_run_folder,
    one_line,
    quick_run_flags,
    run_in_process,
    signal_at,
)

import gpt_instruction_finetuning as ft
from kit.chapter_training import ChapterTraining
from kit.checkpoint import Progress, check_checkpoint
from kit.files import DataError, save_json
from kit.locks import lock_file, unlock_file
from kit.metrics_log import read_metrics
from kit.saved_model import finite_or_none, read_pth
from kit.signals import StopRequests, signals_held
from kit.stopping import FiniteWatch, TrainingDiverged
from previous_chapters import IGNORE_INDEX, TrainingHooks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = "checkpoint-Smalltestmodel-standalone.pth"
METRICS = "metrics-standalone.csv"
ANSWERS = "instruction-data-with-response-standalone.partial.json"
RESPONSES = "instruction-data-with-response-standalone.json"
MODEL = "Smalltestmodel-sft-standalone.pth"
LOCK = "finetuning-standalone.lock"
FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


#####################################
# Helpers
#####################################


def quick_flags(data_path):
    """A test-mode run of one step per epoch that answers in 3 batches of 4, 3 tokens each."""
    return quick_run_flags(data_path, max_new_tokens=3, gen_batch_size=4)


@pytest.fixture
def common(instruction_data_path):
    return quick_flags(instruction_data_path)


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, instruction_data_path):
    """The folder of a finished run with the `common` flags, its checkpoint kept."""
    return finished_run_folder(tmp_path_factory, "earlier", quick_flags(instruction_data_path))


def copy_run(source, folder):
    """Put the files of the run in `source` into `folder`; return their bytes by name."""
    for path in source.iterdir():
        shutil.copyfile(path, folder / path.name)
    return {path.name: path.read_bytes() for path in folder.iterdir()}






@contextmanager
def counting(owner, name):
    """Within the block, count the calls of `owner.name` in the list it yields."""
    real, calls = getattr(owner, name), []

    def counted(*args, **kwargs):
        calls.append(None)
        return real(*args, **kwargs)

    with mock.patch.object(owner, name, counted):
        yield calls


def ran_training(out):
    return any(line.startswith("Ep ") for line in out.splitlines())


def temporary_files(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".tmp-"))


#####################################
# A rerun without --resume keeps the earlier run until its first epoch end
#####################################


def test_ctrl_c_before_a_reruns_first_epoch_end_keeps_the_earlier_run(tmp_path, capsys, common,
                                                                      earlier_run):
    before = copy_run(earlier_run, tmp_path)
    checkpoint = tmp_path / CHECKPOINT
    killed_save = tmp_path / f".tmp-k2j3h4g5{CHECKPOINT}"  # a save killed with SIGKILL
    killed_save.write_bytes(bytes(2_500_000))
    others = tmp_path / ".tmp-abcdefghcheckpoint-Smalltestmodel-lora.pth"  # another run's
    others.write_bytes(b"")
    argv = [*common, "--output_dir", str(tmp_path)]
    with signal_at(ChapterTraining, "batch_loss", signal.SIGINT):
        code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 130
    assert one_line(err) == (
        f"Interrupted; this run's steps were not kept, and {checkpoint} still holds the earlier "
        "run's progress: run the same command with --resume to continue that run, or without "
        "--resume to start over.")
    assert (f"Removed 1 temporary file (2.5 MB) that an interrupted save left in {tmp_path}"
            in out.splitlines())
    assert "Stopping after" not in out  # nothing to save
    assert not killed_save.exists() and others.exists()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, others.name])

    # The advice holds: --resume continues the earlier run, whose training is done. Its
    # metrics log, cut mid-line meanwhile, is rebuilt from the checkpoint.
    metrics = tmp_path / METRICS
    metrics.write_bytes(before[METRICS][:before[METRICS].rindex(b",")])
    with counting(ft, "generate_batch") as calls:
        code, out, err = run_in_process(ft.main, [*argv, "--resume"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert (f"Resuming from {checkpoint}: training finished at epoch 1, so this run writes the "
            "outputs (--epochs 2 or more would train further)") in lines
    assert not ran_training(out) and len(calls) == 3
    assert (f"{metrics}: not a metrics log of this script (line 2 does not have the 7 columns); "
            "rebuilt its 1 row from the checkpoint") in lines
    assert metrics.read_bytes() == before[METRICS]
    assert (tmp_path / RESPONSES).read_bytes() == before[RESPONSES]


#####################################
# Every interrupt ends in one line, at any moment
#####################################


MOMENTS = {  # moment -> (function that gets the signal, its call, which calls count)
    "checking the flags": (ft, "check_args", 1, None),
    "loading": (ft, "load_model", 1, None),
    "initial losses": (ft, "calc_loss_loader", 1, None),
    "training": (ChapterTraining, "batch_loss", 1, None),
    "saving the model": (torch, "save", 1, lambda obj, f: "optimizer" not in obj),
}


@pytest.mark.parametrize(("moment", "signum", "kept"), [
    ("checking the flags", signal.SIGTERM, "nothing was written: run the same command to start "
                                           "again"),
    ("loading", signal.SIGHUP, "nothing of this run was saved: run the same command to start "
                               "again"),
    ("initial losses", signal.SIGINT, "nothing of this run was saved: run the same command to "
                                      "start again"),
    ("training", signal.SIGTERM, "the training so far (1 step) is saved in {checkpoint}: run "
                                 "the same command with --resume to continue"),
    ("saving the model", signal.SIGTERM, "the trained weights are saved in {checkpoint}, and "
                                         "10 of 10 test set answers in {answers}: run the same "
                                         "command with --resume to write the outputs"),
])
def test_an_interrupt_at_any_moment_ends_in_one_line(tmp_path, capsys, common, moment, signum,
                                                     kept):
    owner, name, call, when = MOMENTS[moment]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with signal_at(owner, name, signum, call, when):
        code, out, err = run_in_process(ft.main, [*common, "--output_dir", str(tmp_path)],
                                        capsys)
    assert code == 128 + signum
    stopped = "Interrupted" if signum == signal.SIGINT else f"Stopped by {signum.name}"
    assert one_line(err) == f"{stopped}; " + kept.format(
        checkpoint=tmp_path / CHECKPOINT, answers=tmp_path / ANSWERS) + "."
    assert not (tmp_path / LOCK).exists() and temporary_files(tmp_path) == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
    if moment == "training":  # stopped as Ctrl-C stops it: after the step, with a checkpoint
        assert "Stopping after step 0: saving the checkpoint (do not interrupt)" in out
        progress = torch.load(tmp_path / CHECKPOINT, weights_only=True)["progress"]
        assert (progress["global_step"], progress["batches_done"]) == (0, 1)
    if moment == "saving the model":  # the save was not cut short
        assert torch.load(tmp_path / MODEL, weights_only=True).keys() == \
            ft.GPTModel(ft.TEST_MODE_CONFIG).state_dict().keys()


def test_ignored_signals_stay_ignored():
    """A run started with nohup ignores SIGHUP: hanging up the terminal must not stop it."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequests() as stops, signals_held("Saving"):
            signal.raise_signal(signal.SIGHUP)
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert stops.signum is None
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_resume_answers_only_what_an_interrupted_run_had_not(tmp_path, capsys, common,
                                                             earlier_run):
    argv = [*common, "--output_dir", str(tmp_path)]
    with signal_at(ft, "generate_batch", signal.SIGINT, call=3):
        code, _, err = run_in_process(ft.main, argv, capsys)
    assert code == 130
    assert one_line(err) == (f"Interrupted; the trained weights are saved in "
                             f"{tmp_path / CHECKPOINT}, and 8 of 10 test set answers in "
                             f"{tmp_path / ANSWERS}: run the same command with --resume to "
                             "write the outputs.")
    kept = json.loads((tmp_path / ANSWERS).read_text())["answers"]
    assert sum(answer is not None for answer in kept) == 8  # two batches of 4

    with counting(ft, "generate_batch") as calls:
        code, out, err = run_in_process(ft.main, [*argv, "--resume"], capsys)
    assert code == 0, err
    assert f"Reusing 8 of 10 answers kept in {tmp_path / ANSWERS}" in out.splitlines()
    assert len(calls) == 1  # the last 2 entries
    assert (json.loads((tmp_path / RESPONSES).read_text())
            == json.loads((earlier_run / RESPONSES).read_text()))
    assert not (tmp_path / ANSWERS).exists() and not (tmp_path / CHECKPOINT).exists()


PAUSING_RUN = """
import sys
import torch
import gpt_instruction_finetuning as ft
from kit.chapter_training import ChapterTraining


def pause(label):
    print("PAUSED " + label, flush=True)
    sys.stdin.readline()


def pausing(function, label, when):
    calls = []

    def paused(*args, **kwargs):
        calls.append(None)
        if when(len(calls), *args):
            pause(label)
        return function(*args, **kwargs)
    return paused


ChapterTraining.batch_loss = pausing(ChapterTraining.batch_loss, "step",
                                            lambda n, *args: n == 2)
torch.save = pausing(torch.save, "save", lambda n, obj, f: "optimizer" in obj)
ft.main(sys.argv[1:])
"""


def test_real_sigterm_checkpoints_and_a_second_one_does_not_cut_the_save(tmp_path, capsys,
                                                                          common):
    """The script in its own process, paused at a step and inside the checkpoint's write."""
    argv = [*common, "--batch_size", "2", "--output_dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_RUN, *argv], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": REPO}, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()

    def lines_until(marker):
        lines = []
        while not lines or lines[-1] != marker:
            line = proc.stdout.readline()
            assert line, lines
            lines.append(line.rstrip("\n"))
        return lines

    try:
        lines_until("PAUSED step")  # in the second step
        proc.send_signal(signal.SIGTERM)
        proc.stdin.write("\n")
        proc.stdin.flush()
        lines = lines_until("PAUSED save")
        assert lines[-2] == "Stopping after step 1: saving the checkpoint (do not interrupt)"
        proc.send_signal(signal.SIGTERM)  # while the checkpoint is written
        note = proc.stdout.readline().rstrip("\n")
        assert note == (f"Saving checkpoint {tmp_path / CHECKPOINT} (do not interrupt); "
                        "stopping once it is written")
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 143, err
    assert one_line(err) == (f"Stopped by SIGTERM; the training so far (2 steps) is saved in "
                             f"{tmp_path / CHECKPOINT}: run the same command with --resume to "
                             "continue.")
    assert "PAUSED" not in out
    progress = torch.load(tmp_path / CHECKPOINT, weights_only=True)["progress"]
    assert (progress["global_step"], progress["batches_done"]) == (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, METRICS]

    code, out, err = run_in_process(ft.main, [*argv, "--resume"], capsys)
    assert code == 0, err
    assert f"Resuming from {tmp_path / CHECKPOINT}: epoch 1 of 1, 2 steps done" in out


#####################################
# One run at a time
#####################################


def test_a_second_run_in_the_folder_is_refused(tmp_path, capsys, common):
    held = lock_file(str(tmp_path / LOCK))  # a run in progress
    try:
        code, out, err = run_in_process(ft.main, [*common, "--output_dir", str(tmp_path)],
                                        capsys)
    finally:
        unlock_file(held)
    assert code == 2
    assert_error(err, f"another run (process {os.getpid()}) is writing these outputs in "
                      f"{tmp_path} ({tmp_path / LOCK} is locked); wait for it to end, or pass "
                      "another --output_dir")
    assert "Training set length" not in out
    assert list(tmp_path.iterdir()) == []


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    path = str(tmp_path / LOCK)
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\n"
         "from kit.locks import lock_file\n"
         "held = lock_file(sys.argv[1])\n"
         "os.kill(os.getpid(), signal.SIGKILL)", path],
        env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
    assert killed.returncode == -signal.SIGKILL and os.path.exists(path)
    held = lock_file(path)
    assert held is not None
    assert lock_file(path) is None  # held now: a third run is refused
    unlock_file(held)
    assert not os.path.exists(path)


#####################################
# Full disks: one line, nothing saved before lost
#####################################


def failing_torch_save(kind):
    """torch.save failing as on a full disk for a checkpoint (kind "checkpoint") or weights."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if ("optimizer" in obj) == (kind == "checkpoint"):
            f.write(b"PK\x03\x04 partial")
            raise RuntimeError(FULL_DISK)
        return real(obj, f, *args, **kwargs)

    return mock.patch.object(torch, "save", save)


def failing_json_dump():
    return mock.patch("kit.files.json.dump",
                      side_effect=OSError(28, "No space left on device"))


def failing_metrics_append():
    """Appending an evaluation's row fails (the header, written first, does not)."""
    real = csv.DictWriter.writerow

    def writerow(self, row):
        if row["epoch"] != "epoch":
            raise OSError(28, "No space left on device")
        return real(self, row)

    return mock.patch.object(csv.DictWriter, "writerow", writerow)


FAILED_WRITES = {  # what fails -> (patch, file named, what is saved, how to go on)
    "checkpoint": (partial(failing_torch_save, "checkpoint"), CHECKPOINT,
                   "this run's steps were not kept, and {checkpoint} still holds the earlier "
                   "run's progress", "run the same command with --resume to continue that run, "
                   "or without --resume to start over"),
    "metrics": (failing_metrics_append, METRICS, "nothing of this run was saved",
                "run the same command to start again"),
    "answers": (failing_json_dump, ANSWERS, "the trained weights are saved in {checkpoint}",
                "run the same command with --resume to write the outputs"),
    "model": (partial(failing_torch_save, "model"), MODEL,
              "the trained weights are saved in {checkpoint}, and 10 of 10 test set answers in "
              "{answers}", "run the same command with --resume to write the outputs"),
}


@pytest.mark.parametrize("failing", list(FAILED_WRITES))
def test_a_full_disk_ends_in_one_line_and_loses_nothing(tmp_path, capsys, common, earlier_run,
                                                        failing):
    make_patch, name, what, how = FAILED_WRITES[failing]
    before = copy_run(earlier_run, tmp_path) if failing == "checkpoint" else {}
    with make_patch():
        code, out, err = run_in_process(ft.main, [*common, "--output_dir", str(tmp_path)],
                                        capsys)
    assert code == 1
    reason = (f"torch.save failed, most likely on a full disk: {FULL_DISK}"
              if name.endswith(".pth") else "No space left on device")
    what = what.format(checkpoint=tmp_path / CHECKPOINT, answers=tmp_path / ANSWERS)
    assert one_line(err) == (f"Error: could not write {tmp_path / name} ({reason}); {what}; "
                             f"free space, then {how}")
    assert temporary_files(tmp_path) == [] and not (tmp_path / LOCK).exists()
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    if failing in ("answers", "model"):
        progress = torch.load(tmp_path / CHECKPOINT, weights_only=True)["progress"]
        assert progress["epoch"] == progress["num_epochs"] == 1


#####################################
# Numbers that are not finite
#####################################


def test_training_stops_at_the_first_nan_and_keeps_the_last_good_checkpoint(tmp_path, capsys,
                                                                           common):
    real = TrainingHooks.batch_loss  # the book's loss, which ChapterTraining wraps
    calls = []

    def nan_at_the_third_step(self, *args):
        calls.append(None)
        loss = real(self, *args)
        return loss * math.nan if len(calls) == 3 else loss

    argv = [*common, "--batch_size", "4", "--epochs", "2", "--eval_freq", "1",
            "--output_dir", str(tmp_path)]
    with mock.patch.object(TrainingHooks, "batch_loss", nan_at_the_third_step):
        code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 1
    assert one_line(err) == (f"Error: training stopped at step 2: the loss is nan; the training "
                             f"so far (2 steps) is saved in {tmp_path / CHECKPOINT}; try a lower "
                             "--lr than 5e-05")
    checkpoint = read_pth(tmp_path / CHECKPOINT, "")  # every weight finite
    assert checkpoint["progress"]["global_step"] == 1
    rows = read_metrics(tmp_path / METRICS)
    assert [row["step"] for row in rows] == [0, 1]  # no row of the diverged step


def test_a_learning_rate_that_blows_up_the_weights_stops_at_once(tmp_path, capsys, common):
    argv = [*common, "--lr", "1e38", "--output_dir", str(tmp_path)]
    code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 1
    assert one_line(err) == ("Error: training stopped at step 0: the training loss after it is "
                             "nan; nothing of this run was saved; try a lower --lr than 1e+38")
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS]
    assert read_metrics(tmp_path / METRICS) == []


def watched_step(loss, grad, counted=1):
    """A FiniteWatch that has recorded one step with `loss`, gradient `grad`, `counted` tokens."""
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.full_like(model.weight, grad)
    watch = FiniteWatch("cpu")
    watch.note_loss(torch.tensor(loss), torch.tensor(counted))
    watch.record(7, model)
    return watch


@pytest.mark.parametrize(("loss", "grad", "counted", "problem"), [
    (2.0, math.inf, 5, "step 7: the gradient norm is inf"),
    (math.nan, 0.0, 5, "step 7: the loss is nan"),
    (math.nan, math.nan, 0, "step 7: its batch has no token that the loss counts (every target "
                            "is masked)"),
])
def test_the_watch_names_the_first_bad_step_and_why(loss, grad, counted, problem):
    watch = watched_step(loss, grad, counted)
    with pytest.raises(TrainingDiverged) as info:
        watch.check()
    assert str(info.value) == problem
    assert info.value.empty_batch == (counted == 0)
    watch.check()  # reported once


def test_the_watch_passes_finite_steps_and_checks_the_weights_before_a_save():
    watch = watched_step(2.0, 0.5)
    model = torch.nn.Linear(2, 1)
    watch.check(model)
    with torch.no_grad():
        model.bias.fill_(math.inf)
    with pytest.raises(TrainingDiverged,
                       match="^step 7: the weights after it are not finite numbers$"):
        watch.check(model)


def test_a_training_set_without_a_counted_token_is_refused_before_training(tmp_path, capsys,
                                                                         common):
    def mask_everything(batch, **kwargs):
        inputs, targets = ft.custom_collate_fn(batch, **kwargs)
        return inputs, torch.full_like(targets, IGNORE_INDEX)

    argv = [*common, "--output_dir", str(tmp_path)]
    code, out, err = run_in_process(
        partial(ft.main, experiment=ft.Experiment(collate_fn=mask_everything)), argv, capsys)
    assert code == 2
    assert_error(err, f"{common[2]}: no training entry has a token that the loss counts (every "
                      "target is masked or cut off by the length limit); check the entries' "
                      "responses and the masking")
    assert "Loaded model" not in out and list(tmp_path.iterdir()) == []


def test_weights_that_are_not_finite_are_refused_with_the_file(tmp_path, capsys, common,
                                                               earlier_run):
    from kit.saved_model import load_finetuned_model

    weights = torch.load(earlier_run / MODEL, weights_only=True)
    weights["trf_blocks.0.att.W_query.weight"][0, 0] = math.nan
    torch.save(weights, tmp_path / MODEL)
    shutil.copyfile(earlier_run / "Smalltestmodel-sft-standalone.json",
                    tmp_path / "Smalltestmodel-sft-standalone.json")
    with pytest.raises(DataError, match=(
            f"^{tmp_path / MODEL}: 'trf_blocks.0.att.W_query.weight' holds NaN or infinite "
            "values, not weights to go on from; finetune again or copy the file anew$")):
        load_finetuned_model(tmp_path / MODEL)

    checkpoint = torch.load(earlier_run / CHECKPOINT, weights_only=True)
    checkpoint["optimizer"]["state"][0]["exp_avg_sq"][0, 0] = math.inf
    torch.save(checkpoint, tmp_path / CHECKPOINT)
    code, out, err = run_in_process(
        ft.main, [*common, "--output_dir", str(tmp_path), "--resume"], capsys)
    assert code == 2
    assert_error(err, f"{tmp_path / CHECKPOINT}: 'optimizer.state.0.exp_avg_sq' holds NaN or "
                      "infinite values, not weights to go on from; delete it or run without "
                      "--resume")
    assert "Loaded model" not in out


def test_json_never_holds_nan(tmp_path):
    assert finite_or_none(math.nan) is None and finite_or_none(None) is None
    assert finite_or_none(math.inf) is None and finite_or_none(2.5) == 2.5
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        save_json({"val_loss": math.nan}, tmp_path / "info.json")
    assert list(tmp_path.iterdir()) == []


#####################################
# Checkpoints: every field checked before anything is built
#####################################


def break_field(checkpoint, part, field, value):
    if value is KeyError:
        del checkpoint[part][field]
    else:
        checkpoint[part][field] = value


@pytest.mark.parametrize(("part", "field", "value", "message"), [
    ("progress", "epoch", KeyError, "the checkpoint's progress has no field 'epoch'"),
    ("progress", "metrics", "rows", "the checkpoint's progress field 'metrics' must be a list "
                                    "of metrics rows, not 'rows'"),
    ("progress", "rng", {"torch": torch.zeros(3)}, "the checkpoint's progress field 'rng' must "
                                                   "be random states or None"),
    ("progress", "global_step", True, "the checkpoint's progress field 'global_step' must be "
                                      "a whole number from -1, not True"),
    ("progress", "val_losses", [], "the checkpoint's progress fields train_losses, val_losses, "
                                   "track_tokens_seen and metrics differ in length (1, 0, 1, 1)"),
    ("settings", "--lr", KeyError, "the checkpoint's settings have no field '--lr'"),
])
def test_a_checkpoint_field_missing_or_of_the_wrong_type_is_named(tmp_path, earlier_run, part,
                                                                  field, value, message):
    checkpoint = torch.load(earlier_run / CHECKPOINT, weights_only=True)
    settings = dict(checkpoint["settings"])
    break_field(checkpoint, part, field, value)
    with pytest.raises(DataError) as info:
        check_checkpoint("c.pth", checkpoint, settings)
    assert str(info.value).startswith(f"c.pth: {message}")
    assert str(info.value).endswith("; delete it or run without --resume")


def test_a_checkpoint_s_progress_is_built_back_as_it_was_saved(tmp_path, earlier_run):
    checkpoint = torch.load(earlier_run / CHECKPOINT, weights_only=True)
    stored = dict(checkpoint["progress"])
    progress = check_checkpoint("c.pth", checkpoint, dict(checkpoint["settings"]))
    assert isinstance(progress, Progress)
    assert (progress.epoch, progress.num_epochs, progress.batches_done) == (1, 1, 0)
    assert progress.saved().keys() == stored.keys()
    torch.save({"progress": progress.saved()}, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)["progress"]
    rebuilt = Progress.from_saved("again.pth", again).saved()
    for name, value in progress.saved().items():
        if name.endswith("rng"):  # random states: tensors
            assert torch.equal(rebuilt[name]["torch"], value["torch"]), name
        else:
            assert rebuilt[name] == value, name
    with pytest.raises(DataError, match="^c.pth: the checkpoint's progress field 'epoch' must "
                                        "be a whole number, not -1; "):
        Progress.from_saved("c.pth", {**stored, "epoch": -1})


def test_a_damaged_checkpoint_is_refused_before_the_model_is_built(tmp_path, capsys, common,
                                                                   earlier_run):
    checkpoint = torch.load(earlier_run / CHECKPOINT, weights_only=True)
    checkpoint["settings"] = ["not", "a", "dict"]
    torch.save(checkpoint, tmp_path / CHECKPOINT)
    code, out, err = run_in_process(
        ft.main, [*common, "--output_dir", str(tmp_path), "--resume"], capsys)
    assert code == 2
    assert_error(err, f"{tmp_path / CHECKPOINT}: the checkpoint's 'settings' is not a dict but "
                      "list; delete it or run without --resume")
    assert "Loaded model" not in out and sorted(p.name for p in tmp_path.iterdir()) == [
        CHECKPOINT]
