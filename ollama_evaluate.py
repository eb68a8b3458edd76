"""Score the finetuned model's test set responses with a local LLM judge (section 7.8).

    ollama serve &  ollama pull llama3          # the judge, as in the chapter
    python ollama_evaluate.py --file_path instruction-data-with-response-standalone.json

The judge sees the chapter's prompt for each entry (instruction, input, correct output, the
model's response) and answers with a number from 0 to 100; the script prints how many replies
were scores and their average, median, spread, a bootstrap interval and the lowest-scored
entries. `--prompt rubric` asks with a rubric instead: a 1-5 scale with each score's criterion
spelled out, the correct output defining a 5, and brief feedback before a final "Score: N"
line. `--backend openai` talks to any OpenAI-compatible server (llama.cpp server, vLLM, LM
Studio) instead of Ollama. `--url` takes a chat endpoint or a server address as OLLAMA_HOST is
written (127.0.0.1:11434, http://judge-host:11434); an address without a path gets the
backend's API path. Without --url, Ollama is found where OLLAMA_HOST says, as its own clients
find it. A warning counts the prompts that may be longer than the judge's context (num_ctx 2048
tokens, estimated from their length), which Ollama cuts without saying so. Each reply must be
complete within --timeout seconds and is capped at --max_reply_tokens tokens, so that a judge
that rambles or a server that never finishes cannot stall the run.

Every complete reply is saved as it arrives, one JSON line naming the judge (backend/model),
the SHA-256 of the exact prompt sent and the entry (index, instruction), in
<input>-scores.jsonl beside the input (or --output); a reply cut short is not saved. A rerun
reuses a saved score only when both judge and prompt match: an interrupted run (Ctrl-C, a full
disk, a judge gone away) continues where it stopped, while new responses (a new finetuning run),
another judge (--model phi3) or the other prompt are asked again. Lines are only ever appended,
so earlier judges' scores stay on disk, and the summary counts only the current judge's scores
for the current responses and prompt. A rerun whose scores are all saved prints its summary
without asking, or even checking, the judge. `--write_scores` writes a copy of the responses
with each entry's score and the judge's reply beside its response.

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
from script_utils import (
    DataError,
    WriteError,
    atomic_write,
    check_writable_folder,
    fail,
    image_format,
    save_json,
)

OLLAMA_URL = "http://localhost:11434/api/chat"
OPENAI_URL = "http://localhost:8000/v1/chat/completions"
API_PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
ENDPOINT_NAMES = {"ollama": "Ollama's chat endpoint",
                  "openai": "an OpenAI-compatible chat endpoint"}
OLLAMA_PORT = 11434  # where Ollama listens when OLLAMA_HOST names no port
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the chapter's deterministic judge
CHARS_PER_TOKEN = 3  # English averages about 4 characters per token; 3 errs towards warning
BUSY = (429, 503)  # "too many requests", "unavailable": the judge asks to be asked later
MAX_RETRY_WAIT = 60  # seconds: the longest wait a server's Retry-After gets
LOWEST_SHOWN = 3  # the lowest-scored entries the summary names

_thread = threading.local()  # each thread's requests.Session


class JudgeError(RuntimeError):
    """The judge answered with an error, or with something that is no chat answer."""


class JudgeUnreachable(JudgeError):
    """No complete answer came: the connection failed or dropped, the reply took too long or
    was cut short, or the judge stayed too busy to answer. A rerun continues once the judge
    answers again."""


class IncompleteReply(Exception):
    """A reply that ended before the server said it was complete (no `done`, no
    `finish_reason`): part of an answer, which must not be saved as the answer."""


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
    """The model names the server at `root` lists (Ollama's /api/tags, or /v1/models). A list
    that is null or missing, as Ollama sends with no model pulled, holds none. Raises
    ValueError when the answer is no model list."""
    path = "/v1/models" if backend == "openai" else "/api/tags"
    response = session().get(root + path, timeout=timeout, allow_redirects=False)
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}")
    try:
        payload = response.json()
    except RecursionError:
        raise ValueError("its model list is nested too deeply to be JSON") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} sent no model list")
    listed, field = (payload.get("data"), "id") if backend == "openai" else (
        payload.get("models"), "name")
    if not isinstance(listed, list):
        return set()
    return {m.get(field) for m in listed if isinstance(m, dict)}


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


def one_line(text, width=80):
    """`text` fit for a one-line message: runs of whitespace (newlines too) as one space, cut
    to `width` characters with "...", and a lone surrogate (which no output encoding takes)
    written as its escape, such as \\ud800."""
    line = " ".join(text.split())
    if len(line) > width:
        line = line[:width] + "..."
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def request_body(prompt, model, backend, max_tokens=None):
    """The JSON body of one chat request: Ollama's /api/chat or OpenAI's chat completions.
    `max_tokens` caps the reply's length (Ollama's options.num_predict, OpenAI's max_tokens):
    a judge that rambles stops there, and a shorter reply is the same with or without it."""
    messages = [{"role": "user", "content": prompt}]
    if backend == "openai":
        body = {"model": model, "messages": messages, "temperature": 0, "seed": 123}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body
    options = OPTIONS if max_tokens is None else {**OPTIONS, "num_predict": max_tokens}
    return {"model": model, "messages": messages, "options": options}


def message_text(message):
    """The text of a chat message: its content, "" when that is null or missing (a server
    with nothing to say). Raises ValueError for content that is no text."""
    content = (message or {}).get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"the content is {type(content).__name__}, not text")
    return content


def read_reply(data, backend):
    """Return the reply text: Ollama streams JSON lines of `message.content` pieces until one
    says `done`; an OpenAI-compatible server returns one JSON object whose choice names its
    `finish_reason`. Data without that end is a reply cut short: IncompleteReply. Raises
    ValueError when the data is no reply, such as Ollama's {"error": ...} line after a failure
    mid-stream (which would otherwise be saved as a reply without a score)."""
    if backend == "openai":
        choice = json.loads(data)["choices"][0]
        if choice.get("finish_reason") is None:
            raise IncompleteReply("no finish_reason")
        return message_text(choice["message"])
    pieces = []
    for line in data.splitlines():
        if not line.strip():
            continue
        chunk = json.loads(line)
        if "error" in chunk:
            raise ValueError(chunk["error"])
        pieces.append(message_text(chunk.get("message")))
        if chunk.get("done"):
            return "".join(pieces)
    raise IncompleteReply('no line said "done"')


@contextlib.contextmanager
def reply_deadline(response, seconds):
    """Within the block, the rest of `response` must arrive within `seconds`: a timer then
    shuts its connection, so that a read that waits (on a server that stalls, or streams on and
    on) ends at once with an error. Yields an Event that is set when the time ran out."""
    expired = threading.Event()

    def cut_off():
        expired.set()
        with contextlib.suppress(RuntimeError, ValueError, OSError):  # read already, or closed
            response.raw.shutdown()

    timer = threading.Timer(max(seconds, 0.0), cut_off)
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()
        timer.join()  # no shutdown can reach the connection once it serves another request


def exchange(url, body, timeout):
    """POST `body` as JSON on this thread's session; return the response and its whole body,
    read within `timeout` seconds of sending (connecting, waiting and streaming together).
    Raises JudgeUnreachable when no whole answer came in that time or the connection failed."""
    import requests
    from urllib3 import Timeout

    start = time.monotonic()
    expired = threading.Event()
    try:
        response = session().post(url, json=body, timeout=Timeout(total=timeout), stream=True,
                                  allow_redirects=False)
        with reply_deadline(response, start + timeout - time.monotonic()) as expired:
            data = response.content
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError) as exc:
        reason = failure_reason(exc)
        if expired.is_set() or isinstance(exc, requests.Timeout) or reason == "timed out":
            raise JudgeUnreachable(f"no complete answer from {url} within {timeout:g} s "
                                   "(--timeout)") from None
        raise JudgeUnreachable(f"no answer from {url}: {reason}") from None
    except requests.RequestException as exc:  # an answer that HTTP cannot read, say
        raise JudgeError(f"{url} sent no readable answer: {failure_reason(exc)}") from None
    return response, data


def retry_after(response):
    """The seconds that the server's Retry-After header asks to wait (a number of seconds or a
    date), at most MAX_RETRY_WAIT; None without a usable one. (The date parser is imported here,
    so that a run that only reads saved scores does not spend start-up time on it.)"""
    import email.utils
    from datetime import datetime, timezone

    value = response.headers.get("Retry-After", "")
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value)
                       - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):  # no date, or one without a time zone
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_WAIT)


def error_text(response):
    """The server's own words in an HTTP error answer, on one line: the "error" of Ollama's
    JSON body, the error message of an OpenAI-style one, or the body as it is."""
    try:
        error = response.json()
    except (ValueError, RecursionError):
        error = response.text
    if isinstance(error, dict):
        error = error.get("error", error.get("message", error))
        if isinstance(error, dict):
            error = error.get("message", error)
    return one_line(str(error), 300)


def http_error(url, response, model, backend):
    """The JudgeError for an HTTP error answer, with the advice that fits it: a 404 about the
    model names the model to get, another 404 names the chat endpoint to use, a judge that is
    too busy (HTTP 429, 503) is one to ask again later."""
    status, text = response.status_code, error_text(response)
    root = server_root(url)
    if status == 404 and "model" in text.lower():
        return JudgeError(missing_model(model, root, backend, f" (it says: {text})"))
    if status == 404:
        return JudgeError(f"{url} answered HTTP 404 ({text}), so it is not "
                          f"{ENDPOINT_NAMES[backend]}; use --url {root}{API_PATHS[backend]} "
                          f"(or just --url {root})")
    if status in BUSY:
        return JudgeUnreachable(f"{url} answered HTTP {status} ({text}) to every try: the judge "
                                "is busy; use fewer --workers or more --retries")
    return JudgeError(f"{url} answered HTTP {status}: {text}")


def reply_text(url, data, backend):
    """The reply in the answer `data` from `url` (see read_reply). Raises JudgeUnreachable for a
    reply cut short, which another try may get whole, JudgeError for data that is no answer."""
    try:
        return read_reply(data, backend)
    except IncompleteReply as exc:
        raise JudgeUnreachable(f"the reply from {url} ended before it was complete ({exc})"
                               ) from None
    except (ValueError, LookupError, TypeError, AttributeError, RecursionError):
        raise JudgeError(f"{url} sent a reply that is not a chat answer: "
                         f"{one_line(data[:400].decode('utf-8', 'replace'), 200)}") from None


def query_model(prompt, model="llama3", url=OLLAMA_URL, backend="ollama", timeout=120,
                retries=3, backoff=1.0, max_tokens=None):
    """Send `prompt` to the judge at `url` (its chat endpoint or server address) and return
    the reply text, which must be complete within `timeout` seconds; `max_tokens` caps its
    length (see request_body).

    Failed or dropped connections, replies late or cut short, busy answers (HTTP 429) and server
    errors (HTTP 5xx) are retried `retries` times, after waits of backoff, 2 x backoff, ...
    seconds, or as long as the server's Retry-After asks (at most MAX_RETRY_WAIT). Raises
    JudgeUnreachable when no complete answer came, JudgeError for any other failure."""
    url = chat_url(url, backend)
    body = request_body(prompt, model, backend, max_tokens)
    for attempt in range(retries + 1):
        wait = None
        try:
            response, data = exchange(url, body, timeout)
            status = response.status_code
            if status in BUSY or status >= 500:
                error, wait = http_error(url, response, model, backend), retry_after(response)
            elif status >= 300:
                raise http_error(url, response, model, backend)
            else:
                return reply_text(url, data, backend)
        except JudgeUnreachable as exc:
            error = exc
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt if wait is None else wait)
    raise error


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
# average's line; the chapter's prompt keeps the chapter's output. `max_tokens` caps a reply:
# room for "I'd rate it 85 out of 100." and more, or for the rubric's feedback and score line.
JudgePrompt = namedtuple("JudgePrompt", "build parse low high scale_note bins max_tokens")
JUDGE_PROMPTS = {
    "score": JudgePrompt(judge_prompt, parse_score, 0, 100, "", range(0, 105, 5), 64),
    "rubric": JudgePrompt(rubric_prompt, parse_rubric_score, 1, 5, " on a 1-5 scale",
                          [x - 0.5 for x in range(1, 7)], 256),
}


def entry_prompts(json_data, json_key, style=JUDGE_PROMPTS["score"]):
    """The judge's prompt for each entry; None where the response is empty (it gets the
    lowest score)."""
    return [style.build(entry, json_key) if entry[json_key].strip() else None
            for entry in json_data]


def prompt_sha256(prompt):
    """The hex SHA-256 of a prompt: what a saved score was the answer to. A lone surrogate
    (which JSON allows as an escape) is hashed as its code point, as the request sends it."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


