"""kit/data.py: the reader's own data (JSON Lines beside the book's JSON list, entries
without `input`), the prompt styles, and the one-line refusals of data that cannot be used."""

import json
from functools import partial

import pytest
import torch
from helpers import assert_error, run_in_process
from helpers import run_script as run_any_script
from llms_from_scratch import ch07 as book

import gpt_instruction_finetuning as ft
from kit.data import PROMPT_STYLES, load_json_entries, save_entries
from kit.files import DataError

run_script = partial(run_any_script, "gpt_instruction_finetuning.py")


@pytest.fixture(scope="module")
def chapter_entries(instruction_data_path):
    return json.loads(instruction_data_path.read_text())


def write_jsonl(path, entries, blank_lines=False):
    """Write `entries` one JSON object a line (with blank lines between them when asked)."""
    separator = "\n\n" if blank_lines else "\n"
    path.write_text(separator.join(json.dumps(e) for e in entries) + "\n")
    return path


def without_empty_inputs(entries, null=False):
    """The entries with every empty `input` left out (or given as null)."""
    changed = []
    for entry in entries:
        entry = dict(entry)
        if not entry["input"]:
            if null:
                entry["input"] = None
            else:
                del entry["input"]
        changed.append(entry)
    return changed


def batches(entries, tokenizer, seed=123):
    """The chapter's shuffled training batches of `entries`, as (inputs, targets) lists."""
    torch.manual_seed(seed)
    loader, _ = ft.build_loaders(entries, entries[:8], tokenizer, 8, ft.Experiment())
    return [(x.tolist(), y.tolist()) for x, y in loader]


def test_json_lines_and_a_json_list_give_the_same_batches(tmp_path, chapter_entries, tokenizer):
    entries = chapter_entries[:64]
    list_path = tmp_path / "data.json"
    list_path.write_text(json.dumps(entries))
    lines_path = write_jsonl(tmp_path / "data.jsonl", without_empty_inputs(entries),
                             blank_lines=True)
    from_list, from_lines = load_json_entries(str(list_path)), load_json_entries(str(lines_path))
    assert from_list == from_lines == entries
    assert batches(from_lines, tokenizer) == batches(from_list, tokenizer)
    assert len(batches(from_lines, tokenizer)) == 8


@pytest.mark.parametrize("name", ["entries.json", "entries.JSONL"])
def test_saved_entries_read_back_in_their_format(tmp_path, chapter_entries, name):
    """save_entries writes JSON Lines for a .jsonl name and the book's indented list otherwise,
    replacing an earlier file whole; load_json_entries reads both back unchanged."""
    path = tmp_path / name
    path.write_text("an earlier file")
    save_entries(chapter_entries[:5], str(path))
    text = path.read_text()
    if name.lower().endswith(".jsonl"):
        assert text.splitlines() == [json.dumps(e) for e in chapter_entries[:5]]
    else:
        assert json.loads(text) == chapter_entries[:5]
        assert text.startswith('[\n    {\n        "instruction": ')
    assert load_json_entries(path) == chapter_entries[:5]
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_json_lines_are_recognised_by_their_content(tmp_path, chapter_entries):
    path = write_jsonl(tmp_path / "my-data.json", chapter_entries[:3])
    assert load_json_entries(str(path)) == chapter_entries[:3]


@pytest.mark.parametrize("null", [False, True], ids=["left out", "null"])
def test_entries_without_input_format_as_the_book_formats_an_empty_input(tmp_path,
                                                                        chapter_entries, null,
                                                                        tokenizer):
    no_input = [e for e in chapter_entries if not e["input"]][:20]
    path = write_jsonl(tmp_path / "data.jsonl", without_empty_inputs(no_input, null=null))
    loaded = load_json_entries(str(path))
    assert [e["input"] for e in loaded] == [""] * 20
    for ours, theirs in zip(loaded, no_input, strict=True):
        assert ft.format_input(ours) == book.format_input(theirs)
    assert ft.InstructionDataset(loaded, tokenizer).encoded_texts == \
        book.InstructionDataset(no_input, tokenizer).encoded_texts
    bare = {"instruction": "Name a color.", "output": "Blue."}  # a reader's own entry, as is
    for style in PROMPT_STYLES.values():
        assert style.format_input(bare) == style.format_input({**bare, "input": ""})


