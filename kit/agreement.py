"""How far two judges agree: the correlation of their scores of the same entries
(ollama_evaluate.py --agreement X Y), as the book's ch07/03_model-evaluation measures it.

Each of X and Y is either a score file of ollama_evaluate.py (JSON lines, one reply each) or a
plain JSON list of numbers, such as the book's score lists. A score file may hold several
judges' scores: X names one as FILE#JUDGE (a-scores.jsonl#ollama/phi3), and a file of one
judge needs no name. Two score files are paired by entry (its index and instruction), the
latest score of each entry counting; two lists are paired by position, so lists of different
lengths are refused (which entry lacks its score cannot be told); a list and a score file pair
item i with entry i. The output is the number of pairs and Pearson's r (linear agreement of the
values), Spearman's rho (agreement of the rankings) and Kendall's tau-b (the share of entry
pairs both judges order alike, minus the share they order oppositely, ties accounted for),
each with its p-value, from scipy.stats; `--plot` saves a scatter plot with the fitted line.
"""

import json
import math
import os
import warnings
from collections import namedtuple

from kit.files import WriteError, atomic_write, fail, image_format
from kit.judge_store import ScoreStore

Source = namedtuple("Source", "label scores is_list")  # scores: {entry key: score}
JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "true or false",
              type(None): "null"}  # what a list item that is no number is, in an error


def split_source(spec):
    """(path, judge or None) of an --agreement value: a file, or FILE#JUDGE."""
    if os.path.isfile(spec):
        return spec, None
    path, _, judge = spec.rpartition("#")
    if path and os.path.isfile(path):
        return path, judge
    fail(f"--agreement {spec}: no such file; give a score file (FILE, or FILE#JUDGE) or a JSON "
         "list of numbers")


def plain_list(spec, path):
    """The numbers of a file holding one JSON list, else None (a score file's lines are no
    list). Exits on a list that holds something other than a finite number."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (ValueError, RecursionError):
        return None
    except OSError as exc:
        fail(f"--agreement {spec}: cannot be read ({exc.strerror or exc})")
    if not isinstance(values, list):
        return None
    for index, value in enumerate(values):
        if type(value) not in (int, float) or not math.isfinite(value):
            what = JSON_KINDS.get(type(value), repr(value))
            fail(f"--agreement {spec}: item {index} is {what}, not a number; give a JSON list "
                 "of scores or a score file")
    return values


def judge_scores(spec, path, judge):
    """{(index, instruction): score} of one judge in a score file, the latest line of each
    entry counting. Exits when the file holds no scores, or several judges' and none is named."""
    try:
        records = [r for r in ScoreStore(path).records.values()
                   if type(r.get("index")) is int and isinstance(r.get("instruction"), str)
                   and r["score"] is not None]
    except OSError as exc:
        fail(f"--agreement {spec}: cannot be read ({exc.strerror or exc})")
    judges = sorted({r["judge"] for r in records})
    if not judges:
        fail(f"--agreement {spec}: holds no scores; give a score file of ollama_evaluate.py "
             "or a JSON list of numbers")
    if judge is None and len(judges) > 1:
        fail(f"--agreement {spec}: holds the scores of {len(judges)} judges "
             f"({', '.join(judges)}); name one, as {path}#{judges[0]}")
    if judge is not None and judge not in judges:
        fail(f"--agreement {spec}: holds no scores of judge {judge}; it holds: "
             f"{', '.join(judges)}")
    judge = judge or judges[0]
    return {(r["index"], r["instruction"]): r["score"] for r in records if r["judge"] == judge}


def read_source(spec):
    """One side of --agreement: a plain list ({position: number}) or one judge's scores."""
    path, judge = split_source(spec)
    values = plain_list(spec, path) if judge is None else None
    if values is not None:
        return Source(spec, {(index, None): value for index, value in enumerate(values)}, True)
    return Source(spec, judge_scores(spec, path, judge), False)


def paired_scores(x, y):
    """The two sources' scores of the entries both hold, in entry order: by index and
    instruction between score files, by index where one is a list. Exits when two lists differ
    in length."""
    if x.is_list and y.is_list and len(x.scores) != len(y.scores):
        fail(f"--agreement: {x.label} holds {len(x.scores)} score"
             f"{'s' * (len(x.scores) != 1)} and {y.label} {len(y.scores)}; two lists pair by "
             "position, so they must be of one length")
    if x.is_list or y.is_list:
        x_scores, y_scores = ({index: s for (index, _), s in source.scores.items()}
                              for source in (x, y))
    else:
        x_scores, y_scores = x.scores, y.scores
    keys = sorted(key for key in x_scores if key in y_scores)
    return [x_scores[key] for key in keys], [y_scores[key] for key in keys]


def correlations(xs, ys):
    """[(name, coefficient, p-value)] of Pearson's r, Spearman's rho and Kendall's tau-b, by
    scipy.stats; NaN where they are undefined (a constant list, fewer than two pairs)."""
    from scipy import stats

    tests = (("Pearson's r", stats.pearsonr), ("Spearman's rho", stats.spearmanr),
             ("Kendall's tau-b", stats.kendalltau))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant list: the result says NaN
        results = [(name, test(xs, ys)) for name, test in tests]
    return [(name, float(result.statistic), float(result.pvalue)) for name, result in results]


def correlation_lines(xs, ys):
    """The printed result: the number of pairs, then each correlation with its p-value."""
    lines = [f"Paired entries: {len(xs)}"]
    for name, value, p in correlations(xs, ys):
        lines.append(f"{name + ':':<16} n/a (a constant list)" if math.isnan(value) else
                     f"{name + ':':<16} {value:.3f} (p = {p:.2g})")
    return lines


def plot_agreement(xs, ys, x_label, y_label, path):
    """Save a scatter plot of the paired scores with the least-squares line (scipy.stats
    linregress) to `path`, format from its extension. matplotlib's Figure is used without
    pyplot, so no window system is needed."""
    import numpy as np
    from matplotlib.figure import Figure
    from scipy import stats

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.scatter(xs, ys, alpha=0.6)
    if len(set(xs)) > 1:
        fit = stats.linregress(xs, ys)
        line = np.array([min(xs), max(xs)])
        ax.plot(line, fit.intercept + fit.slope * line, color="black",
                label=f"y = {fit.slope:.2f} x + {fit.intercept:.2f}")
        ax.legend()
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format=image_format(path, "png"))


def run(specs, plot=None):
    """--agreement X Y: read both, pair them, print the correlations; save the scatter plot
    when `plot` names a file. Exits with one Error line on bad input."""
    x, y = (read_source(spec) for spec in specs)
    xs, ys = paired_scores(x, y)
    if len(xs) < 2:
        fail(f"--agreement: {x.label} and {y.label} share {len(xs)} entr"
             f"{'y' if len(xs) == 1 else 'ies'}; a correlation needs two or more (are they "
             "scores of the same responses file?)")
    print(f"X = {x.label}\nY = {y.label}")
    print("\n".join(correlation_lines(xs, ys)))
    if plot:
        try:
            plot_agreement(xs, ys, x.label, y.label, plot)
        except WriteError as exc:
            fail(f"could not write {plot} ({exc.strerror or exc}); free space and rerun", code=1)
        print(f"Scatter plot saved as {plot}")
