"""A judge server for the tests, on 127.0.0.1: Ollama's streaming /api/chat and /api/tags, and
an OpenAI-compatible /v1/chat/completions and /v1/models.

It checks each request body as the chapter's protocol has it (answering 400 otherwise), records
the prompts it was asked, answers per model response, and can be told to fail or be slow.
It speaks HTTP/1.1 and keeps connections open between requests, as Ollama does. It only ever
listens on 127.0.0.1.
"""

import http.server
import json
import re
import threading
import time

OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}


class FakeJudge:
    """Start with `FakeJudge(answers)`; `answers` maps a model response to the judge's reply."""

    def __init__(self, answers=None, models=("llama3:latest",), openai_models=("judge",),
                 delay=0.0):
        self.answers = dict(answers or {})
        self.models = list(models)
        self.openai_models = list(openai_models)
        self.delay = delay
        self.failures = []  # per chat request, in order: an HTTP status, or "drop"
        self.requests = []  # every request, in order: (method, path)
        self.prompts = []
        self.bodies = []
        self.lock = threading.Lock()
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as Go servers such as Ollama do

            def log_message(self, *args):
                pass

            def do_GET(self):
                with judge.lock:
                    judge.requests.append(("GET", self.path))
                if self.path == "/api/tags":
                    self.send_json(200, {"models": [{"name": m} for m in judge.models]})
                elif self.path == "/v1/models":
                    self.send_json(200, {"data": [{"id": m} for m in judge.openai_models]})
                else:
                    self.send_json(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append(("POST", self.path))
                    judge.bodies.append(body)
                    failure = judge.failures.pop(0) if judge.failures else None
                if failure == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)  # hang up without an answer
                    return
                if failure is not None:
                    return self.send_json(failure, {"error": "overloaded"})
                problem = judge.check(self.path, body)
                if problem:
                    return self.send_json(problem[0], {"error": problem[1]})
                prompt = body["messages"][0]["content"]
                with judge.lock:
                    judge.prompts.append(prompt)
                time.sleep(judge.delay)
                reply = judge.reply(prompt)
                if self.path == "/api/chat":
                    self.stream(reply, body["model"])
                else:
                    self.send_json(200, {"choices": [{"message": {"role": "assistant",
                                                                  "content": reply}}]})

            def send_json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def stream(self, reply, model):
                """Ollama's reply: JSON lines with a few characters each, then done."""
                lines = [json.dumps({"model": model, "message": {"role": "assistant",
                                                                 "content": reply[i:i + 3]},
                                     "done": False}) for i in range(0, len(reply), 3)]
                lines.append(json.dumps({"model": model, "message": {"role": "assistant",
                                                                     "content": ""},
                                         "done": True}))
                data = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.root + "/api/chat"
        self.openai_url = self.root + "/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,),  # quick to shut down
                         daemon=True).start()

    def check(self, path, body):
        """(status, reason) when the body breaks the protocol, else None."""
        messages = body.get("messages")
        if not (isinstance(messages, list) and len(messages) == 1
                and messages[0].get("role") == "user"):
            return 400, "expected one user message"
        if path == "/api/chat":
            if body.get("options") != OPTIONS:
                return 400, f"options must be {OPTIONS}"
            if body["model"] not in self.models and f"{body['model']}:latest" not in self.models:
                return 404, f"model '{body['model']}' not found"
        elif path == "/v1/chat/completions":
            if body.get("temperature") != 0 or body.get("seed") != 123:
                return 400, "expected temperature 0 and seed 123"
            if body["model"] not in self.openai_models:
                return 404, "model not found"
        else:
            return 404, "not found"
        return None

    def reply(self, prompt):
        """The answer for the model response quoted in the chapter's scoring prompt."""
        response = re.search(r"score the model response `(.*)` on a scale", prompt, re.S)
        return self.answers.get(response.group(1), "50") if response else "50"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
