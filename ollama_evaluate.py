"""Score the finetuned model's test set responses with a local LLM judge (section 7.8).

    ollama serve &  ollama pull llama3          # the judge, as in the chapter
    python ollama_evaluate.py --file_path instruction-data-with-response-standalone.json

The judge sees the chapter's prompt for each entry (instruction, input, correct output, the
model's response) and answers with a number from 0 to 100; the script prints how many replies
were scores and their average, median, spread and a bootstrap interval. `--prompt rubric` asks
with a rubric instead: a 1-5 scale with each score's criterion spelled out, the correct output
defining a 5, and brief feedback before a final "Score: N" line. `--backend openai` talks to
any OpenAI-compatible server (llama.cpp server, vLLM, LM Studio) instead of Ollama. `--url`
takes a chat endpoint or a server address as OLLAMA_HOST is written (127.0.0.1:11434,
http://judge-host:11434); an address without a path gets the backend's API path. A warning
counts the prompts that may be longer than the judge's context (num_ctx 2048 tokens, estimated
from their length), which Ollama cuts without saying so.

Every reply is saved as it arrives, one JSON line naming the judge (backend/model) and the
SHA-256 of the exact prompt sent, in <input>-scores.jsonl beside the input (or --output). A rerun
reuses a saved score only when both match: an interrupted run continues where it stopped, while
new responses (a new finetuning run), another judge (--model phi3) or the other prompt are asked
again. Lines are only ever appended, so earlier judges' scores stay on disk, and the summary
counts only the current judge's scores for the current responses and prompt. A rerun whose
scores are all saved prints its summary without asking, or even checking, the judge.

Compare runs by giving several files (each with its own score file, or all in one --output)
or several keys of one file (the book's model-evaluation data: --json_key "model 1 response"
"model 2 response"). Each is scored by the same judge, and a table ends the output: the number
of scores and average per file or key, and for each one after the first its paired difference
to the first over the entries both scored (matched by instruction, input and output), with a
95% bootstrap interval.
"""

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import re
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter, namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial

from tqdm import tqdm

from instruction_data import format_input, load_json_entries
from script_utils import DataError, atomic_write, check_writable_folder, fail, image_format

OLLAMA_URL = "http://localhost:11434/api/chat"
OPENAI_URL = "http://localhost:8000/v1/chat/completions"
API_PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
ENDPOINT_NAMES = {"ollama": "Ollama's chat endpoint",
                  "openai": "an OpenAI-compatible chat endpoint"}
OLLAMA_PORT = 11434  # where Ollama listens when OLLAMA_HOST names no port
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the chapter's deterministic judge
CHARS_PER_TOKEN = 3  # English averages about 4 characters per token; 3 errs towards warning

_thread = threading.local()  # each thread's requests.Session


class JudgeError(RuntimeError):
    """The judge answered with an error, or with something that is no chat answer."""


class JudgeUnreachable(JudgeError):
    """No answer came: the connection failed or dropped, or the reply took too long. A rerun
    continues once the judge answers again."""


#####################################
# 7.8 Evaluating the finetuned LLM: checking the judge runs
#####################################


def chat_url(address, backend="ollama"):
    """The judge's chat endpoint for `address`: a whole endpoint URL, or a server address as
    Ollama's clients take OLLAMA_HOST.

    Without a scheme "http://" is assumed, and for Ollama its port 11434 when no port is given
    either; a URL without a path gets the backend's API path (/api/chat, /v1/chat/completions),
    and for the OpenAI backend a base URL ending in /v1 gets /chat/completions. So
    127.0.0.1:11434, http://127.0.0.1:11434 and http://127.0.0.1:11434/api/chat are the same
    judge. Raises ValueError when no http(s) URL with a host can be made of `address`.
    """
    if "://" not in address:
        address = "http://" + address
        parts = urllib.parse.urlsplit(address)
        if backend == "ollama" and parts.hostname and parts.port is None:
            address = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.netloc}:"
                                                                    f"{OLLAMA_PORT}"))
    parts = urllib.parse.urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0:
        raise ValueError(address)  # (.port itself raises it for a port that is no number)
    if parts.path in ("", "/"):
        parts = parts._replace(path=API_PATHS[backend])
    elif backend == "openai" and parts.path.rstrip("/") == "/v1":
        parts = parts._replace(path=API_PATHS["openai"])
    return urllib.parse.urlunsplit(parts)