class ScoreStore:
    """The judge's replies, one JSON line each: {"judge", "prompt_sha256", "index",
    "instruction", "score", "reply"}, where index and instruction name the (first) entry the
    prompt was built from; lines written before they were added have neither.

    Lines are only ever appended, so a run that is stopped keeps every reply that arrived and
    earlier judges' replies stay on disk. A last line cut short by a kill or a full disk is
    skipped, as is any line that is no record. With `path` None the replies are kept in memory
    only.
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
        except (ValueError, RecursionError):  # RecursionError: a line of deeply nested JSON
            return
        if (isinstance(record, dict) and isinstance(record.get("judge"), str)
                and isinstance(record.get("prompt_sha256"), str)
                and (record.get("score") is None or type(record.get("score")) is int)):
            self.records[record["judge"], record["prompt_sha256"]] = record

    def saved(self, judge, prompt):
        """The saved record of `judge` answering exactly `prompt`, whatever its score, or None."""
        return self.records.get((judge, prompt_sha256(prompt)))

    def find(self, judge, prompt, style=JUDGE_PROMPTS["score"]):
        """The saved record of `judge` answering exactly `prompt`, or None. A score outside the
        scale of `style`, which only an edited file holds, counts as none, so it is asked again."""
        record = self.saved(judge, prompt)
        score = None if record is None else record["score"]
        return None if score is not None and not style.low <= score <= style.high else record

    def add(self, judge, prompt, score, reply, index, instruction):
        """Save one reply to the prompt of entry `index`, appended and flushed at once. Raises
        WriteError naming the file when it cannot be written (every line before stays whole)."""
        record = {"judge": judge, "prompt_sha256": prompt_sha256(prompt), "index": index,
                  "instruction": instruction, "score": score, "reply": reply}
        self.records[judge, record["prompt_sha256"]] = record
        if self.path is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n" * self.needs_newline + json.dumps(record) + "\n")
            except OSError as exc:
                self.needs_newline = True  # the line may be cut short
                raise WriteError(exc.errno, exc.strerror or str(exc), self.path) from exc
            self.needs_newline = False


def cancel(futures):
    """Cancel the futures not yet started. (Unlike shutdown(cancel_futures=True), this lets the
    pool's threads mark each as done, so that as_completed still yields them.)"""
    for future in futures:
        future.cancel()


def score_prompts(prompts, entries, judge, ask, workers=1, store=None,
                  style=JUDGE_PROMPTS["score"]):
    """Return the score for each prompt (built from the entry of `entries` at the same place):
    None where the reply held no score, the lowest score (0, or 1 on the rubric's scale) for a
    None prompt (an empty response, not asked).

    Only prompts without a saved reply of `judge` in `store` are asked, each once, by `workers`
    threads calling `ask(prompt)` (Ollama serves several at once with OLLAMA_NUM_PARALLEL); each
    reply is read by `style.parse` and saved as it arrives, with the index and instruction of
    the first entry that has the prompt. The result does not depend on `workers`. When a request
    fails no more are sent, the replies to those in flight are still saved, and the error is
    raised. On Ctrl-C too the replies in flight are awaited and saved (a second Ctrl-C stops the
    wait), then KeyboardInterrupt is raised.
    """
    store = ScoreStore() if store is None else store
    todo = Counter(p for p in prompts if p is not None and store.find(judge, p, style) is None)
    first = {}
    for index, prompt in enumerate(prompts):
        first.setdefault(prompt, index)
    saved = set()

    def save(future):
        """Save the reply of one finished request and report it when it holds no score."""
        prompt, reply = futures[future], future.result()
        score = style.parse(reply)
        index = first[prompt]
        store.add(judge, prompt, score, reply, index, entries[index]["instruction"])
        saved.add(future)
        if score is None:  # on one line, a rubric reply's feedback too
            tqdm.write(f"Could not convert score: {one_line(reply) or '(an empty reply)'}")

    error = None
    futures = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for prompt in todo:
                futures[pool.submit(ask, prompt)] = prompt
            with tqdm(total=len(prompts), initial=len(prompts) - todo.total(),
                      desc="Scoring entries") as bar:
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        error = error or future.exception()
                        cancel(futures)
                        continue
                    save(future)
                    bar.update(todo[futures[future]])
        except KeyboardInterrupt:
            cancel(futures)
            with contextlib.suppress(KeyboardInterrupt):
                pool.shutdown(wait=True)  # the replies in flight arrive within --timeout
            for future in futures:
                if (future.done() and not future.cancelled() and future not in saved
                        and future.exception() is None):
                    save(future)
            raise
        except BaseException:  # WriteError: send no more requests
            cancel(futures)
            raise
    if error is not None:
        raise error
    return [style.low if p is None else store.find(judge, p, style)["score"] for p in prompts]


def generate_model_scores(json_data, json_key, model="llama3", url=OLLAMA_URL, workers=1,
                          store=None, backend="ollama", prompt="score", **query_options):
    """Score every entry's `json_key` response with the judge and return the scores, in entry
    order (the book's function). Replies that are not scores are reported and left out.
    `prompt` names one of JUDGE_PROMPTS: "score" (the chapter's 0-100 prompt) or "rubric"
    (1-5); `store` (a ScoreStore) reuses and keeps this judge's replies; `query_options` go to
    query_model (timeout, retries, backoff, max_tokens: the prompt's cap unless given)."""
    style = JUDGE_PROMPTS[prompt]
    ask = partial(query_model, model=model, url=url, backend=backend,
                  **{"max_tokens": style.max_tokens, **query_options})
    scores = score_prompts(entry_prompts(json_data, json_key, style), json_data,
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
                             f"OLLAMA_HOST when set, else {OLLAMA_URL}; with --backend "
                             f"openai: {OPENAI_URL})")
    parser.add_argument("--backend", default="ollama", choices=["ollama", "openai"],
                        help="ollama, or openai for any OpenAI-compatible server")
    parser.add_argument("--prompt", default="score", choices=list(JUDGE_PROMPTS),
                        help="score: the chapter's prompt, 0-100 (default); rubric: a 1-5 "
                             "rubric, with feedback before the score")
    parser.add_argument("--json_key", default=["model_response"], nargs="+",
                        help="field that holds the response to score (default: model_response); "
                             "several keys of one file are compared")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds within which each reply must be complete, from sending "
                             "the request to the reply's end; one still streaming then is cut "
                             "off and asked again (default: 120)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries after a connection or server error, a late or cut reply "
                             "or a busy judge (HTTP 429, 503), with growing waits or as long as "
                             "the server asks, up to a minute (default: 3)")
    parser.add_argument("--max_reply_tokens", type=int, default=None,
                        help="the most tokens the judge may write per reply: Ollama's "
                             "num_predict, or max_tokens with --backend openai (default: "
                             f"{JUDGE_PROMPTS['score'].max_tokens} with --prompt score, "
                             f"{JUDGE_PROMPTS['rubric'].max_tokens} with --prompt rubric)")
    parser.add_argument("--workers", type=int, default=1,
                        help="requests in flight at once (default: 1)")
    parser.add_argument("--output", default=None,
                        help="JSON-lines file where each reply is saved as it arrives and "
                             "reused from (default: beside each input, its name with "
                             "-scores.jsonl); one file can hold any files, keys and judges")
    parser.add_argument("--plot", default=None,
                        help="save a histogram of the scores here, one per file or key "
                             "(format from the extension: .png, .pdf, .svg, ...)")
    parser.add_argument("--write_scores", default=None, metavar="PATH",
                        help="also write a copy of the responses file here with each entry's "
                             "score and the judge's reply added (fields <json_key>_score and "
                             "<json_key>_judge_reply); one --file_path only")
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


