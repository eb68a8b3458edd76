"""A run's files are its own: no run name, rerun, resume or link makes one run write, replace or
delete another's files; what a run says it saved is there. Also the inputs that ended in a
traceback or a wrong result: an end-of-text token in the data, a temperature too small to
sample with, a vocabulary smaller than GPT-2's, LoRA weights merged with an absurd alpha, and
exports killed or pointed through links."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from helpers import (
    assert_error,
    lora_trained_model,
    one_line,
    quick_run_flags,
    random_model,
    run_in_process,
    save,
    signal_at,
)

import chat
import export_gguf
import export_hf
import gpt_instruction_finetuning as ft
from kit.chapter_training import ChapterTraining
from kit.checkpoint import fingerprint
from kit.files import DataError
from kit.locks import hold_folder, lock_file, remove_leftover_temporaries
from kit.metrics_log import read_metrics
from kit.run_names import name_max
from lora import merge_lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEM = "Smalltestmodel-sft-standalone"
CHECKPOINT = "checkpoint-Smalltestmodel-standalone.pth"
METRICS = "metrics-standalone.csv"
LOCK = "finetuning-standalone.lock"
OUTPUTS = [f"{STEM}.json", f"{STEM}.pth", f"{STEM}-best.json", f"{STEM}-best.pth",
           "instruction-data-with-response-standalone.json", "loss-plot-standalone.pdf",
           METRICS]
LISTED = (f"{STEM}.pth, {STEM}-best.pth, instruction-data-with-response-standalone.json, "
          f"loss-plot-standalone.pdf, {METRICS}")  # the outputs as the lines name them


#####################################
# Helpers
#####################################


@pytest.fixture
def common(instruction_data_path):
    """A test-mode run of one step (two evaluations) that answers in 3 batches of 4."""
    return quick_run_flags(instruction_data_path, max_new_tokens=3, gen_batch_size=4)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, instruction_data_path):
    """The folder of a finished run with --keep_best (its checkpoint removed, as by default)."""
    folder = tmp_path_factory.mktemp("finished")
    flags = quick_run_flags(instruction_data_path, max_new_tokens=3, gen_batch_size=4)
    ft.main([*flags, "--keep_best", "--output_dir", str(folder)])
    return folder


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, instruction_data_path):
    """The folder of a run without --keep_best stopped by Ctrl-C after its second step (of
    five): its checkpoint."""
    folder = tmp_path_factory.mktemp("interrupted")
    flags = quick_run_flags(instruction_data_path, max_new_tokens=3)
    with signal_at(ChapterTraining, "batch_loss", signal.SIGINT, call=2):
        with pytest.raises(SystemExit):
            ft.main([*flags, "--batch_size", "2", "--output_dir", str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == [CHECKPOINT, METRICS]
    return folder


def copy_run(source, folder):
    """Put the files of the run in `source` into `folder`; return their bytes by name."""
    for path in source.iterdir():
        shutil.copyfile(path, folder / path.name)
    return contents(folder)


def contents(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}






def changed_data(instruction_data_path, folder, index):
    """A copy of the chapter's data in `folder` whose entry `index` has another output."""
    data = json.loads(instruction_data_path.read_text())
    data[index]["output"] += " (edited)"
    path = folder / "data.json"
    path.write_text(json.dumps(data))
    return path


#####################################
# Names: no run's file is another run's, no name too long to write
#####################################


