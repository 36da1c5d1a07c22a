"""The resource ledger: every resource a job (or a freeze) creates, recorded before it is created.

A row names what the resource is (its kind and ref), the clone it is for, and
its owner: the backend, or ``core``, whose undo removes it. Rows belong to an
owner id, a job's id or a frozen source's ledger id (``frozen-<name>``).
Recovery after a crash finds what a dead run created here (a record is
written before what it names is made: docs/design/ledger.md);
the jobs layer's ledger undoes it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from ..model import CORE, Resource, ResourceKind, ResourceStatus
from .base import StoreBase

#: The columns :func:`resource` reads, in its order.
COLUMNS = "id, job_id, kind, ref, clone, status, owner, uuid, dev, ino, ftype"

#: Kinds whose ref is a path instaclone made (a file or a directory).
FILE_KINDS = (ResourceKind.FILE.value, ResourceKind.SOURCE_DELTA.value)


def resource(row: tuple[Any, ...]) -> Resource:
    """A Resource from a row of :data:`COLUMNS`."""
    rid, oid, kind, ref, clone, status, owner, uuid, dev, ino, ftype = row
    return Resource(rid, oid, ResourceKind(kind), ref, clone, ResourceStatus(status), owner,
                    uuid=uuid, dev=dev, ino=ino, ftype=ftype)


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
            q = f"SELECT {COLUMNS} FROM resources WHERE job_id=?"
            args: tuple[str, ...] = (owner_id,)
            if active_only:
                q += " AND status != ?"
                args = (owner_id, ResourceStatus.RELEASED.value)
            return [resource(row) for row in db.execute(q + " ORDER BY id", args)]

        return await self._db.write(do)

    async def owner_ids(self, *, prefix: str) -> list[str]:
        """The owner ids starting with ``prefix`` that have active (not released) resources, oldest first."""

        def do(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT job_id, MIN(id) FROM resources WHERE status != ? AND substr(job_id, 1, ?) = ? "
                "GROUP BY job_id ORDER BY 2", (ResourceStatus.RELEASED.value, len(prefix), prefix)).fetchall()
            return [r[0] for r in rows]

        return await self._db.write(do)

    async def set_made(self, resource_id: int, dev: int, ino: int, ftype: int) -> None:
        """The file of ``resource_id`` exists now: record its identity (once; a later call keeps the first)."""

        def do(db: sqlite3.Connection) -> None:
            db.execute("UPDATE resources SET dev=?, ino=?, ftype=? WHERE id=? AND dev IS NULL",
                       (dev, ino, ftype, resource_id))

        await self._db.write(do)

    async def set_removed(self, resource_ids: Iterable[int]) -> None:
        """The files of these rows were deleted by instaclone (or found gone): never candidates again."""
        ids = [(time.time(), i) for i in resource_ids]

        def do(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE resources SET removed_at=? WHERE id=? AND removed_at IS NULL", ids)

        if ids:
            await self._db.write(do)

    async def made_files(self) -> list[Resource]:
        """Every file or directory row with an identity not yet removed, whatever its status, id order."""

        def do(db: sqlite3.Connection) -> list[Resource]:
            q = (f"SELECT {COLUMNS} FROM resources WHERE removed_at IS NULL AND dev IS NOT NULL "
                 f"AND kind IN ({','.join('?' * len(FILE_KINDS))}) ORDER BY id")
            return [resource(row) for row in db.execute(q, FILE_KINDS)]

        return await self._db.write(do)

    async def made_identity(self, ref: str) -> tuple[int, int, int] | None:
        """(dev, ino, ftype) the newest record of ``ref`` not yet removed gave it when made, or None."""

        def do(db: sqlite3.Connection) -> tuple[int, int, int] | None:
            row = db.execute("SELECT dev, ino, ftype FROM resources WHERE ref=? AND dev IS NOT NULL "
                             "AND removed_at IS NULL ORDER BY id DESC LIMIT 1", (ref,)).fetchone()
            return (int(row[0]), int(row[1]), int(row[2] or 0)) if row else None

        return await self._db.write(do)
