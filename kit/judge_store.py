"""The judge's replies as they arrive: the file that keeps them (ReplyFile, ScoreStore) and the
pool that asks for them and stops within a second (ask_all, score_prompts).

Each reply is appended to a JSON Lines file the moment it arrives, keyed by the model and the
SHA-256 of exactly what was asked, so that a run that is stopped (Ctrl-C, SIGTERM, a server gone
away, a full disk) keeps every reply it received and a rerun asks only for what is missing.
Requests run on daemon threads, and a stop signal is only noted while they are awaited: the
replies in flight get STOP_WAIT seconds, every one that arrived is saved, and the program stops
whatever the server still does. `reported_failures` ends a run that failed or was stopped in
one line that says where its replies are and that a rerun continues.
"""

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, wait

from tqdm import tqdm

from kit.files import WriteError, fail
from kit.judge_client import JudgeError, JudgeUnreachable, one_line
from kit.judge_prompts import JUDGE_PROMPTS, prompt_sha256
from kit.signals import Interrupted, exit_code, heeded_signals, in_main_thread

STOP_WAIT = 0.5  # seconds that Ctrl-C waits for the replies in flight before it stops
STOP_POLL = 0.1  # seconds between looks for a stop signal while replies are awaited


class ReplyFile:
    """Records kept in a JSON Lines file, one a line, indexed by `key(record)`: by default
    {"model", "prompt_sha256", ...}, the model's name and the hash of what it was asked.

    Lines are only ever appended, each flushed at once, so a run that is stopped keeps every
    record written before, and records of other models stay on disk. A last line cut short by a
    kill or a full disk is skipped, as is any line that is no record (`is_record`). With `path`
    None the records are kept in memory only.
    """

    def __init__(self, path=None):
        self.path = path
        self.records = {}
        self.needs_newline = False  # the file ends in a line cut short
        if path is not None and os.path.exists(path):
            with open(path, "rb") as f:
                self.read(f.read())

    def read(self, content):
        """Index the records among `content`, the file's bytes."""
        self.needs_newline = bool(content) and not content.endswith(b"\n")
        for line in content.splitlines():
            self.remember(line)

    def is_record(self, record):
        """Whether a dict read from the file is one of this file's records."""
        return isinstance(record.get("model"), str) and isinstance(record.get("prompt_sha256"),
                                                                   str)

    def key(self, record):
        """What a record is found by: (model, prompt hash)."""
        return record["model"], record["prompt_sha256"]

    def remember(self, line):
        """Index one saved line; lines that are not records are skipped."""
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: a line of deeply nested JSON
            return
        if isinstance(record, dict) and self.is_record(record):
            self.records[self.key(record)] = record

    def get(self, *key):
        """The record saved under `key`, or None."""
        return self.records.get(key)

    def append(self, record):
        """Keep `record`, appended to the file and flushed at once. Raises WriteError naming the
        file when it cannot be written (every line before stays whole)."""
        self.records[self.key(record)] = record
        if self.path is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n" * self.needs_newline + json.dumps(record) + "\n")
            except OSError as exc:
                self.needs_newline = True  # the line may be cut short
                raise WriteError(exc.errno, exc.strerror or str(exc), self.path) from exc
            self.needs_newline = False


class ScoreStore(ReplyFile):
    """The judge's replies, one JSON line each: {"judge", "prompt_sha256", "index",
    "instruction", "score", "reply"}, where index and instruction name the (first) entry the
    prompt was built from; lines written before they were added have neither. A ReplyFile
    whose records are found by (judge, prompt hash); `foreign` says that the file holds text
    but no record, so it is no score file.
    """

    def __init__(self, path=None):
        self.foreign = False
        super().__init__(path)

    def read(self, content):
        """Index the records, and note whether the file is a score file at all."""
        super().read(content)
        # (a file whose first record was cut short by a kill starts as a record does)
        self.foreign = (bool(content.strip()) and not self.records
                        and not content.lstrip().startswith(b'{"judge": '))

    def is_record(self, record):
        """Whether a dict read from the file is a judge's reply (a score or none)."""
        return (isinstance(record.get("judge"), str)
                and isinstance(record.get("prompt_sha256"), str)
                and (record.get("score") is None or type(record.get("score")) is int))

    def key(self, record):
        """What a reply is found by: (judge, prompt hash)."""
        return record["judge"], record["prompt_sha256"]

    def saved(self, judge, prompt):
        """The saved record of `judge` answering exactly `prompt`, whatever its score, or None."""
        return self.get(judge, prompt_sha256(prompt))

    def find(self, judge, prompt, style=JUDGE_PROMPTS["score"]):
        """The saved record of `judge` answering exactly `prompt`, or None. A score outside the
        scale of `style`, which only an edited file holds, counts as none, so it is asked again."""
        record = self.saved(judge, prompt)
        score = None if record is None else record["score"]
        return None if score is not None and not style.low <= score <= style.high else record

    def add(self, judge, prompt, score, reply, index, instruction):
        """Save one reply to the prompt of entry `index`, appended and flushed at once. Raises
        WriteError naming the file when it cannot be written (every line before stays whole)."""
        self.append({"judge": judge, "prompt_sha256": prompt_sha256(prompt), "index": index,
                     "instruction": instruction, "score": score, "reply": reply})


