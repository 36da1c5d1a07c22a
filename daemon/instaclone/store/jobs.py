"""Jobs: the persistent queue, each job's states, and the names they claim."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from .. import events
from ..model import JobRecord, JobSpec
from ..states import TERMINAL, State, StateEntry, StateHistory
from .base import Emit, StoreBase
from .gc import retained_names_sql

_TERMINAL = tuple(sorted(s.value for s in TERMINAL))


_JOB_COLUMNS = "id, seq, source, spec, state, error, result, created_at, updated_at, owner"


def _job_from_row(db: sqlite3.Connection, row: tuple[Any, ...]) -> JobRecord:
    job_id, seq, source, spec, _state, error, result, created_at, updated_at, owner = row
    states = db.execute("SELECT state, at FROM job_states WHERE job_id=? ORDER BY n", (job_id,)).fetchall()
    history = StateHistory([StateEntry(State(s), at) for s, at in states])
    return JobRecord(job_id, seq, source, JobSpec.from_dict(json.loads(spec)), history,
                     json.loads(error) if error else None, json.loads(result) if result else {},
                     created_at, updated_at, owner)


class JobsMixin(StoreBase):
    async def create_job(self, job_id: str, source: str, spec: JobSpec, *, owner: int | None = None) -> JobRecord:
        """Persist a new job of ``owner`` (a uid) in Requested; emits ``clone.requested``."""
        now = time.time()

        def do(db: sqlite3.Connection, emit: Emit) -> JobRecord:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs(id, seq, source, spec, state, created_at, updated_at, owner) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job_id, seq, source, json.dumps(spec.to_dict()), State.REQUESTED.value, now, now, owner),
            )
            db.execute("INSERT INTO job_states(job_id, n, state, at) VALUES (?, 0, ?, ?)",
                       (job_id, State.REQUESTED.value, now))
            job = JobRecord(job_id, seq, source, spec, StateHistory([StateEntry(State.REQUESTED, now)]),
                            created_at=now, updated_at=now, owner=owner)
            emit(events.job_event(job, State.REQUESTED, now))
            return job

        return await self._change(do)

    async def record_state(self, job: JobRecord, state: State, *, error: dict[str, Any] | None = None,
                           result: dict[str, Any] | None = None) -> StateEntry:
        """Persist ``job``'s transition to ``state`` with its event; raises StateError if not allowed.

        ``job`` is updated in place (history, error, result); if the write
        fails, the new history entry is taken back.
        """
        if error is not None:
            job.error = error
        if result is not None:
            job.result = result
        return (await self.record_states([job], state))[0]

    async def record_states(self, jobs: Sequence[JobRecord], state: State) -> list[StateEntry]:
        """Persist the transition of each of ``jobs`` to ``state`` (one event each) in one transaction.

        The jobs of one stun go through its shared steps together; one
        transaction keeps the stun short. Raises StateError (nothing written)
        if a transition is not allowed.
        """
        entries: list[StateEntry] = []
        try:
            for job in jobs:
                entries.append(job.history.advance(state))
        except BaseException:
            for job in jobs[:len(entries)]:
                job.history.entries.pop()
            raise
        rows = [(job, len(job.history.entries) - 1, entry, events.job_event(job, state, entry.at))
                for job, entry in zip(jobs, entries, strict=True)]
        written = False

        def do(db: sqlite3.Connection, emit: Emit) -> None:
            nonlocal written
            for job, n, entry, new in rows:
                db.execute("INSERT INTO job_states(job_id, n, state, at) VALUES (?,?,?,?)",
                           (job.id, n, state.value, entry.at))
                emit(new)
                db.execute("UPDATE jobs SET state=?, error=?, result=?, updated_at=? WHERE id=?",
                           (state.value, json.dumps(job.error) if job.error else None, json.dumps(job.result),
                            entry.at, job.id))
            written = True

        try:
            await self._change(do)
        except asyncio.CancelledError:
            # A cancelled caller still waits for the transaction to end: if it
            # was written, the jobs are in ``state`` (the rollback's next state
            # must follow it, not take its place).
            if not written:
                for job in jobs:
                    job.history.entries.pop()
            raise
        except BaseException:
            for job in jobs:
                job.history.entries.pop()
            raise
        for job, entry in zip(jobs, entries, strict=True):
            job.updated_at = entry.at
        return entries

    async def get_job(self, job_id: str) -> JobRecord | None:
        def do(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
            return _job_from_row(db, row) if row else None

        return await self._db.write(do)

    async def list_jobs(self, *, unfinished: bool = False, limit: int = 1000,
                        owner: int | None = None) -> list[JobRecord]:
        """Unfinished jobs oldest first, or else the last ``limit`` jobs newest first (of ``owner``, a uid,
        if given)."""

        def do(db: sqlite3.Connection) -> list[JobRecord]:
            if unfinished:
                marks = ",".join("?" * len(_TERMINAL))
                rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state NOT IN ({marks}) ORDER BY seq",
                                  _TERMINAL).fetchall()
            elif owner is not None:
                rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner=? ORDER BY seq DESC LIMIT ?",
                                  (owner, limit)).fetchall()
            else:
                rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            return [_job_from_row(db, r) for r in rows]

        return await self._db.write(do)

    async def names_in_use(self) -> set[str]:
        """Clone names registered, claimed by an unfinished job, or of a destroyed clone whose directory is kept."""

        def do(db: sqlite3.Connection) -> set[str]:
            names = {r[0] for r in db.execute("SELECT name FROM clones")}
            query = f"SELECT spec FROM jobs WHERE state NOT IN ({','.join('?' * len(_TERMINAL))})"
            for (spec,) in db.execute(query, _TERMINAL).fetchall():
                names.update(json.loads(spec).get("names", []))
            # A destroyed clone whose directory is kept for its children's chains.
            names.update(r[0] for r in db.execute(*retained_names_sql()))
            return names

        return await self._db.write(do)