def judge_address(args):
    """Where the judge is: --url, else for Ollama the OLLAMA_HOST environment variable as
    Ollama's own clients read it (spaces and quotes around it dropped; unset when empty), else
    the backend's default endpoint."""
    if args.url is not None:
        return args.url
    host = os.environ.get("OLLAMA_HOST", "").strip().strip("\"'")
    if args.backend == "ollama" and host:
        return host
    return OPENAI_URL if args.backend == "openai" else OLLAMA_URL


def check_flags(args):
    """Exit with one Error line naming the flag when a flag's value cannot work."""
    if args.workers < 1:
        fail(f"--workers must be at least 1, got {args.workers}")
    if not 0 < args.timeout < math.inf:
        fail(f"--timeout must be a number of seconds above 0, got {args.timeout:g}")
    if args.retries < 0:
        fail(f"--retries must be 0 or more, got {args.retries}")
    if args.max_reply_tokens is not None and args.max_reply_tokens < 1:
        fail(f"--max_reply_tokens must be at least 1, got {args.max_reply_tokens}")
    if len(args.file_path) > 1 and len(args.json_key) > 1:
        fail("compare several --file_path or several --json_key, not both at once")
    if args.write_scores is not None and len(args.file_path) > 1:
        fail("--write_scores copies one responses file; give one --file_path with it")
    address = judge_address(args)
    try:
        chat_url(address, args.backend)
    except ValueError:
        source = f"--url {address}" if args.url is not None else f"OLLAMA_HOST={address}"
        fail(f"{source}: expected a server address such as 127.0.0.1:11434 or "
             "http://host:port, or a chat endpoint such as "
             f"{OPENAI_URL if args.backend == 'openai' else OLLAMA_URL}"
             + ("" if args.url is not None else "; correct it or pass --url"))
    if args.write_scores is not None:
        check_writable("--write_scores", args.write_scores)
    if args.plot is not None:
        check_writable("--plot", args.plot)
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        plot_format = image_format(args.plot, "png")
        if plot_format not in formats:
            fail(f"--plot {args.plot}: unknown image format '{plot_format}'; "
                 f"use one of {', '.join(sorted(formats))}")


