"""kit/overlap.py and the finetuning script's report of it: test and validation entries whose
instruction and input repeat a training entry's, found on the chapter's own split."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, quick_run_flags, run_in_process

import gpt_instruction_finetuning as ft
from kit.overlap import (
    normalise,
    overlap_counts,
    overlap_paragraph,
    repeated_entries,
    split_overlap,
)

CHAPTER_OVERLAP = {"test": {40: [355], 99: [355]},
                   "val": {5: [719], 15: [708], 23: [29], 45: [281, 750, 811]}}


@pytest.fixture(scope="module")
def chapter_split(instruction_data_path):
    return ft.split_data(ft.load_json_entries(instruction_data_path))


def entry(instruction, input_text="", output="an answer"):
    return {"instruction": instruction, "input": input_text, "output": output}


def test_the_chapters_split_repeats_training_entries_in_test_and_validation(chapter_split):
    train_data, test_data, val_data = chapter_split
    overlap = split_overlap(train_data, test_data, val_data)
    assert overlap == CHAPTER_OVERLAP
    assert overlap_counts(overlap) == {"test": 2, "val": 4}
    assert test_data[40]["instruction"] == test_data[99]["instruction"] == \
        train_data[355]["instruction"] == "Generate a sentence using the word 'innovative'."
    assert test_data[40]["input"] == train_data[355]["input"] == ""


def test_case_and_spacing_are_ignored_but_a_different_input_is_not():
    train_data = [entry("Name a  primary colour.", "Paint"), entry("Translate to German.", "Good")]
    entries = [entry("name a primary COLOUR.", " paint\n"),   # the same after normalising
               entry("Translate to German.", "Good morning"),  # another input
               entry("Translate to German."),                    # no input
               {"instruction": "TRANSLATE to german.", "output": "x", "input": None}]
    assert normalise("  Name a\tprimary\n\ncolour. ") == "name a primary colour."
    assert repeated_entries(train_data, entries) == {0: [0]}
    assert repeated_entries([entry("Translate to German.")], entries) == {2: [0], 3: [0]}


def test_the_paragraph_names_counts_first_numbers_and_the_fuller_tool(chapter_split):
    overlap = split_overlap(*chapter_split)
    lines = overlap_paragraph(overlap, 110, 55, "data/my data.json").splitlines()
    assert all(len(line) <= 100 for line in lines[:-1])  # wrapped for a terminal
    assert " ".join(lines[:-1]) == (
        "Overlap: in the split of data/my data.json, 2 of the 110 test entries (40, 99) and 4 of "
        "the 55 validation entries (5, 15, 23, 45) repeat a training entry's instruction and "
        "input (case and spacing ignored), so part of their score is memory, not "
        "generalisation. The split is kept as it is; to see these and the near-duplicates "
        "(--split val for validation), run:")
    assert lines[-1] == ("  python find_near_duplicates.py 'data/my data.json' --split test "
                         "--against_split train --fields prompt")
    many = {"test": {n: [0] for n in range(7)}, "val": {}}
    assert overlap_paragraph(many, 20, 5, "d.json").startswith(
        "Overlap: in the split of d.json, 7 of the 20 test entries (0, 1, 2, 3, 4, ...) repeat")
    assert overlap_paragraph({"test": {}, "val": {}}, 20, 5, "d.json") is None


def test_the_module_imports_no_scikit_learn():
    code = ("import sys, kit.overlap; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


def test_the_script_reports_the_overlap_before_training_and_keeps_the_split(
        tmp_path, instruction_data_path, capsys):
    code, out, err = run_in_process(
        ft.main, [*quick_run_flags(instruction_data_path, max_new_tokens=2),
                  "--output_dir", str(tmp_path)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    start = lines.index("Test set length: 10") + 1
    end = lines.index(50 * "-", start)
    paragraph = " ".join(lines[start:end - 1])
    assert paragraph.startswith(
        f"Overlap: in the split of {instruction_data_path}, 2 of the 110 test entries (40, 99) "
        "and 4 of the 55 validation entries (5, 15, 23, 45) repeat a training entry's "
        "instruction and input")
    assert lines[end - 1] == (f"  python find_near_duplicates.py {instruction_data_path} "
                              "--split test --against_split train --fields prompt")
    assert end < lines.index("Initial losses")
    info = json.loads((tmp_path / "Smalltestmodel-sft-standalone.json").read_text())
    assert info["train_overlap"] == {"test": 2, "val": 4}
    responses = json.loads(
        (tmp_path / "instruction-data-with-response-standalone.json").read_text())
    dataset = json.loads(instruction_data_path.read_text())
    assert [e["instruction"] for e in responses] == [
        e["instruction"] for e in dataset[935:945]]  # the book's split, test mode's first 10


def test_data_without_overlap_prints_nothing_and_records_zeros(tmp_path, capsys):
    data = [entry(f"Write the number {n} in words.") for n in range(20)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    code, out, err = run_in_process(
        ft.main, [*quick_run_flags(path, max_new_tokens=2), "--output_dir", str(tmp_path)],
        capsys)
    assert code == 0, err
    assert "Overlap" not in out and "find_near_duplicates" not in out
    info = json.loads((tmp_path / "Smalltestmodel-sft-standalone.json").read_text())
    assert info["train_overlap"] == {"test": 0, "val": 0}
