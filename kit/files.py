"""What every script shares for its input and output: the one-line errors (`DataError`, `fail`),
whole-file writes (`atomic_write`: a temporary file, then a rename), JSON, and a few words
for the lines a script prints.
"""

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

if os.name == "nt":
    pass
else:
    pass


class DataError(ValueError):
    """Input that cannot be used (a flag, a path, a data file, a checkpoint, a download); the
    message names the flag or file and what to do. Scripts report it in one line (`fail`)."""


class WriteError(OSError):
    """A file could not be written (a full disk, no permission); `filename` is the file that was
    meant, not its temporary copy."""


def fail(message, code=2):
    """End the program with one 'Error: ...' line on stderr and exit code `code` (2: bad input)."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path` and move it onto `path` only if writing succeeds.

    An existing file at `path` is never left half-written: a crash leaves the old file intact.
    A failed write (an OSError while writing, closing or renaming) raises WriteError naming `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror or str(exc), path) from exc
    umask = os.umask(0)  # mkstemp makes the file private; give it the mode open() would
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp_path, path)
    except BaseException as exc:
        os.unlink(tmp_path)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


def save_json(data, path):
    """Write `data` as indented JSON, atomically. NaN and infinity, which JSON does not have,
    are refused (ValueError) rather than written as tokens other readers reject."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=4, allow_nan=False)


def read_json(path):
    """The JSON value in the file at `path`; DataError naming the file when it is missing, a
    folder, or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a JSON file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be read as JSON; check the file") from None


def check_writable_folder(flag, folder, create=False):
    """Raise DataError naming `flag` unless a file can be written in `folder` (created first
    when `create`)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataError(f"{flag} {folder}: is a file, not a folder; pass another folder")
    if not create and not os.path.isdir(folder):
        raise DataError(f"{flag}: the folder {folder} does not exist")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DataError(f"{flag} {folder}: cannot write there ({exc.strerror or exc}); pass "
                        "another folder") from None


def image_format(path, default):
    """The image format that the extension of `path` names (`default` when it has none)."""
    return os.path.splitext(path)[1].lstrip(".").lower() or default


def print_versions(packages):
    """Print the installed version of each package (or "not installed"), then a separator."""
    for package in packages:
        found = "not installed"
        for name in (package, f"{package}-cpu"):  # tensorflow-cpu provides tensorflow on Linux
            try:
                found = version(name)
                break
            except PackageNotFoundError:
                continue
        print(f"{package} version: {found}")
    print(50 * "-")


def plural(count, noun):
    """'1 step', '2 steps': `count` and `noun`, in the plural unless the count is 1."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
