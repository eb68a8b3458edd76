"""generate_answers.py: the answers of any saved model, as the chapter script writes its own.

The reference answers come from the chapter script's own responses file and from the book's
package (its GPTModel, LoRA layers and `generate`, one entry at a time).
"""

import json
import shutil

import pytest
import torch
from llms_from_scratch import appendix_e as book_appendix_e
from llms_from_scratch import ch04 as book_ch04
from llms_from_scratch import ch05 as book_ch05
from llms_from_scratch import ch07 as book_ch07

import generate_answers
import gpt_instruction_finetuning as ft
from kit.saved_model import TEST_MODE_CONFIG
from tests.helpers import assert_error, lora_trained_model, run_in_process, run_script

ANSWER_TOKENS = 5  # the run's --max_new_tokens, recorded in its JSON
TEST_ENTRIES = slice(935, 945)  # the chapter dataset's test split in test mode
LAST = "Smalltestmodel-sft-standalone"
BEST = "Smalltestmodel-sft-standalone-best"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, instruction_data_path):
    """A finished test-mode run of the chapter script with --keep_best whose lowest validation
    loss comes before its last step (a high rate), so its best and last weights differ."""
    folder = tmp_path_factory.mktemp("run")
    result = run_script("gpt_instruction_finetuning.py", "--test_mode", "--data_path",
                        str(instruction_data_path), "--epochs", "3", "--lr", "0.5",
                        "--eval_iter", "1", "--keep_best", "--max_new_tokens",
                        str(ANSWER_TOKENS), "--output_dir", str(folder), cwd=folder)
    assert result.returncode == 0, result.stderr
    best = torch.load(folder / f"{BEST}.pth", weights_only=True)
    last = torch.load(folder / f"{LAST}.pth", weights_only=True)
    assert not torch.equal(best["out_head.weight"], last["out_head.weight"])
    return folder


def answer(capsys, model_path, *flags):
    """generate_answers.main in this process on the CPU: (exit code, stdout, stderr)."""
    return run_in_process(generate_answers.main, [str(model_path), "--device", "cpu", *flags],
                          capsys)


def book_answers(book_model, entries, max_new_tokens=ANSWER_TOKENS):
    """The answers of the book's code: its prompt, `generate` and response cut, entry by entry."""
    tokenizer = ft.gpt2_tokenizer()
    answers = []
    for entry in entries:
        prompt = book_ch07.format_input(entry)
        out = book_ch05.generate(book_model, book_ch05.text_to_token_ids(prompt, tokenizer),
                                 max_new_tokens, TEST_MODE_CONFIG["context_length"],
                                 eos_id=50256)
        text = book_ch05.token_ids_to_text(out, tokenizer)
        answers.append(text[len(prompt):].replace("### Response:", "").strip())
    return answers


def book_model(path, lora=None):
    """The book's GPTModel loaded strictly from `path`, with the book's LoRA layers (rank,
    alpha) when `lora` is given."""
    model = book_ch04.GPTModel(dict(TEST_MODE_CONFIG))
    if lora is not None:
        book_appendix_e.replace_linear_with_lora(model, *lora)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def test_the_scripts_model_gives_the_answers_it_saved_byte_for_byte(run_folder, tmp_path,
                                                                   instruction_data_path):
    """Run as a user would, in other batches than the script's, from another folder."""
    result = run_script("generate_answers.py", str(run_folder / f"{LAST}.pth"),
                        "--batch_size", "3", cwd=tmp_path)
    assert (result.returncode, "Error" in result.stderr) == (0, False), result.stderr
    output = run_folder / f"instruction-data-with-response-{LAST}.json"
    assert result.stdout.splitlines() == [
        f"Answering the 10 test entries of {instruction_data_path} with {run_folder}/"
        f"{LAST}.pth (alpaca prompts, greedy, up to {ANSWER_TOKENS} new tokens, cpu, fp32)",
        f"Responses saved as {output}"]
    saved = (run_folder / "instruction-data-with-response-standalone.json").read_bytes()
    assert output.read_bytes() == saved
    assert sorted(p.name for p in run_folder.glob("instruction-data-with-response-*")) == [
        output.name, "instruction-data-with-response-standalone.json"]  # no .partial, no .lock
    assert not list(run_folder.glob("*.lock"))


def test_the_best_weights_give_the_books_answers(run_folder, capsys, instruction_data_path):
    code, out, err = answer(capsys, run_folder / f"{BEST}.pth")
    assert code == 0, err
    written = json.loads((run_folder / f"instruction-data-with-response-{BEST}.json")
                         .read_text())
    test_entries = json.loads(instruction_data_path.read_text())[TEST_ENTRIES]
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in written] == \
        test_entries
    expected = book_answers(book_model(run_folder / f"{BEST}.pth"), test_entries)
    assert [e["model_response"] for e in written] == expected
    last = json.loads((run_folder / "instruction-data-with-response-standalone.json")
                      .read_text())
    assert [e["model_response"] for e in last] != expected  # other weights, other answers


