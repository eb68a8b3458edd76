"""The judge's command line: the flags that say which model to ask, where and how (shared by
every script that asks a model through the judge's client), the judge script's own flags, their
checks (one Error line naming the flag, exit 2), and the start of the asking: the check that the
server runs and the function that asks it.
"""

import argparse
import math
import os
from functools import partial

from kit.files import fail, image_format
from kit.judge_client import OLLAMA_URL, OPENAI_URL, chat_url, check_judge, query_model
from kit.judge_files import check_writable
from kit.judge_prompts import JUDGE_PROMPTS
from kit.signals import stop_signals_interrupt

MAX_TIMEOUT = 86_400  # seconds (a day): the longest --timeout, far below what timers can wait


def add_server_flags(parser, what="judge", max_tokens_default="none"):
    """Add the flags that say which model to ask, where and how: --model, --url, --backend,
    --timeout, --retries, --max_reply_tokens, --workers. Every script that asks a model through
    this client takes them, with the same meaning; `what` names the model in the help ("judge"),
    `max_tokens_default` the default of --max_reply_tokens."""
    parser.add_argument("--model", default="llama3", help=f"{what} model (default: llama3)")
    parser.add_argument("--url", default=None,
                        help=f"the {what}'s chat endpoint, or its server's address as "
                             f"OLLAMA_HOST is written, such as 127.0.0.1:11434 (default: "
                             f"OLLAMA_HOST when set, else {OLLAMA_URL}; with --backend "
                             f"openai: {OPENAI_URL})")
    parser.add_argument("--backend", default="ollama", choices=["ollama", "openai"],
                        help="ollama, or openai for any OpenAI-compatible server")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds within which each reply must be complete, from sending "
                             "the request to the reply's end; one still streaming then is cut "
                             "off and asked again (default: 120; at most 86400, a day)")
    parser.add_argument("--retries", type=int, default=3,
                        help=f"retries after a connection or server error, a late or cut reply "
                             f"or a busy {what} (HTTP 429, 503), with growing waits or as long "
                             "as the server asks, up to a minute (default: 3)")
    parser.add_argument("--max_reply_tokens", type=int, default=None,
                        help=f"the most tokens the {what} may write per reply: Ollama's "
                             "num_predict, or max_tokens with --backend openai (default: "
                             f"{max_tokens_default})")
    parser.add_argument("--workers", type=int, default=1,
                        help="requests in flight at once (default: 1)")