def same_file(a, b):
    """Whether paths `a` and `b` name one file (through links too), existing or not."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_outputs(args, runs):
    """Exit with one Error line when an output would be written onto an input or onto another
    output: the score file (--output, or the one beside an input), --write_scores or --plot
    naming a --file_path, or two of them naming one file."""
    outputs = [("--output" if args.output else "score file", path)
               for path in dict.fromkeys(run.store_path for run in runs)]
    outputs += [(flag, path) for flag, path in (("--write_scores", args.write_scores),
                                                ("--plot", args.plot)) if path is not None]
    for i, (flag, path) in enumerate(outputs):
        advice = "pass --output" if flag == "score file" else f"pass another {flag}"
        for file_path in args.file_path:
            if same_file(path, file_path):
                fail(f"{flag} {path}: is the input --file_path {file_path}, which writing "
                     f"there would damage; {advice}")
        for other_flag, other in outputs[:i]:
            if same_file(path, other):
                fail(f"{flag} {path}: is also the {other_flag}; {advice}")


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
    return label_by_run_name(runs)


RESPONSES_FILE = re.compile(r"instruction-data-with-response-(.+)\.json")  # --run_name's


def label_by_run_name(runs):
    """Label runs of several responses files of the finetuning script by their --run_name
    ("standalone", "cosine") instead of their paths, when those names tell them apart."""
    names = [RESPONSES_FILE.fullmatch(os.path.basename(run.label)) for run in runs]
    if len(runs) < 2 or not all(names) or len({m.group(1) for m in names}) < len(runs):
        return runs
    return [run._replace(label=m.group(1)) for run, m in zip(runs, names, strict=True)]


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


def unanswered(prompts, store, judge, style=JUDGE_PROMPTS["score"]):
    """How many of `prompts` have no saved reply of `judge` yet (None, an empty response, is
    never asked)."""
    return sum(p is not None and store.find(judge, p, style) is None for p in prompts)


def out_of_scale(prompts, store, judge, style):
    """How many of `prompts` have a saved score of `judge` outside the style's scale."""
    return sum(p is not None and store.saved(judge, p) is not None
               and store.find(judge, p, style) is None for p in prompts)


