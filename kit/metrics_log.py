"""The metrics log (one CSV row per evaluation, appended as training goes, read back for the plot)
and the lines printed above the progress bar.
"""

import csv
import os

import matplotlib.pyplot as plt
import torch

from kit.files import DataError, WriteError, atomic_write, plural
from previous_chapters import plot_losses

METRICS_FIELDS = ("epoch", "step", "tokens_seen", "train_loss", "val_loss", "lr", "seconds")


COUNT_FIELDS = ("epoch", "step", "tokens_seen")  # whole numbers; the other columns are floats


def write_metrics_log(path, rows, fields=METRICS_FIELDS):
    """Write the metrics CSV at `path` whole: its header of `fields` and those of `rows`."""
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def rebuild_metrics_log(path, rows, fields=METRICS_FIELDS):
    """Rewrite a resumed run's metrics CSV from its checkpoint's `rows`, the evaluations of the
    weights it holds (rows logged after it belong to training that is done again). A missing
    or damaged file, whose curve the checkpoint restores, is said so in one line."""
    problem = None
    if not os.path.exists(path):
        problem = f"{path} was missing"
    else:
        try:
            read_metrics(path, fields)
        except DataError as exc:
            problem = str(exc)
    write_metrics_log(path, rows, fields)
    if problem is not None and rows:
        print(f"{problem}; rebuilt its {plural(len(rows), 'row')} from the checkpoint")


def append_metrics_row(path, row, fields=METRICS_FIELDS):
    """Append one evaluation's row (its `fields`) to the metrics CSV and flush it to disk; a
    failed write raises WriteError naming the file."""
    try:
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fields, extrasaction="ignore").writerow(row)
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror or str(exc), path) from exc


def read_metrics(path, fields=METRICS_FIELDS):
    """The rows of a metrics CSV with the columns `fields` as dicts of numbers. Raises
    DataError naming a damaged file (one cut short by a crash mid-line, too)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != tuple(fields):
                raise ValueError(f"expected the columns {', '.join(fields)}")
            rows = []
            for r in reader:
                if None in r or None in r.values():
                    raise ValueError(f"line {reader.line_num} does not have the "
                                     f"{len(fields)} columns")
                rows.append({name: int(r[name]) if name in COUNT_FIELDS else float(r[name])
                             for name in fields})
            return rows
    except (ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a metrics log of this script ({exc})") from None


def plot_losses_from_metrics(metrics_path, save_path="loss-plot.pdf"):
    """Draw the chapter's loss plot (`plot_losses`) from a metrics CSV, with the epochs axis
    the script gives it. Raises DataError naming a damaged or empty file."""
    rows = read_metrics(metrics_path)
    if not rows:
        raise DataError(f"{metrics_path}: holds no evaluation yet")
    epochs_seen = torch.linspace(0, rows[-1]["epoch"], len(rows))
    figure = plot_losses(epochs_seen, [row["tokens_seen"] for row in rows],
                         [row["train_loss"] for row in rows], [row["val_loss"] for row in rows],
                         save_path=save_path)
    plt.close(figure)  # saved: a script shows no figure, and runs in one process would pile up


class PrintAboveBar:
    """Stands in for stdout while a progress bar runs on stderr: each whole line printed is
    written after the bar is cleared, and the bar is drawn again below it. Both streams in one
    terminal then never share a line, and stdout carries exactly the printed lines."""

    def __init__(self, stream, hooks):
        self.stream = stream
        self.hooks = hooks
        self.pending = ""

    def write(self, text):
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            bar = self.hooks.bar
            if bar is not None:
                bar.clear()
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()
            if bar is not None:
                bar.refresh()
        return len(text)

    def flush(self):
        """Write what is left of an unfinished line."""
        if self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()