@pytest.mark.parametrize(("content", "message"), [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
     "line 2 is not valid JSON (Expecting value: line 1 column 32 (char 31))"),
    ('{"instruction": "a", "output": "b"}\n\n[1]\n', "line 3 is not an object"),
    ('{"instruction": "a", "output": "b"}\n{"input": "x", "output": "b"}\n',
     "line 2 has no 'instruction' field"),
    ('{"instruction": "a", "input": 3, "output": "b"}\n',
     "line 1 field 'input' must be a string, got int"),
    ('{"instruction": "a\\ud800", "output": "b"}\n',
     "line 1 field 'instruction' holds a lone surrogate escape (such as \\ud800), which is not "
     "text; fix or remove it"),
    ("\n\n", "the dataset is empty"),
    ('{"instruction": "a", "output": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
     "line 2 is nested too deeply"),
])
def test_a_bad_json_lines_file_is_named_by_its_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        load_json_entries(str(path))
    assert str(error.value) == f"{path}: {message}"


def test_json_list_errors_name_the_entry(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"},
                                {"instruction": "a", "input": None, "output": 7}]))
    with pytest.raises(DataError) as error:
        load_json_entries(str(path))
    assert str(error.value) == f"{path}: entry 1 field 'output' must be a string, got int"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError) as error:
        load_json_entries(str(path))
    assert str(error.value) == f"{path}: nested too deeply to be read as JSON; check the file"


def test_a_json_lines_dataset_trains_and_keeps_its_own_fields(tmp_path, chapter_entries):
    entries = [{**e, "id": f"entry-{i}"} for i, e in enumerate(chapter_entries[:100])]
    data_path = write_jsonl(tmp_path / "mine.jsonl", without_empty_inputs(entries))
    result = run_script("--test_mode", "--data_path", str(data_path), "--output_dir",
                        str(tmp_path), "--max_new_tokens", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Training set length: 10" in result.stdout.splitlines()
    answers = json.loads((tmp_path / "instruction-data-with-response-standalone.json")
                         .read_text())
    # 100 entries split 85/10/5: the test set is entries 85-94, each with its id and an input
    assert [{k: a[k] for k in ("id", "instruction", "input", "output")} for a in answers] == \
        entries[85:95]
    assert all(isinstance(a["model_response"], str) for a in answers)


def test_the_exercises_take_json_lines_too(tmp_path, chapter_entries, capsys):
    from exercise_experiments import run_exercises

    data_path = write_jsonl(tmp_path / "mine.jsonl", without_empty_inputs(chapter_entries[:40]))
    code, out, err = run_in_process(run_exercises, [
        "--exercise_solution", "phi3_prompt", "--test_mode", "--data_path", str(data_path),
        "--output_dir", str(tmp_path), "--max_new_tokens", "3"], capsys)
    assert code == 0, err
    answers = json.loads((tmp_path / "instruction-data-with-response-phi3-prompt.json")
                         .read_text())
    assert [a["input"] for a in answers] == [e["input"] for e in chapter_entries[34:38]]


@pytest.mark.parametrize(("flags", "parts"), [
    (["--lr", "inf"], ("--lr must be a finite number above 0, got inf",)),
    (["--lr", "nan"], ("--lr must be a finite number above 0, got nan",)),
    (["--weight_decay", "inf"], ("--weight_decay must be a finite number",)),
    (["--seed", "99999999999999999999999"],
     ("--seed must be from -9223372036854775808 to 18446744073709551615",)),
    (["--data_path", "/dev/null"], ("--data_path /dev/null: not a regular file",)),
])
def test_flags_that_cannot_work_are_one_line(tmp_path, capsys, flags, parts):
    code, out, err = run_in_process(
        ft.main, ["--test_mode", "--output_dir", str(tmp_path), *flags], capsys)
    assert code == 2
    assert_error(err, *parts)
    assert out == ""


def test_a_lone_surrogate_is_refused_before_the_model_loads(tmp_path):
    entries = [{"instruction": f"Task {i}", "input": "", "output": "Done."} for i in range(12)]
    entries[11]["output"] = "Done.\ud800"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    result = run_script("--test_mode", "--data_path", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"Error: {path}: entry 11 field 'output' holds a lone surrogate "
                             "escape (such as \\ud800), which is not text; fix or remove it\n")
    assert "Loaded model" not in result.stdout
