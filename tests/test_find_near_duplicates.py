"""find_near_duplicates.py: the book's near-duplicate pairs (TF-IDF over character 1-3-grams),
the right entries where a field is empty for some, pairs across two files or splits, the book's
rule of which entry --remove_duplicates drops, and one-line refusals of bad input."""

import json
import re

import numpy as np
import pytest
from conftest import SHARED_DATA
from helpers import assert_error, run_in_process, run_script
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

import find_near_duplicates as nd

EXAMPLES = SHARED_DATA / "instruction-examples.json"  # the book's example file
PAIR = re.compile(r"Duplicate pair found with similarity (\d\.\d\d) \((.+?)\):\n")


def book_pairs(values, threshold=0.9):
    """The book's method on one field, with each pair's own entry numbers: lowercase, drop
    punctuation, TF-IDF of character 1-3-grams over the non-empty values, cosine similarity
    above `threshold`, values of one character left out. [(i, j, similarity)]."""
    kept = [i for i, value in enumerate(values) if value]
    texts = [re.sub(r"[^\w\s]", "", values[i].lower()) for i in kept]
    matrix = cosine_similarity(
        TfidfVectorizer(stop_words=None, analyzer="char", ngram_range=(1, 3)).fit_transform(texts))
    return [(kept[a], kept[b], matrix[a, b])
            for a in range(len(kept)) for b in range(a + 1, len(kept))
            if matrix[a, b] > threshold and len(values[kept[a]]) > 1 and len(values[kept[b]]) > 1]


def printed_pairs(out):
    """{field: [(numbers as printed, similarity as printed, first text, second text)]}."""
    found = {}
    for block in out.split("Searching '")[1:]:
        field = block[:block.index("'")]
        pieces = PAIR.split(block)[1:]
        found[field] = []
        for similarity, where, texts in zip(pieces[::3], pieces[1::3], pieces[2::3],
                                            strict=True):
            first, second = texts.split("\n2. ")
            found[field].append((where, similarity, first.removeprefix("1. "),
                                 second.split("\n\n")[0].rstrip("\n")))
    return found


@pytest.fixture(scope="module")
def chapter_entries(instruction_data_path):
    return json.loads(instruction_data_path.read_text())


def test_the_books_example_file_gives_the_books_pairs_and_numbers(capsys):
    code, out, err = run_in_process(nd.main, [str(EXAMPLES)], capsys)
    assert code == 0, err
    entries = json.loads(EXAMPLES.read_text())
    found = printed_pairs(out)
    assert list(found) == ["instruction", "input", "output"]
    for field in ("instruction", "output"):  # no empty value: the book's script pairs these
        assert all(entry[field] for entry in entries)
        assert found[field] == [
            (f"entries {i} and {j}", f"{similarity:.2f}", entries[i][field], entries[j][field])
            for i, j, similarity in book_pairs([entry[field] for entry in entries])]
    assert [(where, similarity, first) for where, similarity, first, _ in found["instruction"]] \
        == [("entries 42 and 105", "0.94", "Edit the following sentence to make it more formal."),
            ("entries 73 and 74", "1.00", "Name a dwarf planet in our solar system."),
            ("entries 103 and 109", "0.91",
             "Change the sentences from active voice to passive voice.")]
    assert found["output"] == [("entries 73 and 74", "1.00",
                                "One dwarf planet in our solar system is Pluto.",
                                "One dwarf planet in our solar system is Pluto.")]
    assert "Searching 'input' for duplicates ...\n" + 50 * "=" + "\nNo duplicates found\n" in out
    assert out.startswith("scikit-learn version: ")
    assert out.endswith("\nPairs with a similarity above 0.9: instruction 3, input 0, output 1\n")


