"""The start and end that every script asking a model server for many replies shares.

A job is a list of prompts, asked through the judge's client and pool (kit.judge_store's
`ask_all`, each reply kept in a `ReplyFile` the moment it arrives, so that a stopped run keeps
every reply it received and a rerun asks only for what is missing): the same flags, deadlines,
retries and stop within a second as the judge's scoring. `start` checks the flags and the
server as ollama_evaluate.py does, and `asking` turns what can end a job into one line that
says how to go on.
"""

import contextlib
import os
import sys

from kit.files import WriteError, fail
from kit.judge_cli import asker, judge_url, require_judge
from kit.judge_client import JudgeError, JudgeUnreachable
from kit.signals import exit_code, stop_line, stop_signals_raise


def start(args, needed=True):
    """Check the server flags (one Error line, exit 2) and, when `needed` (something is left
    to ask), that the server answers and has the model (one line, exit 1, as
    ollama_evaluate.py says it). Return `ask(prompt, **how)`: query_model with the flags'
    model, server, deadline, retries and reply cap."""
    url = judge_url(args)
    if needed:
        require_judge(url, args.model, args.backend, "Model server")
    return asker(args, url)


@contextlib.contextmanager
def asking(path):
    """Within the block, SIGTERM and SIGHUP stop as Ctrl-C does, and what ends a job ends the
    program in one line that names `path`, where the replies so far are, and says how to go on:
    a stop (exit 130 for Ctrl-C, 143 for SIGTERM), a server that does not answer or answers
    nonsense (exit 1), a file that cannot be written (exit 1)."""
    again = "run the same command to continue"
    try:
        with stop_signals_raise():
            yield
    except JudgeUnreachable as exc:
        fail(f"{exc}. The replies so far are in {path}; {again}.", code=1)
    except JudgeError as exc:
        fail(f"{exc}. The replies so far are in {path}.", code=1)
    except WriteError as exc:
        fail(f"could not write {exc.filename} ({exc.strerror}); the replies so far are in "
             f"{path}; free space and {again}.", code=1)
    except KeyboardInterrupt as exc:
        print(f"\n{stop_line(exc, f'the replies so far are in {path}', again)}", file=sys.stderr)
        raise SystemExit(exit_code(exc)) from None


def left_out_line(counts, total, noun="entries"):
    """'Left out 3 of 20 entries: 2 empty replies, 1 repeating the output' for `counts` (a
    Counter of reasons, in the order first counted); None when nothing was left out."""
    left = sum(counts.values())
    if not left:
        return None
    reasons = ", ".join(f"{count} {reason}" for reason, count in counts.items() if count)
    return f"Left out {left} of {total} {noun}: {reasons}"


def reply_file_beside(output):
    """Where the replies behind `output` are kept: its name with -replies.jsonl."""
    return os.path.splitext(output)[0] + "-replies.jsonl"

