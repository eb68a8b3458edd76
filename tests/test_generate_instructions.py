"""generate_instructions.py against the loopback judge (kit/loopback_judge.py), which continues
the start of a user turn with "Name a word that rhymes with '<word>'." (the word chosen by the
request's seed, 12 words in turn) and answers that instruction with "'<rhyme>' rhymes with
'<word>'."."""

import json
from functools import partial

import pytest
from helpers import assert_error, quick_run_flags, run_in_process, run_script

import generate_instructions as gi
from kit.loopback_judge import RHYMES, WORDS, FakeJudge

generate = partial(run_script, "generate_instructions.py")
USER_TURN = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"


@pytest.fixture
def judge():
    server = FakeJudge()
    yield server
    server.close()


def entry(seed):
    word = WORDS[seed % len(WORDS)]
    return {"instruction": f"Name a word that rhymes with '{word}'.", "input": "",
            "output": f"'{RHYMES[word]}' rhymes with '{word}'."}


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_magpie_requests_and_the_entries_written(tmp_path, judge):
    result = generate("--n", "3", "--url", judge.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert lines(tmp_path / "instruction-data-llama3.jsonl") == [entry(123), entry(124),
                                                                   entry(125)]
    assert result.stdout.splitlines() == [
        "Ollama running: True", "3 entries saved as instruction-data-llama3.jsonl (3 tries)"]
    first = [b for b in judge.bodies if b["messages"][0]["role"] == "assistant"][0]
    assert first == {"model": "llama3", "messages": [{"role": "assistant", "content": USER_TURN}],
                     "options": {"seed": 123, "temperature": 1.0, "top_p": 1.0,
                                 "num_ctx": 2048}}
    asked = [b for b in judge.bodies if b["messages"][0]["role"] == "user"]
    assert sorted((b["messages"][0]["content"], b["options"]["seed"]) for b in asked) == sorted(
        (entry(seed)["instruction"], seed) for seed in (123, 124, 125))


def test_empty_repeated_and_over_long_replies_are_counted_and_replaced(tmp_path, judge):
    judge.instructions = {124: "\n  \n", 125: f"\n\n{entry(123)['instruction'].upper()}\nthx"}
    judge.chat_answers = {entry(126)["instruction"]: "word " * 1100}
    result = generate("--n", "4", "--url", judge.url, "--output", "new.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert lines(tmp_path / "new.jsonl") == [entry(s) for s in (123, 127, 128, 129)]
    assert result.stdout.splitlines()[1:] == [
        "4 entries saved as new.jsonl (7 tries)",
        "Left out 3 of 7 tries: 1 empty replies, 1 repeated instructions, 1 entries longer than "
        "1024 tokens; their replies are in new-replies.jsonl"]


def test_seeded_the_same_with_any_workers_and_a_rerun_asks_nothing(tmp_path, judge):
    judge.instructions = {125: f"{entry(123)['instruction']}"}
    for folder, workers in (("one", "1"), ("four", "4")):
        (tmp_path / folder).mkdir()
        result = generate("--n", "6", "--url", judge.url, "--workers", workers,
                          cwd=tmp_path / folder)
        assert result.returncode == 0, result.stderr
    one = (tmp_path / "one" / "instruction-data-llama3.jsonl").read_text()
    assert one == (tmp_path / "four" / "instruction-data-llama3.jsonl").read_text()
    assert [json.loads(line) for line in one.splitlines()] == [
        entry(s) for s in (123, 124, 126, 127, 128, 129)]
    asked = len(judge.bodies)
    assert generate("--n", "6", "--url", judge.url, cwd=tmp_path / "one").returncode == 0
    assert len(judge.bodies) == asked
    result = generate("--n", "8", "--url", judge.url, cwd=tmp_path / "one")
    assert result.returncode == 0, result.stderr
    assert len(judge.bodies) == asked + 4  # two more tries: an instruction and an answer each
    assert lines(tmp_path / "one" / "instruction-data-llama3.jsonl")[6:] == [entry(130),
                                                                           entry(131)]


def test_a_failure_midway_keeps_the_replies_and_a_rerun_finishes(tmp_path, judge, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    judge.failures = [None] * 5 + ["drop"]
    code, _, err = run_in_process(gi.main, ["--n", "4", "--url", judge.url, "--retries", "0"],
                                  capsys)
    assert code == 1
    assert_error(err, "The replies so far are in instruction-data-llama3-replies.jsonl; run "
                      "the same command to continue.")
    kept = lines(tmp_path / "instruction-data-llama3-replies.jsonl")
    assert len(kept) >= 5
    asked = len(judge.bodies)
    code, _, err = run_in_process(gi.main, ["--n", "4", "--url", judge.url], capsys)
    assert code == 0, err
    assert len(judge.bodies) - asked == 8 - len(kept)
    assert lines(tmp_path / "instruction-data-llama3.jsonl") == [entry(s)
                                                                 for s in range(123, 127)]


def test_max_tries_stops_a_model_that_repeats_itself(tmp_path, judge, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    judge.instructions = {seed: "Say hi." for seed in range(124, 140)}
    code, out, err = run_in_process(gi.main, ["--n", "3", "--url", judge.url], capsys)
    assert code == 1
    assert "Left out 7 of 9 tries: 7 repeated instructions" in out
    assert_error(err, "only 2 of --n 3 entries after --max_tries 9; pass a larger --max_tries")


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--n", "5", "--max_tries", "4"], "--max_tries must be at least --n (5), got 4"),
    (["--n", "2", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["--n", "2", "--output", "taken.jsonl"], "--output taken.jsonl: exists, but not the "
                                             "taken-replies.jsonl it was made from"),
])
def test_bad_input_is_one_line(tmp_path, judge, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    code, _, err = run_in_process(gi.main, ["--url", judge.url] + flags, capsys)
    assert code == 2
    assert_error(err, message)
    assert judge.bodies == []


def test_the_server_down_is_one_line(tmp_path, closed_port, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(gi.main, ["--n", "2", "--url", closed_port], capsys)
    assert code == 1
    assert_error(err, f"Ollama is not running at {closed_port}")


def test_the_generated_file_trains_in_test_mode(tmp_path, judge):
    result = generate("--n", "12", "--url", judge.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = tmp_path / "instruction-data-llama3.jsonl"
    assert len(lines(data)) == 12
    result = run_script("gpt_instruction_finetuning.py", *quick_run_flags(data), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Training set length: 10" in result.stdout
