"""Score the finetuned model's test set responses 0-100 with a local LLM judge.

    ollama serve &  ollama pull llama3          # the judge, as in the chapter
    python ollama_evaluate.py --file_path instruction-data-with-response-standalone.json

The judge sees the chapter's prompt for each entry (instruction, input, correct output, the
model's response) and answers with a number; the script prints how many replies were scores and
their average, median, spread and a bootstrap interval. Every score is saved as it arrives, so
rerunning after an interruption asks only for the entries not yet scored. `--backend openai`
talks to any OpenAI-compatible server (llama.cpp server, vLLM, LM Studio) instead of Ollama.
"""

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from tqdm import tqdm

from instruction_data import DataError, format_input, load_json_entries
from script_utils import atomic_write

OLLAMA_URL = "http://localhost:11434/api/chat"
OPENAI_URL = "http://localhost:8000/v1/chat/completions"
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the chapter's deterministic judge


class JudgeError(RuntimeError):
    """The judge server could not be reached or did not answer."""


def request_body(prompt, model, backend):
    """The JSON body of one chat request: Ollama's /api/chat or OpenAI's chat completions."""
    messages = [{"role": "user", "content": prompt}]
    if backend == "openai":
        return {"model": model, "messages": messages, "temperature": 0, "seed": 123}
    return {"model": model, "messages": messages, "options": OPTIONS}


def read_reply(response, backend):
    """Return the reply text: Ollama streams JSON lines of `message.content` pieces until one
    says `done`; an OpenAI-compatible server returns one JSON object."""
    if backend == "openai":
        return json.loads(response.read())["choices"][0]["message"]["content"]
    pieces = []
    for line in response:
        if not line.strip():
            continue
        chunk = json.loads(line)
        pieces.append(chunk.get("message", {}).get("content", ""))
        if chunk.get("done"):
            break
    return "".join(pieces)


def query_model(prompt, model="llama3", url=OLLAMA_URL, backend="ollama", timeout=120,
                retries=3, backoff=1.0):
    """Send `prompt` to the judge at `url` and return its reply text.

    Connection errors and server errors (HTTP 5xx) are retried `retries` times, waiting
    backoff, 2 x backoff, ... seconds; other HTTP errors fail at once. Raises JudgeError.
    """
    data = json.dumps(request_body(prompt, model, backend)).encode("utf-8")
    attempt = 0
    while True:
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return read_reply(response, backend)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == retries:
                raise JudgeError(f"{url} answered HTTP {exc.code}: "
                                 f"{exc.read().decode('utf-8', 'replace').strip()}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            if attempt == retries:
                raise JudgeError(f"no answer from {url}: "
                                 f"{getattr(exc, 'reason', None) or exc!r}") from None
        time.sleep(backoff * 2**attempt)
        attempt += 1


def server_root(url):
    """scheme://host:port of a URL such as http://localhost:11434/api/chat."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def check_judge(url, model, backend="ollama", timeout=10):
    """Return None when the server at `url` answers and has `model`, else a one-line reason.

    The server itself is asked (Ollama's /api/tags, or /v1/models), so a judge in a container or
    on another machine counts as running.
    """
    root = server_root(url)
    listing = root + ("/v1/models" if backend == "openai" else "/api/tags")
    try:
        with urllib.request.urlopen(listing, timeout=timeout) as response:
            payload = json.loads(response.read())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if backend == "openai":
            return f"no OpenAI-compatible server answers at {root} ({reason})"
        return (f"Ollama is not running at {root} ({reason}); start it with 'ollama serve' "
                f"and get the judge with 'ollama pull {model}'")
    if backend == "openai":
        names = {m.get("id") for m in payload.get("data", [])}
    else:
        names = {m.get("name") for m in payload.get("models", [])}
    if model in names or f"{model}:latest" in names:
        return None
    if backend == "openai":
        return f"model '{model}' is not served at {root}; it serves: {', '.join(sorted(names))}"
    return (f"model '{model}' is not available on the Ollama server at {root}; "
            f"run: ollama pull {model}")


def judge_prompt(entry, json_key):
    """The chapter's scoring prompt for one entry."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
            f"score the model response `{entry[json_key]}` on a scale from 0 to 100, where 100 "
            "is the best score. Respond with the integer number only.")


def parse_score(reply):
    """Return the score in the judge's reply, or None when the reply holds none.

    The score is the first number in the reply when that number is an integer from 0 to 100:
    "85", "Score: 90/100", "I'd rate it 85 out of 100." and "**72**" are scores; "85.5", "150",
    "-3" and "N/A" are not.
    """
    match = re.search(r"-?\d+(?:\.\d+)?", reply)
    if match is None or not re.fullmatch(r"\d+", match.group()):
        return None
    score = int(match.group())
    return score if score <= 100 else None


def score_entry(entry, json_key, model, url, **query_options):
    """Return (score or None, the judge's raw reply); an empty response scores 0 unasked."""
    if not entry[json_key].strip():
        return 0, ""
    reply = query_model(judge_prompt(entry, json_key), model, url, **query_options)
    return parse_score(reply), reply


def generate_model_scores(json_data, json_key, model="llama3", url=OLLAMA_URL, workers=1,
                          done=None, on_record=None, **query_options):
    """Score every entry with the judge and return the scores, in entry order.

    Replies that are not scores are reported and left out. `workers` requests run at once
    (Ollama serves several with OLLAMA_NUM_PARALLEL); the result does not depend on it.
    `done` maps entry index -> record of entries scored before, which are not asked again;
    `on_record(record)` receives each new {"index", "score", "reply"} as it arrives.
    """
    records = dict(done or {})
    todo = [i for i in range(len(json_data)) if i not in records]
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(json_data), initial=len(records), desc="Scoring entries") as bar:
        futures = {pool.submit(score_entry, json_data[i], json_key, model, url,
                               **query_options): i for i in todo}
        try:
            for future in as_completed(futures):
                score, reply = future.result()
                record = {"index": futures[future], "score": score, "reply": reply}
                records[record["index"]] = record
                if on_record is not None:
                    on_record(record)
                if score is None:
                    tqdm.write(f"Could not convert score: {reply}")
                bar.update()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [records[i]["score"] for i in range(len(json_data))
            if records[i]["score"] is not None]