def write_failure(path, exc, store_paths):
    """The one line for an output that could not be written (a full disk, say)."""
    return (f"could not write {path} ({exc.strerror or exc}); the scores so far are in "
            f"{', '.join(store_paths)}; free space and rerun: it continues")


def score_run(prompts, entries, store, judge, ask, workers, backend, style):
    """Score one run's prompts, saying first what is reused (when anything is) and which saved
    scores lie outside the scale; return the score per entry. When no answer comes the message
    says that a rerun continues; other judge errors get their own advice."""
    if backend == "ollama":
        warn_long_prompts(prompts)
    ignored = out_of_scale(prompts, store, judge, style)
    if ignored:
        print(f"Ignoring {ignored} saved score{'s' if ignored > 1 else ''} outside the "
              f"{style.low}-{style.high} scale in {store.path}; asking the judge again")
    asked = unanswered(prompts, store, judge, style)
    reused = sum(p is not None for p in prompts) - asked
    if reused:
        print(f"Reusing saved scores for {reused} of {len(prompts)} entries from "
              f"{store.path}; asking the judge about {asked}")
    try:
        return score_prompts(prompts, entries, judge, ask, workers, store, style)
    except JudgeUnreachable as exc:
        fail(f"{exc}. The scores so far are in {store.path}; run again to continue.", code=1)
    except JudgeError as exc:
        fail(str(exc), code=1)
    except WriteError as exc:
        fail(write_failure(store.path, exc, [store.path]), code=1)
    except KeyboardInterrupt:
        print(f"\nInterrupted. The scores so far are in {store.path}; run again to continue.",
              file=sys.stderr)
        raise SystemExit(130) from None


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


