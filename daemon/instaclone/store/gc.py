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

from ..model import Resource, ResourceKind, ResourceStatus
from .base import StoreBase

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
            rows = db.execute("SELECT id, job_id, kind, ref, clone, status, owner, uuid FROM resources "
                              "WHERE status != ? ORDER BY id", (ResourceStatus.RELEASED.value,)).fetchall()
            return [Resource(rid, oid, ResourceKind(kind), ref, clone, ResourceStatus(status), owner, uuid)
                    for rid, oid, kind, ref, clone, status, owner, uuid in rows]

        return await self._db.write(do)
