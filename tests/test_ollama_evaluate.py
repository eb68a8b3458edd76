"""ollama_evaluate.py against a judge server on 127.0.0.1 (kit/loopback_judge.py)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest
from helpers import REPO, assert_error, run_in_process, run_script
from judge_helpers import ANSWERS, entry, records, write

import ollama_evaluate as oe
from kit import judge_cli, judge_client
from kit.judge_prompts import judge_prompt, prompt_sha256, rubric_prompt
from kit.judge_store import ScoreStore
from kit.loopback_judge import FakeJudge

pytest_plugins = ["judge_helpers"]  # the `judge` fixture


evaluate = partial(run_script, "ollama_evaluate.py")  # as a user runs it


def bootstrap(values):
    """The 95% bootstrap interval computed here, independently of the script."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(123)
    means = values[rng.integers(0, len(values), size=(10_000, len(values)))].mean(axis=1)
    return np.percentile(means, [2.5, 97.5])


def test_importing_loads_no_torch_tiktoken_matplotlib_or_requests():
    result = subprocess.run(
        [sys.executable, "-c", "import ollama_evaluate, sys; print(sorted(m for m in "
         "('torch', 'tiktoken', 'matplotlib', 'requests') if m in sys.modules))"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


def test_happy_path_end_to_end(tmp_path, judge):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1), entry("", 2)])
    result = evaluate("--file_path", str(path), "--url", judge.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:6] == ["Ollama running: True", "Number of scores: 3 of 3",
                         "1 empty response scored 0 without asking the judge",
                         "Average score: 35.00", "Median score: 15.00",
                         "Standard deviation: 48.22"]
    low, high = map(float, re.fullmatch(r"95% bootstrap interval of the mean: "
                                        r"\[(\d+\.\d\d), (\d+\.\d\d)\]", lines[6]).groups())
    assert 0 <= low < 35 < high <= 90
    assert lines[7:] == ["Lowest scores:", "  entry 2, score 0: Task 2",
                         "  entry 1, score 15: Task 1", "  entry 0, score 90: Task 0"]
    assert "Scoring entries: 100%" in result.stderr
    assert len(judge.prompts) == 2  # the empty response scores 0 without asking
    good, bad = sorted(judge.prompts, key=lambda prompt: "`bad`" in prompt)
    assert sorted(records(tmp_path / "responses-scores.jsonl"), key=lambda r: r["score"]) == [
        {"judge": "ollama/llama3", "prompt_sha256": prompt_sha256(bad), "index": 1,
         "instruction": "Task 1", "score": 15, "reply": "I'd rate it 15 out of 100."},
        {"judge": "ollama/llama3", "prompt_sha256": prompt_sha256(good), "index": 0,
         "instruction": "Task 0", "score": 90, "reply": "90"}]


def test_book_signature_returns_the_scores_in_entry_order(judge):
    data = [entry("bad", 0), entry("odd", 1), entry("good", 2), entry(" ", 3)]
    assert oe.generate_model_scores(data, "model_response", model="llama3",
                                    url=judge.url) == [15, 90, 0]


def test_workers_give_the_same_scores(tmp_path, capsys):
    slow = FakeJudge(ANSWERS, delay=0.05)
    try:
        entries = [entry(["good", "bad", "odd", "meh"][i % 4], i) for i in range(12)]
        oe.main(["--file_path", str(write(tmp_path, entries, "a.json")), "--url", slow.url])
        one = capsys.readouterr().out
        oe.main(["--file_path", str(write(tmp_path, entries, "b.json")), "--url", slow.url,
                 "--workers", "4"])
        four = capsys.readouterr().out
    finally:
        slow.close()
    assert sorted(one.splitlines()) == sorted(four.splitlines())  # "Could not convert" order
    assert "Number of scores: 9 of 12" in one

    def by_prompt(name):
        return sorted(records(tmp_path / name), key=lambda r: r["prompt_sha256"])

    assert by_prompt("a-scores.jsonl") == by_prompt("b-scores.jsonl")
    assert len(by_prompt("a-scores.jsonl")) == 12


def test_resume_after_a_kill_asks_only_the_rest(tmp_path):
    entries = [entry(["good", "bad"][i % 2], i) for i in range(10)]
    path = write(tmp_path, entries)
    scores = tmp_path / "responses-scores.jsonl"
    slow = FakeJudge(ANSWERS, delay=0.15)
    try:
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "ollama_evaluate.py"),
                                    "--file_path", str(path), "--url", slow.url],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and (not scores.exists()
                                          or len(scores.read_text().splitlines()) < 3):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        with scores.open("a") as f:
            f.write('{"judge": "ollama/llama3", "prompt_sha')  # a record cut short by the kill
        scored_before = len(scores.read_text().splitlines()) - 1
        assert 3 <= scored_before < 10
        asked_before = len(slow.prompts)
        result = evaluate("--file_path", str(path), "--url", slow.url, cwd=tmp_path)
    finally:
        slow.close()
    assert result.returncode == 0, result.stderr
    assert (f"Reusing saved scores for {scored_before} of 10 entries from {scores}; asking the "
            f"judge about {10 - scored_before}") in result.stdout.splitlines()
    assert len(slow.prompts) - asked_before == 10 - scored_before
    assert "Number of scores: 10 of 10" in result.stdout
    assert "Average score: 52.50" in result.stdout
    lines = scores.read_text().splitlines()
    assert lines[scored_before] == '{"judge": "ollama/llama3", "prompt_sha'  # kept, skipped
    saved = [json.loads(line) for i, line in enumerate(lines) if i != scored_before]
    assert len({r["prompt_sha256"] for r in saved}) == len(saved) == 10


@pytest.mark.parametrize("field", ["model_response", "instruction", "input", "output"])
def test_an_edited_entry_is_asked_again(tmp_path, judge, capsys, field):
    entries = [entry("good", 0), entry("bad", 1), entry("good", 2)]
    path = write(tmp_path, entries)
    oe.main(["--file_path", str(path), "--url", judge.url])
    assert "Average score: 65.00" in capsys.readouterr().out
    entries[1][field] = "good" if field == "model_response" else entries[1][field] + " edited"
    write(tmp_path, entries)
    oe.main(["--file_path", str(path), "--url", judge.url])
    out = capsys.readouterr().out
    assert (f"Reusing saved scores for 2 of 3 entries from {tmp_path}/responses-scores.jsonl; "
            "asking the judge about 1") in out
    assert judge.prompts[3:] == [judge_prompt(entries[1], "model_response")]
    expected = "90.00" if field == "model_response" else "65.00"
    assert f"Average score: {expected}" in out


