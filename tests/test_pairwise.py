"""Side-by-side judging (ollama_evaluate.py --pairwise, kit/pairwise.py) against the loopback
judge: verdicts in both orders, position bias cancelled, exact inversion, reuse and Ctrl-C."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REPO, assert_error, run_in_process, run_script

import ollama_evaluate as oe
from kit import judge_cli, pairwise
from kit.loopback_judge import FakeJudge

OUTPUT = "red green blue"
# (response of A, response of B) per entry: the fair judge prefers the one that repeats more of
# OUTPUT's words. A wins 0-2, B wins 3, 4 and 5 are ties.
RESPONSES = [(OUTPUT, "nothing"), (OUTPUT, "red"), ("red green", "nothing"), ("none", OUTPUT),
             ("red", "red"), ("red", "blue")]


def entries(responses, key="model_response"):
    return [{"instruction": f"Task {i}", "input": "" if i % 2 else f"in {i}", "output": OUTPUT,
             key: response} for i, response in enumerate(responses)]


def write_sides(tmp_path, responses=RESPONSES):
    paths = tmp_path / "a.json", tmp_path / "b.json"
    for path, side in zip(paths, zip(*responses, strict=True), strict=True):
        path.write_text(json.dumps(entries(side)))
    return [str(path) for path in paths]


def bootstrap(values):
    """The 95% bootstrap interval of the mean, computed here independently of the script."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(123)
    means = values[rng.integers(0, len(values), size=(10_000, len(values)))].mean(axis=1)
    return np.percentile(means, [2.5, 97.5])


def compare(capsys, *files, flags=()):
    """Run --pairwise in process; return (exit code, stdout lines, stderr)."""
    code, out, err = run_in_process(oe.main, ["--pairwise", "--file_path", *files, *flags],
                                    capsys)
    return code, out.splitlines(), err


@pytest.fixture
def judge():
    server = FakeJudge()
    yield server
    server.close()


@pytest.mark.parametrize("reply, verdict", [
    ("[[A]]", "A"), ("B keeps the meaning.\n[[B]]", "B"), ("Both are as good. [[C]]", "C"),
    ("[[A]] on reflection, [[A]]", "A"), ("[[A]] ... no, [[B]]", None), ("[A]", None),
    ("[[a]]", None), ("[[D]]", None), ("Response A is better.", None), ("", None)])
def test_only_an_unambiguous_verdict_counts(reply, verdict):
    assert pairwise.parse_verdict(reply) == verdict
    assert pairwise.verdict_points(reply) == {"A": 1, "B": -1, "C": 0, None: None}[verdict]


def test_the_prompt_holds_the_entry_both_responses_and_the_criterion():
    entry = {"instruction": "Name a color.", "input": "Sky", "output": "Blue."}
    assert pairwise.pairwise_prompt(entry, "Blue.", "Green.", "more polite") == (
        "Compare two responses to an instruction and decide which one is better by this "
        "criterion: more polite.\n\n<instruction>\nName a color.\n</instruction>\n<input>\nSky\n"
        "</input>\n<reference_answer>\nBlue.\n</reference_answer>\n<response_a>\nBlue.\n"
        "</response_a>\n<response_b>\nGreen.\n</response_b>\n\nJudge by the criterion only: "
        "neither the order of the responses nor their length may sway you. Explain your "
        'decision in one or two sentences, then give your verdict on the last line: "[[A]]" if '
        'response A is better, "[[B]]" if response B is better, "[[C]]" for a tie.')


