"""What every part of the store shares: the database, the event router, the commit hook.

A change that the outside world hears about writes its event (and the event's
delivery rows) in the same transaction as the change itself (the outbox
invariant): :meth:`StoreBase._change` gives the transaction an ``emit``
function for that, and hands the events to the commit hook only once the
transaction has committed.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from .. import events
from ..model import Event, NewEvent
from .db import Database

T = TypeVar("T")

#: Routes an event type to the names of the webhook endpoints that want it.
Router = Callable[[str], list[str]]
#: Called on the event loop with the events of each committed transaction; must not raise.
CommitHook = Callable[[Sequence[Event]], None]
#: Writes one event inside the running transaction and returns its row.
Emit = Callable[[NewEvent], Event]


class DeliveryStatus(enum.StrEnum):
    """Where one (event, endpoint) delivery stands."""

    PENDING = "pending"  # to be sent (again) at next_at
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # gave up after max_attempts; replayable
    DISABLED = "disabled"  # the endpoint answered 410 Gone; replayable once re-enabled


def insert_event(db: sqlite3.Connection, new: NewEvent, routes: list[str]) -> Event:
    """Write one event and its deliveries to ``routes``, inside the caller's transaction."""
    eid = events.new_id()
    body = events.body_bytes(events.envelope(new.type, new.at, new.data)).decode()
    cur = db.execute("INSERT INTO events(id, type, job_id, at, body) VALUES (?,?,?,?,?)",
                     (eid, new.type, new.job_id, new.at, body))
    cursor = int(cur.lastrowid or 0)
    # An endpoint that answered 410 gets its deliveries parked as "disabled":
    # not sent, but there to replay once the endpoint is enabled again.
    disabled = {r[0] for r in db.execute("SELECT name FROM webhooks WHERE disabled_at IS NOT NULL")}
    db.executemany(
        "INSERT INTO deliveries(event_cursor, webhook, status, next_at, updated_at) VALUES (?,?,?,?,?)",
        [(cursor, name, DeliveryStatus.DISABLED.value if name in disabled else DeliveryStatus.PENDING.value,
          new.at, new.at) for name in routes],
    )
    return Event(cursor, eid, new.type, new.job_id, new.at, body)


def _no_routes(_type: str) -> list[str]:
    return []


def _ignore(_events: Sequence[Event]) -> None:
    return None


class StoreBase:
    """The database and the outbox plumbing the store's parts are built on."""

    def __init__(self, path: Path, *, on_commit: CommitHook | None = None) -> None:
        self.path = path
        self._db = Database(path)
        self._router: Router = _no_routes
        self._on_commit: CommitHook = on_commit or _ignore

    async def open(self) -> None:
        """Open and migrate the database; RuntimeError if it is newer than this daemon."""
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    def set_router(self, router: Router) -> None:
        """Decide which webhook endpoints get a delivery row for each new event (the webhook sender's)."""
        self._router = router

    def set_commit_hook(self, hook: CommitHook) -> None:
        """Call ``hook(events)`` on the event loop after each transaction that wrote events commits."""
        self._on_commit = hook

    async def _change(self, fn: Callable[[sqlite3.Connection, Emit], T]) -> T:
        """Run ``fn(db, emit)`` in one write transaction; what it emits is announced after the commit."""
        router = self._router

        def tx(db: sqlite3.Connection) -> tuple[T, list[Event]]:
            written: list[Event] = []

            def emit(new: NewEvent) -> Event:
                ev = insert_event(db, new, router(new.type))
                written.append(ev)
                return ev

            return fn(db, emit), written

        def announce(result: tuple[T, list[Event]]) -> None:
            if result[1]:
                self._on_commit(result[1])

        result, _ = await self._db.write(tx, committed=announce)
        return result