def test_pairs_of_a_field_empty_for_some_entries_name_the_right_entries(chapter_entries,
                                                                       instruction_data_path,
                                                                       capsys):
    inputs = [entry["input"] for entry in chapter_entries]
    assert inputs.count("") == 775
    expected = book_pairs(inputs)
    assert len(expected) == 15
    code, out, err = run_in_process(nd.main, [str(instruction_data_path), "--fields", "input"],
                                    capsys)
    assert code == 0, err
    assert printed_pairs(out)["input"] == [
        (f"entries {i} and {j}", f"{similarity:.2f}", inputs[i], inputs[j])
        for i, j, similarity in expected]
    assert ("entries 43 and 429", "1.00", "Zebra, Elephant, Crocodile",
            "Zebra, Elephant, Crocodile") in printed_pairs(out)["input"]
    pairs = nd.similar_pairs(inputs, 0.9)
    assert [(i, j) for i, j, _ in pairs] == [(i, j) for i, j, _ in expected]
    np.testing.assert_allclose([s for *_, s in pairs], [s for *_, s in expected], rtol=1e-12)


def test_row_blocks_give_the_same_pairs_as_one_matrix(chapter_entries, monkeypatch):
    texts = [entry["instruction"] for entry in chapter_entries[:300]]
    whole = nd.similar_pairs(texts, 0.8)
    other = [entry["instruction"] for entry in chapter_entries[300:400]]
    across = nd.similar_pairs(texts, 0.8, other)
    monkeypatch.setattr(nd, "BLOCK_CELLS", 7 * 300)  # blocks of 7 rows
    assert nd.similar_pairs(texts, 0.8) == whole and len(whole) > 10
    monkeypatch.setattr(nd, "BLOCK_CELLS", 7 * 100)
    assert nd.similar_pairs(texts, 0.8, other) == across and len(across) > 3


def test_empty_punctuation_and_one_character_values_pair_with_nothing():
    assert [(i, j) for i, j, _ in nd.similar_pairs(["abc", "", "x", "x", "abc", "?"], 0.5)] \
        == [(0, 4)]
    assert nd.similar_pairs(["abc", "abd"], 0.1, ["", ""]) == []
    assert nd.similar_pairs(["", ""], 0.1, ["abc", "abd"]) == []
    assert nd.similar_pairs(["?", "!!", "..."], 0.0) == []  # no character left to compare


def test_the_chapters_test_split_against_its_training_split(instruction_data_path, capsys):
    code, out, err = run_in_process(
        nd.main, [str(instruction_data_path), "--split", "test", "--against_split", "train",
                  "--fields", "prompt", "instruction"], capsys)
    assert code == 0, err
    assert ("1. 110 entries of the test split of instruction-data.json, numbered from 0\n"
            "2. 935 entries of the train split of instruction-data.json, numbered from 0\n") in out
    found = printed_pairs(out)
    assert list(found) == ["prompt", "instruction"]
    assert [(where, similarity) for where, similarity, *_ in found["prompt"]] == [
        ("test entry 17, train entry 168", "0.91"), ("test entry 21, train entry 613", "0.97"),
        ("test entry 40, train entry 355", "1.00"), ("test entry 58, train entry 68", "0.91"),
        ("test entry 99, train entry 355", "1.00"), ("test entry 109, train entry 386", "0.92")]
    assert found["prompt"][0][2:] == (
        "Convert the sentence to use an indefinite pronoun.\nSomeone left a note.",
        "Convert the sentence to use an indefinite pronoun.\nSomeone left a message.")
    assert len(found["instruction"]) == 38  # the same instruction, often with another input
    assert out.endswith("above 0.9: prompt 6, instruction 38\n")


def test_against_another_file_numbers_each_files_entries(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "Name a colour.", "output": "Red."}\n'
                    '{"instruction": "Add 2 and 3.", "input": "", "output": "5"}\n')
    other = tmp_path / "theirs.json"
    other.write_text(json.dumps([{"instruction": "Add 2 and 3!", "input": "", "output": "Five"},
                                 {"instruction": "Name a color.", "input": "", "output": "Red"}]))
    code, out, err = run_in_process(nd.main, [str(data), "--against", str(other),
                                              "--fields", "instruction", "--threshold", "0.8"],
                                    capsys)
    assert code == 0, err
    assert [where for where, *_ in printed_pairs(out)["instruction"]] == [
        "mine.jsonl entry 0, theirs.json entry 1", "mine.jsonl entry 1, theirs.json entry 0"]


