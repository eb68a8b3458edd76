"""The judge's summary lines and plots (kit/judge_summary.py)."""

from kit.judge_prompts import JUDGE_PROMPTS
from kit.judge_summary import lowest_lines, plot_scores


def test_lowest_lines_name_the_entries_on_one_line_each():
    entries = [{"instruction": f"Task {i}"} for i in range(5)]
    entries[3]["instruction"] = "Rewrite\nthe sentence " + "y" * 60
    assert lowest_lines(entries, [40, None, 10, 10, 90]) == [
        "Lowest scores:", "  entry 2, score 10: Task 2",
        f"  entry 3, score 10: Rewrite the sentence {'y' * 39}...",
        "  entry 0, score 40: Task 0"]
    assert lowest_lines(entries, [None] * 5) == []


def test_rubric_histogram_has_one_bar_per_score(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr("matplotlib.axes.Axes.hist",
                        lambda ax, scores, bins, **kwargs: drawn.append((scores, list(bins))))
    plot_scores([(None, [5, 3, 1])], str(tmp_path / "scores.png"),
                   JUDGE_PROMPTS["rubric"])
    assert drawn == [([5, 3, 1], [0.5, 1.5, 2.5, 3.5, 4.5, 5.5])]
    assert (tmp_path / "scores.png").read_bytes().startswith(b"\x89PNG")
