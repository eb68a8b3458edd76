"""make_preference_data.py against the loopback judge (kit/loopback_judge.py), which rewrites
an output more politely as "Thank you for asking! <output>" and impolitely as
"Obviously, <output>"."""

import json
import random
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
from conftest import SHARED_DATA
from helpers import REPO, assert_error, run_in_process, run_script

import make_preference_data as mpd
from kit.data import format_input, load_json_entries
from kit.loopback_judge import FakeJudge

BOOK_PREFERENCE_FILE = SHARED_DATA / "instruction-data-with-preference.json"
FIELDS = ("instruction", "input", "output", "chosen", "rejected")

make = partial(run_script, "make_preference_data.py")


@pytest.fixture
def judge():
    server = FakeJudge()
    yield server
    server.close()


@pytest.fixture
def data(tmp_path, instruction_data_path):
    """The chapter's first 8 entries, in a file of their own."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(json.loads(instruction_data_path.read_text())[:8]))
    return path


def book_styles(count, seed=123):
    """The book's random.choice per entry, from a generator seeded here."""
    rng = random.Random(seed)
    return [rng.choice(["polite", "impolite"]) for _ in range(count)]


def expected(entries, styles):
    """The book's rule, written out: polite rewrite chosen, impolite rewrite rejected."""
    out = []
    for entry, style in zip(entries, styles, strict=True):
        if style == "polite":
            out.append({**entry, "chosen": f"Thank you for asking! {entry['output']}",
                        "rejected": entry["output"]})
        else:
            out.append({**entry, "rejected": f"Obviously, {entry['output']}",
                        "chosen": entry["output"]})
    return out


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_chosen_and_rejected_by_the_books_rule(tmp_path, data, judge):
    result = make("--data_path", "data.json", "--url", judge.url, "--workers", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    entries = json.loads(data.read_text())
    styles = book_styles(8)
    written = json.loads((tmp_path / "data-preference.json").read_text())
    assert written == expected(entries, styles)
    assert [list(e) for e in written] == [  # the book's field order
        ["instruction", "input", "output"]
        + (["chosen", "rejected"] if s == "polite" else ["rejected", "chosen"]) for s in styles]
    polite = styles.count("polite")
    assert result.stdout.splitlines() == [
        "Ollama running: True",
        f"8 entries with a preference pair saved as data-preference.json ({polite} asked to be "
        f"more polite, {8 - polite} more impolite)"]
    assert "Writing entries: 100%" in result.stderr
    prompt = (f"Given the input `{format_input(entries[0])}` and correct output "
              f"`{entries[0]['output']}`, slightly rewrite the output to be more {styles[0]}."
              "Keep the modification minimal.Only return return the generated response and "
              "nothing else.")
    assert prompt in judge.prompts and len(judge.prompts) == 8
    assert judge.bodies[0]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    records = sorted(lines(tmp_path / "data-preference-replies.jsonl"), key=lambda r: r["index"])
    assert [(r["model"], r["index"], r["politeness"]) for r in records] == [
        ("ollama/llama3", i, s) for i, s in enumerate(styles)]


def test_the_seeded_choice_is_reproducible_and_follows_the_seed():
    assert mpd.draw_styles(50, 123) == book_styles(50)
    assert mpd.draw_styles(50, 7) == book_styles(50, seed=7) != book_styles(50)


def test_a_rerun_asks_nothing_new_and_another_seed_asks_again(tmp_path, data, judge):
    assert make("--data_path", "data.json", "--url", judge.url, cwd=tmp_path).returncode == 0
    first = (tmp_path / "data-preference.json").read_text()
    result = make("--data_path", "data.json", "--url", judge.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(judge.prompts) == 8
    assert result.stdout.splitlines()[0] == ("Reusing saved replies for 8 of 8 entries from "
                                             "data-preference-replies.jsonl; asking the model "
                                             "about 0")
    assert (tmp_path / "data-preference.json").read_text() == first
    changed = [a != b for a, b in zip(book_styles(8), book_styles(8, seed=1), strict=True)]
    result = make("--data_path", "data.json", "--url", judge.url, "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(judge.prompts) == 8 + sum(changed)


def test_empty_replies_and_repeats_are_counted_and_left_out(tmp_path, data, judge):
    entries = json.loads(data.read_text())
    judge.rewrites = {entries[1]["output"]: "  \n", entries[4]["output"]: (
        "\n" + entries[4]["output"].replace(" ", "  ") + "\n")}
    result = make("--data_path", "data.json", "--url", judge.url, "--output", "pairs.json",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "Left out 2 of 8 entries: 1 empty replies, 1 replies that repeat the output; their "
        "replies are in pairs-replies.jsonl")
    kept = [e for i, e in enumerate(expected(entries, book_styles(8))) if i not in (1, 4)]
    assert json.loads((tmp_path / "pairs.json").read_text()) == kept
    make("--data_path", "data.json", "--url", judge.url, "--output", "pairs.json", cwd=tmp_path)
    assert len(judge.prompts) == 8  # the left-out replies are kept: not asked again


def test_ctrl_c_keeps_the_replies_and_a_rerun_asks_only_the_rest(tmp_path, data):
    slow = FakeJudge(delay=0.3)
    try:
        process = subprocess.Popen(
            [sys.executable, f"{REPO}/make_preference_data.py", "--data_path", "data.json",
             "--url", slow.url], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        replies = tmp_path / "data-preference-replies.jsonl"
        deadline = time.monotonic() + 30
        while (not replies.exists() or len(lines(replies)) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        assert process.returncode == 130, err
        assert err.splitlines()[-1] == ("Interrupted; the replies so far are in "
                                        "data-preference-replies.jsonl: run the same command "
                                        "to continue.")
        kept = len(lines(replies))
        assert 2 <= kept < 8 and not (tmp_path / "data-preference.json").exists()
        asked = len(slow.prompts)
        result = make("--data_path", "data.json", "--url", slow.url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(slow.prompts) - asked == 8 - kept
    finally:
        slow.close()
    assert json.loads((tmp_path / "data-preference.json").read_text()) == expected(
        json.loads(data.read_text()), book_styles(8))


def test_a_server_failing_midway_keeps_the_replies(tmp_path, data, judge, capsys,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    judge.failures = [None, None, None, "drop"]
    code, _, err = run_in_process(mpd.main, ["--data_path", "data.json", "--url", judge.url,
                                             "--retries", "0"], capsys)
    assert code == 1
    assert_error(err, "The replies so far are in data-preference-replies.jsonl; run the same "
                      "command to continue.")
    kept = len(lines(tmp_path / "data-preference-replies.jsonl"))
    assert 3 <= kept < 8  # the replies before, and one in flight when the request failed
    asked = len(judge.prompts)
    code, _, err = run_in_process(mpd.main, ["--data_path", "data.json", "--url", judge.url],
                                  capsys)
    assert code == 0, err
    assert len(judge.prompts) - asked == 8 - kept


def test_the_file_loads_as_the_books_preference_data(tmp_path, data, judge):
    assert make("--data_path", "data.json", "--url", judge.url, cwd=tmp_path).returncode == 0
    made = tmp_path / "data-preference.json"
    ours, books = load_json_entries(made, FIELDS), load_json_entries(BOOK_PREFERENCE_FILE, FIELDS)
    assert {tuple(sorted(e)) for e in ours} == {tuple(sorted(e)) for e in books}
    assert made.read_text() == json.dumps(ours, indent=4)  # the book's indented JSON list
    assert BOOK_PREFERENCE_FILE.read_text().startswith('[\n    {\n        "instruction": ')
    from kit.dpo_data import load_preference_entries

    assert load_preference_entries(str(made)) == ours


@pytest.mark.parametrize("flags, message, code", [
    (["--data_path", "missing.json"], "--data_path missing.json: file not found", 2),
    (["--workers", "0"], "--workers must be at least 1, got 0", 2),
    (["--timeout", "0"], "--timeout must be a number of seconds above 0, got 0", 2),
    (["--output", "data.json"], "--output data.json: is the input --data_path", 2),
    (["--url", "CLOSED"], "Ollama is not running at CLOSED", 1),
])
def test_bad_input_is_one_line(tmp_path, data, judge, closed_port, capsys, monkeypatch, flags,
                               message, code):
    monkeypatch.chdir(tmp_path)
    flags = [closed_port if flag == "CLOSED" else flag for flag in flags]
    argv = ["--data_path", "data.json", "--url", judge.url] + flags
    result = run_in_process(mpd.main, argv, capsys)
    assert result[0] == code
    assert_error(result[2], message.replace("CLOSED", closed_port))
    assert not (tmp_path / "data-preference-replies.jsonl").exists()