def server_root(url):
    """scheme://host:port of a URL such as http://localhost:11434/api/chat."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def session():
    """This thread's requests.Session. Its connections stay open between requests (keep-alive),
    so that a request costs no connection set-up, and a connection the server closed while idle
    is replaced before it is used. One per thread, as a Session is not made to be shared.
    Proxy settings from the environment are ignored: the judge is asked directly.

    requests is imported here, when the judge is first asked, so that a run that only reads
    saved scores does not spend start-up time on it."""
    import requests

    if not hasattr(_thread, "session"):
        _thread.session = requests.Session()
        _thread.session.trust_env = False
    return _thread.session


def failure_reason(exc):
    """The innermost reason of a requests error, in one line: requests wraps urllib3's errors,
    which wrap the socket's ("[Errno 111] Connection refused")."""
    seen = []
    while isinstance(exc, BaseException) and exc not in seen:
        seen.append(exc)
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in exc.args if isinstance(arg, BaseException)),
                         exc.__cause__)
        exc = inner
    return str(seen[-1]) or type(seen[-1]).__name__


def served_models(root, backend, timeout):
    """The model names the server at `root` lists (Ollama's /api/tags, or /v1/models)."""
    path = "/v1/models" if backend == "openai" else "/api/tags"
    response = session().get(root + path, timeout=timeout, allow_redirects=False)
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}")
    payload = response.json()
    if backend == "openai":
        return {m.get("id") for m in payload.get("data", [])}
    return {m.get("name") for m in payload.get("models", [])}


def missing_model(model, root, backend, detail=""):
    """The one line for a judge model the server does not have (`detail`: what it said)."""
    if backend == "openai":
        return f"model '{model}' is not served at {root}{detail}"
    return (f"model '{model}' is not available on the Ollama server at {root}{detail}; "
            f"run: ollama pull {model}")


def check_judge(url, model, backend="ollama", timeout=10):
    """Return None when the server at `url` answers and has `model`, else a one-line reason.

    The server itself is asked, so a judge in a container or on another machine counts as
    running.
    """
    import requests

    root = server_root(chat_url(url, backend))
    try:
        names = served_models(root, backend, timeout)
    except (requests.RequestException, ValueError, AttributeError) as exc:
        reason = failure_reason(exc)
        if backend == "openai":
            return f"no OpenAI-compatible server answers at {root} ({reason})"
        return (f"Ollama is not running at {root} ({reason}); start it with 'ollama serve' "
                f"and get the judge with 'ollama pull {model}'")
    if model in names or f"{model}:latest" in names:
        return None
    if backend == "openai":
        return f"{missing_model(model, root, backend)}; it serves: {', '.join(sorted(names))}"
    return missing_model(model, root, backend)


#####################################
# 7.8 Evaluating the finetuned LLM: querying the judge
#####################################


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