def test_a_new_finetuning_run_is_scored_afresh(tmp_path, judge, capsys):
    """The rerun of the issue: the response file is rewritten by another model."""
    path = write(tmp_path, [entry("good", i) for i in range(4)])
    oe.main(["--file_path", str(path), "--url", judge.url])
    assert "Average score: 90.00" in capsys.readouterr().out
    write(tmp_path, [entry("bad", i) for i in range(4)])
    oe.main(["--file_path", str(path), "--url", judge.url])
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["Ollama running: True", "Number of scores: 4 of 4",
                       "Average score: 15.00"]  # nothing reused, so no line says so
    assert len(records(tmp_path / "responses-scores.jsonl")) == 8  # the old scores stay


def test_a_second_judge_gets_every_entry_and_both_judges_scores_survive(tmp_path, judge,
                                                                          capsys):
    judge.models = ["llama3:latest", "phi3:latest"]
    path = write(tmp_path, [entry("good", 0), entry("good", 1)])
    oe.main(["--file_path", str(path), "--url", judge.url])
    assert "Average score: 90.00" in capsys.readouterr().out
    judge.answers = {"good": "70"}  # phi3 judges differently
    oe.main(["--file_path", str(path), "--url", judge.url, "--model", "phi3"])
    out = capsys.readouterr().out
    assert "Reusing" not in out
    assert "Average score: 70.00" in out
    assert [b["model"] for b in judge.bodies] == ["llama3", "llama3", "phi3", "phi3"]
    saved = records(tmp_path / "responses-scores.jsonl")
    assert sorted((r["judge"], r["score"]) for r in saved) == [
        ("ollama/llama3", 90), ("ollama/llama3", 90), ("ollama/phi3", 70), ("ollama/phi3", 70)]

    elsewhere = FakeJudge({"good": "10"})  # the same judge served at another URL
    try:
        oe.main(["--file_path", str(path), "--url", elsewhere.url, "--model", "llama3:latest"])
    finally:
        elsewhere.close()
    out = capsys.readouterr().out
    assert "Reusing saved scores for 2 of 2 entries" in out and "asking the judge about 0" in out
    assert "Average score: 90.00" in out
    assert elsewhere.requests == []  # with every score saved the judge is not even checked


def test_server_down_says_how_to_start_ollama(tmp_path, closed_port):
    path = write(tmp_path, [entry("good")])
    result = evaluate("--file_path", str(path), "--url", closed_port + "/api/chat", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: Ollama is not running at {closed_port} (")
    assert result.stderr.endswith("start it with 'ollama serve' and get the judge with "
                                  "'ollama pull llama3'\n")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "responses-scores.jsonl").exists()


def test_missing_model_is_named(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good")])
    with pytest.raises(SystemExit) as exit_info:
        oe.main(["--file_path", str(path), "--url", judge.url, "--model", "mistral"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"Error: model 'mistral' is not available on the Ollama "
                                       f"server at {judge.root}; run: ollama pull mistral\n")


def test_judge_failing_midway_keeps_the_scores_so_far(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1)])
    judge.failures = [None, 500, 500, 500, 500]  # the first request works, then no more
    with pytest.raises(SystemExit) as exit_info:
        oe.main(["--file_path", str(path), "--url", judge.url, "--retries", "0"])
    assert exit_info.value.code == 1
    # A server error is no reason to think that a rerun fares better, so none is suggested.
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"Error: {judge.url} answered HTTP 500: overloaded")
    assert [r["score"] for r in records(tmp_path / "responses-scores.jsonl")] == [90]


def test_ctrl_c_keeps_the_scores_so_far_and_exits_130(tmp_path, judge, capsys, monkeypatch):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1)])
    real_query = oe.query_model
    calls = []

    def query_then_ctrl_c(prompt, *args, **kwargs):
        calls.append(prompt)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_query(prompt, *args, **kwargs)

    monkeypatch.setattr(judge_cli, "query_model", query_then_ctrl_c)  # what main asks with
    with pytest.raises(SystemExit) as exit_info:
        oe.main(["--file_path", str(path), "--url", judge.url])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"Interrupted. The scores so far are in {tmp_path}/responses-scores.jsonl; run again "
        "to continue.")
    assert [r["score"] for r in records(tmp_path / "responses-scores.jsonl")] == [90]


def test_after_a_failure_no_more_is_asked_and_replies_in_flight_are_saved(tmp_path, capsys):
    slow = FakeJudge(ANSWERS, delay=0.2)
    slow.failures = [500]  # the first request fails at once, the next ones are slow
    try:
        path = write(tmp_path, [entry("good", i) for i in range(8)])
        with pytest.raises(SystemExit):
            oe.main(["--file_path", str(path), "--url", slow.url, "--retries", "0",
                     "--workers", "2"])
    finally:
        slow.close()
    assert "answered HTTP 500" in capsys.readouterr().err
    assert 2 <= len(slow.bodies) < 8
    saved = {r["prompt_sha256"] for r in records(tmp_path / "responses-scores.jsonl")}
    assert saved == {prompt_sha256(prompt) for prompt in slow.prompts}