def test_wins_losses_ties_and_win_rate_with_its_interval(tmp_path, judge, capsys):
    code, out, err = compare(capsys, *write_sides(tmp_path), flags=["--url", judge.url])
    assert code == 0, err
    low, high = bootstrap([1, 1, 1, 0, 0.5, 0.5])
    assert out == [
        "Ollama running: True",
        f"A = {tmp_path}/a.json, B = {tmp_path}/b.json: 6 entries in both, each asked in both "
        "orders",
        "Wins, losses and ties of A over B: 3, 1, 2",
        f"Win rate of A over B: 66.7% (95% bootstrap interval [{low:.1%}, {high:.1%}]), ties "
        "counting half",
        "Inconsistent entries (the verdict changed with the order, counted as ties): 0 of 6",
        "Most one-sided entries:",
        "  entry 0, A in both orders: Task 0", "  entry 1, A in both orders: Task 1",
        "  entry 2, A in both orders: Task 2", "  entry 3, B in both orders: Task 3"]
    assert "Judging A, B: 100%" in err and "Judging B, A: 100%" in err
    assert len(judge.prompts) == 11  # 6 entries in two orders; entry 4's two orders are one
    saved = [json.loads(line) for line in (tmp_path / "a-verdicts.jsonl").read_text().splitlines()]
    assert sorted((r["index"], r["score"]) for r in saved) == [
        (0, -1), (0, 1), (1, -1), (1, 1), (2, -1), (2, 1), (3, -1), (3, 1), (4, 0), (5, 0),
        (5, 0)]
    assert {r["judge"] for r in saved} == {"ollama/llama3"}


def numbers(lines):
    """wins, losses, ties, win rate, interval and inconsistent count of a printed summary."""
    text = "\n".join(lines)
    counts = re.search(r"A over B: (\d+), (\d+), (\d+)", text).groups()
    rates = re.search(r"(\S+)% \(95% bootstrap interval \[(\S+)%, (\S+)%\]\)", text).groups()
    inconsistent = re.search(r"counted as ties\): (\d+)", text).group(1)
    return [int(c) for c in counts], [float(r) for r in rates], int(inconsistent)


def test_swapping_the_files_inverts_the_result_exactly(tmp_path, judge, capsys):
    a, b = write_sides(tmp_path)
    code_ab, ab, _ = compare(capsys, a, b, flags=["--url", judge.url])
    code_ba, ba, _ = compare(capsys, b, a, flags=["--url", judge.url])
    assert code_ab == code_ba == 0
    (wins, losses, ties), (rate, low, high), inconsistent = numbers(ab)
    assert numbers(ba) == ([losses, wins, ties],
                           [round(100 - rate, 1), round(100 - high, 1), round(100 - low, 1)],
                           inconsistent)
    one_sided = ab[ab.index("Most one-sided entries:"):]
    swapped = [line.replace(" A ", " * ").replace(" B ", " A ").replace(" * ", " B ")
               for line in one_sided]
    assert sorted(ba[ba.index("Most one-sided entries:"):]) == sorted(swapped)


def test_a_judge_that_always_says_a_gives_only_ties(tmp_path):
    biased = FakeJudge(pairwise="always-a")
    try:
        result = run_script("ollama_evaluate.py", "--pairwise", "--file_path",
                            *write_sides(tmp_path), "--url", biased.url, cwd=tmp_path)
    finally:
        biased.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2:] == [
        "Wins, losses and ties of A over B: 0, 0, 6",
        "Win rate of A over B: 50.0% (95% bootstrap interval [50.0%, 50.0%]), ties counting "
        "half",
        "Inconsistent entries (the verdict changed with the order, counted as ties): 6 of 6"]


def test_a_rerun_reuses_every_verdict_and_asks_again_what_changed(tmp_path, judge, capsys):
    files = write_sides(tmp_path)
    first = compare(capsys, *files, flags=["--url", judge.url])
    requests = len(judge.requests)
    again = compare(capsys, *files, flags=["--url", judge.url])
    assert len(judge.requests) == requests  # not even the check that the judge runs
    assert again[1][0] == (f"Reusing saved verdicts for 12 of 12 prompts (two per entry) from "
                           f"{tmp_path}/a-verdicts.jsonl; asking the judge about 0")
    assert again[1][1:] == first[1][1:]
    changed = list(RESPONSES)
    changed[3] = ("none", "nothing")  # B's answer to entry 3 changes: a tie now
    write_sides(tmp_path, changed)
    asked = len(judge.prompts)
    code, out, _ = compare(capsys, *files, flags=["--url", judge.url])
    assert code == 0
    assert "asking the judge about 2" in out[1]
    assert [p for p in judge.prompts[asked:] if "<response_b>\nnothing" in p] == \
        judge.prompts[asked:asked + 1]
    assert len(judge.prompts) - asked == 2
    assert "Wins, losses and ties of A over B: 3, 0, 3" in out
    compare(capsys, *files, flags=["--url", judge.url, "--criterion", "more polite"])
    assert len(judge.prompts) - asked == 2 + 11  # another criterion: every prompt is new
    assert "criterion: more polite." in judge.prompts[-1]


