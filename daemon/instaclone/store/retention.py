"""Bounded state: finished jobs and delivered deliveries are pruned after the retention period.

:meth:`RetentionMixin.prune` removes, in one transaction, what is older than
its cut-off and needed by nothing: finished jobs (with their states, their
events and their released ledger rows, also those of their stun's
``stun-<id>`` owner id), delivered webhook deliveries, and events that no
delivery and no remaining job refers to. It never removes a job that is not
finished, one whose ledger still holds an active record (a NeedsAttention
job's left-behind files, a stun in progress) or one whose clones are still
registered, nor a delivery still to be sent, failed or parked (those are the
operator's to replay).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..model import ResourceStatus
from ..states import TERMINAL
from .base import DeliveryStatus, StoreBase

_TERMINAL = tuple(sorted(s.value for s in TERMINAL))


def _marks(n: int) -> str:
    return ",".join("?" * n)


class RetentionMixin(StoreBase):
    async def prune(self, before: float) -> dict[str, int]:
        """Delete what finished before ``before`` and nothing needs; returns counts per table."""

        def do(db: sqlite3.Connection) -> dict[str, int]:
            released = ResourceStatus.RELEASED.value
            jobs = [r[0] for r in db.execute(
                f"SELECT id FROM jobs j WHERE state IN ({_marks(len(_TERMINAL))}) AND updated_at < ? "
                "AND NOT EXISTS (SELECT 1 FROM resources r WHERE r.job_id IN (j.id, 'stun-' || j.id) "
                "AND r.status != ?) "
                "AND NOT EXISTS (SELECT 1 FROM clones c WHERE c.job_id = j.id)",
                (*_TERMINAL, before, released))]
            out: dict[str, Any] = {"jobs": len(jobs), "job_states": 0, "resources": 0}
            for i in range(0, len(jobs), 500):  # SQLite's limit of host parameters per statement
                chunk = jobs[i:i + 500]
                owners = [*chunk, *(f"stun-{j}" for j in chunk)]
                out["resources"] += db.execute(
                    f"DELETE FROM resources WHERE job_id IN ({_marks(len(owners))}) AND status = ?",
                    (*owners, released)).rowcount
                out["job_states"] += db.execute(
                    f"DELETE FROM job_states WHERE job_id IN ({_marks(len(chunk))})", chunk).rowcount
                db.execute(f"DELETE FROM jobs WHERE id IN ({_marks(len(chunk))})", chunk)
            out["deliveries"] = db.execute("DELETE FROM deliveries WHERE status = ? AND updated_at < ?",
                                           (DeliveryStatus.DELIVERED.value, before)).rowcount
            out["events"] = db.execute(
                "DELETE FROM events WHERE at < ? "
                "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_cursor = events.cursor) "
                "AND (job_id IS NULL OR NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = events.job_id))",
                (before,)).rowcount
            return out

        return await self._db.write(do)
