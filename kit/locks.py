"""One run per folder: lock files that die with their process, and the leftovers (temporary
files and folders) of a killed run found and removed.
"""

import glob
import os
import shutil
from contextlib import contextmanager, suppress
from stat import S_ISREG

if os.name == "nt":
    import msvcrt
else:
    import fcntl
from kit.files import DataError


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