def test_ctrl_c_keeps_the_verdicts_received_and_exits_130(tmp_path, judge, capsys, monkeypatch):
    real_query = judge_cli.query_model
    calls = []

    def query_then_ctrl_c(prompt, *args, **kwargs):
        calls.append(prompt)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_query(prompt, *args, **kwargs)

    monkeypatch.setattr(judge_cli, "query_model", query_then_ctrl_c)
    code, _, err = compare(capsys, *write_sides(tmp_path), flags=["--url", judge.url])
    assert code == 130
    store = tmp_path / "a-verdicts.jsonl"
    assert err.splitlines()[-1] == (f"Interrupted. The verdicts so far are in {store}; run "
                                    "again to continue.")
    saved = len(store.read_text().splitlines())
    assert 2 <= saved < 11  # the replies before Ctrl-C, and any that were in flight
    monkeypatch.setattr(judge_cli, "query_model", real_query)
    asked = len(judge.prompts)
    code, out, _ = compare(capsys, *write_sides(tmp_path), flags=["--url", judge.url])
    assert code == 0 and "Wins, losses and ties of A over B: 3, 1, 2" in out
    assert len(judge.prompts) - asked == 11 - saved  # only what was not saved


def test_workers_and_the_openai_backend_give_the_same_summary(tmp_path, judge, capsys):
    files = write_sides(tmp_path)
    _, ollama, _ = compare(capsys, *files, flags=["--url", judge.url])
    code, openai, err = compare(capsys, *files, flags=[
        "--backend", "openai", "--model", "judge", "--url", judge.openai_url, "--workers", "3"])
    assert code == 0, err
    assert openai[0] == "Judge server running: True" and openai[1:] == ollama[1:]
    saved = [json.loads(line) for line in (tmp_path / "a-verdicts.jsonl").read_text().splitlines()]
    assert {r["judge"] for r in saved} == {"ollama/llama3", "openai/judge"}


def test_two_keys_of_one_file_are_compared(tmp_path, judge, capsys):
    data = [dict(entry, **{"model 2 response": other})
            for entry, (_, other) in zip(entries([a for a, _ in RESPONSES], "model 1 response"),
                                         RESPONSES, strict=True)]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(data))
    code, out, err = compare(capsys, str(path), flags=[
        "--json_key", "model 1 response", "model 2 response", "--url", judge.url])
    assert code == 0, err
    assert out[1].startswith("A = model 1 response, B = model 2 response: 6 entries in both")
    assert out[2] == "Wins, losses and ties of A over B: 3, 1, 2"


def test_replies_without_a_verdict_are_left_out_and_most_of_them_fail(tmp_path, judge, capsys):
    judge.pairwise_reply = lambda reference, a, b: "[[A]] or maybe [[B]]"
    code, out, err = compare(capsys, *write_sides(tmp_path), flags=["--url", judge.url])
    assert code == 1
    assert out.count("Could not convert score: [[A]] or maybe [[B]]") == 11  # each reply
    assert out[-3:] == ["Wins, losses and ties of A over B: 0, 0, 0",
                       "No verdict for 6 entries (a reply without a single [[A]], [[B]] or "
                       "[[C]]), left out",
                       "Win rate of A over B: n/a (no entry has a verdict)"]
    assert err.splitlines()[-1].startswith("Warning: 6 of 6 entries got a reply without a "
                                           "verdict")


