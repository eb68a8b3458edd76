"""How far two judges agree (ollama_evaluate.py --agreement, kit/agreement.py): score files and
plain lists paired, the three correlations as scipy.stats computes them, the scatter plot."""

import json

import pytest
from helpers import assert_error, run_in_process, run_script
from scipy import stats

import ollama_evaluate as oe
from kit.judge_store import ScoreStore

X = [0, 50, 20, 100, 0, 100, 85, 100, 55, 30]  # two judges' scores of the same ten entries
Y = [10, 60, 40, 90, 20, 85, 85, 100, 35, 60]


def write_list(tmp_path, name, values):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return str(path)


def write_scores(tmp_path, name, judge_scores, instruction="Task {}"):
    """A score file as ollama_evaluate.py writes it: {judge: [score per entry]}."""
    store = ScoreStore(str(tmp_path / name))
    for judge, scores in judge_scores.items():
        for index, score in enumerate(scores):
            store.add(judge, f"{judge} {name} {index}", score, str(score), index,
                      instruction.format(index))
    return store.path


def agreement(capsys, *flags):
    code, out, err = run_in_process(oe.main, ["--agreement", *flags], capsys)
    return code, out.splitlines(), err


def expected_lines(xs, ys):
    return [f"Paired entries: {len(xs)}",
            f"Pearson's r:     {stats.pearsonr(xs, ys).statistic:.3f} "
            f"(p = {stats.pearsonr(xs, ys).pvalue:.2g})",
            f"Spearman's rho:  {stats.spearmanr(xs, ys).statistic:.3f} "
            f"(p = {stats.spearmanr(xs, ys).pvalue:.2g})",
            f"Kendall's tau-b: {stats.kendalltau(xs, ys).statistic:.3f} "
            f"(p = {stats.kendalltau(xs, ys).pvalue:.2g})"]


def test_two_plain_lists_give_scipys_correlations(tmp_path, capsys):
    x, y = write_list(tmp_path, "x.json", X), write_list(tmp_path, "y.json", Y)
    code, out, err = agreement(capsys, x, y)
    assert code == 0, err
    assert out == [f"X = {x}", f"Y = {y}", *expected_lines(X, Y)]
    assert out[3:] == ["Pearson's r:     0.928 (p = 0.0001)",
                       "Spearman's rho:  0.898 (p = 0.00042)",
                       "Kendall's tau-b: 0.786 (p = 0.0024)"]


def test_score_files_are_paired_by_entry(tmp_path, capsys):
    a = write_scores(tmp_path, "a-scores.jsonl", {"ollama/llama3": X})
    b = write_scores(tmp_path, "b-scores.jsonl", {"ollama/phi3": Y[:8] + [None, 5]})
    with open(b, "a") as f:  # a later score of entry 0 counts, another file's entry 3 does not
        f.write(json.dumps({"judge": "ollama/phi3", "prompt_sha256": "f" * 64, "index": 0,
                            "instruction": "Task 0", "score": 30, "reply": "30"}) + "\n")
        f.write(json.dumps({"judge": "ollama/phi3", "prompt_sha256": "e" * 64, "index": 3,
                            "instruction": "Another task", "score": 0, "reply": "0"}) + "\n")
    code, out, err = agreement(capsys, a, b)
    assert code == 0, err
    xs, ys = X[:8] + [X[9]], [30] + Y[1:8] + [5]
    assert out[2:] == expected_lines(xs, ys)  # entry 8 holds no score in b


def test_a_list_pairs_with_a_score_file_by_position(tmp_path, capsys):
    a = write_scores(tmp_path, "a-scores.jsonl", {"ollama/llama3": X[:6]})
    code, out, err = agreement(capsys, a, write_list(tmp_path, "y.json", Y))
    assert code == 0, err
    assert out[2:] == expected_lines(X[:6], Y[:6])


def test_a_file_of_several_judges_needs_one_named(tmp_path, capsys):
    both = write_scores(tmp_path, "scores.jsonl", {"ollama/llama3": X, "ollama/phi3": Y})
    code, _, err = agreement(capsys, both, both)
    assert code == 2
    assert_error(err, f"--agreement {both}: holds the scores of 2 judges (ollama/llama3, "
                      f"ollama/phi3); name one, as {both}#ollama/llama3")
    code, out, err = agreement(capsys, f"{both}#ollama/llama3", f"{both}#ollama/phi3")
    assert code == 0, err
    assert out[2:] == expected_lines(X, Y)
    code, _, err = agreement(capsys, f"{both}#ollama/gemma", both)
    assert_error(err, "holds no scores of judge ollama/gemma; it holds: ollama/llama3, "
                      "ollama/phi3")


def test_two_lists_of_different_lengths_are_refused_in_one_line(tmp_path, capsys):
    x, y = write_list(tmp_path, "x.json", X), write_list(tmp_path, "y.json", Y[:9])
    code, out, err = agreement(capsys, x, y)
    assert (code, out) == (2, [])
    assert_error(err, f"--agreement: {x} holds 10 scores and {y} 9; two lists pair by "
                      "position, so they must be of one length")


def test_plot_writes_the_scatter_with_its_fitted_line(tmp_path):
    x, y = write_list(tmp_path, "x.json", X), write_list(tmp_path, "y.json", Y)
    result = run_script("ollama_evaluate.py", "--agreement", x, y, "--plot", "agree.png",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "Scatter plot saved as agree.png"
    assert (tmp_path / "agree.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file


@pytest.mark.parametrize("first, second, message", [
    ("missing.json", "x.json", "--agreement missing.json: no such file"),
    ("words.json", "x.json", "--agreement words.json: item 1 is a string, not a number"),
    ("responses.json", "x.json", "--agreement responses.json: item 0 is an object, not a number"),
    ("notes.txt", "x.json", "--agreement notes.txt: holds no scores"),
    ("one-scores.jsonl", "x.json", "--agreement: one-scores.jsonl and x.json share 1 entry; a "
                                   "correlation needs two or more"),
])
def test_bad_sources_get_one_error_line(tmp_path, capsys, monkeypatch, first, second, message):
    monkeypatch.chdir(tmp_path)
    write_list(tmp_path, "x.json", X)
    write_list(tmp_path, "words.json", [1, "two"])
    write_list(tmp_path, "responses.json", [{"instruction": "Task 0"}])
    write_scores(tmp_path, "one-scores.jsonl", {"ollama/llama3": [80]})
    (tmp_path / "notes.txt").write_text("nothing\n")
    code, out, err = agreement(capsys, first, second)
    assert (code, out) == (2, [])
    assert_error(err, message)


def test_agreement_takes_no_file_path(tmp_path, capsys):
    x = write_list(tmp_path, "x.json", X)
    code, _, err = run_in_process(oe.main, ["--agreement", x, x, "--file_path", x], capsys)
    assert code == 2
    assert_error(err, "--agreement compares saved scores and asks no judge; drop --file_path")
