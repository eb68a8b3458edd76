"""ollama_evaluate.py against a judge server on 127.0.0.1."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from fake_judge import FakeJudge

import ollama_evaluate as oe
from gpt_instruction_finetuning import format_input

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWERS = {"good": "90", "bad": "I'd rate it 15 out of 100.", "odd": "I cannot score this."}


def entry(response, i=0):
    return {"instruction": f"Task {i}", "input": "" if i % 2 else f"in {i}",
            "output": f"out {i}", "model_response": response}


def write(tmp_path, entries, name="responses.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def evaluate(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "ollama_evaluate.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def judge():
    server = FakeJudge(ANSWERS)
    yield server
    server.close()


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
    assert "Scoring entries: 100%" in result.stderr
    assert len(judge.prompts) == 2  # the empty response scores 0 without asking
    records = [json.loads(line) for line in
               (tmp_path / "responses-scores.jsonl").read_text().splitlines()]
    assert sorted((r["index"], r["score"], r["reply"]) for r in records) == [
        (0, 90, "90"), (1, 15, "I'd rate it 15 out of 100."), (2, 0, "")]


def test_request_follows_the_chapters_protocol(judge):
    e = entry("good", 0)
    assert oe.query_model(oe.judge_prompt(e, "model_response"), url=judge.url) == "90"
    prompt = (f"Given the input `{format_input(e)}` and correct output `out 0`, score the model "
              "response `good` on a scale from 0 to 100, where 100 is the best score. Respond "
              "with the integer number only.")
    assert judge.bodies == [{"model": "llama3",
                             "messages": [{"role": "user", "content": prompt}],
                             "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}]


def test_workers_give_the_same_scores(tmp_path):
    slow = FakeJudge(ANSWERS, delay=0.05)
    try:
        entries = [entry(["good", "bad", "odd", "meh"][i % 4], i) for i in range(12)]
        one = evaluate("--file_path", str(write(tmp_path, entries, "a.json")), "--url", slow.url,
                       cwd=tmp_path)
        four = evaluate("--file_path", str(write(tmp_path, entries, "b.json")), "--url",
                        slow.url, "--workers", "4", cwd=tmp_path)
    finally:
        slow.close()
    assert one.returncode == four.returncode == 0
    assert one.stdout.splitlines()[1:] == four.stdout.splitlines()[1:]

    def by_index(name):
        lines = (tmp_path / name).read_text().splitlines()
        return sorted((json.loads(line) for line in lines), key=lambda r: r["index"])

    assert by_index("a-scores.jsonl") == by_index("b-scores.jsonl")
    assert len(by_index("a-scores.jsonl")) == 12


def test_resume_after_a_kill_asks_only_the_rest(tmp_path):
    entries = [entry(["good", "bad"][i % 2], i) for i in range(10)]
    path = write(tmp_path, entries)
    scores = tmp_path / "responses-scores.jsonl"
    slow = FakeJudge(ANSWERS, delay=0.3)
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
            f.write('{"index": 9, "sco')  # a record cut short by the kill
        scored_before = len(scores.read_text().splitlines()) - 1
        assert 3 <= scored_before < 10
        asked_before = len(slow.prompts)
        result = evaluate("--file_path", str(path), "--url", slow.url, cwd=tmp_path)
    finally:
        slow.close()
    assert result.returncode == 0, result.stderr
    assert f"Resuming: {scored_before} of 10 entries already scored in " in result.stdout
    assert len(slow.prompts) - asked_before == 10 - scored_before
    assert "Number of scores: 10 of 10" in result.stdout
    assert "Average score: 52.50" in result.stdout
    records = [json.loads(line) for line in scores.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(10))


def test_retries_on_server_errors_and_dropped_connections(judge):
    judge.failures = [500, "drop", 503]
    assert oe.query_model("score the model response `good` on a scale", url=judge.url,
                          backoff=0) == "90"
    assert len(judge.bodies) == 4
    judge.failures = [500] * 3
    with pytest.raises(oe.JudgeError, match=r"answered HTTP 500"):
        oe.query_model("x", url=judge.url, retries=2, backoff=0)


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


def test_missing_model_is_named(tmp_path, judge):
    path = write(tmp_path, [entry("good")])
    result = evaluate("--file_path", str(path), "--url", judge.url, "--model", "mistral",
                      cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"Error: model 'mistral' is not available on the Ollama server at "
                             f"{judge.root}; run: ollama pull mistral\n")


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
    assert [json.loads(line)["index"] for line in
            (tmp_path / "responses-scores.jsonl").read_text().splitlines()] == [0]


def test_replies_that_are_not_scores_are_reported_and_left_out(tmp_path, judge, capsys):
    path = write(tmp_path, [entry("good", 0), entry("odd", 1), entry("bad", 2)])
    oe.main(["--file_path", str(path), "--url", judge.url])
    captured = capsys.readouterr()
    assert "Could not convert score: I cannot score this." in captured.out + captured.err
    assert "Number of scores: 2 of 3" in captured.out
    assert "Average score: 52.50" in captured.out


def test_openai_compatible_backend(tmp_path, judge):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1)])
    result = evaluate("--file_path", str(path), "--backend", "openai", "--url",
                      judge.openai_url, "--model", "judge", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["Judge server running: True",
                                              "Number of scores: 2 of 2", "Average score: 52.50"]
    assert judge.bodies[0]["temperature"] == 0 and judge.bodies[0]["seed"] == 123
    missing = evaluate("--file_path", str(path), "--backend", "openai", "--url",
                       judge.openai_url, "--model", "llama3", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr == (f"Error: model 'llama3' is not served at {judge.root}; "
                              "it serves: judge\n")


@pytest.mark.parametrize(("reply", "score"), [
    ("85", 85), ("  100\n", 100), ("0", 0), ("I'd rate it 85 out of 100.", 85),
    ("Score: 90/100", 90), ("**72**", 72), ("The response deserves a 64.", 64),
    ("85.5", None), ("150", None), ("-3", None), ("N/A", None), ("", None),
])
def test_parse_score(reply, score):
    assert oe.parse_score(reply) == score


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


def test_missing_file_from_the_command_line(tmp_path):
    result = evaluate("--file_path", "nope.json", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "Error: nope.json: file not found\n"


def test_histogram_is_saved(tmp_path, judge):
    path = write(tmp_path, [entry("good", 0), entry("bad", 1)])
    result = evaluate("--file_path", str(path), "--url", judge.url, "--plot", "scores.png",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Histogram saved as scores.png" in result.stdout
    assert (tmp_path / "scores.png").read_bytes().startswith(b"\x89PNG")
