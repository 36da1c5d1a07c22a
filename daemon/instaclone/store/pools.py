"""Pools: each pool's definition, and the claim of an idle member, written with their events.

A member is a registered clone whose ``pool`` column names the pool; it is
idle until ``claim_member`` sets its ``claimed_at``, in one transaction, so
that two claims never get the same member. The keeper takes an idle member
out of the pool the same way before it destroys it (``retire_member`` sets
``claimed_at`` to ``RETIRING``): a member is either claimed or retired,
never both. Everything the pool logic keeps
goes through these calls (a later store may be PostgreSQL).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from .. import events
from ..model import CloneRecord, PoolRecord
from .base import Emit, StoreBase
from .clones import _COLUMNS as CLONE_COLUMNS

_POOL_COLUMNS = "name, source, size, spec, generation, created_at, updated_at, owner"

#: ``claimed_at`` of a member the keeper is destroying (no claim can take it).
RETIRING = -1.0


def _pool(row: tuple[Any, ...]) -> PoolRecord:
    name, source, size, spec, generation, created_at, updated_at, owner = row
    d = json.loads(spec)
    return PoolRecord(name, source, int(size), dict(d.get("config") or {}), bool(d.get("customize", True)),
                      bool(d.get("keep_network", False)), int(generation), created_at, updated_at, owner)


def _spec(pool: PoolRecord) -> str:
    return json.dumps({"config": dict(pool.config), "customize": pool.customize, "keep_network": pool.keep_network})


class PoolsMixin(StoreBase):
    async def create_pool(self, pool: PoolRecord) -> PoolRecord:
        """Persist a new pool; emits ``pool.created``. Raises ValueError if the name is taken."""
        now = time.time()

        def do(db: sqlite3.Connection, emit: Emit) -> PoolRecord:
            if db.execute("SELECT 1 FROM pools WHERE name=?", (pool.name,)).fetchone():
                raise ValueError(f"pool {pool.name!r} exists")
            db.execute(f"INSERT INTO pools({_POOL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                       (pool.name, pool.source, pool.size, _spec(pool), pool.generation, now, now, pool.owner))
            rec = PoolRecord(pool.name, pool.source, pool.size, pool.config, pool.customize, pool.keep_network,
                             pool.generation, now, now, pool.owner)
            emit(events.pool_event(events.POOL_CREATED, pool.name, now, **rec.to_dict()))
            return rec

        return await self._change(do)

    async def update_pool(self, name: str, *, size: int | None = None, source: str | None = None) -> PoolRecord:
        """Resize a pool, or move it to a new source (a new generation); emits ``pool.updated``.

        Raises KeyError if there is no such pool.
        """
        now = time.time()

        def do(db: sqlite3.Connection, emit: Emit) -> PoolRecord:
            row = db.execute(f"SELECT {_POOL_COLUMNS} FROM pools WHERE name=?", (name,)).fetchone()
            if row is None:
                raise KeyError(name)
            old = _pool(row)
            new_source = source if source is not None else old.source
            generation = old.generation + 1 if new_source != old.source else old.generation
            new_size = size if size is not None else old.size
            db.execute("UPDATE pools SET size=?, source=?, generation=?, updated_at=? WHERE name=?",
                       (new_size, new_source, generation, now, name))
            rec = PoolRecord(name, new_source, new_size, old.config, old.customize, old.keep_network, generation,
                             old.created_at, now, old.owner)
            emit(events.pool_event(events.POOL_UPDATED, name, now, **rec.to_dict(), previous_size=old.size,
                                   previous_source=old.source))
            return rec

        return await self._change(do)

    async def delete_pool(self, name: str) -> list[str]:
        """Forget a pool; its claimed members become plain clones. Returns its idle members (to destroy).

        Emits ``pool.deleted``. Raises KeyError if there is no such pool.
        """
        now = time.time()

        def do(db: sqlite3.Connection, emit: Emit) -> list[str]:
            if db.execute("DELETE FROM pools WHERE name=?", (name,)).rowcount == 0:
                raise KeyError(name)
            idle = [r[0] for r in db.execute("SELECT name FROM clones WHERE pool=? AND (claimed_at IS NULL "
                                             "OR claimed_at=?)", (name, RETIRING))]
            db.execute("UPDATE clones SET claimed_at=? WHERE pool=? AND claimed_at IS NULL", (RETIRING, name))
            claimed = [r[0] for r in db.execute("SELECT name FROM clones WHERE pool=? AND claimed_at IS NOT NULL "
                                                "AND claimed_at != ?", (name, RETIRING))]
            db.execute("UPDATE clones SET pool=NULL WHERE pool=? AND claimed_at IS NOT NULL AND claimed_at != ?",
                       (name, RETIRING))
            emit(events.pool_event(events.POOL_DELETED, name, now, idle=idle, claimed_kept=claimed))
            return idle

        return await self._change(do)

    async def get_pool(self, name: str) -> PoolRecord | None:
        def do(db: sqlite3.Connection) -> PoolRecord | None:
            row = db.execute(f"SELECT {_POOL_COLUMNS} FROM pools WHERE name=?", (name,)).fetchone()
            return _pool(row) if row else None

        return await self._db.write(do)

    async def list_pools(self) -> list[PoolRecord]:
        def do(db: sqlite3.Connection) -> list[PoolRecord]:
            return [_pool(r) for r in db.execute(f"SELECT {_POOL_COLUMNS} FROM pools ORDER BY name").fetchall()]

        return await self._db.write(do)

    async def pool_members(self, name: str) -> list[CloneRecord]:
        """The pool's registered members (idle and claimed), oldest first."""

        def do(db: sqlite3.Connection) -> list[CloneRecord]:
            rows = db.execute(f"SELECT {CLONE_COLUMNS} FROM clones WHERE pool=? ORDER BY created_at",
                              (name,)).fetchall()
            return [CloneRecord(*r) for r in rows]

        return await self._db.write(do)

    async def claim_member(self, pool: str, candidates: list[str], *, ttl_s: float | None,
                           claimed_by: dict[str, Any] | None = None, owner: int | None = None) -> CloneRecord | None:
        """Claim the first of ``candidates`` still idle in ``pool`` for ``owner`` (a uid: the member is then
        its; None keeps the member's owner); emits ``pool.claimed``. None if none is."""
        now = time.time()
        expires = now + ttl_s if ttl_s is not None else None

        def do(db: sqlite3.Connection, emit: Emit) -> CloneRecord | None:
            for name in candidates:
                cur = db.execute("UPDATE clones SET claimed_at=?, expires_at=COALESCE(?, expires_at), "
                                 "owner=COALESCE(?, owner) WHERE name=? AND pool=? AND claimed_at IS NULL",
                                 (now, expires, owner, name, pool))
                if cur.rowcount:
                    row = db.execute(f"SELECT {CLONE_COLUMNS} FROM clones WHERE name=?", (name,)).fetchone()
                    rec = CloneRecord(*row)
                    emit(events.pool_event(events.POOL_CLAIMED, pool, now, clone=name, expires_at=rec.expires_at,
                                           claimed_by=claimed_by))
                    return rec
            return None

        return await self._change(do)

    async def retire_member(self, pool: str, name: str) -> bool:
        """Take an idle member out of ``pool`` for the keeper to destroy; False if it is not idle (claimed)."""

        def do(db: sqlite3.Connection) -> bool:
            cur = db.execute("UPDATE clones SET claimed_at=? WHERE name=? AND pool=? AND claimed_at IS NULL",
                             (RETIRING, name, pool))
            return cur.rowcount == 1

        return await self._db.write(do)

    async def emit_pool_event(self, type_: str, pool: str, **data: Any) -> None:
        """Write a pool event on its own (e.g. ``pool.replenishing``, ``pool.released``)."""
        new = events.pool_event(type_, pool, time.time(), **data)

        def do(db: sqlite3.Connection, emit: Emit) -> None:
            emit(new)

        await self._change(do)