def test_replies_that_are_not_scores_are_reported_and_left_out(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good", 0), entry("odd", 1), entry("bad", 2)])
    oe.main(["--file_path", str(path), "--url", judge.url])
    captured = capsys.readouterr()
    assert "Could not convert score: I cannot score this." in captured.out + captured.err
    assert "Number of scores: 2 of 3" in captured.out
    assert "Average score: 52.50" in captured.out


def test_openai_compatible_backend(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1)])
    oe.main(["--file_path", str(path), "--backend", "openai", "--url", judge.openai_url,
             "--model", "judge"])
    assert capsys.readouterr().out.splitlines()[:3] == [
        "Judge server running: True", "Number of scores: 2 of 2", "Average score: 52.50"]
    assert judge.bodies[0]["temperature"] == 0 and judge.bodies[0]["seed"] == 123
    assert {r["judge"] for r in records(tmp_path / "responses-scores.jsonl")} == {"openai/judge"}
    with pytest.raises(SystemExit) as exit_info:
        oe.main(["--file_path", str(path), "--backend", "openai", "--url", judge.openai_url,
                 "--model", "llama3"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"Error: model 'llama3' is not served at {judge.root}; "
                                       "it serves: judge\n")


def test_long_prompts_are_warned_about_once(tmp_path, judge, capsys):
    long = "word " * 1300  # 6500 characters: more than 2048 tokens at 3 characters a token
    path = write(tmp_path, [entry(long, 0), entry("good", 1), entry(long, 2)])
    oe.main(["--file_path", str(path), "--url", judge.url])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "Warning" in line]
    assert warnings == ["Warning: 2 of 3 prompts may be longer than the judge's 2048-token "
                        "context (num_ctx, estimated from their length); Ollama cuts them "
                        "without saying so, so those entries may be scored on a cut prompt"]
    oe.main(["--file_path", str(write(tmp_path, [entry("good")], "short.json")),
             "--url", judge.url])
    assert "Warning" not in capsys.readouterr().err


def test_comparing_two_files(tmp_path, judge, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, [entry("good", 0), entry("bad", 1), entry("good", 2), entry("odd", 3)],
          "a.json")  # scores 90, 15, 90, none
    write(tmp_path, [entry("bad", 4), entry("bad", 3), entry("good", 2), entry("good", 1),
                     entry("good", 0)], "b.json")  # another order, one entry more
    oe.main(["--file_path", "a.json", "b.json", "--url", judge.url])
    out = capsys.readouterr().out.splitlines()
    assert "--- a.json ---" in out and "--- b.json ---" in out
    differences = [90 - 90, 90 - 15, 90 - 90]  # entries 2, 1, 0, in b's order; 3 has no a score
    low, high = bootstrap(differences)
    assert out[-4:] == [
        "File    Scores        Average",
        "a.json  3 of 4        65.00",
        "b.json  5 of 5        60.00",
        f"Difference b.json - a.json: +25.00 (95% bootstrap interval [{low:.2f}, {high:.2f}]) "
        "over 3 entries"]
    assert low < 25 < high


def test_two_named_runs_are_compared_by_their_run_names(tmp_path, judge, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = ("instruction-data-with-response-standalone.json",
                     "instruction-data-with-response-cosine.json")
    write(tmp_path, [entry("good", 0), entry("bad", 1)], first)  # scores 90, 15
    write(tmp_path, [entry("good", 0), entry("good", 1)], second)  # scores 90, 90
    oe.main(["--file_path", first, second, "--url", judge.url])
    out = capsys.readouterr().out.splitlines()
    assert "--- standalone ---" in out and "--- cosine ---" in out
    assert out[-4:-1] == ["Run         Scores        Average",
                          "standalone  2 of 2        52.50",
                          "cosine      2 of 2        90.00"]
    assert out[-1].startswith("Difference cosine - standalone: +37.50 ")


def test_equal_differences_collapse_the_interval(tmp_path, judge, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, [entry("good", 0), entry("good", 1)], "a.json")
    write(tmp_path, [entry("bad", 0), entry("bad", 1)], "b.json")
    write(tmp_path, [entry("bad", 7)], "c.json")
    oe.main(["--file_path", "a.json", "b.json", "c.json", "--url", judge.url])
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "Difference b.json - a.json: -75.00 (95% bootstrap interval [-75.00, -75.00]) over 2 "
        "entries",
        "Difference c.json - a.json: n/a (no entry is scored in both)"]


def test_comparing_two_keys_of_one_file(tmp_path, judge, capsys):
    keys = ["model 1 response", "model 2 response"]
    entries = [{**entry("good", i, keys[0]), keys[1]: ["bad", "good", "odd"][i]}
               for i in range(3)]
    path = write(tmp_path, entries)
    oe.main(["--file_path", str(path), "--json_key", *keys, "--url", judge.url])
    out = capsys.readouterr().out.splitlines()
    table = ["Key               Scores        Average",
             "model 1 response  3 of 3        90.00",
             "model 2 response  2 of 3        52.50",
             "Difference model 2 response - model 1 response: -37.50 (95% bootstrap interval "
             "[-75.00, 0.00]) over 2 entries"]
    assert out[-4:] == table
    assert len(judge.prompts) == 5  # "good" for entries 1 was asked once, for both keys
    oe.main(["--file_path", str(path), "--json_key", *keys, "--url", judge.url])
    out = capsys.readouterr().out.splitlines()
    assert out[-4:] == table and len(judge.prompts) == 5
    assert out[:2] == ["--- model 1 response ---",
                       f"Reusing saved scores for 3 of 3 entries from {tmp_path}/"
                       "responses-scores.jsonl; asking the judge about 0"]


@pytest.mark.parametrize("names", [["a.json"], ["a.json", "b.json"]])
def test_histogram_per_file(tmp_path, judge, capsys, monkeypatch, names):
    monkeypatch.chdir(tmp_path)
    for name in names:
        write(tmp_path, [entry("good", 0), entry("bad", 1)], name)
    oe.main(["--file_path", *names, "--url", judge.url, "--plot", "scores.png"])
    plural = "s" if len(names) > 1 else ""
    assert f"Histogram{plural} saved as scores.png" in capsys.readouterr().out
    assert (tmp_path / "scores.png").read_bytes().startswith(b"\x89PNG")


BAD_INPUTS = [
    ("[1]", "entry 0 is not an object"),
    ("[oops", "not valid JSON (Expecting value: line 1 column 2 (char 1))"),
    ("3", "expected a JSON list of entries (or JSON Lines, one entry a line), got int"),
    ('[{"instruction": "a", "input": "", "model_response": "r"}]', "entry 0 has no 'output' field"),
    ('[{"instruction": "a", "input": "", "output": "o", "model_response": "r"}, '
     '{"instruction": "a", "input": "", "output": "o"}]', "entry 1 has no 'model_response' field"),
    ('[{"instruction": "a", "input": "", "output": "o", "model_response": 3}]',
     "entry 0 field 'model_response' must be a string, got int"),
]