def build_parser(description):
    """The judge script's flags; `description` (the script's docstring) heads its --help."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file_path", nargs="+",
                        help="JSON file of test entries with the model's responses; several "
                             "files are compared (required, except with --agreement)")
    add_server_flags(parser, "judge", f"{JUDGE_PROMPTS['score'].max_tokens} with --prompt "
                     f"score, {JUDGE_PROMPTS['rubric'].max_tokens} with --prompt rubric")
    parser.add_argument("--prompt", default="score", choices=list(JUDGE_PROMPTS),
                        help="score: the chapter's prompt, 0-100 (default); rubric: a 1-5 "
                             "rubric, with feedback before the score")
    parser.add_argument("--json_key", default=["model_response"], nargs="+",
                        help="field that holds the response to score (default: model_response); "
                             "several keys of one file are compared")
    parser.add_argument("--output", default=None,
                        help="JSON-lines file where each reply is saved as it arrives and "
                             "reused from (default: beside each input, its name with "
                             "-scores.jsonl); one file can hold any files, keys and judges. "
                             "It must be a new path or a score file: another kind of file, a "
                             "pipe or a device is refused")
    parser.add_argument("--plot", default=None,
                        help="save a histogram of the scores here, one per file or key, or "
                             "with --agreement the scatter plot (format from the extension: "
                             ".png, .pdf, .svg, ...)")
    parser.add_argument("--write_scores", default=None, metavar="PATH",
                        help="also write a copy of the responses file here with each entry's "
                             "score and the judge's reply added (fields <json_key>_score and "
                             "<json_key>_judge_reply); one --file_path only")
    parser.add_argument("--pairwise", action="store_true",
                        help="judge side by side: for each entry in both of two --file_path "
                             "(or under two --json_key of one), ask which response is better, "
                             "in both orders; verdicts are saved in <first input>-verdicts.jsonl "
                             "(or --output)")
    parser.add_argument("--criterion", default=None, metavar="TEXT",
                        help="with --pairwise: what makes a response better, such as 'more "
                             "polite' (default: helpfulness and correctness against the "
                             "correct output)")
    parser.add_argument("--agreement", nargs=2, default=None, metavar=("X", "Y"),
                        help="how far two judges agree: Pearson's, Spearman's and Kendall's "
                             "correlation of two score files (FILE, or FILE#JUDGE such as "
                             "a-scores.jsonl#ollama/phi3, paired by entry) or JSON lists of "
                             "numbers (paired by position); with --plot, a scatter plot")
    return parser


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
    check_server_flags(args)
    check_mode_flags(args)
    if len(args.file_path or ()) > 1 and len(args.json_key) > 1:
        fail("compare several --file_path or several --json_key, not both at once")
    if args.write_scores is not None and len(args.file_path or ()) > 1:
        fail("--write_scores copies one responses file; give one --file_path with it")
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


def check_mode_flags(args):
    """Exit with one Error line when --file_path is missing, or --agreement, --pairwise or
    --criterion meets a flag it does not take."""
    if args.agreement is not None:
        given = [flag for flag, value in (("--file_path", args.file_path),
                                          ("--pairwise", args.pairwise),
                                          ("--criterion", args.criterion),
                                          ("--write_scores", args.write_scores)) if value]
        if given:
            fail(f"--agreement compares saved scores and asks no judge; drop {given[0]}")
        return
    if not args.file_path:
        fail("--file_path is required: the responses file to judge (or --agreement X Y to "
             "compare saved scores)")
    if args.criterion is not None and not args.pairwise:
        fail("--criterion says what --pairwise compares; add --pairwise")
    if not args.pairwise:
        return
    if args.criterion is not None and not args.criterion.strip():
        fail("--criterion is empty; say what makes a response better, such as 'more polite'")
    if len(args.file_path) + len(args.json_key) != 3:
        fail("--pairwise compares two responses per entry: give two --file_path, or one "
             "--file_path and two --json_key")
    for flag, value in (("--prompt rubric", args.prompt == "rubric"),
                        ("--write_scores", args.write_scores), ("--plot", args.plot)):
        if value:
            fail(f"{flag} goes with scoring, not with --pairwise; drop it")


def check_server_flags(args):
    """Exit with one Error line naming the flag when a flag of add_server_flags cannot work,
    or the server's address (--url, or OLLAMA_HOST) is no address."""
    if args.workers < 1:
        fail(f"--workers must be at least 1, got {args.workers}")
    if not 0 < args.timeout < math.inf:
        fail(f"--timeout must be a number of seconds above 0, got {args.timeout:g}")
    if args.timeout > MAX_TIMEOUT:
        fail(f"--timeout must be at most {MAX_TIMEOUT} seconds (a day), got {args.timeout:g}")
    if args.retries < 0:
        fail(f"--retries must be 0 or more, got {args.retries}")
    if args.max_reply_tokens is not None and args.max_reply_tokens < 1:
        fail(f"--max_reply_tokens must be at least 1, got {args.max_reply_tokens}")
    address = judge_address(args)
    try:
        chat_url(address, args.backend)
    except ValueError:
        source = f"--url {address}" if args.url is not None else f"OLLAMA_HOST={address}"
        fail(f"{source}: expected a server address such as 127.0.0.1:11434 or "
             "http://host:port, or a chat endpoint such as "
             f"{OPENAI_URL if args.backend == 'openai' else OLLAMA_URL}"
             + ("" if args.url is not None else "; correct it or pass --url"))


def judge_url(args):
    """The chat endpoint that the flags name (--url, OLLAMA_HOST or the default; checked)."""
    return chat_url(judge_address(args), args.backend)


def require_judge(url, model, backend, server="Judge server"):
    """Exit with check_judge's one line (exit 1) unless the server at `url` answers and has
    `model`; else say so as the chapter does ("Ollama running: True", or `server` for an
    OpenAI-compatible one). Ctrl-C, SIGTERM or SIGHUP while the server is asked end in one line
    (exit 130, 143, 129): nothing was asked yet."""
    with stop_signals_interrupt("no request was sent yet", "run the same command again"):
        problem = check_judge(url, model, backend)
    if problem is not None:
        fail(problem, code=1)
    print(f"{'Ollama' if backend == 'ollama' else server} running: True")


def asker(args, url, max_tokens=None):
    """`ask(prompt, **how)`: query_model with the flags' model, server (`url`), deadline and
    retries, each reply capped at --max_reply_tokens, else at `max_tokens` (a prompt's cap)."""
    return partial(query_model, model=args.model, url=url, backend=args.backend,
                   timeout=args.timeout, retries=args.retries,
                   max_tokens=args.max_reply_tokens or max_tokens)
