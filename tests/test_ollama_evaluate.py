"""ollama_evaluate.py against a judge server on 127.0.0.1 (tests/fake_judge.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest
from fake_judge import FakeJudge

import ollama_evaluate as oe
from instruction_data import format_input

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWERS = {"good": "90", "bad": "I'd rate it 15 out of 100.", "odd": "I cannot score this."}


def entry(response, i=0, key="model_response"):
    return {"instruction": f"Task {i}", "input": "" if i % 2 else f"in {i}",
            "output": f"out {i}", key: response}


def write(tmp_path, entries, name="responses.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def evaluate(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "ollama_evaluate.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def bootstrap(values):
    """The 95% bootstrap interval computed here, independently of the script."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(123)
    means = values[rng.integers(0, len(values), size=(10_000, len(values)))].mean(axis=1)
    return np.percentile(means, [2.5, 97.5])


@pytest.fixture
def judge():
    server = FakeJudge(ANSWERS)
    yield server
    server.close()


def test_importing_loads_no_torch_tiktoken_or_matplotlib():
    result = subprocess.run(
        [sys.executable, "-c", "import ollama_evaluate, sys; print(sorted(m for m in "
         "('torch', 'tiktoken', 'matplotlib') if m in sys.modules))"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


def test_happy_path_end_to_end(tmp_path, judge):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1), entry("", 2)])
    result = evaluate("--file_path", str(path), "--url", judge.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == ["Ollama running: True", "Number of scores: 3 of 3",
                         "Average score: 35.00", "Median score: 15.00",
                         "Standard deviation: 48.22"]
    low, high = map(float, re.fullmatch(r"95% bootstrap interval of the mean: "
                                        r"\[(\d+\.\d\d), (\d+\.\d\d)\]", lines[5]).groups())
    assert 0 <= low < 35 < high <= 90
    assert len(lines) == 6
    assert "Scoring entries: 100%" in result.stderr
    assert len(judge.prompts) == 2  # the empty response scores 0 without asking
    good, bad = sorted(judge.prompts, key=lambda prompt: "`bad`" in prompt)
    assert sorted(records(tmp_path / "responses-scores.jsonl"), key=lambda r: r["score"]) == [
        {"judge": "ollama/llama3", "prompt_sha256": oe.prompt_sha256(bad), "score": 15,
         "reply": "I'd rate it 15 out of 100."},
        {"judge": "ollama/llama3", "prompt_sha256": oe.prompt_sha256(good), "score": 90,
         "reply": "90"}]


def test_request_follows_the_chapters_protocol(judge):
    e = entry("good", 0)
    assert oe.query_model(oe.judge_prompt(e, "model_response"), url=judge.url) == "90"
    prompt = (f"Given the input `{format_input(e)}` and correct output `out 0`, score the model "
              "response `good` on a scale from 0 to 100, where 100 is the best score. Respond "
              "with the integer number only.")
    assert judge.bodies == [{"model": "llama3",
                             "messages": [{"role": "user", "content": prompt}],
                             "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}]


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
    assert judge.prompts[3:] == [oe.judge_prompt(entries[1], "model_response")]
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
    assert out[1] == (f"Reusing saved scores for 0 of 4 entries from {tmp_path}/"
                      "responses-scores.jsonl; asking the judge about 4")
    assert out[2:4] == ["Number of scores: 4 of 4", "Average score: 15.00"]
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
    assert "Reusing saved scores for 0 of 2 entries" in out and "asking the judge about 2" in out
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
    assert elsewhere.prompts == []


def test_score_file_keeps_unknown_lines_and_appends_after_a_cut_line(tmp_path):
    path = tmp_path / "scores.jsonl"
    good = {"judge": "ollama/llama3", "prompt_sha256": oe.prompt_sha256("p"), "score": 80,
            "reply": "80"}
    lines = ['{"index": 0, "score": 90, "reply": "90"}', "not json", json.dumps(good),
             '{"judge": "ollama/llama3", "score": 5}', '{"judge": "ollama/ll']
    path.write_text("\n".join(lines))
    store = oe.ScoreStore(str(path))
    assert store.find("ollama/llama3", "p") == good
    assert store.find("ollama/phi3", "p") is None and store.find("ollama/llama3", "q") is None
    store.add("ollama/phi3", "p", None, "no idea")
    assert path.read_text().splitlines()[:5] == lines
    assert json.loads(path.read_text().splitlines()[5])["judge"] == "ollama/phi3"
    assert oe.ScoreStore(str(path)).find("ollama/phi3", "p")["reply"] == "no idea"


def test_retries_on_server_errors_and_dropped_connections(judge):
    judge.failures = [500, "drop", 503]
    assert oe.query_model("score the model response `good` on a scale", url=judge.url,
                          backoff=0) == "90"
    assert len(judge.bodies) == 4
    judge.failures = [500] * 3
    with pytest.raises(oe.JudgeError, match=r"answered HTTP 500"):
        oe.query_model("x", url=judge.url, retries=2, backoff=0)
    assert len(judge.failures) == 0


def test_a_connection_closed_while_idle_is_reopened_at_once(judge):
    oe.query_model("x", url=judge.url)  # leaves this thread's connection open
    judge.failures = ["drop"]  # the server hangs up on the kept-open connection
    assert oe.query_model("score the model response `good` on a scale", url=judge.url,
                          retries=0) == "90"
    judge.failures = ["drop"]  # on a fresh connection the hang-up is an error
    oe.open_connection(urllib.parse.urlsplit(judge.url)).close()
    with pytest.raises(oe.JudgeError, match=r"no answer from .*: Remote end closed"):
        oe.query_model("x", url=judge.url, retries=0)


def test_an_error_in_the_stream_is_no_reply():
    chunk = b'{"message": {"content": "8"}, "done": false}\n'
    assert oe.read_reply(chunk + b'{"done": true}\n', "ollama") == "8"
    with pytest.raises(ValueError, match="runner stopped"):
        oe.read_reply(chunk + b'{"error": "runner stopped"}\n', "ollama")


def test_client_errors_are_not_retried(judge):
    with pytest.raises(oe.JudgeError, match=r"answered HTTP 404: .*model 'mistral' not found"):
        oe.query_model("x", model="mistral", url=judge.url, backoff=0)
    assert len(judge.bodies) == 1


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
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"Error: {judge.url} answered HTTP 500")
    assert err.endswith(f"The scores so far are in {tmp_path}/responses-scores.jsonl; run again "
                        "to continue.")
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

    monkeypatch.setattr(oe, "query_model", query_then_ctrl_c)
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
    assert saved == {oe.prompt_sha256(prompt) for prompt in slow.prompts}


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


@pytest.mark.parametrize(("reply", "score"), [
    ("85", 85), ("  100\n", 100), ("0", 0), ("I'd rate it 85 out of 100.", 85),
    ("Score: 90/100", 90), ("**72**", 72), ("The response deserves a 64.", 64),
    ("85.5", None), ("150", None), ("-3", None), ("N/A", None), ("", None),
])
def test_parse_score(reply, score):
    assert oe.parse_score(reply) == score


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
    assert "Reusing saved scores for 3 of 3 entries" in out[2]


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
    ("{oops", "not valid JSON (Expecting property name enclosed in double quotes: line 1 "
              "column 2 (char 1))"),
    ('{"a": 1}', "expected a JSON list of entries, got dict"),
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
    with pytest.raises(SystemExit) as exit_info:
        oe.main(["--file_path", str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"Error: {path}: {message}\n"


BAD_FLAGS = [
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--timeout", "0"], "--timeout must be a number of seconds above 0, got 0"),
    (["--timeout", "-2.5"], "--timeout must be a number of seconds above 0, got -2.5"),
    (["--timeout", "nan"], "--timeout must be a number of seconds above 0, got nan"),
    (["--retries", "-1"], "--retries must be 0 or more, got -1"),
    (["--json_key", "model_response", "other"], "compare several --file_path or several "
                                                "--json_key, not both at once"),
    (["--url", "localhost:11434"], "--url localhost:11434: expected http://host:port/path"),
    (["--file_path", "folder"], "folder: is a folder, not a JSON file"),
    (["--file_path", "missing.json"], "missing.json: file not found"),
    (["--output", "nowhere/scores.jsonl"], "--output nowhere/scores.jsonl: the folder "
                                           "{tmp}/nowhere does not exist"),
    (["--output", "folder"], "--output folder: is a folder, not a file"),
    (["--plot", "nowhere/scores.png"], "--plot nowhere/scores.png: the folder {tmp}/nowhere "
                                       "does not exist"),
    (["--plot", "folder"], "--plot folder: is a folder, not a file"),
    (["--plot", "scores.xyz"], "--plot scores.xyz: unknown image format 'xyz'; use one of "),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_flags_are_one_line_and_exit_2_before_any_request(tmp_path, judge, capsys,
                                                               monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    write(tmp_path, [entry("good")], "a.json")
    write(tmp_path, [entry("good")], "b.json")
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
