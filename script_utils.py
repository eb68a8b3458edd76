"""What every script of the repo shares: one error type for bad input and its one-line report,
files written whole or not at all (a failed write names the file), JSON read with errors that
name the file, the checks of where outputs go, and what keeps a long run's files safe: signals
held while a file is written, a lock that keeps a second run out, and the removal of what a
killed write left. Imports no PyTorch, so the judge script starts fast."""

import glob
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from stat import S_ISREG

if os.name == "nt":
    import msvcrt
else:
    import fcntl


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


#####################################
# Signals: Ctrl-C, SIGTERM and SIGHUP stop a run the same way
#####################################

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))  # Windows has no SIGHUP


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; `signum` says which (Ctrl-C sends SIGINT)."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(interrupt):
    """128 + the number of the signal behind `interrupt`, as a shell reports a process it
    stopped: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def stop_line(interrupt, what, how):
    """The line that ends a program stopped by `interrupt`: what is saved, and how to go on."""
    interrupted = exit_code(interrupt) == 128 + signal.SIGINT
    stopped = "Interrupted" if interrupted else f"Stopped by {interrupt}"
    return f"{stopped}; {what}: {how}."


def heeded_signals():
    """The stop signals that this process does not ignore: one started with nohup ignores
    SIGHUP, a background job of a shell script SIGINT, and those stay ignored."""
    return [signum for signum in STOP_SIGNALS if signal.getsignal(signum) != signal.SIG_IGN]


def raise_interrupted(signum, frame):
    """A signal handler that stops the program as Ctrl-C does."""
    raise Interrupted(signum)


def in_main_thread():
    """Whether signal handlers can be set here (only the main thread may)."""
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_signals_raise():
    """Within the block, SIGTERM and SIGHUP raise Interrupted, as Ctrl-C raises
    KeyboardInterrupt, so that the code they stop can clean up and say what it saved instead
    of the process ending on the spot."""
    previous = {}
    if in_main_thread():
        previous = {signum: signal.signal(signum, raise_interrupted)
                    for signum in heeded_signals() if signum != signal.SIGINT}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def stop_signals_interrupt(what="nothing was written", how="run the same command to start again"):
    """`stop_signals_raise`, and an interrupt that leaves the block unreported ends in one line
    (`stop_line` of `what` is saved and `how` to go on), with exit code 128 + the signal."""
    try:
        with stop_signals_raise():
            yield
    except KeyboardInterrupt as exc:
        print(stop_line(exc, what, how), file=sys.stderr)
        raise SystemExit(exit_code(exc)) from None


class StopRequests:
    """Within the block, the first Ctrl-C, SIGTERM or SIGHUP asks the work to stop where it
    safely can (`signum` says which signal came), and a second one stops it at once
    (Interrupted). Ignored signals stay ignored; outside the main thread nothing changes."""

    def __enter__(self):
        self.signum = None
        self.previous = {}
        if in_main_thread():
            self.previous = {signum: signal.signal(signum, self.request)
                             for signum in heeded_signals()}
        return self

    def request(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def say_now(text):
    """Write a line to stdout from a signal handler: unbuffered, as a buffered stream may be in
    the middle of a write of its own."""
    with suppress(OSError):
        os.write(1, f"{text}\n".encode())


_held_signals = None  # the signals that the running `signals_held` block holds, else None


@contextmanager
def signals_held(note):
    """Hold Ctrl-C, SIGTERM and SIGHUP while the block writes a file, so that none cuts it.

    The first signal held prints `note` at once; when the block ends, it goes to the handler
    that it was meant for. Blocks nest (the outermost holds); ignored signals stay ignored;
    outside the main thread nothing changes.
    """
    global _held_signals
    if _held_signals is not None or not in_main_thread():
        yield
        return
    _held_signals = held = []

    def hold(signum, frame):
        if not held:
            say_now(note)
        held.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in heeded_signals()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _held_signals = None
    if held:
        deliver_signal(held[0], previous[held[0]])


def deliver_signal(signum, handler):
    """Act on `signum` as `handler` (a handler that `signal.signal` returned) would have."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


