"""The resource ledger: every resource a job (or a freeze) creates, recorded before it is created.

A row names what the resource is (its kind and ref), the clone it is for, and
its owner: the backend, or ``core``, whose undo removes it. Rows belong to an
owner id, a job's id or a frozen source's ledger id (``frozen-<name>``).
Recovery after a crash finds what a dead run created here (DESIGN.md
invariant 2); the jobs layer's ledger undoes it.
"""

from __future__ import annotations

import sqlite3
import time

from ..model import CORE, Resource, ResourceKind, ResourceStatus
from .base import StoreBase


class LedgerMixin(StoreBase):
    async def plan(self, owner_id: str, kind: ResourceKind, ref: str, *, clone: str | None = None,
                   owner: str = CORE, uuid: str | None = None) -> int:
        """Record a resource *before* creating it (status planned); returns its id.

        ``uuid``: a domain's UUID, chosen before it is defined (its undo acts on that domain only).
        """
        kind = ResourceKind(kind)  # a plugin may hand in the plain string

        def do(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO resources(job_id, kind, ref, clone, status, created_at, owner, uuid) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (owner_id, kind.value, ref, clone, ResourceStatus.PLANNED.value, time.time(), owner, uuid),
            )
            return int(cur.lastrowid or 0)

        return await self._db.write(do)

    async def set_resource(self, resource_id: int, status: ResourceStatus) -> None:
        value = ResourceStatus(status).value

        def do(db: sqlite3.Connection) -> None:
            db.execute("UPDATE resources SET status=? WHERE id=?", (value, resource_id))

        await self._db.write(do)

    async def resources(self, owner_id: str, *, active_only: bool = True) -> list[Resource]:
        """The resources recorded for ``owner_id``, in the order they were recorded (id order).

        ``active_only``: without the released ones.
        """

        def do(db: sqlite3.Connection) -> list[Resource]:
            q = "SELECT id, job_id, kind, ref, clone, status, owner, uuid FROM resources WHERE job_id=?"
            args: tuple[str, ...] = (owner_id,)
            if active_only:
                q += " AND status != ?"
                args = (owner_id, ResourceStatus.RELEASED.value)
            rows = db.execute(q + " ORDER BY id", args).fetchall()
            return [Resource(rid, oid, ResourceKind(kind), ref, clone, ResourceStatus(status), owner, uuid)
                    for rid, oid, kind, ref, clone, status, owner, uuid in rows]

        return await self._db.write(do)

    async def owner_ids(self, *, prefix: str) -> list[str]:
        """The owner ids starting with ``prefix`` that have active (not released) resources, oldest first."""

        def do(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT job_id, MIN(id) FROM resources WHERE status != ? AND substr(job_id, 1, ?) = ? "
                "GROUP BY job_id ORDER BY 2", (ResourceStatus.RELEASED.value, len(prefix), prefix)).fetchall()
            return [r[0] for r in rows]

        return await self._db.write(do)