@pytest.mark.parametrize(("content", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "responses.json"
    path.write_text(content)
    code, _, err = run_in_process(oe.main, ["--file_path", str(path)], capsys)
    assert (code, err) == (2, f"Error: {path}: {message}\n")


BAD_FLAGS = [
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--timeout", "0"], "--timeout must be a number of seconds above 0, got 0"),
    (["--timeout", "-2.5"], "--timeout must be a number of seconds above 0, got -2.5"),
    (["--timeout", "nan"], "--timeout must be a number of seconds above 0, got nan"),
    (["--retries", "-1"], "--retries must be 0 or more, got -1"),
    (["--json_key", "model_response", "other"], "compare several --file_path or several "
                                                "--json_key, not both at once"),
    (["--url", "ftp://localhost:11434"], "--url ftp://localhost:11434: expected a server address "
                                         "such as 127.0.0.1:11434 or http://host:port, or a chat "
                                         "endpoint such as http://localhost:11434/api/chat"),
    (["--url", "localhost:port"], "--url localhost:port: expected a server address such as "),
    (["--url", "http://"], "--url http://: expected a server address such as "),
    (["--url", "http://localhost:0"], "--url http://localhost:0: expected a server address "),
    (["--backend", "openai", "--url", "http:///v1"], "--url http:///v1: expected a server "
                                                      "address such as 127.0.0.1:11434 or "
                                                      "http://host:port, or a chat endpoint "
                                                      "such as http://localhost:8000/v1/chat/"
                                                      "completions"),
    (["--file_path", "folder"], "folder: is a folder, not a JSON file"),
    (["--file_path", "missing.json"], "missing.json: file not found"),
    (["--output", "nowhere/scores.jsonl"], "--output nowhere/scores.jsonl: the folder "
                                           "{tmp}/nowhere does not exist"),
    (["--output", "folder"], "--output folder: is a folder, not a file"),
    (["--plot", "nowhere/scores.png"], "--plot nowhere/scores.png: the folder {tmp}/nowhere "
                                       "does not exist"),
    (["--plot", "folder"], "--plot folder: is a folder, not a file"),
    (["--plot", "scores.xyz"], "--plot scores.xyz: unknown image format 'xyz'; use one of "),
    (["--max_reply_tokens", "0"], "--max_reply_tokens must be at least 1, got 0"),
    (["--write_scores", "copy.json", "--file_path", "a.json", "b.json"],
     "--write_scores copies one responses file; give one --file_path with it"),
    (["--write_scores", "folder"], "--write_scores folder: is a folder, not a file"),
    (["--output", "a.json"], "--output a.json: is the input --file_path a.json, which writing "
                             "there would damage; pass another --output"),
    (["--output", "link.json"], "--output link.json: is the input --file_path a.json, which "
                                "writing there would damage; pass another --output"),
    (["--file_path", "a.json", "b.json", "--output", "b.json"],
     "--output b.json: is the input --file_path b.json, which writing there would damage; "
     "pass another --output"),
    (["--write_scores", "a.json"], "--write_scores a.json: is the input --file_path a.json, "
                                   "which writing there would damage; pass another "
                                   "--write_scores"),
    (["--output", "scores.png", "--plot", "scores.png"], "--plot scores.png: is also the "
                                                         "--output; pass another --plot"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_flags_are_one_line_and_exit_2_before_any_request(tmp_path, judge, capsys,
                                                               monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    write(tmp_path, [entry("good")], "a.json")
    write(tmp_path, [entry("good")], "b.json")
    (tmp_path / "link.json").symlink_to("a.json")
    files = [] if "--file_path" in flags else ["--file_path", "a.json"]
    if "--json_key" in flags:
        files += ["b.json"]
    with pytest.raises(SystemExit) as exit_info:
        oe.main([*files, "--url", judge.url, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1
    assert judge.requests == []
    assert not (tmp_path / "a-scores.jsonl").exists()


def test_missing_file_from_the_command_line(tmp_path):
    result = evaluate("--file_path", "nope.json", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "Error: nope.json: file not found\n"


@pytest.mark.parametrize("with_scheme", [True, False])
def test_a_bare_server_address_scores_end_to_end(tmp_path, judge, with_scheme):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1)])
    address = judge.root if with_scheme else judge.root.removeprefix("http://")
    result = evaluate("--file_path", str(path), "--url", address, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["Ollama running: True", "Number of scores: 2 of 2",
                                              "Average score: 52.50"]
    assert judge.requests == [("GET", "/api/tags"), ("POST", "/api/chat"),
                              ("POST", "/api/chat")]


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_a_bare_openai_address_gets_the_chat_completions_path(tmp_path, judge, capsys, suffix):
    path = write(tmp_path, [entry("good", 0)])
    oe.main(["--file_path", str(path), "--backend", "openai", "--model", "judge",
             "--url", judge.root + suffix])
    assert "Average score: 90.00" in capsys.readouterr().out
    assert judge.requests == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]


# --- HTTP errors: the advice that fits ---

def test_a_model_that_is_not_pulled_names_ollama_pull(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good", 0)])
    judge.failures = [(404, {"error": 'model "llama3" not found, try pulling it first'})]
    with pytest.raises(SystemExit) as exit_info:
        oe.main(["--file_path", str(path), "--url", judge.root])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.endswith(
        f"\nError: model 'llama3' is not available on the Ollama server at {judge.root} (it "
        'says: model "llama3" not found, try pulling it first); run: ollama pull llama3\n')
    assert err.count("Error") == 1 and "run again" not in err


@pytest.mark.parametrize(("backend", "flags", "path", "endpoint", "name"), [
    ("ollama", [], "/api/generate", "/api/chat", "Ollama's chat endpoint"),
    ("openai", ["--model", "judge"], "/v1/chat", "/v1/chat/completions",
     "an OpenAI-compatible chat endpoint"),
])
def test_a_wrong_path_names_the_url_to_use(tmp_path, judge, backend, flags, path, endpoint,
                                           name):
    file_path = write(tmp_path, [entry("good", 0)])
    result = evaluate("--file_path", str(file_path), "--backend", backend, *flags,
                      "--url", judge.root + path, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {judge.root}{path} answered HTTP 404 (404 page not found), so it is not {name}; "
        f"use --url {judge.root}{endpoint} (or just --url {judge.root})")
    assert "Traceback" not in result.stderr and "run again" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "Error" in line]) == 1


def test_a_timeout_says_a_rerun_continues(tmp_path):
    slow = FakeJudge(ANSWERS, delay=0.6)
    try:
        path = write(tmp_path, [entry("good", 0)])
        result = evaluate("--file_path", str(path), "--url", slow.root, "--timeout", "0.1",
                          "--retries", "0", cwd=tmp_path)
    finally:
        slow.close()
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: no complete answer from {slow.url} within 0.1 s (--timeout). The scores so far "
        f"are in {tmp_path}/responses-scores.jsonl; run again to continue.")
    assert "Traceback" not in result.stderr


def test_a_dropped_connection_says_a_rerun_continues(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1)])
    judge.failures = [None, "drop"]
    with pytest.raises(SystemExit) as exit_info:
        oe.main(["--file_path", str(path), "--url", judge.url, "--retries", "0"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"Error: no answer from {judge.url}: Remote end closed connection without response. The "
        f"scores so far are in {tmp_path}/responses-scores.jsonl; run again to continue.")
    assert len(records(tmp_path / "responses-scores.jsonl")) == 1


# --- the reuse line ---

def test_no_reuse_line_when_nothing_is_reused(tmp_path, judge, capsys):
    keys = ["model 1 response", "model 2 response"]
    entries = [{**entry("good", i, keys[0]), keys[1]: "bad"} for i in range(3)]
    oe.main(["--file_path", str(write(tmp_path, entries)), "--json_key", *keys,
             "--url", judge.url])
    out = capsys.readouterr().out
    assert "Reusing" not in out  # the second key has nothing saved although the file exists
    assert "model 2 response  3 of 3        15.00" in out.splitlines()


def test_a_rerun_with_every_score_saved_needs_no_judge(tmp_path, capsys):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1)])
    server = FakeJudge(ANSWERS)
    try:
        oe.main(["--file_path", str(path), "--url", server.url])
    finally:
        server.close()
    first = capsys.readouterr().out.splitlines()
    oe.main(["--file_path", str(path), "--url", server.url])  # the judge is gone
    again = capsys.readouterr().out.splitlines()
    assert again[0] == (f"Reusing saved scores for 2 of 2 entries from {tmp_path}/"
                        "responses-scores.jsonl; asking the judge about 0")
    assert again[1:] == first[1:]


