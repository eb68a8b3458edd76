"""What every script of the repo shares: one error type for bad input and its one-line report,
files written whole or not at all, JSON read with errors that name the file, and the checks of
where outputs go. Imports no PyTorch, so the judge script starts fast."""

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version


class DataError(ValueError):
    """Input that cannot be used (a flag, a path, a data file, a checkpoint, a download); the
    message names the flag or file and what to do. Scripts report it in one line (`fail`)."""


def fail(message, code=2):
    """End the program with one 'Error: ...' line on stderr and exit code `code` (2: bad input)."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path` and move it onto `path` only if writing succeeds.

    An existing file at `path` is never left half-written: a crash leaves the old file intact.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    umask = os.umask(0)  # mkstemp makes the file private; give it the mode open() would
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def save_json(data, path):
    """Write `data` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=4)


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
