"""End-to-end speed of ollama_evaluate.py against a judge that takes 0.1 s per answer.

    python benchmarks/bench_judge.py                  # about 20 s
    git show HEAD:ollama_evaluate.py > /tmp/old/ollama_evaluate.py
    python benchmarks/bench_judge.py --script /tmp/old/ollama_evaluate.py ollama_evaluate.py

The loopback judge of the tests (kit/loopback_judge.py, on 127.0.0.1) answers after `--delay`
seconds. The script runs as a subprocess, as a user runs it, on `--entries` entries with
`--workers 1` and with `--workers 4`: first with a fresh score file, so that every entry is
asked, then again on that file, so that every score is reused and nothing is asked (the
start-up cost alone). Prints a markdown table of the medians of `--repeats` runs, the speed-up
of 4 workers over 1, and whether all runs printed the same summary. Several `--script`s (say,
the committed version and the working copy) take turns within each repeat, so that a change in
the machine's load hits them alike, and share one table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kit.loopback_judge import FakeJudge  # noqa: E402


def write_entries(folder, count):
    """A test file of `count` entries whose responses the judge scores 0, 3, 6, ..."""
    entries = [{"instruction": f"Task {i}", "input": f"input {i}" if i % 2 else "",
                "output": f"output {i}", "model_response": f"response {i}"}
               for i in range(count)]
    path = os.path.join(folder, "responses.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path, {e["model_response"]: str(3 * i % 101) for i, e in enumerate(entries)}


def run_once(script, args, output):
    """Seconds for one run of the script, and its summary (stdout without the reuse line)."""
    env = {**os.environ, "PYTHONPATH": REPO}  # a copied older version finds the repo's modules
    start = time.perf_counter()
    result = subprocess.run([sys.executable, script, *args, "--output", output],
                            capture_output=True, text=True, env=env, check=True)
    seconds = time.perf_counter() - start
    summary = [line for line in result.stdout.splitlines()
               if not line.startswith(("Reusing", "Resuming"))]
    return seconds, summary


def measure(scripts, file_path, url, repeats, folder):
    """Per script and worker count: the median seconds of runs that ask every entry and of runs
    that reuse every score, and the summaries printed. Scripts and worker counts take turns
    within each repeat, so that a change in the machine's load hits all alike."""
    times = {(script, workers): ([], []) for script in scripts for workers in (1, 4)}
    summaries = set()
    for repeat in range(repeats):
        for index, ((script, workers), (fresh, reused)) in enumerate(times.items()):
            args = ["--file_path", file_path, "--url", url, "--workers", str(workers)]
            output = os.path.join(folder, f"scores-{index}-{repeat}.jsonl")
            seconds, summary = run_once(script, args, output)
            fresh.append(seconds)
            reused.append(run_once(script, args, output)[0])
            summaries.add(tuple(summary))
    medians = {key: (statistics.median(fresh), statistics.median(reused))
               for key, (fresh, reused) in times.items()}
    return medians, summaries


def main():
    """Start the judge, time the script, print the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", nargs="+", default=[os.path.join(REPO, "ollama_evaluate.py")],
                        help="the script(s) to time (default: the repo's ollama_evaluate.py)")
    parser.add_argument("--entries", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.1, help="the judge's seconds per answer")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path, answers = write_entries(folder, args.entries)
        judge = FakeJudge(answers, delay=args.delay)
        try:
            rows, summaries = measure(args.script, path, judge.url, args.repeats, folder)
        finally:
            judge.close()

    print(f"{args.entries} entries, judge delay {args.delay} s, median of {args.repeats} runs, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}\n")
    several = len(args.script) > 1
    print(f"| {'script | ' if several else ''}workers | all entries asked (s) | "
          "every score reused (s) |")
    print(f"|{'---|' if several else ''}---|---|---|")
    for (script, workers), (fresh, reused) in rows.items():
        print(f"| {f'{script} | ' if several else ''}{workers} | {fresh:.2f} | {reused:.2f} |")
    print()
    for script in args.script:
        speedup = rows[script, 1][0] / rows[script, 4][0]
        print(f"Speed-up of 4 workers over 1{f' ({script})' if several else ''}: {speedup:.2f}x")
    print(f"Same summary in every run: {'yes' if len(summaries) == 1 else 'NO'}")


if __name__ == "__main__":
    main()