def start_requests(ask, prompts, workers):
    """Start `ask(prompt)` for each of `prompts` on `workers` threads; return {future: prompt}.

    The threads are daemon threads, which the program does not wait for when it ends (those of
    a ThreadPoolExecutor it does), so that a stop need not wait for a judge that is slow to
    answer: an abandoned request ends with the program. A future cancelled before a thread
    takes it is marked done unasked, so that a wait for it ends."""
    futures = {Future(): prompt for prompt in prompts}
    work = queue.SimpleQueue()
    for item in futures.items():
        work.put(item)

    def serve():
        while True:
            try:
                future, prompt = work.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(ask(prompt))
                except BaseException as exc:  # noqa: BLE001 (the future carries it to the caller)
                    future.set_exception(exc)

    for _ in range(min(workers, len(futures))):
        threading.Thread(target=serve, daemon=True).start()
    return futures


def cancel(futures):
    """Cancel the futures not yet started."""
    for future in futures:
        future.cancel()


class StopNote:
    """A signal handler that only takes note: `signum` is the first stop signal that came,
    `count` how many came."""

    def __init__(self):
        self.signum, self.count = None, 0

    def __call__(self, signum, frame):
        self.signum = self.signum or signum
        self.count += 1


_stop_note = None  # the StopNote of the running stop_signals_noted block, if any


@contextlib.contextmanager
def stop_signals_noted():
    """Within the block, Ctrl-C, SIGTERM and SIGHUP raise nothing: a StopNote takes note of
    them, and the code looks at it where it can stop. So no Ctrl-C is lost (a KeyboardInterrupt
    raised while the interpreter runs a callback of its own, such as an import's, is printed
    and dropped) and none cuts short the saving of a reply or the last line. Blocks nest (the
    outermost one's note serves all); outside the main thread nothing changes."""
    global _stop_note
    if _stop_note is not None or not in_main_thread():
        yield _stop_note or StopNote()
        return
    _stop_note = note = StopNote()
    previous = {signum: signal.signal(signum, note) for signum in heeded_signals()}
    try:
        yield note
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop_note = None


def arrivals(futures, stop):
    """The futures as they finish, as as_completed yields them, looking at `stop` (a StopNote)
    between waits: a stop signal raises Interrupted within STOP_POLL seconds."""
    pending = set(futures)
    while pending:
        if stop.count:
            raise Interrupted(stop.signum)
        done, pending = wait(pending, timeout=STOP_POLL, return_when=FIRST_COMPLETED)
        yield from done


def stop_waiting(futures, save, saved, stop):
    """After a stop signal: send no more requests, give the replies in flight STOP_WAIT
    seconds to arrive (another signal, noted by `stop`, ends the wait), and save every reply
    that arrived. The requests still in flight are abandoned: the judge's reply is not waited
    for, however slow it is."""
    cancel(futures)
    seen, end = stop.count, time.monotonic() + STOP_WAIT
    pending = {future for future in futures if not future.done()}
    while pending and stop.count == seen and time.monotonic() < end:
        _, pending = wait(pending, timeout=min(STOP_POLL, max(end - time.monotonic(), 0)))
    for future in futures:
        if (future.done() and not future.cancelled() and future not in saved
                and future.exception() is None):
            save(future)