def saved_replies(prompts, store, judge, style):
    """The judge's saved reply to each prompt; None for an empty response, never asked."""
    return [None if p is None else store.find(judge, p, style)["reply"] for p in prompts]


def scored_copy(entries, runs, scores_per_run, replies_per_run):
    """Copies of `entries` with each run's score and judge's reply beside its response:
    "<key>_score" and "<key>_judge_reply" (null where the response is empty and was not
    asked)."""
    copies = [dict(entry) for entry in entries]
    for run, scores, replies in zip(runs, scores_per_run, replies_per_run, strict=True):
        for copy, score, reply in zip(copies, scores, replies, strict=True):
            copy[f"{run.key}_score"] = score
            copy[f"{run.key}_judge_reply"] = reply
    return copies


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
    files or keys the comparison). Exit 2 on bad input, 1 when the judge is down or fails, or
    when most of its replies hold no score. The judge is checked only when there is something
    to ask it: a rerun whose scores are all saved prints its summary without a judge running."""
    args = build_parser().parse_args(argv)
    check_flags(args)
    url = chat_url(judge_address(args), args.backend)
    style = JUDGE_PROMPTS[args.prompt]
    runs = load_runs(args)
    check_outputs(args, runs)
    stores = {path: ScoreStore(path) for path in dict.fromkeys(run.store_path for run in runs)}

    judge = judge_name(args.backend, args.model)
    prompts_per_run = [entry_prompts(run.entries, run.key, style) for run in runs]
    if any(unanswered(prompts, stores[run.store_path], judge, style)
           for run, prompts in zip(runs, prompts_per_run, strict=True)):
        problem = check_judge(url, args.model, args.backend)
        if problem is not None:
            fail(problem, code=1)
        print(f"{'Ollama' if args.backend == 'ollama' else 'Judge server'} running: True")
        preload("numpy")

    ask = partial(query_model, model=args.model, url=url, backend=args.backend,
                  timeout=args.timeout, retries=args.retries,
                  max_tokens=args.max_reply_tokens or style.max_tokens)
    scores_per_run = []
    warned = False
    for run, prompts in zip(runs, prompts_per_run, strict=True):
        if len(runs) > 1:
            print(f"--- {run.label} ---")
        store = stores[run.store_path]
        scores = score_run(prompts, run.entries, store, judge, ask, args.workers, args.backend,
                           style)
        warned |= report_run(run, prompts, scores, store.path, style)
        scores_per_run.append(scores)
    if len(runs) > 1:
        header = "Key" if len(args.file_path) == 1 else (
            "File" if runs[0].label in args.file_path else "Run")
        print("\n".join(comparison_lines(header, runs, scores_per_run, style)))
    if args.write_scores:
        replies_per_run = [saved_replies(prompts, stores[run.store_path], judge, style)
                           for run, prompts in zip(runs, prompts_per_run, strict=True)]
        try:
            save_json(scored_copy(runs[0].entries, runs, scores_per_run, replies_per_run),
                      args.write_scores)
        except OSError as exc:
            fail(write_failure(args.write_scores, exc, list(stores)), code=1)
        print(f"Responses with their scores and the judge's replies saved as "
              f"{args.write_scores}")
    labeled = [(run.label if len(runs) > 1 else None, [s for s in scores if s is not None])
               for run, scores in zip(runs, scores_per_run, strict=True)]
    if args.plot and any(scores for _, scores in labeled):
        try:
            plot_scores(labeled, args.plot, style)
        except OSError as exc:
            fail(write_failure(args.plot, exc, list(stores)), code=1)
    if warned:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
