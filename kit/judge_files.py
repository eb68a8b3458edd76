"""The judge's inputs and outputs: the responses files to score (read from a pipe too), the
score files beside them, and the checks that no output is written onto an input, onto another
output, onto a pipe or device, or onto a file of another kind.
"""

import os
import re
import shutil
import stat
import tempfile
from collections import namedtuple

from kit.data import load_json_entries
from kit.files import DataError, check_writable_folder, fail
from kit.judge_store import ScoreStore

Run = namedtuple("Run", "label entries key store_path")  # one file's responses under one key


def default_output(file_path):
    """responses.json -> responses-scores.jsonl, beside the input."""
    return os.path.splitext(file_path)[0] + "-scores.jsonl"


def special_file(path):
    """What `path` names when it exists and is neither a regular file nor a folder (following
    links): "a pipe" (a FIFO, a process substitution such as <(cat a.json), /dev/stdout piped
    on), "a device" (/dev/zero, a terminal) or "a socket"; else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a pipe"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


def check_writable(flag, path):
    """Exit with one Error line unless a file can be written at `path`. A pipe or device is
    refused: the score file is read back before it is appended to (reading /dev/stdout that is
    piped on waits for ever, /dev/zero never ends), and the other outputs are written whole
    beside their path and renamed onto it, which would replace the device itself."""
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a folder, not a file")
    kind = special_file(path)
    if kind is not None:
        fail(f"{flag} {path}: is {kind}, not a file; pass the path of a file")
    try:
        check_writable_folder(f"{flag} {path}", os.path.dirname(os.path.abspath(path)))
    except DataError as exc:
        fail(exc)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        fail(f"{flag} {path}: cannot be written")


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


def open_stores(args, runs):
    """{path: ScoreStore} for the runs' score files. Exits with one Error line when one is a
    file of another kind (another run's responses, a dataset): scores are only ever appended,
    so they would be appended to it. A score file is a new path, an empty file, or a file
    holding this script's score lines."""
    stores = {path: ScoreStore(path) for path in dict.fromkeys(run.store_path for run in runs)}
    for path, store in stores.items():
        if store.foreign:
            flag, advice = (("--output", "pass a new path or a score file as --output")
                            if args.output else
                            ("score file", "move it away, or pass --output"))
            fail(f"{flag} {path}: is not a score file (no line of it is a judge's reply), so "
                 f"appending scores would damage it; {advice}")
    return stores


def read_entries(file_path, fields):
    """The entries of the responses file at `file_path` (load_json_entries), from a pipe too.

    A pipe (a FIFO, or a process substitution such as <(cat a.json)) can be read only once,
    while the file's format is found by looking at its start, so it is first copied into a
    temporary file of the same name; errors name the pipe. A device or socket is refused, as
    /dev/zero would be read for ever. Raises DataError."""
    kind = special_file(file_path)
    if kind is None:
        return load_json_entries(file_path, fields)
    if kind != "a pipe":
        raise DataError(f"{file_path}: is {kind}, not a JSON file; pass a file (or a pipe)")
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, os.path.basename(file_path))
        try:
            with open(file_path, "rb") as pipe, open(copy, "wb") as f:
                shutil.copyfileobj(pipe, f)
        except OSError as exc:
            raise DataError(f"{file_path}: cannot be read ({exc.strerror or exc})") from None
        try:
            return load_json_entries(copy, fields)
        except DataError as exc:
            raise DataError(str(exc).replace(copy, file_path, 1)) from None


def load_runs(args):
    """The files and keys to score, checked: one Run per file or key. Exits on bad input."""
    runs = []
    for file_path in args.file_path:
        if special_file(file_path) == "a pipe" and args.output is None:
            fail(f"--file_path {file_path}: is a pipe, so no score file can go beside it; pass "
                 "--output scores.jsonl")
        try:
            entries = read_entries(file_path,
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


def write_failure(path, exc, store_paths):
    """The one line for an output that could not be written (a full disk, say)."""
    return (f"could not write {path} ({exc.strerror or exc}); the scores so far are in "
            f"{', '.join(store_paths)}; free space and rerun: it continues")


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