def test_one_order_against_a_tie_is_inconsistent_and_less_one_sided():
    side = pairwise.Side("a", entries(["x"] * 4), "model_response")
    pairs = [(i, i) for i in range(4)]
    # per entry: the verdict with A first, with B first (points for the response shown first)
    lines, missing = pairwise.summary_lines(side, side, pairs, [1, 1, 0, None], [-1, 0, 1, 0])
    assert missing == 1
    assert lines[1:] == [
        "Wins, losses and ties of A over B: 1, 0, 2",
        "No verdict for 1 entry (a reply without a single [[A]], [[B]] or [[C]]), left out",
        f"Win rate of A over B: 66.7% (95% bootstrap interval [{bootstrap([1, 0.5, 0.5])[0]:.1%}"
        f", {bootstrap([1, 0.5, 0.5])[1]:.1%}]), ties counting half",
        "Inconsistent entries (the verdict changed with the order, counted as ties): 2 of 3",
        "Most one-sided entries:", "  entry 0, A in both orders: Task 0",
        "  entry 1, A in one order, a tie in the other: Task 1",
        "  entry 2, B in one order, a tie in the other: Task 2"]


@pytest.mark.parametrize("flags, message", [
    (["--file_path", "a.json"], "--pairwise compares two responses per entry: give two "
                                "--file_path, or one --file_path and two --json_key"),
    (["--file_path", "a.json", "b.json", "--plot", "p.png"],
     "--plot goes with scoring, not with --pairwise"),
    (["--file_path", "a.json", "b.json", "--prompt", "rubric"],
     "--prompt rubric goes with scoring, not with --pairwise"),
    (["--file_path", "a.json", "b.json", "--criterion", " "], "--criterion is empty"),
    (["--file_path", "a.json", "c.json"], "--file_path: no entry of"),
])
def test_bad_flags_and_files_get_one_error_line(tmp_path, capsys, monkeypatch, flags, message):
    write_sides(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "Other", "input": "",
                                                  "output": "x", "model_response": "y"}]))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(oe.main, ["--pairwise", *flags], capsys)
    assert code == 2
    assert_error(err, message)
    assert not (tmp_path / "a-verdicts.jsonl").exists()


def test_criterion_needs_pairwise(tmp_path, capsys):
    code, _, err = run_in_process(oe.main, ["--file_path", "a.json", "--criterion", "polite"],
                                  capsys)
    assert code == 2
    assert_error(err, "--criterion says what --pairwise compares; add --pairwise")


def test_a_judge_gone_away_keeps_the_verdicts_so_far(tmp_path, judge, capsys):
    judge.failures = [None, None, "drop"]
    code, _, err = compare(capsys, *write_sides(tmp_path), flags=["--url", judge.url,
                                                                  "--retries", "0"])
    store = tmp_path / "a-verdicts.jsonl"
    assert code == 1
    assert_error(err, f"Error: no answer from {judge.url}: ",
                 f". The verdicts so far are in {store}; run again to continue.")
    saved = [json.loads(line) for line in store.read_text().splitlines()]
    assert 2 <= len(saved) < 11 and all(r["score"] in (-1, 0, 1) for r in saved)


def test_sigterm_stops_with_the_verdicts_saved(tmp_path):
    slow = FakeJudge(delay=0.2)
    store = tmp_path / "a-verdicts.jsonl"
    try:
        process = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "ollama_evaluate.py"), "--pairwise",
             "--file_path", *write_sides(tmp_path), "--url", slow.url], cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not (store.exists() and store.read_text()):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        slow.close()
    assert process.returncode == 143
    assert err.splitlines()[-1] == (f"Stopped by SIGTERM. The verdicts so far are in {store}; "
                                    "run again to continue.")
    saved = [json.loads(line) for line in store.read_text().splitlines()]
    assert 1 <= len(saved) < 11 and all(r["score"] in (-1, 0, 1) for r in saved)
