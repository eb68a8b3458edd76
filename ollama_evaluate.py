"""Score the finetuned model's test set responses 0-100 with a local LLM judge.

    ollama serve &  ollama pull llama3          # the judge, as in the chapter
    python ollama_evaluate.py --file_path instruction-data-with-response-standalone.json

The judge sees the chapter's prompt for each entry (instruction, input, correct output, the
model's response) and answers with a number; the script prints how many replies were scores and
their average, median, spread and a bootstrap interval. `--backend openai` talks to any
OpenAI-compatible server (llama.cpp server, vLLM, LM Studio) instead of Ollama. A warning
counts the prompts that may be longer than the judge's context (num_ctx 2048 tokens, estimated
from their length), which Ollama cuts without saying so.

Every reply is saved as it arrives, one JSON line naming the judge (backend/model) and the
SHA-256 of the exact prompt sent, in <input>-scores.jsonl beside the input (or --output). A rerun
reuses a saved score only when both match: an interrupted run continues where it stopped, while
new responses (a new finetuning run) or another judge (--model phi3) are asked again. Lines are
only ever appended, so earlier judges' scores stay on disk, and the summary counts only the
current judge's scores for the current responses.

Compare runs by giving several files (each with its own score file, or all in one --output)
or several keys of one file (the book's model-evaluation data: --json_key "model 1 response"
"model 2 response"). Each is scored by the same judge, and a table ends the output: the number
of scores and average per file or key, and for each one after the first its paired difference
to the first over the entries both scored (matched by instruction, input and output), with a
95% bootstrap interval.
"""

import argparse
import hashlib
import http.client
import json
import math
import os
import re
import socket
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter, namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial

from tqdm import tqdm

from instruction_data import DataError, format_input, load_json_entries
from script_utils import atomic_write, fail

OLLAMA_URL = "http://localhost:11434/api/chat"
OPENAI_URL = "http://localhost:8000/v1/chat/completions"
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the chapter's deterministic judge
CHARS_PER_TOKEN = 3  # English averages about 4 characters per token; 3 errs towards warning
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)

_connections = threading.local()  # each thread's open connections, by (scheme, host:port)


class JudgeError(RuntimeError):
    """The judge server could not be reached or did not answer."""


def open_connection(parts):
    """This thread's connection to the server in `parts` (a urlsplit result), made once and
    kept open between requests, so that a request costs no connection set-up."""
    pool = _connections.__dict__.setdefault("pool", {})
    key = (parts.scheme, parts.netloc)
    if key not in pool:
        https = parts.scheme == "https"
        pool[key] = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
            parts.netloc)
    return pool[key]


def http_request(method, url, payload=None, timeout=120):
    """Send one request (with `payload` as a JSON body) and return (HTTP status, body bytes).

    The connection sends small writes at once (TCP_NODELAY): http.client writes the headers and
    the body separately, and without it the body waits for the server's delayed ACK (40 ms on
    Linux). A kept-open connection that the server closed while idle is reopened once at once;
    other connection errors are raised (OSError or http.client.HTTPException).
    """
    parts = urllib.parse.urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {} if body is None else {"Content-Type": "application/json"}
    while True:
        connection = open_connection(parts)
        connection.timeout = timeout
        reused = connection.sock is not None
        try:
            if reused:
                connection.sock.settimeout(timeout)
            else:
                connection.connect()
                connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if not (reused and isinstance(exc, STALE_CONNECTION)):
                raise


def request_body(prompt, model, backend):
    """The JSON body of one chat request: Ollama's /api/chat or OpenAI's chat completions."""
    messages = [{"role": "user", "content": prompt}]
    if backend == "openai":
        return {"model": model, "messages": messages, "temperature": 0, "seed": 123}
    return {"model": model, "messages": messages, "options": OPTIONS}


