"""A judge server on 127.0.0.1 for the tests, and for trying the judge flow without Ollama.

    python kit/loopback_judge.py --port 11434 [--delay 0.1] [--backend ollama|openai]

It serves Ollama's streaming /api/chat and /api/tags and, as Ollama also does, an
OpenAI-compatible /v1/chat/completions and /v1/models (with `--backend openai` only these, as
llama.cpp or vLLM would), until Ctrl-C. It answers both of ollama_evaluate.py's prompts: the
chapter's 0-100 prompt with a number, and the rubric prompt with a line of feedback and a last
line "Score: N". Unless told otherwise, the score is how much of the correct output the
response repeats: the share of the output's words found in the response, 0-100 or 1-5.
The side-by-side prompt (--pairwise) gets a sentence and a verdict, [[A]] or [[B]] for the
response that repeats more of the output's words and [[C]] when both repeat as much; with
`--pairwise always-a` it always answers [[A]], as a judge biased to the first position would.
For the data tools it rewrites an output when asked to make it more polite ("Thank you for
asking! " before it) or impolite ("Obviously, " before it), and continues an assistant
message, the start of a user turn as Magpie sends it, with an instruction that the request's
seed chooses ("Name a word that rhymes with 'cat'."), which it then answers when asked.

The tests start a `FakeJudge` in their own process: it checks each request body as the chapter's
protocol has it (answering 400 otherwise), records the prompts it was asked, answers per model
response, and can be told to be slow or to misbehave as real servers do: fail, be busy, stream
on and on, end a reply before its end, send null content or bytes that are no answer. It
speaks HTTP/1.1, streams Ollama's replies in chunks and keeps connections open between
requests, as Ollama does. It only ever listens on 127.0.0.1.
"""

import argparse
import http.server
import json
import re
import socket
import threading
import time

OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
PATHS = {"ollama": ("/api/chat", "/api/tags"), "openai": ("/v1/chat/completions", "/v1/models")}
ENDLESS_PIECES = 600  # a reply that streams on and on: at most this many pieces,
ENDLESS_PIECE_S = 0.05  # one each this many seconds (30 s in all), until the client hangs up
SCORE_PROMPT = re.compile(r"correct output `(.*)`, score the model response `(.*)` on a scale",
                          re.S)
REWRITE_PROMPT = re.compile(r"correct output `(.*)`, slightly rewrite the output to be more "
                            r"(polite|impolite)\.", re.S)
RHYMES = {"cat": "hat", "tree": "bee", "light": "night", "stone": "bone", "rain": "train",
          "song": "long", "bread": "red", "moon": "spoon", "fire": "wire", "road": "toad",
          "glass": "grass", "cake": "lake"}  # what the instructions it writes ask, by seed
WORDS = tuple(RHYMES)
INSTRUCTION = re.compile(r"Name a word that rhymes with '(\w+)'\.")
RUBRIC_PROMPT = re.compile(r"<reference_answer>\n(.*)\n</reference_answer>\n<response>\n(.*)\n"
                           r"</response>", re.S)
PAIRWISE_PROMPT = re.compile(r"<reference_answer>\n(.*)\n</reference_answer>\n<response_a>\n(.*)\n"
                             r"</response_a>\n<response_b>\n(.*)\n</response_b>", re.S)
PAIRWISE_MODES = ("fair", "always-a")  # see FakeJudge.pairwise_reply


def chunk(text):
    """`text` as one chunk of HTTP/1.1's chunked transfer encoding."""
    data = text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def sampling_ok(settings, deterministic):
    """Whether a request's sampling `settings` are the chapter's `deterministic` ones, or
    sampled as the book's Magpie notebook asks: temperature 1, top_p 1, a whole-number seed."""
    sampled = {**deterministic, "temperature": 1.0, "top_p": 1.0, "seed": settings.get("seed")}
    return settings == deterministic or (type(settings.get("seed")) is int
                                         and settings == sampled)


def token_cap(value):
    """Whether `value` can cap a reply's length: a whole number of tokens from 1."""
    return type(value) is int and value >= 1


