"""Knowing the data: find_near_duplicates.py and the finetuning script's overlap check, timed on
the chapter's 1,100 entries.

    python benchmarks/bench_data.py               # about a minute on 2 CPU cores
    python benchmarks/bench_data.py --repeats 1

Each command of find_near_duplicates.py runs in a fresh Python process, as a user runs it,
imports included (scikit-learn's, and PyTorch's for a --split); the median of --repeats runs.
The overlap check (kit/overlap.py) is timed in this process, as the finetuning script calls it
on the already loaded split. The pair counts are printed beside the times, so a table that
disagrees with the documented counts shows it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import SHARED_DATA, chapter_data, machine_line, median_seconds, table

from kit.overlap import overlap_counts, split_overlap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {  # row label -> arguments after the dataset
    "the whole file, the book's 3 fields": [],
    "test split against train split, prompt": ["--split", "test", "--against_split", "train",
                                               "--fields", "prompt"],
}


def run_tool(data_path, args):
    """(seconds, the last line printed) of one find_near_duplicates.py run."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(REPO, "find_near_duplicates.py"),
                             data_path, *args], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout.splitlines()[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (the median)")
    args = parser.parse_args()
    data_path = SHARED_DATA if os.path.exists(SHARED_DATA) else "instruction-data.json"
    rows = []
    for label, flags in COMMANDS.items():
        runs = [run_tool(data_path, flags) for _ in range(args.repeats)]
        found = runs[0][1].split(": ", 1)[1]
        rows.append([f"find_near_duplicates.py: {label}",
                     f"{statistics.median(seconds for seconds, _ in runs):.2f} s", found])
    split = chapter_data(data_path)
    seconds = median_seconds(lambda: split_overlap(*split), max(args.repeats, 20))
    counts = overlap_counts(split_overlap(*split))
    rows.append(["kit/overlap.py: exact repeats in test and validation",
                 f"{seconds * 1000:.1f} ms", f"test {counts['test']}, val {counts['val']}"])
    print(machine_line())
    print(table(["the chapter's 1,100 entries", "time", "pairs / entries found"], rows))


if __name__ == "__main__":
    main()
