"""The persistent job queue and journal (SQLite in WAL mode).

Everything a job is about to create is written here *before* it is created
(DESIGN.md invariant 2), so that recovery after a crash can find and remove
it. All SQLite work runs on one dedicated thread: the event loop never waits
on a file sync, and writes are naturally serialized.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import events
from .states import State, StateEntry, StateHistory

T = TypeVar("T")

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS job_states (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    n INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    clone TEXT,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS resources_job ON resources(job_id);
CREATE TABLE IF NOT EXISTS frozen (
    name TEXT PRIMARY KEY,
    since REAL NOT NULL,
    status TEXT NOT NULL,
    paused_by_us INTEGER NOT NULL,
    backend TEXT NOT NULL,
    image TEXT,
    clones INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS clones (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    source TEXT NOT NULL,
    job_id TEXT NOT NULL,
    dir TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

# Version 2: the event outbox. An event row and its delivery rows are written
# in the same transaction as the change they describe.
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS events (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    job_id TEXT,
    at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_cursor INTEGER NOT NULL REFERENCES events(cursor) ON DELETE CASCADE,
    webhook TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    updated_at REAL NOT NULL,
    UNIQUE (event_cursor, webhook)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(status, next_at);
CREATE TABLE IF NOT EXISTS webhooks (
    name TEXT PRIMARY KEY,
    disabled_at REAL,
    reason TEXT
);
"""

#: Resource kinds recorded in the journal.
FILE = "file"  # a file or directory the job creates; removed on rollback
DOMAIN = "domain"  # a libvirt domain (by name) the job defines; undefined on rollback
STUN = "stun"  # the source was paused by this job; resumed on rollback/recovery
SOURCE_DELTA = "source_delta"  # the source's new top; kept (the source writes to it)

#: Delivery statuses.
PENDING = "pending"  # to be sent (again) at next_at
DELIVERED = "delivered"  # the receiver answered 2xx
FAILED = "failed"  # gave up after max_attempts; replayable
DISABLED = "disabled"  # the endpoint answered 410 Gone; replayable once re-enabled

#: Resource statuses.
PLANNED = "planned"  # recorded, creation may or may not have happened
DONE = "done"  # created / in effect
RELEASED = "released"  # removed / undone / handed over to a clone


@dataclass
class Resource:
    id: int
    job_id: str
    kind: str
    ref: str
    clone: str | None
    status: str


@dataclass
class JobRecord:
    id: str
    seq: int
    source: str
    spec: dict[str, Any]
    history: StateHistory
    error: dict[str, Any] | None = None
    result: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def state(self) -> State:
        return self.history.current

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "state": self.state.value,
            "spec": self.spec,
            "error": self.error,
            "result": self.result,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "history": [{"state": e.state.value, "at": e.at} for e in self.history.entries],
            "durations_ms": self.history.durations_ms(),
        }


@dataclass
class CloneRecord:
    name: str
    uuid: str
    source: str
    job_id: str
    dir: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Event:
    cursor: int
    id: str
    type: str
    job_id: str | None
    at: float
    body: str  # the exact JSON bytes that are signed and sent

    def to_dict(self) -> dict[str, Any]:
        """The event as the event stream shows it: the webhook body plus id and cursor."""
        return {"id": self.id, "cursor": self.cursor, **json.loads(self.body)}


@dataclass
class Delivery:
    id: int
    event_cursor: int
    event_id: str
    event_type: str
    job_id: str | None
    webhook: str
    status: str
    attempts: int
    next_at: float
    last_status: int | None
    last_error: str | None
    updated_at: float
    body: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("body")
        return d


#: Routes an event type to the names of the webhook endpoints that want it.
Router = Callable[[str], list[str]]
EventListener = Callable[[Event], None]

_DELIVERY_COLS = ("d.id, d.event_cursor, e.id, e.type, e.job_id, d.webhook, d.status, d.attempts, d.next_at, "
                  "d.last_status, d.last_error, d.updated_at")