def test_unmerged_lora_answers_as_the_books_lora_model(tmp_path, capsys):
    """LoRA layers saved unmerged are answered unmerged, as the chapter script answers; a .pth
    without its JSON takes --lora_alpha, and needs it."""
    config = dict(TEST_MODE_CONFIG)
    model = lora_trained_model(config)  # rank 2, alpha 4
    path = tmp_path / "lora.pth"
    ft.save_finetuned_model(model, str(path), {"config": {**config, "lora": {"rank": 2,
                                                                             "alpha": 4}},
                                               "prompt_style": "alpaca"})
    entries = [{"instruction": "Name a color.", "input": ""},
               {"instruction": "Rewrite the sentence.", "input": "The cake was baked by me."}]
    data = tmp_path / "questions.json"
    data.write_text(json.dumps(entries))
    code, _, err = answer(capsys, path, "--data_path", str(data), "--max_new_tokens", "6")
    assert code == 0, err
    written = (tmp_path / "instruction-data-with-response-lora.json").read_bytes()
    expected = book_answers(book_model(path, lora=(2, 4)), entries, max_new_tokens=6)
    assert [e["model_response"] for e in json.loads(written)] == expected

    (tmp_path / "lora.json").unlink()
    code, out, err = answer(capsys, path, "--data_path", str(data), "--max_new_tokens", "6")
    assert (code, out) == (2, "")
    assert_error(err, f"{tmp_path}/lora.json: not found", "--lora_alpha")
    code, _, err = answer(capsys, path, "--data_path", str(data), "--max_new_tokens", "6",
                          "--lora_alpha", "4")
    assert code == 0, err
    assert (tmp_path / "instruction-data-with-response-lora.json").read_bytes() == written


def test_an_interrupt_keeps_the_answers_and_resume_generates_only_the_rest(
        run_folder, tmp_path, capsys, monkeypatch):
    shutil.copy(run_folder / f"{LAST}.pth", tmp_path)
    shutil.copy(run_folder / f"{LAST}.json", tmp_path)
    model = tmp_path / f"{LAST}.pth"
    output = tmp_path / f"instruction-data-with-response-{LAST}.json"
    kept = tmp_path / f"instruction-data-with-response-{LAST}.partial.json"
    generate_batch = ft.generate_batch
    asked, interrupt_at = [], {"call": 2}

    def interrupted_at_a_call(model, prompts, *args, **kwargs):
        asked.append(len(prompts))
        if len(asked) == interrupt_at["call"]:
            raise KeyboardInterrupt
        return generate_batch(model, prompts, *args, **kwargs)

    monkeypatch.setattr(ft, "generate_batch", interrupted_at_a_call)
    code, out, err = answer(capsys, model, "--batch_size", "4")
    assert code == 130 and not output.exists()
    assert err.splitlines()[-1] == (f"Interrupted; 4 of 10 answers are kept in {kept}: run "
                                    "the same command with --resume to answer the rest.")
    assert sum(a is not None for a in json.loads(kept.read_text())["answers"]) == 4

    asked.clear()
    interrupt_at["call"] = None
    code, out, err = answer(capsys, model, "--batch_size", "4", "--resume")
    assert code == 0, err
    assert asked == [4, 2]  # the 6 entries left, in batches of 4
    assert f"Reusing 4 of 10 answers kept in {kept}" in out.splitlines()
    assert output.read_bytes() == (
        run_folder / "instruction-data-with-response-standalone.json").read_bytes()
    assert not kept.exists()


def test_without_resume_kept_answers_are_not_reused(run_folder, tmp_path, capsys):
    for suffix in (".pth", ".json"):
        shutil.copy(run_folder / f"{LAST}{suffix}", tmp_path)
    kept = tmp_path / f"instruction-data-with-response-{LAST}.partial.json"
    kept.write_text(json.dumps({"key": "another run", "answers": ["x"] * 10}))
    code, out, err = answer(capsys, tmp_path / f"{LAST}.pth")
    assert code == 0, err
    assert out.splitlines()[1] == (f"Note: {kept} holds answers kept by an earlier run; this "
                                   "run answers every entry and replaces them. To continue "
                                   "that run instead, stop now (Ctrl-C) and run the same "
                                   "command with --resume.")
    assert not kept.exists()


def test_data_path_of_json_lines_answers_every_entry(run_folder, tmp_path, capsys,
                                                     instruction_data_path):
    """Entries without an output, or without an input, keep their own fields."""
    test_entries = json.loads(instruction_data_path.read_text())[TEST_ENTRIES][:3]
    lines = [{"instruction": test_entries[0]["instruction"], "input": test_entries[0]["input"],
              "id": 7},
             {"instruction": test_entries[1]["instruction"]},
             test_entries[2]]
    assert not test_entries[1]["input"]
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    output = tmp_path / "answers.json"
    code, out, err = answer(capsys, run_folder / f"{LAST}.pth", "--data_path", str(data),
                            "--output", str(output))
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"Answering 3 entries of {data} with ")
    saved = json.loads((run_folder / "instruction-data-with-response-standalone.json")
                       .read_text())
    assert json.loads(output.read_text()) == [
        {**lines[0], "model_response": saved[0]["model_response"]},
        {**lines[1], "input": "", "model_response": saved[1]["model_response"]},
        {**lines[2], "model_response": saved[2]["model_response"]}]


