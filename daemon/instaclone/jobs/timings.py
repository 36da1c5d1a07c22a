"""Milliseconds per phase of a clone's start, for the job result (``identity.phases_ms``).

Phases may overlap (the NIC replug runs while the identity is reset), so
their sum may exceed the clone's wall time, which is ``ready_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    """The phases of one clone's start: each one's own duration, summed if it runs more than once."""

    def __init__(self, phases: dict[str, float] | None = None) -> None:
        self.t0 = time.monotonic()
        self.phases: dict[str, float] = {} if phases is None else phases
        self.agent_calls = 0

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = round(self.phases.get(name, 0.0) + seconds * 1000.0, 1)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (also when it raises: a failed clone's result is not kept anyway)."""
        t = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - t)

    def since_start_ms(self) -> float:
        return round((time.monotonic() - self.t0) * 1000.0, 1)
