"""Ctrl-C: from the moment ``main`` runs, it ends any command within a second (exit status 130).

``main`` installs :func:`handled` first thing, before it imports the rest of the CLI. A command's
coroutine runs through ``loop.run``, which registers its task here and makes every signal wake
the event loop. On SIGINT, when ``main`` runs as the program (the ``instaclone`` command):

- while a command's task runs, the task is cancelled (its ``finally`` blocks and context managers
  close the daemon's connection), and a watchdog is armed: if the process has not ended
  ``GRACE_S`` later, because something does not give up (a read of a terminal, a flush into a
  full pipe, a close that waits), the watchdog prints the line and ends the process itself;
- at any other moment (importing, parsing, printing, exiting) there is nothing to close: the line
  is printed and the process ends at once;
- a second SIGINT ends it at once.

Raising KeyboardInterrupt at those other moments, as Python's own handler does, is not enough:
Python runs the handler wherever the main thread happens to be, and an exception raised in a
weakref callback or a ``__del__`` (the import system runs some) is printed as "Exception ignored"
and dropped, so the command goes on as if no Ctrl-C had come. In-process callers (``main(argv)``
with an argv, as tests do) keep Python's behaviour: KeyboardInterrupt, never an exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn

from .exitcodes import EXIT_INTERRUPTED

if TYPE_CHECKING:
    import asyncio
    from types import FrameType

#: How long a cancelled command may take to end before the watchdog ends the process.
GRACE_S = 0.5
#: What Ctrl-C prints (on stderr), once.
MESSAGE = "instaclone: interrupted\n"


class _State:
    """The Ctrl-C state of this process while ``main`` runs (signal handlers are per process)."""

    def __init__(self) -> None:
        self.count = 0
        self.program = False  # main runs as the instaclone program, not called in-process
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Future[Any] | None = None
        self.said = False
        self.lock = threading.Lock()


_state = _State()


def interrupted() -> bool:
    """True once a SIGINT came during this call of ``main``."""
    return _state.count > 0


def say(raw: bool = False) -> None:
    """Print the interrupted line on stderr, unless it was printed already.

    ``raw``: straight to fd 2, for the signal handler and the watchdog (the main thread may be in
    the middle of a write to ``sys.stderr``, whose buffer is not re-entrant).
    """
    # Never wait for the lock: its holder (the main thread, which a signal handler may have
    # interrupted right there, or the watchdog) is printing the line.
    if not _state.lock.acquire(blocking=False):
        return
    try:
        if _state.said:
            return
        _state.said = True
    finally:
        _state.lock.release()
    if raw:
        with suppress(OSError):
            os.write(2, MESSAGE.encode())
        return
    with suppress(OSError, ValueError):
        sys.stderr.write(MESSAGE)
        sys.stderr.flush()


def _exit_now() -> NoReturn:
    say(raw=True)
    os._exit(EXIT_INTERRUPTED)


def end() -> int:
    """After a Ctrl-C: print the line; as the program, end now; else return the exit status (130).

    The program does not go through Python's finalization: a worker thread still blocked in a read
    of stdin holds that stream's lock, and finalization would wait for it (a second, then abort).
    What the command printed is flushed first.
    """
    if _state.program:
        with suppress(OSError, ValueError):
            sys.stdout.flush()
        say(raw=True)
        os._exit(EXIT_INTERRUPTED)
    say()
    return EXIT_INTERRUPTED


def start_without_sigint(thread: threading.Thread) -> None:
    """Start ``thread`` with SIGINT blocked in it (a new thread inherits the signal mask), so that
    a SIGINT is always delivered to the main thread."""
    if threading.current_thread() is not threading.main_thread():
        thread.start()
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _state.count += 1
    loop, task = _state.loop, _state.task
    running = loop is not None and task is not None and not task.done()
    if not _state.program:
        if not running:
            raise KeyboardInterrupt  # in-process: Python's behaviour
    elif _state.count > 1 or not running:
        _exit_now()  # nothing to close, or a second Ctrl-C: no more waiting
    else:
        watchdog = threading.Timer(GRACE_S, _exit_now)
        watchdog.daemon = True
        start_without_sigint(watchdog)
    assert loop is not None and task is not None
    try:
        loop.call_soon_threadsafe(task.cancel)
    except RuntimeError:  # the loop has just closed: the command is over
        if not _state.program:
            raise KeyboardInterrupt from None
        _exit_now()


@contextmanager
def handled(program: bool) -> Iterator[None]:
    """Ctrl-C handling for one call of ``main`` in the main thread (elsewhere: Python's, unchanged).

    ``program``: main runs as the ``instaclone`` program (``argv`` from the command line); the
    handling then stays after ``main`` returns, so that a Ctrl-C while Python exits ends it at
    once too. In-process callers get the previous handler back.
    """
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield  # not ours to change: a thread, or SIGINT ignored (a background job) or taken
        return
    _state.count, _state.said, _state.program = 0, False, program
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        if not program:
            signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def registered(loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any]) -> Iterator[None]:
    """While inside: ``task`` on ``loop`` is the command a SIGINT cancels."""
    _state.loop, _state.task = loop, task
    try:
        yield
    finally:
        _state.loop = _state.task = None
