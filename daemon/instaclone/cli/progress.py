"""``instaclone clone --wait``'s progress: each state of the job as it is reached, with its time.

On a terminal the line under the states shows the time spent waiting so far, rewritten in place
(carriage return, erase line) a few times a second and erased before each new state line and at
the end. Anywhere else (a pipe, a file) each state is one plain line, flushed as it comes: a log
or ``| head`` gets the same lines, with no control characters.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import TextIO

#: How often the waiting line is redrawn on a terminal (seconds).
TICK_S = 0.2


class Progress:
    """Prints the states of one job on ``stream`` (stdout by default)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._started = time.monotonic()
        self._status = ""  # the transient line shown on a terminal, "" when none is shown
        self.seen: list[str] = []

    def _erase(self) -> None:
        if self._status:
            self.stream.write("\r\x1b[K")
            self._status = ""

    def state(self, state: str, since_start_ms: float, step_ms: float | None) -> None:
        """The job reached ``state``, ``since_start_ms`` after it was requested (``step_ms``: the step's time)."""
        self._erase()
        step = "" if step_ms is None else f"  (step {step_ms:.0f} ms)"
        self.stream.write(f"  {state:<20} +{since_start_ms:9.1f} ms{step}\n")
        self.stream.flush()
        self.seen.append(state)

    def tick(self) -> None:
        """On a terminal: redraw the line saying how long we have been waiting."""
        if not self.tty:
            return
        self._status = f"  ... waiting {time.monotonic() - self._started:5.1f} s"
        self.stream.write("\r\x1b[K" + self._status)
        self.stream.flush()

    def close(self) -> None:
        """Erase the waiting line (the states stay)."""
        self._erase()
        self.stream.flush()


#: A job's state events, as dicts with "state", "at", "started_at", "duration_ms" (the API's event data).
StateEvents = AsyncIterator[dict[str, object]]


async def show(events: StateEvents, progress: Progress, terminal: frozenset[str]) -> str | None:
    """Print each state of ``events`` until a state in ``terminal``; that state (None: the stream ended).

    The caller bounds the wait (``asyncio.timeout``); on a terminal a ticker redraws the waiting
    line meanwhile.
    """

    async def ticker() -> None:
        while True:
            progress.tick()
            await asyncio.sleep(TICK_S)

    tick = asyncio.get_running_loop().create_task(ticker()) if progress.tty else None
    try:
        async for data in events:
            state = str(data["state"])
            at, started = data.get("at"), data.get("started_at")
            since = (float(at) - float(started)) * 1000 if isinstance(at, int | float) and isinstance(
                started, int | float) else 0.0
            step = data.get("duration_ms")
            progress.state(state, since, float(step) if isinstance(step, int | float) else None)
            if state in terminal:
                return state
        return None
    finally:
        if tick is not None:
            tick.cancel()
            with suppress(asyncio.CancelledError):
                await tick
        progress.close()