def post_json(url, body, timeout, retries, backoff):
    """POST `body` as JSON on this thread's session and return the response.

    Failed connections, dropped connections, timeouts and server errors (HTTP 5xx) are retried
    `retries` times, after waits of backoff, 2 x backoff, ... seconds. The last 5xx response
    is returned; when the last try got no answer, JudgeUnreachable is raised.
    """
    import requests

    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            response = session().post(url, json=body, timeout=timeout, allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            reason = failure_reason(exc)
            if isinstance(exc, requests.Timeout) or reason == "timed out":
                error = JudgeUnreachable(f"no answer from {url} within {timeout:g} s (--timeout)")
            else:
                error = JudgeUnreachable(f"no answer from {url}: {reason}")
            continue
        if response.status_code < 500 or attempt == retries:
            return response
    raise error


def error_text(response):
    """The server's own words in an HTTP error answer, on one line: the "error" of Ollama's
    JSON body, the error message of an OpenAI-style one, or the body as it is."""
    try:
        error = response.json()
    except ValueError:
        error = response.text
    if isinstance(error, dict):
        error = error.get("error", error.get("message", error))
        if isinstance(error, dict):
            error = error.get("message", error)
    return " ".join(str(error).split())[:300]


def http_error(url, response, model, backend):
    """The JudgeError for an HTTP error answer, with the advice that fits it: a 404 about the
    model names the model to get, another 404 names the chat endpoint to use."""
    status, text = response.status_code, error_text(response)
    root = server_root(url)
    if status == 404 and "model" in text.lower():
        return JudgeError(missing_model(model, root, backend, f" (it says: {text})"))
    if status == 404:
        return JudgeError(f"{url} answered HTTP 404 ({text}), so it is not "
                          f"{ENDPOINT_NAMES[backend]}; use --url {root}{API_PATHS[backend]} "
                          f"(or just --url {root})")
    return JudgeError(f"{url} answered HTTP {status}: {text}")


def query_model(prompt, model="llama3", url=OLLAMA_URL, backend="ollama", timeout=120,
                retries=3, backoff=1.0):
    """Send `prompt` to the judge at `url` (its chat endpoint or server address) and return
    the reply text. Connection errors, timeouts and HTTP 5xx are retried (see post_json).
    Raises JudgeUnreachable when no answer came, JudgeError for any other failure."""
    url = chat_url(url, backend)
    response = post_json(url, request_body(prompt, model, backend), timeout, retries, backoff)
    if response.status_code >= 300:
        raise http_error(url, response, model, backend)
    try:
        return read_reply(response.content, backend)
    except (ValueError, LookupError, TypeError, AttributeError):
        raise JudgeError(f"{url} sent a reply that is not a chat answer: "
                         f"{response.content[:200].decode('utf-8', 'replace')}") from None


#####################################
# 7.8 Evaluating the finetuned LLM: scoring the responses
#####################################


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


RUBRIC = """\
5: as good as the reference answer: correct and complete; the wording may differ.
4: correct, with a small omission, addition or flaw of wording that changes no meaning.
3: partly correct: the main point is there, but a real part is missing or wrong.
2: mostly wrong or far from complete, though some of it fits the instruction.
1: wrong, unrelated to the instruction, or no answer at all."""


def rubric_prompt(entry, json_key):
    """The rubric prompt for one entry: a 1-5 scale with each score's criterion, the entry's
    correct output as the reference answer that defines a 5, and brief feedback before a last
    line "Score: N" (written first, the feedback makes the judge reason before it scores)."""
    task = f"<instruction>\n{entry['instruction']}\n</instruction>\n"
    if entry["input"]:
        task += f"<input>\n{entry['input']}\n</input>\n"
    return ("Grade a response to an instruction, comparing it with the reference answer.\n\n"
            f"{task}<reference_answer>\n{entry['output']}\n</reference_answer>\n"
            f"<response>\n{entry[json_key]}\n</response>\n\n"
            f"Score the response from 1 to 5; the reference answer scores 5.\n{RUBRIC}\n\n"
            "Give brief feedback in one or two sentences, then end with the score alone on the "
            'last line, written as "Score: N" with N from 1 to 5.')


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


def parse_rubric_score(reply):
    """Return the 1-5 score on the last line of a rubric reply, or None.

    The last non-empty line must be the score alone, with or without markdown and a "/5":
    "Score: 4", "**Score:** 4", "Score: 4/5" and "4" are scores; "Score: 7", "Score: 3.5" and
    a last line of feedback are not.
    """
    lines = reply.strip().splitlines()
    last = re.sub(r"[*_`#]", "", lines[-1]).strip() if lines else ""
    match = re.fullmatch(r"(?:score\s*:?\s*)?(\d+)(?:\s*(?:/|out of)\s*5)?\.?", last, re.I)
    score = int(match.group(1)) if match else None
    return score if score is not None and 1 <= score <= 5 else None


# How the judge is asked (--prompt) and what its answer means. `scale_note` is added to the
# average's line; the chapter's prompt keeps the chapter's output.
PromptStyle = namedtuple("PromptStyle", "build parse low high scale_note bins")
PROMPT_STYLES = {
    "score": PromptStyle(judge_prompt, parse_score, 0, 100, "", range(0, 105, 5)),
    "rubric": PromptStyle(rubric_prompt, parse_rubric_score, 1, 5, " on a 1-5 scale",
                          [x - 0.5 for x in range(1, 7)]),
}


def entry_prompts(json_data, json_key, style=PROMPT_STYLES["score"]):
    """The judge's prompt for each entry; None where the response is empty (it gets the
    lowest score)."""
    return [style.build(entry, json_key) if entry[json_key].strip() else None
            for entry in json_data]


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


def score_prompts(prompts, judge, ask, workers=1, store=None, style=PROMPT_STYLES["score"]):
    """Return the score for each prompt: None where the reply held no score, the lowest score
    (0, or 1 on the rubric's scale) for a None prompt (an empty response, not asked).

    Only prompts without a saved reply of `judge` in `store` are asked, each once, by `workers`
    threads calling `ask(prompt)` (Ollama serves several at once with OLLAMA_NUM_PARALLEL); each
    reply is read by `style.parse` and saved as it arrives. The result does not depend on
    `workers`. When a request fails no more are sent, the replies to those in flight are still
    saved, and the error is raised.
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
                    score = style.parse(reply)
                    store.add(judge, futures[future], score, reply)
                    if score is None:  # on one line, a rubric reply's feedback too
                        tqdm.write(f"Could not convert score: {' '.join(reply.split())}")
                    bar.update(todo[futures[future]])
            except BaseException:  # Ctrl-C: send no more requests
                cancel(futures)
                raise
    if error is not None:
        raise error
    return [style.low if p is None else store.find(judge, p)["score"] for p in prompts]


def generate_model_scores(json_data, json_key, model="llama3", url=OLLAMA_URL, workers=1,
                          store=None, backend="ollama", prompt_style="score", **query_options):
    """Score every entry's `json_key` response with the judge and return the scores, in entry
    order (the book's function). Replies that are not scores are reported and left out.
    `prompt_style` is "score" (the chapter's 0-100 prompt) or "rubric" (1-5); `store` (a
    ScoreStore) reuses and keeps this judge's replies; `query_options` go to query_model
    (timeout, retries, backoff)."""
    style = PROMPT_STYLES[prompt_style]
    ask = partial(query_model, model=model, url=url, backend=backend, **query_options)
    scores = score_prompts(entry_prompts(json_data, json_key, style),
                           judge_name(backend, model), ask, workers, store, style)
    return [score for score in scores if score is not None]


#####################################
# The summary, the comparison and the command line
#####################################


def bootstrap_interval(values, resamples=10_000, seed=123):
    """The 95% bootstrap interval of the mean of `values`: percentiles 2.5 and 97.5 of the means
    of `resamples` resamples drawn with replacement by a seeded numpy Generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(scores, num_entries, style=PROMPT_STYLES["score"]):
    """The summary lines: how many replies counted, mean (with the scale named when it is the
    rubric's), median, spread, 95% interval."""
    lines = [f"Number of scores: {len(scores)} of {num_entries}"]
    if not scores:
        return lines + ["Average score: n/a (no reply was a score)"]
    lines += [f"Average score: {statistics.mean(scores):.2f}{style.scale_note}",
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


def comparison_lines(header, runs, scores_per_run, style=PROMPT_STYLES["score"]):
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


def plot_scores(labeled_scores, path, style=PROMPT_STYLES["score"]):
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
                        help=f"the judge's chat endpoint, or its server's address as "
                             f"OLLAMA_HOST is written, such as 127.0.0.1:11434 (default: "
                             f"{OLLAMA_URL}; with --backend openai: {OPENAI_URL})")
    parser.add_argument("--backend", default="ollama", choices=["ollama", "openai"],
                        help="ollama, or openai for any OpenAI-compatible server")
    parser.add_argument("--prompt", default="score", choices=list(PROMPT_STYLES),
                        help="score: the chapter's prompt, 0-100 (default); rubric: a 1-5 "
                             "rubric, with feedback before the score")
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
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a folder, not a file")
    try:
        check_writable_folder(f"{flag} {path}", os.path.dirname(os.path.abspath(path)))
    except DataError as exc:
        fail(exc)
    if os.path.exists(path) and not os.access(path, os.W_OK):
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
        try:
            chat_url(args.url, args.backend)
        except ValueError:
            fail(f"--url {args.url}: expected a server address such as 127.0.0.1:11434 or "
                 "http://host:port, or a chat endpoint such as "
                 f"{OPENAI_URL if args.backend == 'openai' else OLLAMA_URL}")
    if args.plot is not None:
        check_writable("--plot", args.plot)
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        plot_format = image_format(args.plot, "png")
        if plot_format not in formats:
            fail(f"--plot {args.plot}: unknown image format '{plot_format}'; "
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


def unanswered(prompts, store, judge):
    """How many of `prompts` have no saved reply of `judge` yet (None, an empty response, is
    never asked)."""
    return sum(p is not None and store.find(judge, p) is None for p in prompts)


def score_run(prompts, store, judge, ask, workers, backend, style):
    """Score one run's prompts, saying first what is reused (when anything is); return the
    score per entry. When no answer comes the message says that a rerun continues; other
    judge errors get their own advice."""
    if backend == "ollama":
        warn_long_prompts(prompts)
    asked = unanswered(prompts, store, judge)
    reused = sum(p is not None for p in prompts) - asked
    if reused:
        print(f"Reusing saved scores for {reused} of {len(prompts)} entries from "
              f"{store.path}; asking the judge about {asked}")
    try:
        return score_prompts(prompts, judge, ask, workers, store, style)
    except JudgeUnreachable as exc:
        fail(f"{exc}. The scores so far are in {store.path}; run again to continue.", code=1)
    except JudgeError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        print(f"\nInterrupted. The scores so far are in {store.path}; run again to continue.",
              file=sys.stderr)
        raise SystemExit(130) from None


def preload(module):
    """Import `module` in a thread of its own: numpy, which only the summary needs, then loads
    while the judge is asked rather than after its last answer. A failure is left to the import
    that needs the module to report."""

    def load():
        with contextlib.suppress(ImportError):
            importlib.import_module(module)

    threading.Thread(target=load).start()


def main(argv=None):
    """Check flags, files and the judge, score every entry, print the summary (and with several
    files or keys the comparison). Exit 2 on bad input, 1 when the judge is down or fails.
    The judge is checked only when there is something to ask it: a rerun whose scores are all
    saved prints its summary without a judge running."""
    args = build_parser().parse_args(argv)
    check_flags(args)
    url = chat_url(args.url or (OPENAI_URL if args.backend == "openai" else OLLAMA_URL),
                   args.backend)
    style = PROMPT_STYLES[args.prompt]
    runs = load_runs(args)
    stores = {path: ScoreStore(path) for path in dict.fromkeys(run.store_path for run in runs)}

    judge = judge_name(args.backend, args.model)
    prompts_per_run = [entry_prompts(run.entries, run.key, style) for run in runs]
    if any(unanswered(prompts, stores[run.store_path], judge)
           for run, prompts in zip(runs, prompts_per_run, strict=True)):
        problem = check_judge(url, args.model, args.backend)
        if problem is not None:
            fail(problem, code=1)
        print(f"{'Ollama' if args.backend == 'ollama' else 'Judge server'} running: True")
        preload("numpy")

    ask = partial(query_model, model=args.model, url=url, backend=args.backend,
                  timeout=args.timeout, retries=args.retries)
    scores_per_run = []
    for run, prompts in zip(runs, prompts_per_run, strict=True):
        if len(runs) > 1:
            print(f"--- {run.label} ---")
        scores = score_run(prompts, stores[run.store_path], judge, ask, args.workers,
                           args.backend, style)
        print("\n".join(summarize([s for s in scores if s is not None], len(scores), style)))
        scores_per_run.append(scores)
    if len(runs) > 1:
        header = "File" if len(args.file_path) > 1 else "Key"
        print("\n".join(comparison_lines(header, runs, scores_per_run, style)))
    labeled = [(run.label if len(runs) > 1 else None, [s for s in scores if s is not None])
               for run, scores in zip(runs, scores_per_run, strict=True)]
    if args.plot and any(scores for _, scores in labeled):
        plot_scores(labeled, args.plot, style)


if __name__ == "__main__":
    main()