#####################################
# One run at a time, and what a killed write leaves
#####################################


def lock_file(path):
    """Take the lock at `path` (creating the file) without waiting; return the open lock file,
    or None when another process holds it. The operating system releases the lock when the
    process ends, however it ends: a killed run leaves no lock behind. The file holds the
    holder's process id. A symbolic link, a second name of another file (a hard link) or
    anything but a regular file at `path` is refused (DataError): the lock file is truncated,
    and that would empty the file it leads to."""
    while True:
        f = open_lock(path)
        try:
            if os.name == "nt":
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                f.truncate(0)
                f.write(str(os.getpid()))
                f.flush()
                return f
        except FileNotFoundError:
            pass
        f.close()  # the holder removed the file after this process opened it: lock the new one


def open_lock(path):
    """Open (or create) the lock file at `path` for reading and writing, never through a link;
    DataError when `path` is not a lock file that can be taken."""
    flags = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a pipe: no wait
    try:
        f = open(path, "a+", opener=lambda name, mode: os.open(name, mode | flags, 0o666))
    except OSError as exc:
        if os.path.islink(path):
            raise DataError(f"{path}: is a symbolic link, not a lock file of this script; remove "
                            "the link") from None
        raise DataError(f"{path}: cannot be opened as a lock file ({exc.strerror or exc}); "
                        "remove what is there, or pass another --output_dir") from None
    stat = os.fstat(f.fileno())
    if not S_ISREG(stat.st_mode) or stat.st_nlink > 1:
        f.close()
        what = "a hard link to another file" if S_ISREG(stat.st_mode) else "not a regular file"
        raise DataError(f"{path}: is {what}, not a lock file of this script; remove it")
    return f


def lock_holder(path):
    """The process id written in the lock file at `path`, or None where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def unlock_file(f):
    """Release a lock taken by `lock_file`, removing its file (on Windows, where an open file
    cannot be removed, the file stays for the next run to lock)."""
    if os.name != "nt":
        with suppress(FileNotFoundError):
            os.remove(f.name)  # while still locked: a process that opened it sees it gone
    f.close()


def remove_leftover_temporaries(paths):
    """Remove the temporary files that `atomic_write` left beside `paths` (a process killed
    while writing one of them); return how many were removed and their bytes."""
    count = size = 0
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        # mkstemp's 8 random letters exactly: `.tmp-*` + name would also match the temporary
        # file of another name that ends in this one (run "x-metrics-y" and run "y").
        pattern = f".tmp-{'[a-z0-9_]' * 8}{glob.escape(name)}"
        for leftover in glob.glob(os.path.join(glob.escape(folder), pattern)):
            with suppress(FileNotFoundError):
                size += os.path.getsize(leftover)
                os.remove(leftover)
                count += 1
    return count, size


#####################################
# Folders written whole: what a killed writer left
#####################################


@contextmanager
def folder_locked(path):
    """Within the block, hold an exclusive lock on the folder at `path` (waiting for it), so
    that making a new temporary folder there (`hold_folder`) and removing abandoned ones
    (`remove_abandoned_folders`) never overlap. Does nothing on Windows."""
    if os.name == "nt":
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def hold_folder(path):
    """Lock the new folder at `path` for as long as this process keeps the returned descriptor
    open (the operating system releases it however the process ends); None on Windows."""
    if os.name == "nt":
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_abandoned_folders(parent, prefix):
    """Remove the folders named `prefix`... in `parent` that no process holds (`hold_folder`):
    those that a process killed while writing left. Call it inside `folder_locked(parent)`.
    Returns (how many were removed, their bytes, the paths of those left because no lock can
    tell whether their writer still runs: all of them on Windows)."""
    count = size = 0
    unsure = []
    for path in sorted(glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*"))):
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        if os.name == "nt":
            unsure.append(path)
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is running
            os.close(fd)
            continue
        size += sum(os.path.getsize(os.path.join(folder, name))
                    for folder, _, names in os.walk(path) for name in names)
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        count += 1
    return count, size, unsure