def test_the_script_has_the_banners_of_section_7_8():
    source = open(os.path.join(REPO, "ollama_evaluate.py")).read()
    banners = [f"{'#' * 37}\n# 7.8 Evaluating the finetuned LLM: {step}\n{'#' * 37}\n"
               for step in ("checking the judge runs", "querying the judge",
                            "scoring the responses")]
    assert all(banner in source for banner in banners)
    assert [source.index(banner) for banner in banners] == sorted(
        source.index(banner) for banner in banners)
    assert source.index(banners[0]) < source.index("require_judge(url") < source.index(
        banners[1]) < source.index("score_prompts(prompts") < source.index(banners[2]) < \
        source.index("def generate_model_scores(") < source.index("def main(")
    assert oe.query_model is judge_client.query_model  # the book's name, from the client


RUBRIC_ENTRIES = [
    {"instruction": "T0", "input": "", "output": "the sky is blue", "model_response":
     "The sky is blue."},  # every word: 5
    {"instruction": "T1", "input": "x", "output": "red green blue yellow", "model_response":
     "red and green"},  # half: 3
    {"instruction": "T2", "input": "", "output": "four", "model_response": "five"},  # 1
    {"instruction": "T3", "input": "", "output": "anything", "model_response": " "},  # empty: 1
    {"instruction": "T4", "input": "", "output": "odd", "model_response": "out of range"},
]


def test_rubric_judge_end_to_end(tmp_path):
    server = FakeJudge(rubric_answers={"out of range": "Very good.\nScore: 7"})
    try:
        path = write(tmp_path, RUBRIC_ENTRIES)
        result = evaluate("--file_path", str(path), "--url", server.root, "--prompt", "rubric",
                          cwd=tmp_path)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:7] == ["Ollama running: True", "Could not convert score: Very good. Score: 7",
                         "Number of scores: 4 of 5",
                         "1 empty response scored 1 without asking the judge",
                         "Average score: 2.50 on a 1-5 scale", "Median score: 2.00",
                         "Standard deviation: 1.91"]
    prompts = [rubric_prompt(e, "model_response") for e in RUBRIC_ENTRIES]
    assert sorted(server.prompts) == sorted(prompts[:3] + prompts[4:])
    saved = {r["prompt_sha256"]: r["score"] for r in records(tmp_path / "responses-scores.jsonl")}
    assert saved == {prompt_sha256(prompts[0]): 5, prompt_sha256(prompts[1]): 3,
                     prompt_sha256(prompts[2]): 1, prompt_sha256(prompts[4]): None}


def test_rubric_and_chapter_scores_never_mix(tmp_path, judge, capsys):
    path = write(tmp_path, RUBRIC_ENTRIES[:3])
    judge.answers = {"The sky is blue.": "95", "red and green": "60", "five": "10"}
    oe.main(["--file_path", str(path), "--url", judge.url])
    chapter = capsys.readouterr().out.splitlines()
    assert chapter[1:3] == ["Number of scores: 3 of 3", "Average score: 55.00"]
    oe.main(["--file_path", str(path), "--url", judge.url, "--prompt", "rubric"])
    rubric = capsys.readouterr().out.splitlines()
    assert rubric[:3] == ["Ollama running: True", "Number of scores: 3 of 3",
                          "Average score: 3.00 on a 1-5 scale"]  # all three asked anew
    assert len(judge.prompts) == 6
    oe.main(["--file_path", str(path), "--url", judge.url])
    assert capsys.readouterr().out.splitlines()[1:] == chapter[1:]  # as the first time
    oe.main(["--file_path", str(path), "--url", judge.url, "--prompt", "rubric"])
    assert capsys.readouterr().out.splitlines()[1:] == rubric[1:]
    assert len(judge.prompts) == 6
    assert len(records(tmp_path / "responses-scores.jsonl")) == 6


