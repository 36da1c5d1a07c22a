"""Clones: the registry of finished clones, each with the job that made it."""

from __future__ import annotations

import sqlite3
import time

from .. import events
from ..model import CloneRecord, ResourceStatus
from .base import Emit, StoreBase

_COLUMNS = "name, uuid, source, job_id, dir, created_at"


class ClonesMixin(StoreBase):
    async def add_clones(self, job_id: str, clones: list[CloneRecord], resource_ids: list[int]) -> None:
        """Register finished clones and hand their resources over to them (released), atomically."""

        def do(db: sqlite3.Connection) -> None:
            db.executemany(f"INSERT INTO clones({_COLUMNS}) VALUES (?,?,?,?,?,?)",
                           [(c.name, c.uuid, c.source, c.job_id, c.dir, c.created_at) for c in clones])
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

    async def remove_clone(self, rec: CloneRecord) -> None:
        """Forget a destroyed clone; emits ``clone.destroyed``."""
        new = events.clone_destroyed(rec, time.time())

        def do(db: sqlite3.Connection, emit: Emit) -> None:
            db.execute("DELETE FROM clones WHERE name=?", (rec.name,))
            emit(new)

        await self._change(do)
