"""Clones: the registry of finished clones, each with the job that made it."""

from __future__ import annotations

import sqlite3
import time

from .. import events
from ..model import CloneRecord, ResourceStatus
from .base import Emit, StoreBase

_COLUMNS = "name, uuid, source, job_id, dir, created_at, expires_at, pool, claimed_at, generation, owner"


class ClonesMixin(StoreBase):
    async def add_clones(self, job_id: str, clones: list[CloneRecord], resource_ids: list[int]) -> None:
        """Register finished clones and hand their resources over to them (released), atomically."""

        def do(db: sqlite3.Connection) -> None:
            db.executemany(f"INSERT INTO clones({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                           [(c.name, c.uuid, c.source, c.job_id, c.dir, c.created_at, c.expires_at, c.pool,
                             c.claimed_at, c.generation, c.owner) for c in clones])
            db.executemany("UPDATE resources SET status=? WHERE id=?",
                           [(ResourceStatus.RELEASED.value, rid) for rid in resource_ids])

        await self._db.write(do)

    async def list_clones(self) -> list[CloneRecord]:
        """Every registered clone, oldest first."""

        def do(db: sqlite3.Connection) -> list[CloneRecord]:
            rows = db.execute(f"SELECT {_COLUMNS} FROM clones ORDER BY created_at").fetchall()
            return [CloneRecord(*r) for r in rows]

        return await self._db.write(do)

    async def get_clone(self, name: str) -> CloneRecord | None:
        def do(db: sqlite3.Connection) -> CloneRecord | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM clones WHERE name=?", (name,)).fetchone()
            return CloneRecord(*row) if row else None

        return await self._db.write(do)

    async def remove_clone(self, rec: CloneRecord, *, reason: str = "destroyed") -> None:
        """Forget a destroyed clone; emits ``clone.destroyed`` (and ``clone.expired`` for a TTL)."""
        at = time.time()
        news = ([events.clone_expired(rec, at)] if reason == "expired" else []) + \
            [events.clone_destroyed(rec, at, reason=reason)]

        def do(db: sqlite3.Connection, emit: Emit) -> None:
            db.execute("DELETE FROM clones WHERE name=?", (rec.name,))
            for new in news:
                emit(new)

        await self._change(do)

    async def expired_clones(self, now: float) -> list[CloneRecord]:
        """Clones whose expiry has passed, soonest first."""

        def do(db: sqlite3.Connection) -> list[CloneRecord]:
            rows = db.execute(f"SELECT {_COLUMNS} FROM clones WHERE expires_at IS NOT NULL AND expires_at <= ? "
                              "ORDER BY expires_at", (now,)).fetchall()
            return [CloneRecord(*r) for r in rows]

        return await self._db.write(do)

    async def next_expiry(self) -> float | None:
        """The soonest expiry of any clone, or None."""

        def do(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT MIN(expires_at) FROM clones").fetchone()
            return float(row[0]) if row and row[0] is not None else None

        return await self._db.write(do)

    async def set_expiry(self, name: str, expires_at: float | None) -> None:
        def do(db: sqlite3.Connection) -> None:
            db.execute("UPDATE clones SET expires_at=? WHERE name=?", (expires_at, name))

        await self._db.write(do)
