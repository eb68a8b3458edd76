"""The judge's HTTP client: where the judge is (chat_url), whether it runs and has the model
(check_judge), and one request with its deadline, retries and errors (query_model).

Ollama's /api/chat and any OpenAI-compatible chat endpoint (llama.cpp server, vLLM, LM Studio)
are spoken. Each reply must be complete within a deadline and is capped in length, so that a
judge that rambles or a server that never finishes cannot stall a run; busy answers, server
errors and dropped connections are asked again. JudgeUnreachable says that no complete answer
came (a rerun continues once the judge answers), JudgeError that the judge answered with an
error or with something that is no chat answer.
"""

import contextlib
import json
import math
import threading
import time
import urllib.parse

OLLAMA_URL = "http://localhost:11434/api/chat"
OPENAI_URL = "http://localhost:8000/v1/chat/completions"
API_PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
ENDPOINT_NAMES = {"ollama": "Ollama's chat endpoint",
                  "openai": "an OpenAI-compatible chat endpoint"}
OLLAMA_PORT = 11434  # where Ollama listens when OLLAMA_HOST names no port
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the chapter's deterministic judge
BUSY = (429, 503)  # "too many requests", "unavailable": the judge asks to be asked later
MAX_RETRY_WAIT = 60  # seconds: the longest wait a server's Retry-After gets

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



def one_line(text, width=80):
    """`text` fit for a one-line message: runs of whitespace (newlines too) as one space, cut
    to `width` characters with "...", and a lone surrogate (which no output encoding takes)
    written as its escape, such as \\ud800."""
    line = " ".join(text.split())
    if len(line) > width:
        line = line[:width] + "..."
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def request_body(prompt, model, backend, max_tokens=None, role="user", sampling=None):
    """The JSON body of one chat request: Ollama's /api/chat or OpenAI's chat completions.
    `max_tokens` caps the reply's length (Ollama's options.num_predict, OpenAI's max_tokens):
    a judge that rambles stops there, and a shorter reply is the same with or without it.
    `role` "assistant" sends `prompt` as the start of the model's own turn, which it continues;
    `sampling` (seed, temperature, top_p) replaces the chapter's deterministic seed 123 and
    temperature 0 where given."""
    messages = [{"role": role, "content": prompt}]
    if backend == "openai":
        body = {"model": model, "messages": messages, "temperature": 0, "seed": 123,
                **(sampling or {})}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body
    options = {**OPTIONS, **(sampling or {})}
    if max_tokens is not None:
        options["num_predict"] = max_tokens
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
                retries=3, backoff=1.0, max_tokens=None, role="user", sampling=None):
    """Send `prompt` to the judge at `url` (its chat endpoint or server address) and return
    the reply text, which must be complete within `timeout` seconds; `max_tokens` caps its
    length, `role` and `sampling` say how it is asked (see request_body).

    Failed or dropped connections, replies late or cut short, busy answers (HTTP 429) and server
    errors (HTTP 5xx) are retried `retries` times, after waits of backoff, 2 x backoff, ...
    seconds, or as long as the server's Retry-After asks (at most MAX_RETRY_WAIT). Raises
    JudgeUnreachable when no complete answer came, JudgeError for any other failure."""
    url = chat_url(url, backend)
    body = request_body(prompt, model, backend, max_tokens, role, sampling)
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


def judge_name(backend, model):
    """The judge as the score files name it, wherever it is served: "ollama/llama3" (Ollama's
    "llama3:latest" is the same model as "llama3")."""
    if backend == "ollama" and model.endswith(":latest"):
        model = model[:-len(":latest")]
    return f"{backend}/{model}"
