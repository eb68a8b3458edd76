"""Stop signals (Ctrl-C, SIGTERM, SIGHUP): one mechanism for every script, so that a stop ends in
one line with exit 128 + the signal, and a save in progress is not cut by it.
"""

import os
import signal
import sys
import threading
from contextlib import contextmanager, suppress

if os.name == "nt":
    pass
else:
    pass


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