def removal_data():
    """Entries whose pairs show which one the book's rule removes."""
    return [
        {"instruction": "Summarise the text.", "input": "The cat sat on the mat.", "output": "A"
         " cat sat."},
        {"instruction": "Summarise the text.", "input": "A dog ran in the park.", "output": "A "
         "dog ran."},                                          # instruction pair only: kept
        {"instruction": "Shorten the text.", "input": "The cat sat on the mat!", "output": "It "
         "sat."},                                              # input pair with 0: removed
        {"instruction": "Name a planet.", "input": "", "output": "Mars is a planet."},
        {"instruction": "Name a red planet.", "input": "", "output": "Mars is a planet."},
        {"instruction": "Give an example.", "input": "x", "output": "An example."},
    ]


@pytest.mark.parametrize("name", ["clean.json", "clean.jsonl"])
def test_remove_duplicates_drops_the_later_entry_of_input_and_output_pairs(tmp_path, capsys,
                                                                           name):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(removal_data()))
    output = tmp_path / name
    code, out, err = run_in_process(nd.main, [str(data), "--remove_duplicates",
                                              "--json_output_file", str(output)], capsys)
    assert code == 0, err
    found = printed_pairs(out)
    assert [where for where, *_ in found["instruction"]] == ["entries 0 and 1"]
    assert [where for where, *_ in found["input"]] == ["entries 0 and 2"]
    assert [where for where, *_ in found["output"]] == ["entries 3 and 4"]
    expected = [entry for n, entry in enumerate(removal_data()) if n not in (2, 4)]
    if name.endswith(".jsonl"):
        assert [json.loads(line) for line in output.read_text().splitlines()] == expected
    else:
        assert json.loads(output.read_text()) == expected
    assert out.endswith(f"Removed 2 of 6 entries; the 4 left saved as {output}\n")


def test_remove_duplicates_against_a_file_drops_the_entries_of_data(tmp_path, capsys):
    data = tmp_path / "test.json"
    data.write_text(json.dumps(removal_data()[2:4]))
    other = tmp_path / "train.json"
    other.write_text(json.dumps(removal_data()[:2] + removal_data()[4:]))
    output = tmp_path / "clean.json"
    code, out, err = run_in_process(nd.main, [str(data), "--against", str(other),
                                              "--remove_duplicates", "--json_output_file",
                                              str(output), "--fields", "prompt", "output"], capsys)
    assert code == 0, err
    assert [where for where, *_ in printed_pairs(out)["output"]] == [
        "test.json entry 1, train.json entry 2"]
    assert json.loads(output.read_text()) == [removal_data()[2]]


def test_the_example_file_as_a_user_runs_it(tmp_path):
    result = run_script("find_near_duplicates.py", str(EXAMPLES), "--threshold", "0.95",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(entries 73 and 74):" in result.stdout and "0.94" not in result.stdout
    assert result.stdout.endswith("above 0.95: instruction 1, input 0, output 1\n")


@pytest.mark.parametrize("flags, parts", [
    (["--threshold", "1.5"], ["--threshold 1.5", "between 0 and 1"]),
    (["--remove_duplicates"], ["--remove_duplicates needs --json_output_file"]),
    (["--json_output_file", "out.json"], ["--json_output_file", "only with --remove_duplicates"]),
    (["--against", "missing.json"], ["missing.json: file not found"]),
])
def test_bad_flags_get_one_error_line(tmp_path, capsys, flags, parts):
    code, out, err = run_in_process(nd.main, [str(EXAMPLES), *flags], capsys)
    assert code == 2
    assert_error(err, *parts)


def test_bad_files_get_one_error_line(tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n')
    code, _, err = run_in_process(nd.main, [str(broken)], capsys)
    assert code == 2
    assert_error(err, f"{broken}: line 2 field 'instruction' must be a string")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(removal_data()))
    code, _, err = run_in_process(nd.main, [str(data), "--remove_duplicates",
                                            "--json_output_file", str(data)], capsys)
    assert code == 2
    assert_error(err, f"--json_output_file {data}: is an input file")
    assert json.loads(data.read_text()) == removal_data()
    code, _, err = run_in_process(nd.main, [str(tmp_path / "none.json"), "--split", "test"],
                                  capsys)
    assert code == 2
    assert_error(err, "none.json: file not found")
    code, _, err = run_in_process(nd.main, [str(data), "--split", "test"], capsys)
    assert code == 2
    assert_error(err, f"{data}: 6 entries are too few to split 85/10/5")