def test_a_changed_data_file_is_refused(run_folder, tmp_path, capsys, instruction_data_path):
    """The test split is the run's only while the file holds the run's training entries."""
    for suffix in (".pth", ".json"):
        shutil.copy(run_folder / f"{LAST}{suffix}", tmp_path)
    data = json.loads(instruction_data_path.read_text())
    data[0]["output"] += " Edited."
    changed = tmp_path / "instruction-data.json"
    changed.write_text(json.dumps(data))
    info_path = tmp_path / f"{LAST}.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()),
                                     "data_path": str(changed)}))
    code, out, err = answer(capsys, tmp_path / f"{LAST}.pth")
    assert (code, out) == (2, "")
    assert_error(err, f"{changed}: its training split is not the one the model was trained on",
                 "--data_path")

    info_path.write_text(json.dumps({**json.loads(info_path.read_text()),
                                     "data_path": str(tmp_path / "gone.json")}))
    code, out, err = answer(capsys, tmp_path / f"{LAST}.pth")
    assert (code, out) == (2, "")
    assert_error(err, f"{tmp_path}/gone.json: file not found (the data {info_path} records",
                 "--data_path")


def test_the_answers_file_of_a_run_is_never_replaced(run_folder, tmp_path, capsys):
    """A model named as a run of the same folder (--run_name set to a model's name) would write
    that run's answers file: refused."""
    for suffix in (".pth", ".json"):
        shutil.copy(run_folder / f"{LAST}{suffix}", tmp_path / f"standalone{suffix}")
        shutil.copy(run_folder / f"{LAST}{suffix}", tmp_path)
    code, out, err = answer(capsys, tmp_path / "standalone.pth")
    assert (code, out) == (2, "")
    assert_error(err, f"--output {tmp_path}/instruction-data-with-response-standalone.json: is "
                      f"the answers file of the run 'standalone' ({tmp_path}/{LAST}.json)")


@pytest.mark.parametrize(("flags", "parts"), [
    (["--max_new_tokens", "-1"], ["--max_new_tokens must not be negative, got -1"]),
    (["--batch_size", "0"], ["--batch_size must be at least 1, got 0"]),
    (["--lora_alpha", "0"], ["--lora_alpha must be a finite number above 0, got 0.0"]),
    (["--data_path", "missing.jsonl"], ["--data_path missing.jsonl: file not found"]),
    (["--output", "answers.txt"], ["--output answers.txt: name a .json file"]),
    (["--output", "no-such-folder/answers.json"],
     ["--output: the folder no-such-folder does not exist"]),
    (["--device", "tpu"], ["--device tpu: not a device"]),
])
def test_bad_flags_are_refused(run_folder, capsys, monkeypatch, tmp_path, flags, parts):
    monkeypatch.chdir(tmp_path)
    code, out, err = answer(capsys, run_folder / f"{LAST}.pth", *flags)
    assert (code, out) == (2, "")
    assert_error(err, *parts)


@pytest.mark.parametrize(("content", "parts"), [
    ('{"instruction": "Name a color."}\n{broken\n', ["questions.jsonl: line 2 is not valid JSON"]),
    ('{"input": "x"}\n', ["questions.jsonl: line 1 has no 'instruction' field"]),
    ("", ["questions.jsonl: the dataset is empty"]),
])
def test_bad_data_files_are_refused(run_folder, tmp_path, capsys, content, parts):
    data = tmp_path / "questions.jsonl"
    data.write_text(content)
    code, out, err = answer(capsys, run_folder / f"{LAST}.pth", "--data_path", str(data))
    assert (code, out) == (2, "")
    assert_error(err, *parts)


def test_missing_or_damaged_model_is_refused(tmp_path, capsys):
    code, out, err = answer(capsys, tmp_path / "missing.pth")
    assert (code, out) == (2, "")
    assert_error(err, f"{tmp_path}/missing.pth: file not found")
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"these are not weights")
    code, out, err = answer(capsys, damaged)
    assert (code, out) == (2, "")
    assert_error(err, f"{damaged}: damaged or not a PyTorch weight file")


@pytest.mark.parametrize(("record", "parts"), [
    ({"max_new_tokens": "5"}, ["'max_new_tokens' must be a whole number, 0 or above, got '5'"]),
    ({"data_path": 3}, ["'data_path' must be a file's path, got 3"]),
    ({"settings": {"--precision": "int8"}}, ["'--precision' setting must be one of fp32, tf32, "
                                             "bf16, fp16, got 'int8'"]),
])
def test_a_damaged_record_beside_the_model_is_refused(run_folder, tmp_path, capsys, record,
                                                      parts):
    shutil.copy(run_folder / f"{LAST}.pth", tmp_path)
    info_path = tmp_path / f"{LAST}.json"
    info_path.write_text(json.dumps({**json.loads((run_folder / f"{LAST}.json").read_text()),
                                     **record}))
    code, out, err = answer(capsys, tmp_path / f"{LAST}.pth")
    assert (code, out) == (2, "")
    assert_error(err, f"{info_path}: ", *parts)
