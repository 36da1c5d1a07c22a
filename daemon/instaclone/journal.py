"""The persistent job queue and journal (SQLite in WAL mode).

Everything a job is about to create is written here *before* it is created
(DESIGN.md invariant 2), so that recovery after a crash can find and remove
it. All SQLite work runs on one dedicated thread: the event loop never waits
on a file sync, and writes are naturally serialized.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from .states import State, StateEntry, StateHistory

T = TypeVar("T")

SCHEMA_VERSION = 1

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

#: Resource kinds recorded in the journal.
FILE = "file"  # a file or directory the job creates; removed on rollback
DOMAIN = "domain"  # a libvirt domain (by name) the job defines; undefined on rollback
STUN = "stun"  # the source was paused by this job; resumed on rollback/recovery
SOURCE_DELTA = "source_delta"  # the source's new top; kept (the source writes to it)

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


class Journal:
    """Async facade over one SQLite database; every call runs on its own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._db: sqlite3.Connection | None = None

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
            if int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"journal {self.path} has schema {row[0]}, this daemon knows {SCHEMA_VERSION}")
            db.isolation_level = "IMMEDIATE"
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._pool, do_open)

    async def close(self) -> None:
        def do_close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

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
            return JobRecord(job_id, seq, source, spec, history, created_at=now, updated_at=now)

        return await self._run(do)

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

        def do(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO job_states(job_id, n, state, at) VALUES (?,?,?,?)",
                (job.id, n, state.value, entry.at),
            )
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

    async def remove_clone(self, name: str) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM clones WHERE name=?", (name,))

        await self._run(do)

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

    async def set_frozen_image(self, name: str, image: dict[str, Any]) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute("UPDATE frozen SET status='frozen', image=? WHERE name=?", (json.dumps(image), name))

        await self._run(do)

    async def remove_frozen(self, name: str) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM frozen WHERE name=?", (name,))

        await self._run(do)

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
