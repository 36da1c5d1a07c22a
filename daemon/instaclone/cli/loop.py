"""``run``: a command's coroutine on its own event loop, where a Ctrl-C is always seen at once.

Why not ``asyncio.run``: its Ctrl-C handling installs a Python-level SIGINT handler and no
wakeup fd. Python runs such a handler only when the main thread next executes bytecode; if the
signal lands after the event loop's last look and before it blocks in ``epoll_wait`` (or lands
on another thread), the loop sleeps on, with no timer and no data due (``events -f`` on a quiet
daemon), until something else wakes it: seconds later, or never. Here ``signal.set_wakeup_fd``
makes the C-level handler write to a pipe the loop watches, so the loop wakes, and the handler
(``interrupt``) runs, whenever the signal comes. The loop's worker threads (``asyncio.to_thread``:
reading stdin, the ``pool create`` question) are daemon threads with SIGINT blocked: the signal
always goes to the main thread, and a thread blocked on a terminal does not hold up the exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, ParamSpec, TypeVar

from . import interrupt

P = ParamSpec("P")
T = TypeVar("T")


class _DaemonThreads(ThreadPoolExecutor):
    """The loop's executor: one daemon thread per call, with SIGINT blocked in it."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine, which raises it
                future.set_exception(exc)

        interrupt.start_without_sigint(threading.Thread(target=work, name="instaclone-cli", daemon=True))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to wait for: the threads are daemons, each ending with its call."""


@contextmanager
def _wakeup(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Make any signal wake ``loop``: the C-level handler writes to a pipe the loop watches."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread gets Python's signal handlers
        return
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def drain() -> None:
        with suppress(OSError):
            while os.read(r, 512):
                pass

    loop.add_reader(r, drain)
    old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old)
        loop.remove_reader(r)
        os.close(r)
        os.close(w)


async def _registered(coro: Coroutine[Any, Any, T]) -> T:
    task = asyncio.current_task()
    assert task is not None
    with interrupt.registered(asyncio.get_running_loop(), task):
        return await coro


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on a new event loop; its result. Raises KeyboardInterrupt after Ctrl-C.

    Like ``asyncio.run`` (the loop's tasks and async generators are closed at the end), but a
    Ctrl-C always wakes the loop and cancels the command (see the module's docstring).
    """
    try:
        with asyncio.Runner() as runner:
            loop = runner.get_loop()
            loop.set_default_executor(_DaemonThreads())
            with _wakeup(loop):
                try:
                    return runner.run(_registered(coro))
                except asyncio.CancelledError:
                    if interrupt.interrupted():
                        raise KeyboardInterrupt from None
                    raise
    finally:
        coro.close()  # interrupted before it started: no "never awaited" warning