def load_records(path, num_entries):
    """Read the scores saved by an earlier run: index -> record. A line cut short by a kill is
    dropped, and the file is rewritten without it so that new records start on a fresh line."""
    if not os.path.exists(path):
        return {}
    records = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("index") in range(num_entries):
                records[record["index"]] = record
    with atomic_write(path, "w") as f:
        for index in sorted(records):
            f.write(json.dumps(records[index]) + "\n")
    return records


def summarize(scores, num_entries):
    """The summary lines: how many replies counted, mean, median, spread, 95% interval."""
    lines = [f"Number of scores: {len(scores)} of {num_entries}"]
    if not scores:
        return lines + ["Average score: n/a (no reply was a score)"]
    lines += [f"Average score: {statistics.mean(scores):.2f}",
              f"Median score: {statistics.median(scores):.2f}"]
    if len(scores) > 1:
        rng = np.random.default_rng(123)
        means = rng.choice(scores, size=(10_000, len(scores)), replace=True).mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        lines += [f"Standard deviation: {statistics.stdev(scores):.2f}",
                  f"95% bootstrap interval of the mean: [{low:.2f}, {high:.2f}]"]
    return lines


def plot_scores(scores, path):
    """Save a histogram of the scores to `path` (format from its extension)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(scores, bins=range(0, 105, 5), edgecolor="black")
    ax.set_xlabel("Score")
    ax.set_ylabel("Entries")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format=os.path.splitext(path)[1].lstrip(".") or "png")
    plt.close(fig)
    print(f"Histogram saved as {path}")


def default_output(file_path):
    """responses.json -> responses-scores.jsonl, beside the input."""
    return os.path.splitext(file_path)[0] + "-scores.jsonl"


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file_path", required=True,
                        help="JSON file of test entries with the model's responses")
    parser.add_argument("--model", default="llama3", help="judge model (default: llama3)")
    parser.add_argument("--url", default=None,
                        help=f"the judge's chat endpoint (default: {OLLAMA_URL}; with "
                             f"--backend openai: {OPENAI_URL})")
    parser.add_argument("--backend", default="ollama", choices=["ollama", "openai"],
                        help="ollama, or openai for any OpenAI-compatible server")
    parser.add_argument("--json_key", default="model_response",
                        help="field that holds the response to score (default: model_response)")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds to wait for one reply (default: 120)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries after a connection or server error, with growing waits "
                             "(default: 3)")
    parser.add_argument("--workers", type=int, default=1,
                        help="requests in flight at once (default: 1)")
    parser.add_argument("--output", default=None,
                        help="where each score is saved as it arrives (default: the input name "
                             "with -scores.jsonl)")
    parser.add_argument("--plot", default=None, help="save a histogram of the scores here")
    return parser


def main(argv=None):
    """Check the judge, score every entry, print the summary. Exit 2 on bad input, 1 when the
    judge is down or fails."""
    args = build_parser().parse_args(argv)
    url = args.url or (OPENAI_URL if args.backend == "openai" else OLLAMA_URL)
    try:
        data = load_json_entries(args.file_path,
                                 fields=("instruction", "input", "output", args.json_key))
    except DataError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    problem = check_judge(url, args.model, args.backend)
    if problem is not None:
        print(f"Error: {problem}", file=sys.stderr)
        raise SystemExit(1)
    print(f"{'Ollama' if args.backend == 'ollama' else 'Judge server'} running: True")

    output = args.output or default_output(args.file_path)
    done = load_records(output, len(data))
    if done:
        print(f"Resuming: {len(done)} of {len(data)} entries already scored in {output}")
    with open(output, "a", encoding="utf-8") as out:
        def save(record):
            out.write(json.dumps(record) + "\n")
            out.flush()

        try:
            scores = generate_model_scores(
                data, args.json_key, args.model, url, workers=args.workers, done=done,
                on_record=save, backend=args.backend, timeout=args.timeout,
                retries=args.retries)
        except JudgeError as exc:
            print(f"Error: {exc}. The scores so far are in {output}; run again to continue.",
                  file=sys.stderr)
            raise SystemExit(1) from None
    print("\n".join(summarize(scores, len(data))))
    if args.plot and scores:
        plot_scores(scores, args.plot)


if __name__ == "__main__":
    main()