def test_rubric_scores_compare_across_files(tmp_path, judge, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, RUBRIC_ENTRIES[:3], "a.json")  # 5, 3, 1
    write(tmp_path, [{**e, "model_response": e["output"]} for e in RUBRIC_ENTRIES[:3]],
          "b.json")  # 5, 5, 5
    oe.main(["--file_path", "a.json", "b.json", "--url", judge.url, "--prompt", "rubric"])
    low, high = bootstrap([0, 2, 4])
    assert capsys.readouterr().out.splitlines()[-4:] == [
        "File    Scores        Average (1-5)",
        "a.json  3 of 3        3.00",
        "b.json  3 of 3        5.00",
        f"Difference b.json - a.json: +2.00 (95% bootstrap interval [{low:.2f}, {high:.2f}]) "
        "over 3 entries"]


def test_rubric_book_function_gives_the_lowest_score_to_an_empty_response(judge):
    assert oe.generate_model_scores(RUBRIC_ENTRIES[:4], "model_response", url=judge.url,
                                    prompt="rubric") == [5, 3, 1, 1]
    assert len(judge.prompts) == 3


# --- whole replies within the deadline, capped, complete ---

def test_a_reply_that_streams_on_and_on_ends_at_the_timeout(tmp_path, judge, capsys):
    judge.failures = ["endless"]
    path = write(tmp_path, [entry("good", 0)])
    code, out, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url,
                                              "--timeout", "0.5", "--retries", "0"], capsys)
    assert code == 1
    assert err.splitlines()[-1] == (
        f"Error: no complete answer from {judge.url} within 0.5 s (--timeout). The scores so "
        f"far are in {tmp_path}/responses-scores.jsonl; run again to continue.")
    assert not (tmp_path / "responses-scores.jsonl").exists()
    assert oe.query_model("score the model response `good` on a scale", url=judge.url,
                          retries=0) == "90"  # the cut connection is not used again


def test_help_says_the_timeout_bounds_the_whole_reply(capsys):
    code, out, _ = run_in_process(oe.main, ["--help"], capsys)
    assert code == 0
    assert ("--timeout TIMEOUT seconds within which each reply must be complete, from "
            "sending the request to the reply's end") in " ".join(out.split())


@pytest.mark.parametrize(("flags", "cap"), [
    ([], 64), (["--prompt", "rubric"], 256), (["--max_reply_tokens", "10"], 10),
    (["--prompt", "rubric", "--max_reply_tokens", "400"], 400),
])
def test_each_request_caps_the_reply_length(tmp_path, judge, capsys, flags, cap):
    path = write(tmp_path, [entry("good", 0)])
    code, _, _ = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url, *flags],
                                capsys)
    assert code == 0
    assert judge.bodies[0]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048,
                                          "num_predict": cap}
    code, _, _ = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.openai_url,
                                          "--backend", "openai", "--model", "judge", *flags],
                                capsys)
    assert code == 0
    assert judge.bodies[1]["max_tokens"] == cap


def test_the_book_function_caps_replies_by_prompt_style(judge):
    oe.generate_model_scores([entry("good")], "model_response", url=judge.url)
    oe.generate_model_scores([entry("good")], "model_response", url=judge.url,
                             prompt="rubric")
    oe.generate_model_scores([entry("good")], "model_response", url=judge.url, max_tokens=5)
    assert [body["options"]["num_predict"] for body in judge.bodies] == [64, 256, 5]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_reply_cut_before_its_end_is_not_saved_and_a_rerun_asks_again(tmp_path, judge, capsys,
                                                                        backend):
    path = write(tmp_path, [entry("good", 0)])
    scores = tmp_path / "responses-scores.jsonl"
    url, flags = ((judge.url, []) if backend == "ollama" else
                  (judge.openai_url, ["--backend", "openai", "--model", "judge"]))
    judge.failures = ["cut"]
    code, _, err = run_in_process(oe.main, ["--file_path", str(path), "--url", url, *flags,
                                            "--retries", "0"], capsys)
    end = 'no line said "done"' if backend == "ollama" else "no finish_reason"
    assert code == 1
    assert err.splitlines()[-1] == (
        f"Error: the reply from {url} ended before it was complete ({end}). The scores so far "
        f"are in {scores}; run again to continue.")
    assert not scores.exists()
    code, out, _ = run_in_process(oe.main, ["--file_path", str(path), "--url", url, *flags],
                                  capsys)
    assert code == 0 and "Average score: 90.00" in out.splitlines()
    assert [r["reply"] for r in records(scores)] == ["90"]


def test_a_reply_without_a_score_is_shown_on_one_short_line(tmp_path, judge, capsys):
    judge.answers = {"long": "No score.\n\n" + "x" * 100}
    path = write(tmp_path, [entry("long", 0), entry("good", 1), entry("good", 2)])
    code, out, _ = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url], capsys)
    assert code == 0
    assert f"Could not convert score: No score. {'x' * 70}..." in out.splitlines()


def test_ollama_with_no_model_pulled_names_the_pull(tmp_path, capsys):
    empty = FakeJudge(models=None)  # its /api/tags says {"models": null}
    try:
        path = write(tmp_path, [entry("good")])
        code, out, err = run_in_process(oe.main, ["--file_path", str(path), "--url", empty.url],
                                        capsys)
    finally:
        empty.close()
    assert (code, out) == (1, "")
    assert err == (f"Error: model 'llama3' is not available on the Ollama server at "
                   f"{empty.root}; run: ollama pull llama3\n")


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_null_content_is_an_empty_reply(tmp_path, judge, capsys, backend):
    url, flags = ((judge.url, []) if backend == "ollama" else
                  (judge.openai_url, ["--backend", "openai", "--model", "judge"]))
    judge.failures = ["null"]
    path = write(tmp_path, [entry("good", 0), entry("good", 1), entry("good", 2)])
    code, out, err = run_in_process(oe.main, ["--file_path", str(path), "--url", url, *flags],
                                    capsys)
    assert code == 0 and "Traceback" not in err
    assert "Could not convert score: (an empty reply)" in out.splitlines()
    assert "Number of scores: 2 of 3" in out.splitlines()
    assert sorted(r["reply"] for r in records(tmp_path / "responses-scores.jsonl")) == [
        "", "90", "90"]