def read_reply(data, backend):
    """Return the reply text: Ollama streams JSON lines of `message.content` pieces until one
    says `done`; an OpenAI-compatible server returns one JSON object. Raises ValueError when the
    data is no reply, such as Ollama's {"error": ...} line after a failure mid-stream (which
    would otherwise be saved as a reply without a score)."""
    if backend == "openai":
        return json.loads(data)["choices"][0]["message"]["content"]
    pieces = []
    for line in data.splitlines():
        if not line.strip():
            continue
        chunk = json.loads(line)
        if "error" in chunk:
            raise ValueError(chunk["error"])
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
    body = request_body(prompt, model, backend)
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            status, data = http_request("POST", url, body, timeout)
        except (OSError, http.client.HTTPException) as exc:
            problem = f"no answer from {url}: {str(exc) or type(exc).__name__}"
            continue
        if status >= 300:
            problem = f"{url} answered HTTP {status}: {data.decode('utf-8', 'replace').strip()}"
            if status < 500:
                break
            continue
        try:
            return read_reply(data, backend)
        except (ValueError, LookupError, TypeError, AttributeError):
            raise JudgeError(f"{url} sent a reply that is not a chat answer: "
                             f"{data[:200].decode('utf-8', 'replace')}") from None
    raise JudgeError(problem)


