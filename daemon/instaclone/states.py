"""The clone operation's state machine: states, allowed transitions, guard.

Pure: no I/O. The engine drives it; every successful ``advance`` is one event.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from .errors import StateError


class State(enum.StrEnum):
    """A job's state. Each carries its facts: the event it emits, whether the source is stunned in it."""

    REQUESTED = "Requested"
    STUNNED = "Stunned"
    SOURCE_DELTA_CREATED = "SourceDeltaCreated"
    CLONE_DELTA_CREATED = "CloneDeltaCreated"
    MEMORY_LINKED = "MemoryLinked"
    CONFIGURED = "Configured"
    UNSTUNNED = "Unstunned"
    PARTIAL = "Partial"
    FAILED = "Failed"
    NEEDS_ATTENTION = "NeedsAttention"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def failed(self) -> bool:
        return self in _FAIL

    @property
    def event_type(self) -> str:
        """The type of the event a transition to this state emits."""
        return _EVENT_TYPES[self]

    @property
    def source_stunned(self) -> bool:
        """True if a running source is paused while a job is in this state."""
        return self in _STUNNED


_EVENT_TYPES: dict[State, str] = {
    State.REQUESTED: "clone.requested",
    State.STUNNED: "clone.stunned",
    State.SOURCE_DELTA_CREATED: "clone.source_delta_created",
    State.CLONE_DELTA_CREATED: "clone.clone_delta_created",
    State.MEMORY_LINKED: "clone.memory_linked",
    State.CONFIGURED: "clone.configured",
    State.UNSTUNNED: "clone.ready",
    State.PARTIAL: "clone.partial",
    State.FAILED: "clone.failed",
    State.NEEDS_ATTENTION: "clone.needs_attention",
}

_STUNNED = frozenset({State.STUNNED, State.SOURCE_DELTA_CREATED, State.CLONE_DELTA_CREATED,
                      State.MEMORY_LINKED, State.CONFIGURED})


#: The happy path, in order.
HAPPY_PATH: tuple[State, ...] = (
    State.REQUESTED,
    State.STUNNED,
    State.SOURCE_DELTA_CREATED,
    State.CLONE_DELTA_CREATED,
    State.MEMORY_LINKED,
    State.CONFIGURED,
    State.UNSTUNNED,
)

#: Unstunned: every clone of the job runs. Partial: the source was cloned,
#: some clones run and the others failed and were removed, each reported in
#: the result's ``failed_clones``. Failed: no clone was made.
TERMINAL = frozenset({State.UNSTUNNED, State.PARTIAL, State.FAILED, State.NEEDS_ATTENTION})

_FAIL = frozenset({State.FAILED, State.NEEDS_ATTENTION})

#: Every allowed transition. A frozen source (already paused as a template) is
#: never stunned, so Requested may go straight to SourceDeltaCreated.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.REQUESTED: frozenset({State.STUNNED, State.SOURCE_DELTA_CREATED}) | _FAIL,
    State.STUNNED: frozenset({State.SOURCE_DELTA_CREATED}) | _FAIL,
    State.SOURCE_DELTA_CREATED: frozenset({State.CLONE_DELTA_CREATED}) | _FAIL,
    State.CLONE_DELTA_CREATED: frozenset({State.MEMORY_LINKED}) | _FAIL,
    State.MEMORY_LINKED: frozenset({State.CONFIGURED}) | _FAIL,
    State.CONFIGURED: frozenset({State.UNSTUNNED, State.PARTIAL}) | _FAIL,
    State.UNSTUNNED: frozenset(),
    State.PARTIAL: frozenset(),
    State.FAILED: frozenset(),
    State.NEEDS_ATTENTION: frozenset(),
}


def require(current: State, target: State) -> None:
    """Raise :class:`StateError` unless ``current -> target`` is allowed."""
    if target not in TRANSITIONS[current]:
        raise StateError(current, target)


@dataclass(frozen=True)
class StateEntry:
    state: State
    at: float  # wall-clock seconds (time.time())


@dataclass
class StateHistory:
    """The states a job went through, with timestamps and per-state timings."""

    entries: list[StateEntry] = field(default_factory=list)

    @property
    def current(self) -> State:
        return self.entries[-1].state

    def advance(self, target: State, *, at: float | None = None) -> StateEntry:
        if self.entries:
            require(self.current, target)
        elif target is not State.REQUESTED:
            raise StateError("new", target)
        entry = StateEntry(target, time.time() if at is None else at)
        self.entries.append(entry)
        return entry

    def durations_ms(self) -> dict[str, float]:
        """Milliseconds spent reaching each state from the previous one."""
        out: dict[str, float] = {}
        for prev, cur in itertools.pairwise(self.entries):
            out[cur.state.value] = round((cur.at - prev.at) * 1000.0, 3)
        return out