@pytest.mark.parametrize(("name", "suffix", "owner", "what"), [
    ("kb2-best", "-best", "kb2", "best weights"),
    ("cz.partial", ".partial", "cz", "answers kept so far"),
    ("run-BEST", "-best", "run", "best weights"),
])
def test_a_name_ending_in_the_scripts_own_suffix_is_refused(tmp_path, capsys, common, name,
                                                            suffix, owner, what):
    code, out, err = run_in_process(ft.main, [*common, "--run_name", name, "--output_dir",
                                              str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert_error(err, f"--run_name {name}: a name may not end in '{suffix}', which the script "
                      f"adds to the files of run '{owner}' (its {what}); pick another name")
    assert list(tmp_path.iterdir()) == []


def test_help_says_which_names_are_refused():
    text = " ".join(ft.build_parser().format_help().split())
    assert "not ending in '-best' or '.partial', which the script adds to a run's own names" \
        in text


def test_a_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path, capsys,
                                                                        common):
    most = name_max(str(tmp_path)) - len(".tmp-12345678instruction-data-with-response-"
                                         ".partial.json")
    for length in (most + 7, 300):
        argv = [*common, "--run_name", "a" * length, "--output_dir", str(tmp_path)]
        code, out, err = run_in_process(ft.main, argv, capsys)
        assert code == 2 and "Training set length" not in out
        assert_error(err, f"--run_name: a name of {length} characters makes file names too long "
                          f"for {tmp_path} (the temporary copy of the run's answers file would "
                          f"have {name_max(str(tmp_path)) + length - most} characters, the file "
                          f"system takes {name_max(str(tmp_path))}); use at most {most} "
                          "characters")
        assert list(tmp_path.iterdir()) == []
    code, _, err = run_in_process(ft.main, [*common, "--run_name", "a" * most, "--output_dir",
                                            str(tmp_path)], capsys)
    assert code == 0, err  # the longest name allowed writes every file
    assert (tmp_path / f"instruction-data-with-response-{'a' * most}.json").exists()


def test_leftovers_are_only_those_of_the_runs_own_files(tmp_path):
    """A killed save's temporary file is `.tmp-` + 8 letters + the name: the temporary file of
    run "xloss-plot-y"'s plot, which ends like run "y"'s, is not run "y"'s to remove."""
    own = tmp_path / ".tmp-k2j3h4g5loss-plot-y.pdf"
    other = tmp_path / ".tmp-a1b2c3d4loss-plot-xloss-plot-y.pdf"
    own.write_bytes(b"12")
    other.write_bytes(b"345")
    assert remove_leftover_temporaries([str(tmp_path / "loss-plot-y.pdf")]) == (1, 2)
    assert not own.exists() and other.exists()


#####################################
# --resume without a checkpoint; a rerun over a finished run
#####################################


def test_resume_without_a_checkpoint_says_what_is_there(tmp_path, capsys, common, finished):
    argv = [*common, "--resume", "--output_dir", str(tmp_path)]
    code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 2 and "Training set length" not in out
    assert_error(err, f"--resume: there is no checkpoint {tmp_path / CHECKPOINT} to continue, "
                      f"and no other file of this run is in {tmp_path}; run without --resume "
                      "to start the run")
    before = copy_run(finished, tmp_path)
    code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 2 and "Training set length" not in out
    assert_error(err, f"--resume: there is no checkpoint {tmp_path / CHECKPOINT} to continue; of "
                      f"this run, {tmp_path} holds only {LISTED} (a finished run's checkpoint is "
                      "removed unless --keep_checkpoint); run without --resume to train anew, "
                      "replacing them, or pass another --run_name")
    assert contents(tmp_path) == before


def note(folder, dropped=""):
    return (f"Note: {folder} holds the outputs of an earlier run of this name ({LISTED}); this "
            f"run replaces them as it writes its own, none before its first epoch end{dropped}. "
            "To keep them, stop now (Ctrl-C) and pass another --run_name or --output_dir.")


def test_a_rerun_keeps_every_earlier_file_until_its_first_epoch_end(tmp_path, capsys, common,
                                                                    finished):
    """Stopped after 3 of 5 steps, each a new lowest validation loss for --keep_best: the
    earlier run's best weights and all its other files are as they were."""
    before = copy_run(finished, tmp_path)
    argv = [*common, "--keep_best", "--batch_size", "2", "--output_dir", str(tmp_path)]
    with signal_at(ChapterTraining, "batch_loss", signal.SIGINT, call=3):
        code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 130
    assert note(tmp_path) in out.splitlines()
    assert out.count("Ep 1 (Step") == 3 and "Stopping after" not in out
    assert one_line(err) == (f"Interrupted; nothing of this run was saved, and the earlier "
                             f"run's outputs in {tmp_path} are unchanged: run the same command "
                             "to start again.")
    assert contents(tmp_path) == before

    # Run to its end, it replaces them all, its best weights with the lowest of its own.
    code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 0, err
    rows = read_metrics(tmp_path / METRICS)
    best = min(rows, key=lambda row: row["val_loss"])
    assert len(rows) == 5 and out.splitlines()[-2] == (
        f"Lowest validation loss {best['val_loss']:.3f} at step {best['step']} (epoch 1): saved "
        f"as {tmp_path / f'{STEM}-best.pth'}")
    info = json.loads((tmp_path / f"{STEM}-best.json").read_text())
    assert (info["losses_step"], info["val_loss"], info["settings"]["--batch_size"]) == (
        best["step"], best["val_loss"], 2)
    assert sorted(contents(tmp_path)) == sorted(OUTPUTS)


def test_a_rerun_without_keep_best_removes_the_earlier_best(tmp_path, capsys, common,
                                                           finished):
    copy_run(finished, tmp_path)
    code, out, err = run_in_process(ft.main, [*common, "--output_dir", str(tmp_path)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert note(tmp_path, f", and removes {STEM}-best.pth with them (without --keep_best it "
                          "keeps no best weights)") in lines
    assert (f"Removed {STEM}-best.pth, {STEM}-best.json from {tmp_path}: an earlier run's best "
            "weights (--keep_best keeps this run's)") in lines
    assert sorted(contents(tmp_path)) == sorted(
        name for name in OUTPUTS if "-best" not in name)


def test_the_best_line_names_the_file_only_when_it_holds_that_step(tmp_path, capsys, common):
    ft.main([*common, "--keep_best", "--keep_checkpoint", "--output_dir", str(tmp_path)])
    (tmp_path / f"{STEM}-best.pth").unlink()
    capsys.readouterr()
    code, out, err = run_in_process(ft.main, [*common, "--keep_best", "--resume",
                                              "--output_dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert out.splitlines()[-2].endswith(f"its weights are not in {tmp_path / STEM}-best.pth")


#####################################
# Resuming with other settings or entries
#####################################


@pytest.mark.parametrize(("change", "setting"), [
    ("keep_best", "--keep_best"), ("validation", "validation data"), ("test", "test data")])
def test_resuming_with_another_keep_best_or_other_entries_is_refused(
        tmp_path, capsys, instruction_data_path, interrupted, change, setting):
    before = copy_run(interrupted, tmp_path)
    first = {"validation": 1045, "test": 935}  # where the splits of the 1100 entries start
    data = instruction_data_path if change == "keep_best" else changed_data(
        instruction_data_path, tmp_path, first[change])
    argv = [*quick_run_flags(data, max_new_tokens=3), "--batch_size", "2", "--resume",
            "--output_dir", str(tmp_path)] + (["--keep_best"] if change == "keep_best" else [])
    code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 2 and "Loaded model" not in out
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)["settings"]
    now = True if change == "keep_best" else fingerprint(
        ft.split_data(json.loads(data.read_text()))[2 if change == "validation" else 1][:10])
    assert saved[setting] != now
    assert_error(err, f"{tmp_path / CHECKPOINT} was saved with {setting} {saved[setting]}, this "
                      f"run has {setting} {now}; delete it or run without --resume, or resume "
                      "with the same settings")
    assert {name: contents(tmp_path)[name] for name in before} == before


#####################################
# Links and other files in the outputs' places
#####################################


def test_a_link_named_like_the_lock_is_refused_and_its_target_kept(tmp_path, capsys, common):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    (tmp_path / LOCK).symlink_to(target)
    code, out, err = run_in_process(ft.main, [*common, "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and "Training set length" not in out
    assert_error(err, f"{tmp_path / LOCK}: is a symbolic link (to {target}), not a file that "
                      "this script wrote; remove the link, or pass another --run_name or "
                      "--output_dir")
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "notes.txt"]


def test_the_lock_never_opens_through_a_link(tmp_path):
    """Checked where it is opened too: a link made after the run's check, or a second name (a
    hard link) of another file."""
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    (tmp_path / "soft.lock").symlink_to(target)
    os.link(target, tmp_path / "hard.lock")
    with pytest.raises(DataError, match="soft.lock: is a symbolic link, not a lock file"):
        lock_file(str(tmp_path / "soft.lock"))
    with pytest.raises(DataError, match="hard.lock: is a hard link to another file, not a lock"):
        lock_file(str(tmp_path / "hard.lock"))
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("kind", ["link", "folder"])
def test_an_output_that_is_a_link_or_a_folder_is_refused_before_any_work(tmp_path, capsys,
                                                                         common, kind):
    target = tmp_path / "other-run-metrics.csv"
    target.write_text("epoch\n")
    path = tmp_path / (METRICS if kind == "link" else f"{STEM}.pth")
    if kind == "link":
        path.symlink_to(target)
    else:
        path.mkdir()
    code, out, err = run_in_process(ft.main, [*common, "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and "Training set length" not in out
    assert_error(err, f"{path}: is a symbolic link (to {target}), not a file that this script "
                      "wrote" if kind == "link" else
                      f"{path}: is a folder, where this run writes a file; move it away")
    assert target.read_text() == "epoch\n"
    assert not (tmp_path / LOCK).exists()


#####################################
# Inputs that ended in a traceback or a wrong result
#####################################


def test_data_holding_the_end_of_text_token_names_the_entry(tmp_path, capsys, common,
                                                           instruction_data_path):
    data = json.loads(instruction_data_path.read_text())[:40]
    data[3]["output"] += " <|endoftext|>"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    argv = [*quick_run_flags(path), "--output_dir", str(tmp_path / "out")]
    code, out, err = run_in_process(ft.main, argv, capsys)
    assert code == 2 and "Training set length" not in out
    assert_error(err, f"{path}: entry 3 field 'output' holds <|endoftext|>, GPT-2's end-of-text "
                      "token, which finetuning puts after every response and the tokenizer "
                      "refuses inside an entry; remove it or write it another way")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A test-mode model, one with a 1000-token vocabulary, and unmerged LoRA weights without
    their JSON (so --lora_alpha gives the alpha)."""
    folder = tmp_path_factory.mktemp("models")
    config = dict(ft.TEST_MODE_CONFIG)
    small = {**config, "vocab_size": 1000}
    torch.save(lora_trained_model(config).state_dict(), folder / "lora.pth")
    return {"model": save(random_model(config), folder / "model.pth", config),
            "small": save(random_model(small), folder / "small.pth", small),
            "lora": str(folder / "lora.pth")}


def test_a_temperature_too_small_to_sample_with_is_refused(capsys, models):
    argv = [models["model"], "--prompt", "Name a fruit.", "--temperature", "1e-39"]
    code, out, err = run_in_process(chat.main, argv, capsys)
    assert code == 2 and out == ""
    assert_error(err, "--temperature 1e-39 is too small to sample with (the logits divided by it "
                      "overflow); pass 0 for greedy answers, which it approaches, or at least "
                      "1e-06")


def test_a_vocabulary_other_than_gpt2s_answers_or_ends_in_one_line(tmp_path, capsys, models):
    """A smaller vocabulary answers prompts whose tokens it has (its answers decode) and
    refuses one with a token it lacks; a larger one would write tokens that GPT-2's tokenizer
    cannot decode."""
    config = {**ft.TEST_MODE_CONFIG, "vocab_size": 50300}
    large = save(random_model(config), tmp_path / "large.pth", config)
    code, out, err = run_in_process(chat.main, [large, "--prompt", "Hi"], capsys)
    assert code == 2 and out == ""
    assert_error(err, f"{large}: has a vocabulary of 50300 tokens, GPT-2's tokenizer 50257; "
                      "only a model finetuned from GPT-2 can chat with it")
    code, out, err = run_in_process(chat.main, [models["small"], "--prompt", "Name a fruit.",
                                                "--max_new_tokens", "2"], capsys)
    assert code == 2 and out == ""
    assert_error(err, "the prompt holds the token ' Instruction' (id 46486), which the model's "
                      "vocabulary of 1000 tokens lacks (GPT-2's has 50257); ask without it, or "
                      "chat with a model finetuned from GPT-2")
    config = {**ft.TEST_MODE_CONFIG, "vocab_size": 50256}  # all but <|endoftext|>
    fewer = save(random_model(config), tmp_path / "fewer.pth", config)
    code, out, err = run_in_process(chat.main, [fewer, "--prompt", "Name a fruit.",
                                                "--max_new_tokens", "2"], capsys)
    assert code == 0 and "Traceback" not in err, err


@pytest.mark.parametrize(("alpha", "problem"), [
    ("1e39", "merging the LoRA layers with alpha 1e+39 makes trf_blocks.0.att.W_query.weight "
             "hold values that are not finite numbers: the alpha is far too large"),
    ("1e30", "with its LoRA layers merged at alpha 1e+30 the model computes values that are "
             "not finite numbers: the alpha is far too large"),
])
@pytest.mark.parametrize("script", ["chat", "export_hf", "export_gguf"])
def test_lora_merged_with_an_absurd_alpha_is_refused(tmp_path, capsys, models, alpha, problem,
                                                     script):
    entry = {"chat": chat.main, "export_hf": export_hf.main, "export_gguf": export_gguf.main}
    rest = ["--prompt", "Name a fruit."] if script == "chat" else [str(tmp_path / "out")]
    code, out, err = run_in_process(entry[script], [models["lora"], *rest, "--lora_alpha", alpha],
                                    capsys)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"Error: {models['lora']}: {problem}"), err
    assert list(tmp_path.iterdir()) == []


def test_merge_lora_refuses_before_changing_the_layer():
    model = lora_trained_model(ft.TEST_MODE_CONFIG)
    for module in model.modules():
        if hasattr(module, "alpha"):
            module.alpha = 1e39
    query = model.trf_blocks[0].att.W_query.linear.weight.clone()
    with pytest.raises(DataError, match="trf_blocks.0.att.W_query.weight hold values"):
        merge_lora(model)
    assert torch.equal(model.trf_blocks[0].att.W_query.linear.weight, query)


def test_weights_beyond_f16_are_refused_in_an_f16_gguf(tmp_path, capsys, models):
    """Alpha 1e6 merges to finite weights of up to about 1e6: f32 stores them, f16 cannot."""
    argv = [models["lora"], str(tmp_path / "f16"), "--lora_alpha", "1e6"]
    code, out, err = run_in_process(export_gguf.main, argv, capsys)
    assert code == 2
    assert err.splitlines()[-1].startswith("Error: blk.0.attn_qkv.weight holds values up to ")
    assert err.splitlines()[-1].endswith(
        "more than --outtype f16 can store (its largest is 65504), so the exported weights "
        "would be infinite; check the LoRA alpha, or pass --outtype f32")
    code, _, err = run_in_process(export_gguf.main, [*argv[:1], str(tmp_path / "f32"),
                                                     *argv[2:], "--outtype", "f32"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["f32"]


#####################################
# Exports: killed, and pointed through links
#####################################


PAUSING_EXPORT = """
import sys
import gguf
import export_gguf

write = gguf.GGUFWriter.write_tensor_data


def paused(self, *args, **kwargs):
    write(self, *args, **kwargs)
    self.flush()
    print("PAUSED", flush=True)
    sys.stdin.readline()


gguf.GGUFWriter.write_tensor_data = paused
export_gguf.main(sys.argv[1:])
"""


def test_the_next_export_removes_what_a_killed_one_left(tmp_path, capsys, models):
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_EXPORT, models["model"],
                             str(tmp_path / "first")], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        while proc.stdout.readline() not in ("PAUSED\n", ""):  # mid-way through the GGUF file
            pass
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-export-")]
    size = sum(p.stat().st_size for p in left.iterdir())
    running = tmp_path / ".tmp-export-running"  # the folder of an export still at work
    running.mkdir()
    held = hold_folder(str(running))
    try:
        code, out, err = run_in_process(export_gguf.main, [models["model"],
                                                           str(tmp_path / "second")], capsys)
    finally:
        os.close(held)
    assert code == 0, err
    assert (f"Removed 1 folder ({size / 1e6:.1f} MB) that an interrupted export left in "
            f"{tmp_path}") in out.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-export-running", "second"]


@pytest.mark.parametrize("kind", ["link", "dotdot"])
def test_an_out_dir_through_a_link_or_dotdot_is_written_where_it_leads(tmp_path, capsys,
                                                                       models, kind):
    (tmp_path / "real").mkdir()
    if kind == "link":
        (tmp_path / "link").symlink_to(tmp_path / "real")
        out_dir, written = tmp_path / "link", tmp_path / "real"
    else:
        out_dir, written = tmp_path / "missing" / ".." / "real" / "hf", tmp_path / "real" / "hf"
    code, out, err = run_in_process(export_hf.main, [models["model"], str(out_dir)], capsys)
    assert code == 0, err
    assert f"Wrote {out_dir}: {', '.join(export_hf.FILES)}" in out.splitlines()
    assert sorted(os.listdir(written)) == sorted(export_hf.FILES)
    assert not (tmp_path / "missing").exists()


def test_a_failed_export_write_names_its_cause(tmp_path, capsys, monkeypatch, models):
    def refused(tensors, path, metadata):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export_hf, "save_file", refused)
    code, _, err = run_in_process(export_hf.main, [models["model"], str(tmp_path / "hf")],
                                  capsys)
    assert code == 1
    assert err.splitlines()[-1].split("\r")[-1] == (
        f"Error: {tmp_path / 'hf'}: could not write the export (Permission denied); nothing was "
        "written. Pass another OUT_DIR, and run again")
