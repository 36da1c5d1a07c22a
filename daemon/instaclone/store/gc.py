"""What garbage collection reads of the ledger: every active resource, and the clones destroyed but kept.

A destroyed clone whose images other chains still use keeps its directory
as a ledger record under the owner id ``retained:<source>:<clone>`` (``:``
is in no domain name), until garbage collection finds nothing in it used and
rolls the record back. While it is active, its name stays taken
(``names_in_use``): a new clone of that name would make, and on failure
remove, that very directory.
"""

from __future__ import annotations

import sqlite3
import time

from ..model import Resource, ResourceKind, ResourceStatus
from .base import StoreBase
from .ledger import COLUMNS, resource

#: Owner-id prefix of a destroyed clone's kept directory.
RETAINED = "retained:"


def retained_id(source: str, clone: str) -> str:
    """The ledger owner id of destroyed ``clone``'s (of ``source``) kept directory."""
    return f"{RETAINED}{source}:{clone}"


def retained_source(owner_id: str) -> str:
    """The source named in a ``retained:`` owner id."""
    return owner_id.removeprefix(RETAINED).split(":", 1)[0]


def retained_names_sql() -> tuple[str, tuple[str, ...]]:
    """(query, args): the clone names of active retained records."""
    return ("SELECT clone FROM resources WHERE job_id LIKE ? AND status != ? AND clone IS NOT NULL",
            (RETAINED + "%", ResourceStatus.RELEASED.value))


class GcMixin(StoreBase):
    async def active_resources(self) -> list[Resource]:
        """Every resource of every owner id not released (in-flight jobs, freezes, retained clones), id order."""

        def do(db: sqlite3.Connection) -> list[Resource]:
            return [resource(row) for row in db.execute(
                f"SELECT {COLUMNS} FROM resources WHERE status != ? ORDER BY id", (ResourceStatus.RELEASED.value,))]

        return await self._db.write(do)

    async def adopt_source_deltas(self, owner_ids: tuple[str, str], source: str, *, into: str,
                                  clone: str) -> int:
        """Copy the made source deltas of ``source`` (a clone being destroyed) under its retained id ``into``.

        ``owner_ids``: (the stun ledger-id prefix, the freeze ledger id) its
        deltas were recorded under. Only adopted deltas are ever collected: a
        source that is not a destroyed clone of ours keeps its own. Returns how many.
        """
        stun_prefix, frozen_id = owner_ids
        now = time.time()

        def do(db: sqlite3.Connection) -> int:
            rows = db.execute(
                "SELECT ref, owner, dev, ino, ftype FROM resources WHERE kind=? AND removed_at IS NULL "
                "AND dev IS NOT NULL AND (job_id=? OR (substr(job_id, 1, ?)=? AND substr(job_id, ?) IN "
                "(SELECT id FROM jobs WHERE source=?))) ORDER BY id",
                (ResourceKind.SOURCE_DELTA.value, frozen_id, len(stun_prefix), stun_prefix, len(stun_prefix) + 1,
                 source)).fetchall()
            unique = {(ref, dev, ino, ftype): owner for ref, owner, dev, ino, ftype in rows}
            db.executemany(
                "INSERT INTO resources(job_id, kind, ref, clone, status, created_at, owner, dev, ino, ftype) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(into, ResourceKind.SOURCE_DELTA.value, ref, clone, ResourceStatus.DONE.value, now, owner,
                  dev, ino, ftype) for (ref, dev, ino, ftype), owner in unique.items()])
            return len(unique)

        return await self._db.write(do)

    async def release_owner(self, owner_id: str) -> None:
        """Mark every row of ``owner_id`` released (a destroyed clone's retained records, once all is gone)."""

        def do(db: sqlite3.Connection) -> None:
            db.execute("UPDATE resources SET status=? WHERE job_id=?", (ResourceStatus.RELEASED.value, owner_id))

        await self._db.write(do)