def server_root(url):
    """scheme://host:port of a URL such as http://localhost:11434/api/chat."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def served_models(root, backend, timeout):
    """The model names the server at `root` lists (Ollama's /api/tags, or /v1/models)."""
    status, data = http_request("GET", root + ("/v1/models" if backend == "openai"
                                               else "/api/tags"), timeout=timeout)
    if status != 200:
        raise ValueError(f"HTTP {status}")
    payload = json.loads(data)
    if backend == "openai":
        return {m.get("id") for m in payload.get("data", [])}
    return {m.get("name") for m in payload.get("models", [])}


def check_judge(url, model, backend="ollama", timeout=10):
    """Return None when the server at `url` answers and has `model`, else a one-line reason.

    The server itself is asked, so a judge in a container or on another machine counts as
    running.
    """
    root = server_root(url)
    try:
        names = served_models(root, backend, timeout)
    except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
        reason = str(exc) or type(exc).__name__
        if backend == "openai":
            return f"no OpenAI-compatible server answers at {root} ({reason})"
        return (f"Ollama is not running at {root} ({reason}); start it with 'ollama serve' "
                f"and get the judge with 'ollama pull {model}'")
    if model in names or f"{model}:latest" in names:
        return None
    if backend == "openai":
        return f"model '{model}' is not served at {root}; it serves: {', '.join(sorted(names))}"
    return (f"model '{model}' is not available on the Ollama server at {root}; "
            f"run: ollama pull {model}")


def judge_name(backend, model):
    """The judge as the score files name it, wherever it is served: "ollama/llama3" (Ollama's
    "llama3:latest" is the same model as "llama3")."""
    if backend == "ollama" and model.endswith(":latest"):
        model = model[:-len(":latest")]
    return f"{backend}/{model}"


def judge_prompt(entry, json_key):
    """The chapter's scoring prompt for one entry."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
            f"score the model response `{entry[json_key]}` on a scale from 0 to 100, where 100 "
            "is the best score. Respond with the integer number only.")


def entry_prompts(json_data, json_key):
    """The judge's prompt for each entry; None where the response is empty (it scores 0)."""
    return [judge_prompt(entry, json_key) if entry[json_key].strip() else None
            for entry in json_data]


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


def prompt_sha256(prompt):
    """The hex SHA-256 of a prompt: what a saved score was the answer to."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class ScoreStore:
    """The judge's replies, one JSON line each: {"judge", "prompt_sha256", "score", "reply"}.

    Lines are only ever appended, so a run that is stopped keeps every reply that arrived and
    earlier judges' replies stay on disk. A last line cut short by a kill is skipped. With
    `path` None the replies are kept in memory only.
    """

    def __init__(self, path=None):
        self.path = path
        self.records = {}
        self.needs_newline = False  # the file ends in a line cut short
        if path is not None and os.path.exists(path):
            with open(path, "rb") as f:
                content = f.read()
            self.needs_newline = bool(content) and not content.endswith(b"\n")
            for line in content.splitlines():
                self.remember(line)

    def remember(self, line):
        """Index one saved line by (judge, prompt hash); lines that are not records are skipped."""
        try:
            record = json.loads(line)
        except ValueError:
            return
        if (isinstance(record, dict) and isinstance(record.get("judge"), str)
                and isinstance(record.get("prompt_sha256"), str)
                and (record.get("score") is None or type(record.get("score")) is int)):
            self.records[record["judge"], record["prompt_sha256"]] = record

    def find(self, judge, prompt):
        """The saved record of `judge` answering exactly `prompt`, or None."""
        return self.records.get((judge, prompt_sha256(prompt)))

    def add(self, judge, prompt, score, reply):
        """Save one reply, appended and flushed at once."""
        record = {"judge": judge, "prompt_sha256": prompt_sha256(prompt), "score": score,
                  "reply": reply}
        self.records[judge, record["prompt_sha256"]] = record
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n" * self.needs_newline + json.dumps(record) + "\n")
            self.needs_newline = False


def cancel(futures):
    """Cancel the futures not yet started. (Unlike shutdown(cancel_futures=True), this lets the
    pool's threads mark each as done, so that as_completed still yields them.)"""
    for future in futures:
        future.cancel()


def score_prompts(prompts, judge, ask, workers=1, store=None):
    """Return the score for each prompt: None where the reply held no score, 0 for a None
    prompt (an empty response, not asked).

    Only prompts without a saved reply of `judge` in `store` are asked, each once, by `workers`
    threads calling `ask(prompt)` (Ollama serves several at once with OLLAMA_NUM_PARALLEL); each
    reply is saved as it arrives. The result does not depend on `workers`. When a request fails
    no more are sent, the replies to those in flight are still saved, and the error is raised.
    """
    store = ScoreStore() if store is None else store
    todo = Counter(p for p in prompts if p is not None and store.find(judge, p) is None)
    error = None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(ask, prompt): prompt for prompt in todo}
        with tqdm(total=len(prompts), initial=len(prompts) - todo.total(),
                  desc="Scoring entries") as bar:
            try:
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        error = error or future.exception()
                        cancel(futures)
                        continue
                    reply = future.result()
                    score = parse_score(reply)
                    store.add(judge, futures[future], score, reply)
                    if score is None:
                        tqdm.write(f"Could not convert score: {reply}")
                    bar.update(todo[futures[future]])
            except BaseException:  # Ctrl-C: send no more requests
                cancel(futures)
                raise
    if error is not None:
        raise error
    return [0 if p is None else store.find(judge, p)["score"] for p in prompts]


def generate_model_scores(json_data, json_key, model="llama3", url=OLLAMA_URL, workers=1,
                          store=None, backend="ollama", **query_options):
    """Score every entry's `json_key` response with the judge and return the scores, in entry
    order (the book's function). Replies that are not scores are reported and left out.
    `store` (a ScoreStore) reuses and keeps this judge's replies; `query_options` go to
    query_model (timeout, retries, backoff)."""
    ask = partial(query_model, model=model, url=url, backend=backend, **query_options)
    scores = score_prompts(entry_prompts(json_data, json_key), judge_name(backend, model), ask,
                           workers, store)
    return [score for score in scores if score is not None]


def bootstrap_interval(values, resamples=10_000, seed=123):
    """The 95% bootstrap interval of the mean of `values`: percentiles 2.5 and 97.5 of the means
    of `resamples` resamples drawn with replacement by a seeded numpy Generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(scores, num_entries):
    """The summary lines: how many replies counted, mean, median, spread, 95% interval."""
    lines = [f"Number of scores: {len(scores)} of {num_entries}"]
    if not scores:
        return lines + ["Average score: n/a (no reply was a score)"]
    lines += [f"Average score: {statistics.mean(scores):.2f}",
              f"Median score: {statistics.median(scores):.2f}"]
    if len(scores) > 1:
        low, high = bootstrap_interval(scores)
        lines += [f"Standard deviation: {statistics.stdev(scores):.2f}",
                  f"95% bootstrap interval of the mean: [{low:.2f}, {high:.2f}]"]
    return lines


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


def comparison_lines(header, runs, scores_per_run):
    """The closing table: scores and average per run, then each run's paired difference to
    the first."""
    width = max(len(header), *(len(run.label) for run in runs))
    lines = [f"{header:<{width}}  {'Scores':<12}  Average"]
    for run, scores in zip(runs, scores_per_run, strict=True):
        valid = [score for score in scores if score is not None]
        average = f"{statistics.mean(valid):.2f}" if valid else "n/a"
        lines.append(f"{run.label:<{width}}  {f'{len(valid)} of {len(scores)}':<12}  {average}")
    base = runs[0]
    for run, scores in zip(runs[1:], scores_per_run[1:], strict=True):
        differences = paired_differences(base.entries, scores_per_run[0], run.entries, scores)
        lines.append(difference_line(run.label, base.label, differences))
    return lines


def plot_scores(labeled_scores, path):
    """Save one histogram per (label, scores), stacked, to `path` (format from its extension).

    matplotlib's Figure is used without pyplot, so no window system is needed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3 * len(labeled_scores)))
    axes = fig.subplots(len(labeled_scores), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, scores) in zip(axes, labeled_scores, strict=True):
        ax.hist(scores, bins=range(0, 105, 5), edgecolor="black")
        ax.set_ylabel("Entries")
        if label:
            ax.set_title(label)
    axes[-1].set_xlabel("Score")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format=image_format(path))
    print(f"Histogram{'s' if len(labeled_scores) > 1 else ''} saved as {path}")


