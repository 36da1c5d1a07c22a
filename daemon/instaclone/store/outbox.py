"""The event outbox: events, their deliveries to webhook endpoints, and disabled endpoints.

Rows are written by the change they describe (see :func:`.base.insert_event`);
this part reads them for the event stream and the webhook sender, and settles,
replays and prunes deliveries. Reads go through the reader connection: webhook
traffic never queues behind a clone's writes.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from .. import events
from ..model import Delivery, Event
from .base import DeliveryStatus, StoreBase

_DELIVERY_COLS = ("d.id, d.event_cursor, e.id, e.type, e.job_id, d.webhook, d.status, d.attempts, d.next_at, "
                  "d.last_status, d.last_error, d.updated_at")
_JOIN = "FROM deliveries d JOIN events e ON e.cursor = d.event_cursor"


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _where(filters: tuple[tuple[str, Any], ...]) -> tuple[str, list[Any]]:
    """``col = ?`` for each filter whose value is not None, and-ed (``1=1`` if none)."""
    where, args = ["1=1"], []
    for col, val in filters:
        if val is not None:
            where.append(f"{col} = ?")
            args.append(val)
    return " AND ".join(where), args


class OutboxMixin(StoreBase):
    async def events(self, *, since: int | None = None, job_id: str | None = None,
                     types: list[str] | None = None, limit: int = 1000) -> list[Event]:
        """Events in cursor order: after ``since``, or else the last ``limit`` that match."""

        def do(db: sqlite3.Connection) -> list[Event]:
            where, args = _where((("job_id", job_id),))
            if since is not None:
                where += " AND cursor > ?"
                args.append(since)
            order = "ASC" if since is not None else "DESC"
            rows = db.execute(f"SELECT cursor, id, type, job_id, at, body FROM events WHERE {where} "
                              f"ORDER BY cursor {order}", args)
            out = []
            for r in rows:
                if types and not events.matches(r[2], types):
                    continue
                out.append(Event(*r))
                if len(out) >= limit:
                    break
            return out if since is not None else out[::-1]

        return await self._db.read(do)

    async def last_cursor(self) -> int:
        """The cursor of the newest event (0: none yet)."""
        return await self._db.read(
            lambda db: int(db.execute("SELECT COALESCE(MAX(cursor), 0) FROM events").fetchone()[0]))

    async def due_deliveries(self, now: float, webhooks: list[str], *, exclude: set[int],
                             limit: int) -> list[Delivery]:
        """Pending deliveries to ``webhooks`` due by ``now``, oldest first, with their bodies."""
        if not webhooks or limit <= 0:
            return []

        def do(db: sqlite3.Connection) -> list[Delivery]:
            rows = db.execute(
                f"SELECT {_DELIVERY_COLS}, e.body {_JOIN} "
                f"WHERE d.status = ? AND d.next_at <= ? AND d.webhook IN ({_marks(len(webhooks))}) "
                "ORDER BY d.next_at, d.id LIMIT ?",
                (DeliveryStatus.PENDING.value, now, *webhooks, limit + len(exclude)),
            ).fetchall()
            return [Delivery(*r) for r in rows if r[0] not in exclude][:limit]

        return await self._db.read(do)

    async def next_due_at(self, webhooks: list[str], *, exclude: set[int]) -> float | None:
        """When the next pending delivery (not in ``exclude``) to ``webhooks`` is due."""
        if not webhooks:
            return None
        skip = sorted(exclude)

        def do(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                f"SELECT MIN(next_at) FROM deliveries WHERE status = ? AND webhook IN ({_marks(len(webhooks))}) "
                f"AND id NOT IN ({_marks(len(skip))})", (DeliveryStatus.PENDING.value, *webhooks, *skip),
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._db.read(do)

    async def settle_delivery(self, delivery_id: int, *, status: DeliveryStatus, attempts: int, next_at: float,
                              http_status: int | None, error: str | None) -> None:
        """Record the outcome of one attempt."""
        now = time.time()
        value = DeliveryStatus(status).value

        def do(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET status=?, attempts=?, next_at=?, last_status=?, last_error=?, updated_at=? "
                "WHERE id=?", (value, attempts, next_at, http_status, error, now, delivery_id),
            )

        await self._db.write(do)

    async def disable_webhook(self, name: str, reason: str) -> int:
        """Mark an endpoint gone (410): its pending deliveries become ``disabled``; returns how many."""
        now = time.time()

        def do(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO webhooks(name, disabled_at, reason) VALUES (?,?,?) "
                       "ON CONFLICT(name) DO UPDATE SET disabled_at=excluded.disabled_at, reason=excluded.reason",
                       (name, now, reason))
            cur = db.execute("UPDATE deliveries SET status=?, updated_at=? WHERE webhook=? AND status=?",
                             (DeliveryStatus.DISABLED.value, now, name, DeliveryStatus.PENDING.value))
            return cur.rowcount

        return await self._db.write(do)

    async def enable_webhook(self, name: str) -> bool:
        """Re-enable an endpoint; True if it was disabled."""

        def do(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM webhooks WHERE name=? AND disabled_at IS NOT NULL",
                              (name,)).rowcount > 0

        return await self._db.write(do)

    async def disabled_webhooks(self) -> dict[str, dict[str, Any]]:
        """{endpoint: {"disabled_at", "reason"}} of the endpoints disabled by a 410."""

        def do(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            return {n: {"disabled_at": at, "reason": r} for n, at, r in db.execute(
                "SELECT name, disabled_at, reason FROM webhooks WHERE disabled_at IS NOT NULL")}

        return await self._db.read(do)

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        """{webhook: {status: count}}."""

        def do(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for name, status, n in db.execute("SELECT webhook, status, COUNT(*) FROM deliveries "
                                              "GROUP BY webhook, status"):
                out.setdefault(name, {})[status] = n
            return out

        return await self._db.read(do)

    async def list_deliveries(self, *, status: str | None = None, webhook: str | None = None,
                              job_id: str | None = None, event_id: str | None = None,
                              limit: int = 100) -> list[Delivery]:
        """Deliveries, newest first."""

        def do(db: sqlite3.Connection) -> list[Delivery]:
            where, args = _where((("d.status", status), ("d.webhook", webhook), ("e.job_id", job_id),
                                  ("e.id", event_id)))
            rows = db.execute(f"SELECT {_DELIVERY_COLS} {_JOIN} WHERE {where} ORDER BY d.id DESC LIMIT ?",
                              (*args, limit)).fetchall()
            return [Delivery(*r) for r in rows]

        return await self._db.read(do)

    async def replay_deliveries(self, *, ids: list[int] | None = None, status: str | None = None,
                                webhook: str | None = None, event_id: str | None = None) -> list[int]:
        """Queue deliveries again, now, with a fresh attempt budget; returns their ids.

        The event keeps its id, so a receiver that already has it sees a
        duplicate it can drop.
        """
        now = time.time()

        def do(db: sqlite3.Connection) -> list[int]:
            where, args = _where((("d.status", status), ("d.webhook", webhook), ("e.id", event_id)))
            if ids is not None:
                where += f" AND d.id IN ({_marks(len(ids)) or 'NULL'})"
                args.extend(ids)
            chosen = [r[0] for r in db.execute(f"SELECT d.id {_JOIN} WHERE {where}", args)]
            db.executemany("UPDATE deliveries SET status=?, attempts=0, next_at=?, updated_at=? WHERE id=?",
                           [(DeliveryStatus.PENDING.value, now, now, i) for i in chosen])
            return chosen

        return await self._db.write(do)

    async def prune_events(self, before: float) -> int:
        """Delete events older than ``before`` whose deliveries are all settled (none pending)."""

        def do(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM events WHERE at < ? AND NOT EXISTS (SELECT 1 FROM deliveries d "
                "WHERE d.event_cursor = events.cursor AND d.status = ?)", (before, DeliveryStatus.PENDING.value),
            ).rowcount

        return await self._db.write(do)

    async def drop_deliveries(self, keep: list[str]) -> dict[str, int]:
        """Delete every delivery to an endpoint not in ``keep`` (removed from the config); {endpoint: count}.

        Nobody would ever send them, and they would keep their events forever.
        """

        def do(db: sqlite3.Connection) -> dict[str, int]:
            gone: dict[str, int] = dict(db.execute(
                f"SELECT webhook, COUNT(*) FROM deliveries WHERE webhook NOT IN ({_marks(len(keep))}) "
                "GROUP BY webhook", keep).fetchall())
            if gone:
                db.execute(f"DELETE FROM deliveries WHERE webhook NOT IN ({_marks(len(keep))})", keep)
                db.execute(f"DELETE FROM webhooks WHERE name NOT IN ({_marks(len(keep))})", keep)
            return gone

        return await self._db.write(do)