def ask_all(todo, ask, keep, workers=1):
    """Call `ask(prompt)` for each prompt of `todo` on `workers` threads (start_requests), and
    `keep(prompt, reply)` in this thread as each reply arrives, to save it at once.

    When a request fails no more are sent, the replies to those in flight are still kept, and
    the error is raised; an error of `keep` (a WriteError) sends no more and is raised. Ctrl-C,
    SIGTERM and SIGHUP are noted while replies are awaited: the replies in flight get STOP_WAIT
    seconds to arrive, every reply that arrived is kept, and KeyboardInterrupt (Interrupted) is
    raised at once, whatever the server still does (see stop_waiting).
    """
    error = None
    futures = {}
    kept = set()

    def keep_reply(future):
        keep(futures[future], future.result())
        kept.add(future)

    with stop_signals_noted() as stop:
        try:
            futures = start_requests(ask, todo, workers)
            for future in arrivals(futures, stop):
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    error = error or future.exception()
                    cancel(futures)
                    continue
                keep_reply(future)
        except KeyboardInterrupt:
            stop_waiting(futures, keep_reply, kept, stop)
            raise
        except BaseException:  # WriteError: send no more requests
            cancel(futures)
            raise
    if error is not None:
        raise error


def score_prompts(prompts, entries, judge, ask, workers=1, store=None,
                  style=JUDGE_PROMPTS["score"], desc="Scoring entries"):
    """Return the score for each prompt (built from the entry of `entries` at the same place):
    None where the reply held no score, the lowest score (0, or 1 on the rubric's scale) for a
    None prompt (an empty response, not asked). `desc` names the progress bar.

    Only prompts without a saved reply of `judge` in `store` are asked, each once, by `workers`
    threads calling `ask(prompt)` (Ollama serves several at once with OLLAMA_NUM_PARALLEL); each
    reply is read by `style.parse` and saved as it arrives, with the index and instruction of
    the first entry that has the prompt. The result does not depend on `workers`. A failure and
    Ctrl-C end the asking as ask_all says, every reply that arrived saved.
    """
    store = ScoreStore() if store is None else store
    todo = Counter(p for p in prompts if p is not None and store.find(judge, p, style) is None)
    first = {}
    for index, prompt in enumerate(prompts):
        first.setdefault(prompt, index)

    with tqdm(total=len(prompts), initial=len(prompts) - todo.total(), desc=desc) as bar:
        def save(prompt, reply):
            """Save one reply and report it when it holds no score."""
            score = style.parse(reply)
            index = first[prompt]
            store.add(judge, prompt, score, reply, index, entries[index]["instruction"])
            if score is None:  # on one line, a rubric reply's feedback too
                tqdm.write(f"Could not convert score: {one_line(reply) or '(an empty reply)'}")
            bar.update(todo[prompt])

        ask_all(todo, ask, save, workers)
    return [style.low if p is None else store.find(judge, p, style)["score"] for p in prompts]


def unanswered(prompts, store, judge, style=JUDGE_PROMPTS["score"]):
    """How many of `prompts` have no saved reply of `judge` yet (None, an empty response, is
    never asked)."""
    return sum(p is not None and store.find(judge, p, style) is None for p in prompts)


def out_of_scale(prompts, store, judge, style):
    """How many of `prompts` have a saved score of `judge` outside the style's scale."""
    return sum(p is not None and store.saved(judge, p) is not None
               and store.find(judge, p, style) is None for p in prompts)


def saved_replies(prompts, store, judge, style):
    """The judge's saved reply to each prompt; None for an empty response, never asked."""
    return [None if p is None else store.find(judge, p, style)["reply"] for p in prompts]


@contextlib.contextmanager
def reported_failures(so_far, write_failure):
    """Within the block, what ends the asking ends the program in one line: a judge that does
    not answer (its reason and `so_far`, where the replies so far are and that a rerun
    continues), another judge error, a file that cannot be written (`write_failure(exc)`), all
    exit 1; Ctrl-C, SIGTERM or SIGHUP (the signal and `so_far`, exit 130, 143 or 129). Stop
    signals are only noted within the block, so that none cuts the last line short."""
    with stop_signals_noted():
        try:
            yield
        except JudgeUnreachable as exc:
            fail(f"{exc}. {so_far}", code=1)
        except JudgeError as exc:
            fail(str(exc), code=1)
        except WriteError as exc:
            fail(write_failure(exc), code=1)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM or SIGHUP (Interrupted)
            code = exit_code(exc)
            stopped = "Interrupted" if code == 128 + signal.SIGINT else f"Stopped by {exc}"
            print(f"\n{stopped}. {so_far}", file=sys.stderr)
            raise SystemExit(code) from None


def ignore_stop_signals():
    """Ignore Ctrl-C, SIGTERM and SIGHUP from now on: for a program that has said its last line
    and ends, which a repeated Ctrl-C would otherwise interrupt in the interpreter's own
    shutdown, with a traceback after that line."""
    for signum in heeded_signals():
        signal.signal(signum, signal.SIG_IGN)