def image_format(path):
    """The image format named by the extension of `path` ("png" when there is none)."""
    return os.path.splitext(path)[1].lstrip(".").lower() or "png"


def default_output(file_path):
    """responses.json -> responses-scores.jsonl, beside the input."""
    return os.path.splitext(file_path)[0] + "-scores.jsonl"


def build_parser():
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file_path", required=True, nargs="+",
                        help="JSON file of test entries with the model's responses; several "
                             "files are compared")
    parser.add_argument("--model", default="llama3", help="judge model (default: llama3)")
    parser.add_argument("--url", default=None,
                        help=f"the judge's chat endpoint (default: {OLLAMA_URL}; with "
                             f"--backend openai: {OPENAI_URL})")
    parser.add_argument("--backend", default="ollama", choices=["ollama", "openai"],
                        help="ollama, or openai for any OpenAI-compatible server")
    parser.add_argument("--json_key", default=["model_response"], nargs="+",
                        help="field that holds the response to score (default: model_response); "
                             "several keys of one file are compared")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds to wait for one reply (default: 120)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries after a connection or server error, with growing waits "
                             "(default: 3)")
    parser.add_argument("--workers", type=int, default=1,
                        help="requests in flight at once (default: 1)")
    parser.add_argument("--output", default=None,
                        help="JSON-lines file where each reply is saved as it arrives and "
                             "reused from (default: beside each input, its name with "
                             "-scores.jsonl); one file can hold any files, keys and judges")
    parser.add_argument("--plot", default=None,
                        help="save a histogram of the scores here, one per file or key "
                             "(format from the extension: .png, .pdf, .svg, ...)")
    return parser


def check_writable(flag, path):
    """Exit with one Error line unless a file can be written at `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a folder, not a file")
    if not os.path.isdir(folder):
        fail(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        fail(f"{flag} {path}: cannot be written")


def check_flags(args):
    """Exit with one Error line naming the flag when a flag's value cannot work."""
    if args.workers < 1:
        fail(f"--workers must be at least 1, got {args.workers}")
    if not 0 < args.timeout < math.inf:
        fail(f"--timeout must be a number of seconds above 0, got {args.timeout:g}")
    if args.retries < 0:
        fail(f"--retries must be 0 or more, got {args.retries}")
    if len(args.file_path) > 1 and len(args.json_key) > 1:
        fail("compare several --file_path or several --json_key, not both at once")
    if args.url is not None:
        parts = urllib.parse.urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            fail(f"--url {args.url}: expected http://host:port/path")
    if args.plot is not None:
        check_writable("--plot", args.plot)
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if image_format(args.plot) not in formats:
            fail(f"--plot {args.plot}: unknown image format '{image_format(args.plot)}'; "
                 f"use one of {', '.join(sorted(formats))}")


