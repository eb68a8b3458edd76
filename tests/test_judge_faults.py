"""ollama_evaluate.py's faults and bad inputs: score files of another kind, pipes and devices,
deadlines out of range, Ctrl-C while a reply is in flight, and replies that are no clear score.
The judge is the loopback judge (kit/loopback_judge.py); signals are real ones, sent to the
script run as a user runs it."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from helpers import assert_error, run_in_process, run_script
from judge_helpers import records

import ollama_evaluate as oe
from kit.judge_prompts import parse_rubric_score, parse_score, prompt_sha256
from kit.loopback_judge import FakeJudge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "ollama_evaluate.py")
INTERRUPTED = "Interrupted. The scores so far are in {}; run again to continue."


def entries(*responses):
    return [{"instruction": f"Task {i}", "input": "", "output": f"out {i}",
             "model_response": response} for i, response in enumerate(responses)]


def write(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def judge():
    server = FakeJudge({"good": "90", "bad": "15"})
    server.httpd.block_on_close = False  # close without waiting for replies still on their way
    yield server
    server.close()


# --- --output is a score file or a new path ---

@pytest.mark.parametrize("other", ["responses", "dataset"])
def test_output_of_another_kind_is_refused_before_any_request(tmp_path, judge, capsys, other):
    path = write(tmp_path / "a.json", entries("good"))
    target = tmp_path / "other.json"
    if other == "responses":  # another run's responses, as the finetuning script writes them
        target.write_text(json.dumps(entries("bad"), indent=4))
    else:  # a dataset in JSON Lines
        target.write_text("".join(json.dumps(e) + "\n" for e in entries("x", "y")))
    before = target.read_bytes()
    code, _, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url,
                                            "--output", str(target)], capsys)
    assert code == 2
    assert err == (f"Error: --output {target}: is not a score file (no line of it is a judge's "
                   "reply), so appending scores would damage it; pass a new path or a score "
                   "file as --output\n")
    assert target.read_bytes() == before and judge.requests == []


def test_a_default_score_file_of_another_kind_is_refused(tmp_path, judge, capsys):
    path = write(tmp_path / "a.json", entries("good"))
    (tmp_path / "a-scores.jsonl").write_text("my notes\n")
    code, _, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url],
                                  capsys)
    assert code == 2
    assert err == (f"Error: score file {tmp_path}/a-scores.jsonl: is not a score file (no line "
                   "of it is a judge's reply), so appending scores would damage it; move it "
                   "away, or pass --output\n")
    assert (tmp_path / "a-scores.jsonl").read_text() == "my notes\n"


@pytest.mark.parametrize("content", ["", "\n", '{"judge": "ollama/llama3", "prompt_sha'])
def test_an_empty_score_file_or_one_whose_first_line_was_cut_is_used(tmp_path, judge, capsys,
                                                                     content):
    path = write(tmp_path / "a.json", entries("good", "bad"))
    scores = tmp_path / "scores.jsonl"
    scores.write_text(content)
    code, out, _ = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url,
                                            "--output", str(scores)], capsys)
    assert code == 0 and "Average score: 52.50" in out.splitlines()
    text = scores.read_text()
    assert text.startswith(content)
    assert sorted(json.loads(line)["score"] for line in text[len(content):].splitlines()
                  if line.strip()) == [15, 90]


# --- pipes are read, devices refused ---

def bash(command, cwd, timeout=60):
    """`command` run by bash as a user types it (process substitution, pipes)."""
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("lines", [False, True])
def test_a_process_substitution_is_read_as_input(tmp_path, judge, lines):
    data = entries("good", "bad")
    if lines:
        (tmp_path / "a.jsonl").write_text("".join(json.dumps(e) + "\n" for e in data))
    else:
        write(tmp_path / "a.jsonl", data)
    result = bash(f"{sys.executable} {SCRIPT} --file_path <(cat a.jsonl) --output s.jsonl "
                  f"--url {judge.url}", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Average score: 52.50" in result.stdout.splitlines()
    assert [r["score"] for r in records(tmp_path / "s.jsonl")] in ([90, 15], [15, 90])


def test_a_named_pipe_is_read_once_and_its_errors_name_it(tmp_path, judge, capsys):
    fifo = tmp_path / "answers.json"
    os.mkfifo(fifo)

    def feed(text):
        with open(fifo, "w") as f:
            f.write(text)

    for text, expected in ((json.dumps(entries("good")), 0), ('[{"instruction": "a"}]', 2)):
        writer = threading.Thread(target=feed, args=(text,))
        writer.start()
        code, out, err = run_in_process(oe.main, ["--file_path", str(fifo), "--url", judge.url,
                                                  "--output", str(tmp_path / "s.jsonl")], capsys)
        writer.join()
        assert code == expected
        if expected:
            assert err == f"Error: {fifo}: entry 0 has no 'output' field\n"
        else:
            assert "Average score: 90.00" in out.splitlines()


def test_a_pipe_as_input_needs_output(tmp_path, judge):
    write(tmp_path / "a.json", entries("good"))
    result = bash(f"cat a.json | {sys.executable} {SCRIPT} --file_path /dev/stdin "
                  f"--url {judge.url}", tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("Error: --file_path /dev/stdin: is a pipe, so no score file can go "
                             "beside it; pass --output scores.jsonl\n")
    assert judge.requests == []


def test_a_device_as_input_is_refused(tmp_path, judge):
    result = run_script("ollama_evaluate.py", "--file_path", "/dev/zero", "--url", judge.url,
                        cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr == ("Error: /dev/zero: is a device, not a JSON file; pass a file (or "
                             "a pipe)\n")
    assert judge.requests == []


def test_output_to_a_pipe_is_refused_at_once(tmp_path, judge):
    write(tmp_path / "a.json", entries("good"))
    result = bash(f"{sys.executable} {SCRIPT} --file_path a.json --output /dev/stdout "
                  f"--url {judge.url} | cat", tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("Error: --output /dev/stdout: is a pipe, not a file; pass the path "
                             "of a file\n")
    assert judge.requests == [] and os.listdir(tmp_path) == ["a.json"]


@pytest.mark.parametrize("flag", ["--output", "--write_scores", "--plot"])
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_as_an_output_is_refused(tmp_path, judge, capsys, flag, device):
    path = write(tmp_path / "a.json", entries("good"))
    code, _, err = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url,
                                            flag, device], capsys)
    assert (code, err) == (2, f"Error: {flag} {device}: is a device, not a file; pass the path "
                              "of a file\n")
    assert stat.S_ISCHR(os.stat(device).st_mode)  # never replaced by a file
    assert judge.requests == []


# --- deadlines ---

@pytest.mark.parametrize("value", ["1e10", "86401", "1e309"])
def test_a_timeout_beyond_a_day_is_refused(tmp_path, capsys, value):
    path = write(tmp_path / "a.json", entries("good"))
    code, _, err = run_in_process(oe.main, ["--file_path", str(path), "--timeout", value],
                                  capsys)
    assert code == 2
    assert_error(err, "--timeout must be")
    assert "Traceback" not in err


def test_a_timeout_of_a_day_is_taken(tmp_path, judge, capsys):
    path = write(tmp_path / "a.json", entries("good"))
    code, out, _ = run_in_process(oe.main, ["--file_path", str(path), "--url", judge.url,
                                            "--timeout", "86400"], capsys)
    assert code == 0 and "Average score: 90.00" in out.splitlines()


# --- Ctrl-C while replies are in flight ---

def start(path, url, *flags):
    return subprocess.Popen([sys.executable, SCRIPT, "--file_path", str(path), "--url", url,
                             "--timeout", "600", *flags], cwd=path.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition):
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "the judge was never asked"
        time.sleep(0.01)


@pytest.mark.parametrize(("server", "stop", "code", "line"), [
    ("slow", signal.SIGINT, 130, INTERRUPTED), ("endless", signal.SIGINT, 130, INTERRUPTED),
    ("slow", signal.SIGTERM, 143, "Stopped by SIGTERM. The scores so far are in {}; run again "
                                  "to continue."),
])
def test_a_stop_does_not_wait_for_the_judge(tmp_path, judge, server, stop, code, line):
    """The judge takes a minute to answer, or streams on and on: Ctrl-C (or SIGTERM) does not
    wait for it, nor for --timeout 600."""
    if server == "slow":
        judge.delay = 60
    else:
        judge.failures = ["endless"]
    path = write(tmp_path / "a.json", entries("good"))
    process = start(path, judge.url)
    wait_for(lambda: judge.prompts)
    process.send_signal(stop)
    _, err = process.communicate(timeout=30)  # the judge would take 60 s, --timeout 600 s
    assert process.returncode == code
    assert err.splitlines()[-1] == line.format(tmp_path / "a-scores.jsonl")
    assert "Traceback" not in err
    assert not (tmp_path / "a-scores.jsonl").exists()


def test_ctrl_c_keeps_every_reply_that_arrived_and_abandons_the_rest(tmp_path, judge):
    judge.failures = [None, None, "endless", "endless"]  # two answers, then two never end
    path = write(tmp_path / "a.json", entries("good", "bad", "good", "bad", "good"))
    scores = tmp_path / "a-scores.jsonl"
    process = start(path, judge.url, "--workers", "2")
    wait_for(lambda: len(judge.prompts) == 4 and scores.exists()
             and len(scores.read_text().splitlines()) == 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert err.splitlines()[-1] == INTERRUPTED.format(scores)
    assert {r["prompt_sha256"] for r in records(scores)} == {
        prompt_sha256(prompt) for prompt in judge.prompts[:2]}
    assert len(judge.prompts) == 4  # no request was sent after Ctrl-C


@pytest.mark.parametrize(("stop", "code", "stopped"), [
    (signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Stopped by SIGTERM"),
])
def test_a_stop_while_the_judge_is_checked_ends_in_one_line(tmp_path, stop, code, stopped):
    """A server that takes the connection but never answers the model list: Ctrl-C (or
    SIGTERM) while the script waits for it ends in one line, before any request is sent."""
    path = write(tmp_path / "a.json", entries("good"))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        process = start(path, f"127.0.0.1:{silent.getsockname()[1]}")
        connection, _ = silent.accept()
        with connection:
            assert connection.recv(1024).startswith(b"GET /api/tags ")
            process.send_signal(stop)
            _, err = process.communicate(timeout=30)
    assert process.returncode == code
    assert err == f"{stopped}; no request was sent yet: run the same command again.\n"
    assert not (tmp_path / "a-scores.jsonl").exists()


@pytest.mark.parametrize("gap", [0.0, 0.02, 0.2])
def test_repeated_ctrl_c_ends_in_one_line(tmp_path, judge, gap):
    judge.delay = 60
    path = write(tmp_path / "a.json", entries("good", "bad", "good"))
    process = start(path, judge.url, "--workers", "3")
    wait_for(lambda: len(judge.prompts) == 3)
    for _ in range(10):
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        time.sleep(gap)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert err.splitlines()[-1] == INTERRUPTED.format(tmp_path / "a-scores.jsonl")
    assert "Traceback" not in err and "Exception ignored" not in err


# --- replies that are a score only when unambiguous ---

@pytest.mark.parametrize(("reply", "score"), [
    ("10/10", None), ("8/10", None), ("0x50", None), ("1e309", None), ("1e3", None),
    ("\u0668\u0665", None),  # Arabic-Indic 85
    ("\uff18\uff15", None),  # full-width 85
    ("Score: \u0968\u0966", None),  # Devanagari 20
    ("85 (\u0668\u0665)", None), ("80 or 85", None), ("85 out of 10", None), ("85,5", None),
    ("90/1000", None), ("Score: 4/5", None), ("Score: 85\n(out of 100)", None),
    ("100/100", 100), ("85 / 100", 85), ("Score: 85.", 85), ("85, a good answer.", 85),
    ("0/100", 0), ("Score: **85** out of 100", 85), ("**85**/100", 85),
])
def test_parse_score_takes_only_one_clear_number_on_the_scale(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply", ["Score: \u0664", "Score: \uff14", "Score: 4/10", "Score: 4e0"])
def test_parse_rubric_score_takes_only_ascii_digits_on_its_scale(reply):
    assert parse_rubric_score(reply) is None


def test_ambiguous_replies_are_reported_and_left_out(tmp_path, capsys):
    replies = {"a": "10/10", "b": "0x50", "c": "1e309", "d": "\u0668\u0665", "e": "72"}
    server = FakeJudge(replies)
    try:
        path = write(tmp_path / "a.json", entries(*replies))
        code, out, err = run_in_process(oe.main, ["--file_path", str(path), "--url",
                                                  server.url], capsys)
    finally:
        server.close()
    assert code == 1  # most replies hold no score: no average
    assert "Number of scores: 1 of 5" in out.splitlines()
    for reply in ("10/10", "0x50", "1e309", "\u0668\u0665"):
        assert f"Could not convert score: {reply}" in out.splitlines()
    assert "Traceback" not in err
    assert [r["score"] for r in records(tmp_path / "a-scores.jsonl")] == [None] * 4 + [72]
