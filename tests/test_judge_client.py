"""The judge's HTTP client (kit/judge_client.py) against the loopback judge: its addresses,
requests, retries, deadlines, sessions and errors."""

import threading
import time
from types import SimpleNamespace

import pytest
import requests
from judge_helpers import entry

from kit import judge_client as client
from kit.data import format_input
from kit.judge_prompts import judge_prompt

pytest_plugins = ["judge_helpers"]  # the `judge` fixture


def test_request_follows_the_chapters_protocol(judge):
    e = entry("good", 0)
    assert client.query_model(judge_prompt(e, "model_response"), url=judge.url) == "90"
    prompt = (f"Given the input `{format_input(e)}` and correct output `out 0`, score the model "
              "response `good` on a scale from 0 to 100, where 100 is the best score. Respond "
              "with the integer number only.")
    assert judge.bodies == [{"model": "llama3",
                             "messages": [{"role": "user", "content": prompt}],
                             "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}]


def test_retries_on_server_errors_and_dropped_connections(judge):
    judge.failures = [500, "drop", 503]
    assert client.query_model("score the model response `good` on a scale", url=judge.url,
                          backoff=0) == "90"
    assert len(judge.bodies) == 4
    judge.failures = [500] * 3
    with pytest.raises(client.JudgeError, match=r"answered HTTP 500"):
        client.query_model("x", url=judge.url, retries=2, backoff=0)
    assert len(judge.failures) == 0


def test_a_connection_closed_while_idle_is_reopened_at_once(judge):
    judge.failures = ["close"]  # answers, then closes the kept-open connection
    assert client.query_model("x", url=judge.url) == "50"
    assert judge.closed.wait(10)
    assert client.query_model("score the model response `good` on a scale", url=judge.url,
                          retries=0) == "90"  # on a new connection, without a retry
    assert len(judge.bodies) == 2 and len(judge.connections) == 2
    judge.failures = ["drop"]  # a hang-up in the middle of a request is an error
    with pytest.raises(client.JudgeUnreachable,
                       match=r"^no answer from .*/api/chat: Remote end closed connection "
                             r"without response$"):
        client.query_model("x", url=judge.url, retries=0)


def test_an_error_in_the_stream_is_no_reply():
    chunk = b'{"message": {"content": "8"}, "done": false}\n'
    assert client.read_reply(chunk + b'{"done": true}\n', "ollama") == "8"
    with pytest.raises(ValueError, match="runner stopped"):
        client.read_reply(chunk + b'{"error": "runner stopped"}\n', "ollama")


def test_client_errors_are_not_retried(judge):
    with pytest.raises(client.JudgeError) as error:
        client.query_model("x", model="mistral", url=judge.url, backoff=0)
    assert str(error.value) == (f"model 'mistral' is not available on the Ollama server at "
                                f"{judge.root} (it says: model \"mistral\" not found, try "
                                "pulling it first); run: ollama pull mistral")
    assert len(judge.bodies) == 1
    judge.failures = [400]
    with pytest.raises(client.JudgeError, match=r"^http://.*/api/chat answered HTTP 400: "
                                            r"overloaded$"):
        client.query_model("x", url=judge.url, backoff=0)
    assert len(judge.bodies) == 2


# --- judge addresses as Ollama's clients take them ---

@pytest.mark.parametrize(("address", "backend", "url"), [
    ("http://127.0.0.1:11434", "ollama", "http://127.0.0.1:11434/api/chat"),
    ("http://127.0.0.1:11434/", "ollama", "http://127.0.0.1:11434/api/chat"),
    ("127.0.0.1:11434", "ollama", "http://127.0.0.1:11434/api/chat"),
    ("localhost", "ollama", "http://localhost:11434/api/chat"),
    ("[::1]", "ollama", "http://[::1]:11434/api/chat"),
    ("https://judge.example.com", "ollama", "https://judge.example.com/api/chat"),
    ("http://judge:8080/custom/chat", "ollama", "http://judge:8080/custom/chat"),
    ("http://localhost:11434/api/chat", "ollama", "http://localhost:11434/api/chat"),
    ("http://127.0.0.1:8000", "openai", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/v1", "openai", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/v1/", "openai", "http://127.0.0.1:8000/v1/chat/completions"),
    ("127.0.0.1:8080", "openai", "http://127.0.0.1:8080/v1/chat/completions"),
    ("localhost", "openai", "http://localhost/v1/chat/completions"),
])
def test_chat_url_completes_a_server_address(address, backend, url):
    assert client.chat_url(address, backend) == url


@pytest.mark.parametrize("address", ["ftp://host/x", "http://", "localhost:port", "host:0",
                                     "http://:11434"])
def test_chat_url_refuses_what_is_no_http_address(address):
    with pytest.raises(ValueError):
        client.chat_url(address)


def test_the_library_functions_take_a_server_address_too(judge):
    assert client.check_judge(judge.root, "llama3") is None
    assert client.query_model("score the model response `good` on a scale", url=judge.root) == "90"
    assert judge.requests == [("GET", "/api/tags"), ("POST", "/api/chat")]


def test_a_judge_that_went_down_is_retried_then_named(closed_port):
    with pytest.raises(client.JudgeUnreachable,
                       match=rf"^no answer from {closed_port}/api/chat: .*Connection refused$"):
        client.query_model("x", url=closed_port, retries=2, backoff=0)


# --- the requests session ---

def test_each_thread_keeps_one_session_and_one_connection(judge):
    sessions = []

    def three_queries():
        for _ in range(3):
            client.query_model("x", url=judge.url)
        sessions.append(client.session())

    threads = [threading.Thread(target=three_queries) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(session, requests.Session) for session in sessions)
    assert sessions[0] is not sessions[1]
    assert len(judge.bodies) == 6 and len(judge.connections) == 2


def test_proxy_settings_are_not_used_for_the_judge(judge, closed_port, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, closed_port)  # a proxy that is down
    assert client.query_model("score the model response `good` on a scale", url=judge.url) == "90"


def test_a_cut_reply_is_retried(judge):
    judge.failures = ["cut", "cut"]
    assert client.query_model("score the model response `good` on a scale", url=judge.url,
                          backoff=0) == "90"
    assert len(judge.bodies) == 3


# --- busy judges and odd answers ---

def test_a_busy_judge_is_asked_again_after_the_wait_it_names(judge, monkeypatch):
    waits = []
    monkeypatch.setattr(client, "time", SimpleNamespace(sleep=waits.append,
                                                        monotonic=time.monotonic))
    judge.failures = [(429, {"error": "slow down"}, {"Retry-After": "2"}),
                      (503, {"error": "busy"}, {"Retry-After": "3600"}), 429, None]
    assert client.query_model("score the model response `good` on a scale", url=judge.url,
                          backoff=0.25) == "90"
    assert waits == [2.0, 60.0, 1.0]  # as asked; at most a minute; else backoff x 2 ** 2
    judge.failures = [429, 429]
    with pytest.raises(client.JudgeUnreachable) as error:
        client.query_model("x", url=judge.url, retries=1, backoff=0)
    assert str(error.value) == (f"{judge.url} answered HTTP 429 (overloaded) to every try: the "
                                "judge is busy; use fewer --workers or more --retries")


@pytest.mark.parametrize(("value", "seconds"), [
    ("5", 5.0), ("0.5", 0.5), ("-3", 0.0), ("86400", 60.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ("soon", None), ("nan", None), ("", None),
])
def test_retry_after(value, seconds):
    response = requests.Response()
    response.headers["Retry-After"] = value
    assert client.retry_after(response) == seconds
