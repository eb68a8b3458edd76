"""The judge's summary: the average, median and spread of a run's scores with a bootstrap
interval of the mean, its lowest-scored entries, the paired comparison of several runs, and
histograms of the scores.
"""

import contextlib
import importlib
import statistics
import sys
import threading
from collections import Counter

from kit.files import atomic_write, image_format
from kit.judge_client import one_line
from kit.judge_prompts import JUDGE_PROMPTS

LOWEST_SHOWN = 3  # the lowest-scored entries the summary names


def bootstrap_interval(values, resamples=10_000, seed=123):
    """The 95% bootstrap interval of the mean of `values`: percentiles 2.5 and 97.5 of the means
    of `resamples` resamples drawn with replacement by a seeded numpy Generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def count_lines(scores, num_entries, empty=0, style=JUDGE_PROMPTS["score"]):
    """How many replies counted, and how many empty responses got the lowest score unasked."""
    lines = [f"Number of scores: {len(scores)} of {num_entries}"]
    if empty:
        lines.append(f"{empty} empty response{'s' if empty > 1 else ''} scored {style.low} "
                     "without asking the judge")
    return lines


def summarize(scores, num_entries, style=JUDGE_PROMPTS["score"], empty=0):
    """The summary lines: how many replies counted (and empty responses), mean (with the scale
    named when it is the rubric's), median, spread, 95% interval."""
    lines = count_lines(scores, num_entries, empty, style)
    if not scores:
        return lines + ["Average score: n/a (no reply was a score)"]
    lines += [f"Average score: {statistics.mean(scores):.2f}{style.scale_note}",
              f"Median score: {statistics.median(scores):.2f}"]
    if len(scores) > 1:
        low, high = bootstrap_interval(scores)
        lines += [f"Standard deviation: {statistics.stdev(scores):.2f}",
                  f"95% bootstrap interval of the mean: [{low:.2f}, {high:.2f}]"]
    return lines


def lowest_lines(entries, scores, count=LOWEST_SHOWN):
    """The `count` lowest-scored entries, the answers worth reading first: index, score and
    instruction (on one line) of each, ties in entry order."""
    lowest = sorted((score, index) for index, score in enumerate(scores)
                    if score is not None)[:count]
    if not lowest:
        return []
    return ["Lowest scores:"] + [
        f"  entry {index}, score {score}: {one_line(entries[index]['instruction'], 60)}"
        for score, index in lowest]


def unparsed_warning(prompts, scores, store_path):
    """The warning when most replies of the judge (more than half of the non-empty responses'
    replies) hold no score: then the judge ignores the prompt's format and an average of the
    few that do would mislead. None otherwise."""
    replies = sum(p is not None for p in prompts)
    unparsed = sum(p is not None and s is None for p, s in zip(prompts, scores, strict=True))
    if unparsed * 2 <= replies:
        return None
    return (f"Warning: {unparsed} of {replies} replies of the judge hold no score, so it does not "
            "answer in the prompt's format and no average is given; the replies are in "
            f"{store_path}; try another --model or --prompt")


def keyed_scores(entries, scores):
    """{(instruction, input, output, occurrence): score} for the entries that have a score; the
    occurrence number tells apart entries that repeat the same instruction, input and output."""
    seen = Counter()
    keyed = {}
    for entry, score in zip(entries, scores, strict=True):
        key = (entry["instruction"], entry["input"], entry["output"])
        seen[key] += 1
        if score is not None:
            keyed[key + (seen[key],)] = score
    return keyed


def paired_differences(base_entries, base_scores, entries, scores):
    """Score minus base score for each entry scored in both, in the order of `entries`."""
    base = keyed_scores(base_entries, base_scores)
    return [score - base[key] for key, score in keyed_scores(entries, scores).items()
            if key in base]


def difference_line(label, base_label, differences):
    """'Difference b - a: +8.45 (95% bootstrap interval [5.10, 11.90]) over 110 entries'."""
    if not differences:
        return f"Difference {label} - {base_label}: n/a (no entry is scored in both)"
    low, high = bootstrap_interval(differences)
    noun = "entry" if len(differences) == 1 else "entries"
    return (f"Difference {label} - {base_label}: {statistics.mean(differences):+.2f} "
            f"(95% bootstrap interval [{low:.2f}, {high:.2f}]) over {len(differences)} {noun}")


def comparison_lines(header, runs, scores_per_run, style=JUDGE_PROMPTS["score"]):
    """The closing table: scores and average per run (the rubric's scale named in its
    heading), then each run's paired difference to the first."""
    width = max(len(header), *(len(run.label) for run in runs))
    scale = f" ({style.low}-{style.high})" if style.scale_note else ""
    lines = [f"{header:<{width}}  {'Scores':<12}  Average{scale}"]
    for run, scores in zip(runs, scores_per_run, strict=True):
        valid = [score for score in scores if score is not None]
        average = f"{statistics.mean(valid):.2f}" if valid else "n/a"
        lines.append(f"{run.label:<{width}}  {f'{len(valid)} of {len(scores)}':<12}  {average}")
    base = runs[0]
    for run, scores in zip(runs[1:], scores_per_run[1:], strict=True):
        differences = paired_differences(base.entries, scores_per_run[0], run.entries, scores)
        lines.append(difference_line(run.label, base.label, differences))
    return lines


def plot_scores(labeled_scores, path, style=JUDGE_PROMPTS["score"]):
    """Save one histogram per (label, scores), stacked, to `path` (format from its extension),
    with the bins of the prompt style's scale (5 points wide, or one bar per rubric score).

    matplotlib's Figure is used without pyplot, so no window system is needed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3 * len(labeled_scores)))
    axes = fig.subplots(len(labeled_scores), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, scores) in zip(axes, labeled_scores, strict=True):
        ax.hist(scores, bins=style.bins, edgecolor="black")
        ax.set_ylabel("Entries")
        if label:
            ax.set_title(label)
    axes[-1].set_xlabel("Score")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format=image_format(path, "png"))
    print(f"Histogram{'s' if len(labeled_scores) > 1 else ''} saved as {path}")


def report_run(run, prompts, scores, store_path, style):
    """Print one run's summary and its lowest-scored entries; when most replies hold no score,
    only its counts and the warning instead. Return whether it warned."""
    valid = [score for score in scores if score is not None]
    empty = prompts.count(None)
    warning = unparsed_warning(prompts, scores, store_path)
    if warning:
        print("\n".join(count_lines(valid, len(scores), empty, style)))
        print(warning, file=sys.stderr)
        return True
    print("\n".join(summarize(valid, len(scores), style, empty)
                    + lowest_lines(run.entries, scores)))
    return False


def preload(module):
    """Import `module` in a thread of its own: numpy, which only the summary needs, then loads
    while the judge is asked rather than after its last answer. A failure is left to the import
    that needs the module to report."""

    def load():
        with contextlib.suppress(ImportError):
            importlib.import_module(module)

    threading.Thread(target=load, daemon=True).start()  # a stop need not wait for it