class Journal:
    """Async facade over one SQLite database; every call runs on its own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._db: sqlite3.Connection | None = None
        # Reads for the outbox sender and the event stream go through a second,
        # read-only connection on its own thread (WAL lets it read while the
        # writer commits): webhook traffic never queues behind a clone's writes.
        self._rpool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self._rdb: sqlite3.Connection | None = None
        self._router: Router = lambda _type: []
        self._listeners: list[EventListener] = []

    def set_router(self, router: Router) -> None:
        """Decide which webhook endpoints get a delivery row for each new event."""
        self._router = router

    def on_event(self, fn: EventListener) -> None:
        """Call ``fn(event)`` on the event loop after each event is committed."""
        self._listeners.append(fn)

    def _announce(self, new: list[Event]) -> None:
        for ev in new:
            for fn in self._listeners:
                try:
                    fn(ev)
                except Exception:  # a listener's bug must not fail the state change
                    logging.getLogger("instaclone").exception("event listener failed")

    def _insert_event(self, db: sqlite3.Connection, event_type: str, job_id: str | None, at: float,
                      data: dict[str, Any], routes: list[str]) -> Event:
        """Write one event and its deliveries, inside the caller's transaction."""
        eid = events.new_id()
        body = events.body_bytes(events.envelope(event_type, at, data)).decode()
        cur = db.execute("INSERT INTO events(id, type, job_id, at, body) VALUES (?,?,?,?,?)",
                         (eid, event_type, job_id, at, body))
        cursor = int(cur.lastrowid or 0)
        # An endpoint that answered 410 gets its deliveries parked as "disabled":
        # not sent, but there to replay once the endpoint is enabled again.
        disabled = {r[0] for r in db.execute("SELECT name FROM webhooks WHERE disabled_at IS NOT NULL")}
        db.executemany(
            "INSERT INTO deliveries(event_cursor, webhook, status, next_at, updated_at) VALUES (?,?,?,?,?)",
            [(cursor, name, DISABLED if name in disabled else PENDING, at, at) for name in routes],
        )
        return Event(cursor, eid, event_type, job_id, at, body)

    # -- plumbing ---------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()

        def call() -> T:
            assert self._db is not None, "journal is not open"
            with self._db:  # one transaction per call
                return fn(self._db)

        fut = loop.run_in_executor(self._pool, call)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # A journal write must not be half-known: wait for it, then cancel.
            await asyncio.wait([fut])
            raise

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only query on the reader connection."""

        def call() -> T:
            assert self._rdb is not None, "journal is not open"
            return fn(self._rdb)

        return await asyncio.get_running_loop().run_in_executor(self._rpool, call)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def do_open() -> None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if int(row[0]) <= SCHEMA_VERSION:
                # Every migration only adds tables: apply them all, idempotently.
                db.executescript(_SCHEMA_V2)
                db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
                row = (str(SCHEMA_VERSION),)
            if int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"journal {self.path} has schema {row[0]}, this daemon knows {SCHEMA_VERSION}")
            db.isolation_level = "IMMEDIATE"
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._pool, do_open)

        def open_reader() -> None:
            self._rdb = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                        isolation_level=None)

        await asyncio.get_running_loop().run_in_executor(self._rpool, open_reader)

    async def close(self) -> None:
        def do_close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        def close_reader() -> None:
            if self._rdb is not None:
                self._rdb.close()
                self._rdb = None

        await asyncio.get_running_loop().run_in_executor(self._rpool, close_reader)
        self._rpool.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(self._pool, do_close)
        self._pool.shutdown(wait=True)

    # -- jobs ---------------------------------------------------------------------

    async def create_job(self, job_id: str, source: str, spec: dict[str, Any]) -> JobRecord:
        now = time.time()

        def do(db: sqlite3.Connection) -> JobRecord:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs(id, seq, source, spec, state, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                (job_id, seq, source, json.dumps(spec), State.REQUESTED.value, now, now),
            )
            db.execute(
                "INSERT INTO job_states(job_id, n, state, at) VALUES (?, 0, ?, ?)",
                (job_id, State.REQUESTED.value, now),
            )
            history = StateHistory([StateEntry(State.REQUESTED, now)])
            job = JobRecord(job_id, seq, source, spec, history, created_at=now, updated_at=now)
            etype, data = events.job_event(job, State.REQUESTED, now)
            new.append(self._insert_event(db, etype, job_id, now, data, routes(etype)))
            return job

        new: list[Event] = []
        routes = self._router
        job = await self._run(do)
        self._announce(new)
        return job

    async def record_state(
        self,
        job: JobRecord,
        state: State,
        *,
        error: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
    ) -> StateEntry:
        """Persist ``job``'s transition to ``state`` (the guard runs first)."""
        entry = job.history.advance(state)
        n = len(job.history.entries) - 1
        if error is not None:
            job.error = error
        if result is not None:
            job.result = result

        etype, data = events.job_event(job, state, entry.at)
        routes = self._router(etype)
        new: list[Event] = []

        def do(db: sqlite3.Connection) -> None:
            new.clear()
            db.execute(
                "INSERT INTO job_states(job_id, n, state, at) VALUES (?,?,?,?)",
                (job.id, n, state.value, entry.at),
            )
            new.append(self._insert_event(db, etype, job.id, entry.at, data, routes))
            db.execute(
                "UPDATE jobs SET state=?, error=?, result=?, updated_at=? WHERE id=?",
                (
                    state.value,
                    json.dumps(job.error) if job.error else None,
                    json.dumps(job.result),
                    entry.at,
                    job.id,
                ),
            )

        try:
            await self._run(do)
        except BaseException:
            job.history.entries.pop()
            raise
        job.updated_at = entry.at
        self._announce(new)
        return entry

    @staticmethod
    def _job_from_row(db: sqlite3.Connection, row: tuple[Any, ...]) -> JobRecord:
        job_id, seq, source, spec, _state, error, result, created_at, updated_at = row
        states = db.execute(
            "SELECT state, at FROM job_states WHERE job_id=? ORDER BY n", (job_id,)
        ).fetchall()
        history = StateHistory([StateEntry(State(s), at) for s, at in states])
        return JobRecord(
            job_id,
            seq,
            source,
            json.loads(spec),
            history,
            json.loads(error) if error else None,
            json.loads(result) if result else {},
            created_at,
            updated_at,
        )

    async def get_job(self, job_id: str) -> JobRecord | None:
        def do(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return self._job_from_row(db, row) if row else None

        return await self._run(do)

    async def list_jobs(self, *, unfinished: bool = False, limit: int = 1000) -> list[JobRecord]:
        terminal = tuple(s.value for s in (State.UNSTUNNED, State.FAILED, State.NEEDS_ATTENTION))

        def do(db: sqlite3.Connection) -> list[JobRecord]:
            if unfinished:
                rows = db.execute(
                    f"SELECT * FROM jobs WHERE state NOT IN ({','.join('?' * len(terminal))}) ORDER BY seq",
                    terminal,
                ).fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            return [self._job_from_row(db, r) for r in rows]

        return await self._run(do)

    # -- resources ------------------------------------------------------------------

    async def plan(self, job_id: str, kind: str, ref: str, *, clone: str | None = None) -> int:
        """Record a resource *before* creating it; returns its id."""

        def do(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO resources(job_id, kind, ref, clone, status, created_at) VALUES (?,?,?,?,?,?)",
                (job_id, kind, ref, clone, PLANNED, time.time()),
            )
            return int(cur.lastrowid or 0)

        return await self._run(do)

    async def set_resource(self, resource_id: int, status: str) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute("UPDATE resources SET status=? WHERE id=?", (status, resource_id))

        await self._run(do)

    async def resources(self, job_id: str, *, active_only: bool = True) -> list[Resource]:
        def do(db: sqlite3.Connection) -> list[Resource]:
            q = "SELECT id, job_id, kind, ref, clone, status FROM resources WHERE job_id=?"
            if active_only:
                q += f" AND status != '{RELEASED}'"
            rows = db.execute(q + " ORDER BY id", (job_id,)).fetchall()
            return [Resource(*r) for r in rows]

        return await self._run(do)

    # -- clones ---------------------------------------------------------------------

    async def add_clones(self, job_id: str, clones: list[CloneRecord], resource_ids: list[int]) -> None:
        """Register finished clones and hand their resources over to them, atomically."""

        def do(db: sqlite3.Connection) -> None:
            for c in clones:
                db.execute(
                    "INSERT INTO clones(name, uuid, source, job_id, dir, created_at) VALUES (?,?,?,?,?,?)",
                    (c.name, c.uuid, c.source, c.job_id, c.dir, c.created_at),
                )
            db.executemany(
                "UPDATE resources SET status=? WHERE id=?", [(RELEASED, rid) for rid in resource_ids]
            )

        await self._run(do)

    async def list_clones(self) -> list[CloneRecord]:
        def do(db: sqlite3.Connection) -> list[CloneRecord]:
            rows = db.execute(
                "SELECT name, uuid, source, job_id, dir, created_at FROM clones ORDER BY created_at"
            ).fetchall()
            return [CloneRecord(*r) for r in rows]

        return await self._run(do)

    async def get_clone(self, name: str) -> CloneRecord | None:
        def do(db: sqlite3.Connection) -> CloneRecord | None:
            row = db.execute(
                "SELECT name, uuid, source, job_id, dir, created_at FROM clones WHERE name=?", (name,)
            ).fetchone()
            return CloneRecord(*row) if row else None

        return await self._run(do)

    async def remove_clone(self, rec: CloneRecord) -> None:
        """Forget a destroyed clone; emits ``clone.destroyed``."""
        now = time.time()
        etype = events.CLONE_DESTROYED
        routes = self._router(etype)
        data = {"clone": rec.name, "uuid": rec.uuid, "source": rec.source, "job_id": rec.job_id, "at": now}

        def do(db: sqlite3.Connection) -> Event:
            db.execute("DELETE FROM clones WHERE name=?", (rec.name,))
            return self._insert_event(db, etype, rec.job_id, now, data, routes)

        self._announce([await self._run(do)])

    async def names_in_use(self) -> set[str]:
        """Clone names registered or claimed by an unfinished job."""
        terminal = (State.UNSTUNNED.value, State.FAILED.value, State.NEEDS_ATTENTION.value)

        def do(db: sqlite3.Connection) -> set[str]:
            names = {r[0] for r in db.execute("SELECT name FROM clones")}
            for (spec,) in db.execute(
                "SELECT spec FROM jobs WHERE state NOT IN (?,?,?)", terminal
            ).fetchall():
                names.update(json.loads(spec).get("names", []))
            return names

        return await self._run(do)

    # -- frozen sources ---------------------------------------------------------------
    # A row exists from the moment a freeze starts ("freezing"), so that a crash
    # mid-freeze is found and undone; "frozen" once its memory image is made.

    async def add_frozen(self, name: str, *, paused_by_us: bool, backend: str) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO frozen(name, since, status, paused_by_us, backend) VALUES (?,?,?,?,?)",
                (name, time.time(), "freezing", int(paused_by_us), backend),
            )

        await self._run(do)

    async def set_frozen_image(self, name: str, image: dict[str, Any], *, freeze_ms: float) -> None:
        """The freeze is complete; emits ``source.frozen``."""
        now = time.time()
        etype = events.SOURCE_FROZEN
        routes = self._router(etype)

        def do(db: sqlite3.Connection) -> Event:
            db.execute("UPDATE frozen SET status='frozen', image=? WHERE name=?", (json.dumps(image), name))
            return self._insert_event(db, etype, None, now,
                                      {"source": name, "at": now, "freeze_ms": freeze_ms}, routes)

        self._announce([await self._run(do)])

    async def remove_frozen(self, name: str, *, clones: int | None = None) -> None:
        """Forget a frozen source; with ``clones`` (an unfreeze) emits ``source.unfrozen``."""
        now = time.time()
        etype = events.SOURCE_UNFROZEN
        routes = self._router(etype)

        def do(db: sqlite3.Connection) -> Event | None:
            db.execute("DELETE FROM frozen WHERE name=?", (name,))
            if clones is None:
                return None  # a freeze rolled back: it never happened for the outside world
            return self._insert_event(db, etype, None, now, {"source": name, "at": now, "clones": clones},
                                      routes)

        ev = await self._run(do)
        if ev is not None:
            self._announce([ev])

    async def frozen(self) -> dict[str, dict[str, Any]]:
        def do(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            rows = db.execute(
                "SELECT name, since, status, paused_by_us, backend, image, clones FROM frozen ORDER BY name"
            ).fetchall()
            return {
                n: {"name": n, "since": since, "status": status, "paused_by_us": bool(p), "backend": b,
                    "image": json.loads(img) if img else None, "clones": c}
                for n, since, status, p, b, img, c in rows
            }

        return await self._run(do)

    async def count_frozen_clones(self, name: str, n: int) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute("UPDATE frozen SET clones = clones + ? WHERE name=?", (n, name))

        await self._run(do)

    # -- events and webhook deliveries --------------------------------------------------

    async def events(self, *, since: int | None = None, job_id: str | None = None,
                     types: list[str] | None = None, limit: int = 1000) -> list[Event]:
        """Events in cursor order: after ``since``, or else the last ``limit`` that match."""

        def do(db: sqlite3.Connection) -> list[Event]:
            where, args = ["1=1"], []
            if since is not None:
                where.append("cursor > ?")
                args.append(since)
            if job_id is not None:
                where.append("job_id = ?")
                args.append(job_id)
            order = "ASC" if since is not None else "DESC"
            rows = db.execute(
                f"SELECT cursor, id, type, job_id, at, body FROM events WHERE {' AND '.join(where)} "
                f"ORDER BY cursor {order}", args,
            )
            out = []
            for r in rows:
                if types and not events.matches(r[2], types):
                    continue
                out.append(Event(*r))
                if len(out) >= limit:
                    break
            return out if since is not None else out[::-1]

        return await self._read(do)

    async def last_cursor(self) -> int:
        return await self._read(lambda db: int(db.execute("SELECT COALESCE(MAX(cursor), 0) FROM events")
                                              .fetchone()[0]))

    async def due_deliveries(self, now: float, webhooks: list[str], *, exclude: set[int],
                             limit: int) -> list[Delivery]:
        """Pending deliveries to ``webhooks`` due by ``now``, oldest first, with their bodies."""
        if not webhooks or limit <= 0:
            return []

        def do(db: sqlite3.Connection) -> list[Delivery]:
            rows = db.execute(
                f"SELECT {_DELIVERY_COLS}, e.body FROM deliveries d JOIN events e ON e.cursor = d.event_cursor "
                f"WHERE d.status = ? AND d.next_at <= ? AND d.webhook IN ({','.join('?' * len(webhooks))}) "
                "ORDER BY d.next_at, d.id LIMIT ?",
                (PENDING, now, *webhooks, limit + len(exclude)),
            ).fetchall()
            return [Delivery(*r) for r in rows if r[0] not in exclude][:limit]

        return await self._read(do)

    async def next_due_at(self, webhooks: list[str], *, exclude: set[int]) -> float | None:
        """When the next pending delivery (not in ``exclude``) to ``webhooks`` is due."""
        if not webhooks:
            return None
        skip = sorted(exclude)

        def do(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                f"SELECT MIN(next_at) FROM deliveries WHERE status = ? "
                f"AND webhook IN ({','.join('?' * len(webhooks))}) "
                f"AND id NOT IN ({','.join('?' * len(skip))})", (PENDING, *webhooks, *skip),
            ).fetchone()
            return row[0]

        return await self._read(do)

    async def settle_delivery(self, delivery_id: int, *, status: str, attempts: int, next_at: float,
                              http_status: int | None, error: str | None) -> None:
        now = time.time()

        def do(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET status=?, attempts=?, next_at=?, last_status=?, last_error=?, updated_at=? "
                "WHERE id=?", (status, attempts, next_at, http_status, error, now, delivery_id),
            )

        await self._run(do)

    async def disable_webhook(self, name: str, reason: str) -> int:
        """Mark an endpoint gone (410): its pending deliveries become ``disabled``; returns how many."""
        now = time.time()

        def do(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO webhooks(name, disabled_at, reason) VALUES (?,?,?) "
                       "ON CONFLICT(name) DO UPDATE SET disabled_at=excluded.disabled_at, reason=excluded.reason",
                       (name, now, reason))
            cur = db.execute("UPDATE deliveries SET status=?, updated_at=? WHERE webhook=? AND status=?",
                             (DISABLED, now, name, PENDING))
            return cur.rowcount

        return await self._run(do)

    async def enable_webhook(self, name: str) -> bool:
        """Re-enable an endpoint; True if it was disabled."""

        def do(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM webhooks WHERE name=? AND disabled_at IS NOT NULL",
                              (name,)).rowcount > 0

        return await self._run(do)

    async def disabled_webhooks(self) -> dict[str, dict[str, Any]]:
        def do(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            return {n: {"disabled_at": at, "reason": r} for n, at, r in db.execute(
                "SELECT name, disabled_at, reason FROM webhooks WHERE disabled_at IS NOT NULL")}

        return await self._read(do)

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        """{webhook: {status: count}}."""

        def do(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for name, status, n in db.execute("SELECT webhook, status, COUNT(*) FROM deliveries "
                                              "GROUP BY webhook, status"):
                out.setdefault(name, {})[status] = n
            return out

        return await self._read(do)

    async def list_deliveries(self, *, status: str | None = None, webhook: str | None = None,
                              job_id: str | None = None, event_id: str | None = None,
                              limit: int = 100) -> list[Delivery]:
        """Deliveries, newest first."""

        def do(db: sqlite3.Connection) -> list[Delivery]:
            where, args = ["1=1"], []
            for col, val in (("d.status", status), ("d.webhook", webhook), ("e.job_id", job_id),
                             ("e.id", event_id)):
                if val is not None:
                    where.append(f"{col} = ?")
                    args.append(val)
            rows = db.execute(
                f"SELECT {_DELIVERY_COLS} FROM deliveries d JOIN events e ON e.cursor = d.event_cursor "
                f"WHERE {' AND '.join(where)} ORDER BY d.id DESC LIMIT ?", (*args, limit),
            ).fetchall()
            return [Delivery(*r) for r in rows]

        return await self._read(do)

    async def replay_deliveries(self, *, ids: list[int] | None = None, status: str | None = None,
                                webhook: str | None = None, event_id: str | None = None) -> list[int]:
        """Queue deliveries again, now, with a fresh attempt budget; returns their ids.

        The event keeps its id, so a receiver that already has it sees a
        duplicate it can drop.
        """
        now = time.time()

        def do(db: sqlite3.Connection) -> list[int]:
            where, args = ["1=1"], []
            if ids is not None:
                where.append(f"d.id IN ({','.join('?' * len(ids)) or 'NULL'})")
                args.extend(ids)
            for col, val in (("d.status", status), ("d.webhook", webhook), ("e.id", event_id)):
                if val is not None:
                    where.append(f"{col} = ?")
                    args.append(val)
            chosen = [r[0] for r in db.execute(
                f"SELECT d.id FROM deliveries d JOIN events e ON e.cursor = d.event_cursor "
                f"WHERE {' AND '.join(where)}", args)]
            db.executemany("UPDATE deliveries SET status=?, attempts=0, next_at=?, updated_at=? WHERE id=?",
                           [(PENDING, now, now, i) for i in chosen])
            return chosen

        return await self._run(do)

    async def prune_events(self, before: float) -> int:
        """Delete events older than ``before`` whose deliveries are all settled."""

        def do(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM events WHERE at < ? AND NOT EXISTS (SELECT 1 FROM deliveries d "
                "WHERE d.event_cursor = events.cursor AND d.status = ?)", (before, PENDING),
            ).rowcount

        return await self._run(do)