def test_lone_surrogates_are_sent_hashed_and_printed(tmp_path, judge, capsys):
    e = entry("\ud800 answer", 0)
    store = ScoreStore(str(tmp_path / "scores.jsonl"))
    assert oe.generate_model_scores([e], "model_response", url=judge.url, store=store) == [0]
    prompt = judge_prompt(e, "model_response")
    assert judge.prompts == [prompt]  # sent as the JSON escape \ud800 and read back
    assert records(tmp_path / "scores.jsonl")[0]["prompt_sha256"] == prompt_sha256(prompt)
    judge.answers = {"good": "\udc80 is no score"}
    path = write(tmp_path, [entry("good", 0), entry("bad", 1), entry("bad", 2)])
    code, out, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url],
                                    capsys)
    assert code == 0 and "Traceback" not in err
    assert "Could not convert score: \\udc80 is no score" in out.splitlines()
    out.encode("utf-8")  # printable: no lone surrogate reached the output
    write(tmp_path, [entry("\ud800", 0)], "surrogate.json")  # json.dumps writes the escape
    code, _, err = run_in_process(oe.main, ["--file_path", str(tmp_path / "surrogate.json"),
                                            "--url", judge.url], capsys)
    assert code == 2
    assert_error(err, f"{tmp_path}/surrogate.json: entry 0 field 'model_response'")


def test_a_reply_of_deeply_nested_json_is_one_line(tmp_path, judge, capsys):
    judge.failures = [b"[" * 100_000]
    path = write(tmp_path, [entry("good", 0)])
    code, _, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url],
                                  capsys)
    assert code == 1
    assert_error(err, f"{judge.url} sent a reply that is not a chat answer: [[[")


# --- the score file ---

def test_a_deeply_nested_line_in_the_score_file_is_skipped(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good", 0)])
    other_judge = {"judge": "ollama/phi3", "prompt_sha256": "0" * 64, "score": 1, "reply": "1"}
    (tmp_path / "responses-scores.jsonl").write_text(
        json.dumps(other_judge) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    code, out, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url],
                                    capsys)
    assert code == 0 and "Traceback" not in err
    assert "Average score: 90.00" in out.splitlines()


def test_saved_scores_outside_the_scale_are_ignored_and_asked_again(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1), entry("good", 2)])
    scores = tmp_path / "responses-scores.jsonl"
    oe.main(["--file_path", str(path), "--url", judge.url])
    assert "Average score: 65.00" in capsys.readouterr().out
    edited = records(scores)
    edited[0]["score"], edited[1]["score"] = 150, -40
    scores.write_text("".join(json.dumps(r) + "\n" for r in edited))
    code, out, _ = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url], capsys)
    assert code == 0
    assert out.splitlines()[:5] == [
        "Ollama running: True",
        f"Ignoring 2 saved scores outside the 0-100 scale in {scores}; asking the judge again",
        f"Reusing saved scores for 1 of 3 entries from {scores}; asking the judge about 2",
        "Number of scores: 3 of 3", "Average score: 65.00"]
    assert len(judge.prompts) == 5
    code, out, _ = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url], capsys)
    assert "Ignoring" not in out and "Average score: 65.00" in out  # the new replies count


def test_ctrl_c_saves_every_reply_that_arrived(tmp_path):
    slow = FakeJudge(ANSWERS, delay=0.3)
    path = write(tmp_path, [entry("good", i) for i in range(8)])
    scores = tmp_path / "responses-scores.jsonl"
    try:
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "ollama_evaluate.py"),
                                    "--file_path", str(path), "--url", slow.url,
                                    "--workers", "2"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                len(slow.prompts) < 4 or not scores.exists()
                or len(scores.read_text().splitlines()) < 2):
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)  # two replies saved, two requests in flight
        _, err = process.communicate(timeout=60)
    finally:
        slow.close()
    assert process.returncode == 130
    assert err.splitlines()[-1] == (f"Interrupted. The scores so far are in {scores}; run again "
                                    "to continue.")
    saved = {r["prompt_sha256"] for r in records(scores)}
    assert len(slow.prompts) >= 4
    assert saved == {prompt_sha256(prompt) for prompt in slow.prompts}


def run_with_file_size_limit(limit, *args, cwd):
    """The script run as a user runs it, on a system where no file may grow past `limit` bytes
    (as on a full disk, writes fail; Python ignores the signal such a write would raise)."""
    code = ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"sys.path.insert(0, {REPO!r}); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "ollama_evaluate.py"),
                           *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_full_disk_stops_with_one_line_and_a_rerun_continues(tmp_path, judge):
    path = write(tmp_path, [entry("good", i) for i in range(3)])
    scores = tmp_path / "responses-scores.jsonl"
    result = run_with_file_size_limit(250, "--file_path", str(path), "--url", judge.url,
                                      cwd=tmp_path)  # room for one reply's line
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: could not write {scores} (File too large); the scores so far are in {scores}; "
        "free space and rerun: it continues")
    result = evaluate("--file_path", str(path), "--url", judge.url, cwd=tmp_path)
    assert result.returncode == 0
    assert (f"Reusing saved scores for 1 of 3 entries from {scores}; asking the judge about 2"
            in result.stdout.splitlines())
    assert "Number of scores: 3 of 3" in result.stdout.splitlines()


def test_a_copy_that_cannot_be_written_leaves_nothing_behind(tmp_path, judge):
    path = write(tmp_path, [{**entry("good", i), "output": "word " * 600} for i in range(2)])
    copy = tmp_path / "scored.json"
    result = run_with_file_size_limit(2000, "--file_path", str(path), "--url", judge.url,
                                      "--write_scores", str(copy), cwd=tmp_path)
    scores = tmp_path / "responses-scores.jsonl"
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: could not write {copy} (File too large); the scores so far are in {scores}; "
        "free space and rerun: it continues")
    assert len(records(scores)) == 2
    assert sorted(os.listdir(tmp_path)) == ["responses-scores.jsonl", "responses.json"]