def word_overlap(reference, response):
    """The share (0 to 1) of the reference's distinct words that the response also holds."""
    words = set(re.findall(r"\w+", reference.lower()))
    if not words:
        return 1.0
    return len(words & set(re.findall(r"\w+", response.lower()))) / len(words)


class FakeJudge:
    """Start with `FakeJudge(answers)`; `answers` maps a model response to the judge's reply to
    the chapter's prompt, `rubric_answers` to its reply to the rubric prompt. `models` None is
    Ollama with no model pulled (its /api/tags lists null). `backends` are the APIs served
    ("ollama", "openai"); `port` 0 takes a free one. `pairwise` is how it answers the
    side-by-side prompt: "fair" or "always-a" (see pairwise_reply)."""

    def __init__(self, answers=None, models=("llama3:latest",), openai_models=("judge",),
                 delay=0.0, rubric_answers=None, backends=("ollama", "openai"), port=0,
                 pairwise="fair"):
        self.pairwise = pairwise
        self.answers = dict(answers or {})
        self.rubric_answers = dict(rubric_answers or {})
        self.rewrites = {}  # output -> the reply to the prompt that asks to rewrite it
        self.instructions = {}  # seed -> the reply to a user turn's start (an instruction)
        self.chat_answers = {}  # plain prompt (an instruction) -> the reply to it
        self.models = None if models is None else list(models)
        self.openai_models = list(openai_models)
        self.delay = delay
        self.paths = {path for backend in backends for path in PATHS[backend]}
        # Per chat request, in order (None: answer as usual): an HTTP status, a (status, JSON
        # body) pair or a (status, JSON body, headers) triple, bytes (sent as the 200 answer's
        # body), "drop" (hang up without an answer), "close" (answer, then close the
        # connection), "endless" (stream on and on), "cut" (a reply that ends without saying it
        # is complete) or "null" (a complete reply whose content is null).
        self.failures = []
        self.requests = []  # every request, in order: (method, path)
        self.connections = set()  # the client ports requests came from: one per connection
        self.prompts = []
        self.bodies = []
        self.closed = threading.Event()  # set when a "close" failure has closed its connection
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
                    judge.connections.add(self.client_address[1])
                served = self.path in judge.paths
                if served and self.path == "/api/tags":
                    self.send_json(200, {"models": None if judge.models is None else
                                         [{"name": m} for m in judge.models]})
                elif served and self.path == "/v1/models":
                    self.send_json(200, {"data": [{"id": m} for m in judge.openai_models]})
                else:
                    self.page_not_found()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append(("POST", self.path))
                    judge.connections.add(self.client_address[1])
                    judge.bodies.append(body)
                    failure = judge.failures.pop(0) if judge.failures else None
                if failure == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # hang up without an answer
                    return
                if isinstance(failure, int):
                    return self.send_json(failure, {"error": "overloaded"})
                if isinstance(failure, tuple):
                    return self.send_json(*failure)
                if isinstance(failure, bytes):
                    return self.send_data(200, "application/json", failure)
                if self.path not in judge.paths or self.path.endswith(("/tags", "/models")):
                    return self.page_not_found()
                problem = judge.check(self.path, body)
                if problem:
                    return self.send_json(*problem)
                prompt = body["messages"][0]["content"]
                with judge.lock:
                    judge.prompts.append(prompt)
                if judge.delay:
                    time.sleep(judge.delay)
                reply = None if failure == "null" else judge.answer(body["messages"][0],
                                                                     body)
                if failure == "endless":
                    self.stream_endlessly(body["model"])
                elif self.path == "/api/chat":
                    self.stream(reply, body["model"], done=failure != "cut")
                else:
                    self.send_json(200, {"choices": [{
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": None if failure == "cut" else "stop"}]})
                if failure == "close":  # as a server closing an idle kept-open connection
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    judge.closed.set()

            def send_json(self, status, payload, headers=None):
                self.send_data(status, "application/json", json.dumps(payload).encode(),
                               headers)

            def page_not_found(self):
                """What Ollama's router answers for a path it does not serve."""
                self.send_data(404, "text/plain", b"404 page not found")

            def send_data(self, status, content_type, data, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def start_stream(self):
                """The headers of a streamed answer, as Ollama sends them: chunked, no length."""
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

            def stream(self, reply, model, done=True):
                """Ollama's reply, written at once: a chunk per JSON line of a few characters,
                then (when `done`) the line that says done, and the end of the stream. A None
                reply is one line whose content is null."""
                if reply is None:
                    lines = [{"model": model, "message": {"role": "assistant", "content": None},
                              "done": True, "done_reason": "stop"}]
                else:
                    lines = [{"model": model, "message": {"role": "assistant",
                                                          "content": reply[i:i + 3]},
                              "done": False} for i in range(0, len(reply), 3)]
                    if done:
                        lines.append({"model": model,
                                      "message": {"role": "assistant", "content": ""},
                                      "done": True, "done_reason": "stop"})
                self.start_stream()
                self.wfile.write(b"".join(chunk(json.dumps(line) + "\n") for line in lines)
                                 + b"0\r\n\r\n")

            def stream_endlessly(self, model):
                """A reply that never says done: a piece each ENDLESS_PIECE_S seconds until the
                client hangs up (or ENDLESS_PIECES were sent)."""
                self.start_stream()
                line = json.dumps({"model": model, "message": {"role": "assistant",
                                                               "content": "and "},
                                   "done": False}) + "\n"
                self.close_connection = True
                try:
                    for _ in range(ENDLESS_PIECES):
                        self.wfile.write(chunk(line))
                        time.sleep(ENDLESS_PIECE_S)
                except OSError:  # the client hung up
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.root + "/api/chat"
        self.openai_url = self.root + "/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,),  # quick to shut down
                         daemon=True).start()

    def check(self, path, body):
        """(status, JSON body) when the request breaks the protocol or names a model that is
        not served, as Ollama answers them; else None."""
        messages = body.get("messages")
        if not (isinstance(messages, list) and len(messages) == 1
                and messages[0].get("role") in ("user", "assistant")):
            return 400, {"error": "expected one user message (or one assistant message to "
                                  "continue)"}
        missing = f'model "{body.get("model")}" not found, try pulling it first'
        if path == "/api/chat":
            options = dict(body.get("options") or {})
            if not token_cap(options.pop("num_predict", 1)) or not sampling_ok(options, OPTIONS):
                return 400, {"error": f"options must be {OPTIONS} (or sampled: temperature 1, "
                                      "top_p 1, any seed), with or without a num_predict from 1"}
            models = self.models or []
            if body["model"] not in models and f"{body['model']}:latest" not in models:
                return 404, {"error": missing}
        else:
            settings = {k: body[k] for k in ("seed", "temperature", "top_p") if k in body}
            if not sampling_ok(settings, {"seed": 123, "temperature": 0}):
                return 400, {"error": "expected temperature 0 and seed 123 (or temperature 1, "
                                      "top_p 1 and any seed)"}
            if not token_cap(body.get("max_tokens", 1)):
                return 400, {"error": "max_tokens must be from 1"}
            if body["model"] not in self.openai_models:
                return 404, {"error": {"message": missing, "type": "api_error"}}
        return None

    def answer(self, message, body):
        """The reply to one chat message: an assistant message (the start of a user turn, as
        Magpie sends it) is continued with an instruction chosen by the request's seed; a
        prompt that asks to rewrite an output is answered with the output made more polite or
        impolite; an instruction it wrote gets its answer; the judge's prompts (and any other)
        as `reply` answers them. Each can be set per seed, output or instruction."""
        prompt = message["content"]
        if message["role"] == "assistant":
            seed = (body.get("options") or body)["seed"]
            if seed in self.instructions:
                return self.instructions[seed]
            word = WORDS[seed % len(WORDS)]
            return f"\nName a word that rhymes with '{word}'.\nI need it for a poem."
        rewrite = REWRITE_PROMPT.search(prompt)
        if rewrite:
            output, politeness = rewrite.groups()
            if output in self.rewrites:
                return self.rewrites[output]
            return (f"Thank you for asking! {output}" if politeness == "polite"
                    else f"Obviously, {output}")
        if prompt in self.chat_answers:
            return self.chat_answers[prompt]
        instruction = INSTRUCTION.fullmatch(prompt)
        if instruction:
            return f"'{RHYMES[instruction.group(1)]}' rhymes with '{instruction.group(1)}'."
        return self.reply(prompt)

    def reply(self, prompt):
        """The answer to one of the two prompts: the reply set for the model response it quotes,
        else a score from the response's word overlap with the correct output; "50" for a
        prompt that is neither. The side-by-side prompt gets pairwise_reply's verdict."""
        pair = PAIRWISE_PROMPT.search(prompt)
        if pair:
            return self.pairwise_reply(*pair.groups())
        rubric = RUBRIC_PROMPT.search(prompt)
        if rubric:
            reference, response = rubric.groups()
            if response in self.rubric_answers:
                return self.rubric_answers[response]
            overlap = word_overlap(reference, response)
            return (f"The response repeats {overlap:.0%} of the reference answer's words.\n"
                    f"Score: {1 + round(4 * overlap)}")
        response = re.search(r"score the model response `(.*)` on a scale", prompt, re.S)
        if response and response.group(1) in self.answers:
            return self.answers[response.group(1)]
        scored = SCORE_PROMPT.search(prompt)
        return str(round(100 * word_overlap(*scored.groups()))) if scored else "50"

    def pairwise_reply(self, reference, response_a, response_b):
        """A sentence and a verdict in MT-Bench's format. "fair": [[A]] or [[B]] for the
        response that repeats more of the reference answer's words, [[C]] when both repeat as
        much; "always-a": [[A]] whatever the responses, as a judge biased to the first position."""
        if self.pairwise == "always-a":
            return "Response A is better.\n[[A]]"
        a, b = word_overlap(reference, response_a), word_overlap(reference, response_b)
        verdict = "A" if a > b else "B" if b > a else "C"
        return (f"Response A repeats {a:.0%} of the reference answer's words, response B "
                f"{b:.0%}.\n[[{verdict}]]")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def main():
    """Serve a fake judge on 127.0.0.1 until Ctrl-C, after one line saying how to use it."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=11434, help="port on 127.0.0.1 "
                        "(default: 11434, Ollama's)")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds to wait before each answer (default: 0)")
    parser.add_argument("--backend", default="ollama", choices=sorted(PATHS),
                        help="ollama: Ollama's API (and its OpenAI-compatible one); openai: "
                             "only the OpenAI-compatible API")
    parser.add_argument("--pairwise", default="fair", choices=PAIRWISE_MODES,
                        help="the side-by-side verdict: fair (the response repeating more of "
                             "the correct output's words; default) or always-a (always [[A]], "
                             "a judge biased to the first position)")
    args = parser.parse_args()
    if not 0 < args.port < 65536:
        raise SystemExit(f"Error: --port must be from 1 to 65535, got {args.port}")
    if args.delay < 0:
        raise SystemExit(f"Error: --delay must be 0 or more seconds, got {args.delay:g}")
    backends = ("ollama", "openai") if args.backend == "ollama" else ("openai",)
    try:
        judge = FakeJudge(models=("llama3:latest",), openai_models=("llama3",), delay=args.delay,
                          backends=backends, port=args.port, pairwise=args.pairwise)
    except OSError as exc:
        raise SystemExit(f"Error: --port {args.port}: cannot listen on 127.0.0.1:{args.port} "
                         f"({exc.strerror}); is Ollama or another server using it? Pick "
                         "another --port") from None
    flags = f"--url {judge.root}" + (" --backend openai" if args.backend == "openai" else "")
    print(f"Fake judge (model llama3) listening; score with: python ollama_evaluate.py {flags} "
          "--file_path <responses.json>   (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        judge.close()


if __name__ == "__main__":
    main()
