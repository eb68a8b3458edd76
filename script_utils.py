"""What every script of the repo shares: one-line errors, and files written whole or not at all."""

import json
import os
import sys
import tempfile
from contextlib import contextmanager


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