Run = namedtuple("Run", "label entries key store_path")  # one file's responses under one key


def load_runs(args):
    """The files and keys to score, checked: one Run per file or key. Exits on bad input."""
    runs = []
    for file_path in args.file_path:
        try:
            entries = load_json_entries(file_path,
                                        fields=("instruction", "input", "output", *args.json_key))
        except DataError as exc:
            fail(str(exc))
        store_path = args.output or default_output(file_path)
        check_writable("--output" if args.output else "score file", store_path)
        for key in args.json_key:
            runs.append(Run(file_path if len(args.file_path) > 1 else key, entries, key,
                            store_path))
    return runs


def warn_long_prompts(prompts):
    """Print one warning when prompts may exceed Ollama's num_ctx, which Ollama cuts without
    telling the client. Length in tokens is estimated from characters (no tokenizer needed)."""
    limit = OPTIONS["num_ctx"]
    long = sum(p is not None and len(p) > limit * CHARS_PER_TOKEN for p in prompts)
    if long:
        print(f"Warning: {long} of {len(prompts)} prompts may be longer than the judge's "
              f"{limit}-token context (num_ctx, estimated from their length); Ollama cuts "
              "them without saying so, so those entries may be scored on a cut prompt",
              file=sys.stderr)


def score_run(run, store, judge, ask, workers, backend):
    """Score one run's entries, saying first what is reused; return the score per entry."""
    prompts = entry_prompts(run.entries, run.key)
    if backend == "ollama":
        warn_long_prompts(prompts)
    if store.records:
        reused = sum(p is not None and store.find(judge, p) is not None for p in prompts)
        asked = sum(p is not None for p in prompts) - reused
        print(f"Reusing saved scores for {reused} of {len(prompts)} entries from "
              f"{store.path}; asking the judge about {asked}")
    try:
        return score_prompts(prompts, judge, ask, workers, store)
    except JudgeError as exc:
        fail(f"{exc}. The scores so far are in {store.path}; run again to continue.", code=1)
    except KeyboardInterrupt:
        print(f"\nInterrupted. The scores so far are in {store.path}; run again to continue.",
              file=sys.stderr)
        raise SystemExit(130) from None


def main(argv=None):
    """Check flags, files and the judge, score every entry, print the summary (and with several
    files or keys the comparison). Exit 2 on bad input, 1 when the judge is down or fails."""
    args = build_parser().parse_args(argv)
    check_flags(args)
    url = args.url or (OPENAI_URL if args.backend == "openai" else OLLAMA_URL)
    runs = load_runs(args)
    stores = {path: ScoreStore(path) for path in dict.fromkeys(run.store_path for run in runs)}

    problem = check_judge(url, args.model, args.backend)
    if problem is not None:
        fail(problem, code=1)
    print(f"{'Ollama' if args.backend == 'ollama' else 'Judge server'} running: True")

    judge = judge_name(args.backend, args.model)
    ask = partial(query_model, model=args.model, url=url, backend=args.backend,
                  timeout=args.timeout, retries=args.retries)
    scores_per_run = []
    for run in runs:
        if len(runs) > 1:
            print(f"--- {run.label} ---")
        scores = score_run(run, stores[run.store_path], judge, ask, args.workers, args.backend)
        print("\n".join(summarize([s for s in scores if s is not None], len(scores))))
        scores_per_run.append(scores)
    if len(runs) > 1:
        header = "File" if len(args.file_path) > 1 else "Key"
        print("\n".join(comparison_lines(header, runs, scores_per_run)))
    labeled = [(run.label if len(runs) > 1 else None, [s for s in scores if s is not None])
               for run, scores in zip(runs, scores_per_run, strict=True)]
    if args.plot and any(scores for _, scores in labeled):
        plot_scores(labeled, args.plot)


if __name__ == "__main__":
    main()