# --- the judge's address from OLLAMA_HOST ---

def test_ollama_host_names_the_judge_when_url_is_not_given(tmp_path, judge, capsys, monkeypatch):
    path = write(tmp_path, [entry("good", 0)])
    monkeypatch.setenv("OLLAMA_HOST", judge.root.removeprefix("http://"))
    code, out, _ = run_in_process(oe.main, ["--file_path", str(path)], capsys)
    assert code == 0 and "Average score: 90.00" in out.splitlines()
    assert judge.requests == [("GET", "/api/tags"), ("POST", "/api/chat")]
    monkeypatch.setenv("OLLAMA_HOST", "localhost:port")
    code, _, err = run_in_process(oe.main, ["--file_path", str(path)], capsys)
    assert (code, err) == (2, "Error: OLLAMA_HOST=localhost:port: expected a server address "
                              "such as 127.0.0.1:11434 or http://host:port, or a chat endpoint "
                              "such as http://localhost:11434/api/chat; correct it or pass "
                              "--url\n")
    code, out, _ = run_in_process(oe.main, ["--file_path", str(write(tmp_path, [entry("bad")],
                                                                      "b.json")),
                                            "--url", judge.url], capsys)  # --url comes first
    assert code == 0 and "Average score: 15.00" in out.splitlines()


# --- the summary and the scored copy ---

def test_a_judge_that_ignores_the_format_gets_no_average_and_exit_1(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("odd", 0), entry("good", 1), entry("odd", 2), entry("", 3)])
    scores = tmp_path / "responses-scores.jsonl"
    warning = (f"Warning: 2 of 3 replies of the judge hold no score, so it does not answer in "
               f"the prompt's format and no average is given; the replies are in {scores}; try "
               "another --model or --prompt")
    code, out, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url],
                                    capsys)
    assert code == 1
    assert out.splitlines() == ["Ollama running: True",
                                "Could not convert score: I cannot score this.",
                                "Could not convert score: I cannot score this.",
                                "Number of scores: 2 of 4",
                                "1 empty response scored 0 without asking the judge"]
    assert err.splitlines()[-1] == warning
    assert len(records(scores)) == 3
    code, out, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url],
                                    capsys)  # the saved replies say the same
    assert code == 1 and err.splitlines()[-1] == warning
    half = write(tmp_path, [entry("odd", 0), entry("good", 1)], "half.json")
    code, out, _ = run_in_process(oe.main, ["--file_path", str(half), "--url", judge.url], capsys)
    assert code == 0 and "Average score: 90.00" in out.splitlines()


def test_write_scores_puts_each_score_and_reply_beside_its_response(tmp_path, judge, capsys):
    keys = ["model 1 response", "model 2 response"]
    entries = [{**entry("good", i, keys[0]), keys[1]: ["bad", "odd", ""][i], "id": i}
               for i in range(3)]
    path = write(tmp_path, entries)
    copy = tmp_path / "scored.json"
    code, out, _ = run_in_process(oe.main, ["--file_path", str(path), "--json_key", *keys,
                                            "--url", judge.url, "--write_scores", str(copy)],
                                  capsys)
    assert code == 0
    assert f"Responses with their scores and the judge's replies saved as {copy}" in out
    replies = [("I'd rate it 15 out of 100.", 15), ("I cannot score this.", None), (None, 0)]
    assert json.loads(copy.read_text()) == [
        {**e, "model 1 response_score": 90, "model 1 response_judge_reply": "90",
         "model 2 response_score": score, "model 2 response_judge_reply": reply}
        for e, (reply, score) in zip(entries, replies, strict=True)]
    assert json.loads(path.read_text()) == entries


# --- the fake judge as a program ---

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_fake_judge(*flags):
    """The fake judge started as a reader starts it, and the line it printed."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "kit", "loopback_judge.py"),
                                *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    return process, process.stdout.readline()


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_fake_judge_program_serves_the_whole_flow(tmp_path, backend):
    port = free_port()
    process, line = start_fake_judge("--port", str(port), "--delay", "0.01",
                                     "--backend", backend)
    try:
        openai = " --backend openai" if backend == "openai" else ""
        assert line == (f"Fake judge (model llama3) listening; score with: python "
                        f"ollama_evaluate.py --url http://127.0.0.1:{port}{openai} --file_path "
                        "<responses.json>   (Ctrl-C stops it)\n")
        flags = line.split("ollama_evaluate.py ")[1].split(" --file_path")[0].split()
        path = write(tmp_path, RUBRIC_ENTRIES[:3])
        result = evaluate("--file_path", str(path), *flags, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[1:3] == ["Number of scores: 3 of 3",
                                                   "Average score: 50.00"]  # 100, 50, 0
        result = evaluate("--file_path", str(path), *flags, "--prompt", "rubric", cwd=tmp_path)
        assert result.stdout.splitlines()[1:3] == ["Number of scores: 3 of 3",
                                                   "Average score: 3.00 on a 1-5 scale"]
        if backend == "openai":  # only the OpenAI-compatible API, as llama.cpp or vLLM
            result = evaluate("--file_path", str(path), "--url", f"127.0.0.1:{port}",
                              cwd=tmp_path)
            assert result.returncode == 1
            assert result.stderr.startswith(f"Error: Ollama is not running at "
                                            f"http://127.0.0.1:{port} (HTTP 404)")
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0
    assert out == "" and err == ""


@pytest.mark.parametrize(("flags", "message"), [
    (["--port", "70000"], "--port must be from 1 to 65535, got 70000"),
    (["--port", "0"], "--port must be from 1 to 65535, got 0"),
    (["--delay", "-1"], "--delay must be 0 or more seconds, got -1"),
])
def test_fake_judge_program_refuses_bad_flags(flags, message):
    process, line = start_fake_judge(*flags)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 1 and line == "" and out == ""
    assert err == f"Error: {message}\n"


def test_fake_judge_program_on_a_busy_port_says_so():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process, line = start_fake_judge("--port", str(port))
        out, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert line == "" and out == ""
    assert err == (f"Error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in "
                   "use); is Ollama or another server using it? Pick another --port\n")
