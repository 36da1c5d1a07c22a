"""Owners: which jobs, clones, claims, pools and sources a caller reaches.

Every job, clone and pool records the uid that made it (a claim makes the
claimer the member's owner); the daemon's own work (pool members, the TTL
reaper) is the daemon's. An admin (:class:`.access.Caller`) reaches
everything. Anyone else:

* sees, execs into, copies to and from, destroys and releases only its own
  clones and claims, and sees only its own jobs and their events: another
  user's object answers 404 ``not_found``, as one that does not exist, so
  that its name and contents stay private;
* may clone, freeze, prepare or check only the sources its groups'
  ``access.sources`` patterns match (checked by name at the request; the job
  then acts on the domain it found), and a clone made by instaclone only if
  it owns it: 403 ``forbidden`` naming the rule;
* sees every pool (shared supply), but another's pool's guest config
  redacted and only its own claimed members; resizes, moves or deletes only
  its own pools (403, rule ``pool owner``).

Rows from before owners were recorded have no owner: only admins reach them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import Forbidden, NotFound
from ..model import CloneRecord, Event, JobRecord
from ..store import Store
from .access import Caller, caller_of
from .common import STORE

#: What a redacted script or guest config value reads.
REDACTED = "(redacted)"


def _of(caller: Caller) -> str:
    """What a not-found message adds for a non-admin: whose objects were looked at (not whether another's
    exists)."""
    return "" if caller.admin else f" for {caller.who}"


async def own_clone(request: web.Request, name: str) -> CloneRecord:
    """The clone ``name`` if the caller may reach it; raises NotFound (none, or another user's)."""
    caller = caller_of(request)
    rec = await request.app[STORE].get_clone(name)
    if rec is None or not caller.owns(rec.owner):
        raise NotFound(f"{name!r} is not a clone made by instaclone{_of(caller)}")
    return rec


async def own_job(request: web.Request, job_id: str) -> JobRecord:
    """The job ``job_id`` if the caller may see it; raises NotFound (none, or another user's)."""
    caller = caller_of(request)
    job = await request.app[STORE].get_job(job_id)
    if job is None or not caller.owns(job.owner):
        raise NotFound(f"no job {job_id!r}{_of(caller)}")
    return job


async def usable_source(request: web.Request, name: str) -> None:
    """Refuse (403 forbidden, naming the rule) a source the caller may not clone, freeze or prepare."""
    caller = caller_of(request)
    if caller.admin:
        return
    if not caller.may_use_source(name):
        allowed = ", ".join(caller.sources or ()) or "no source"
        raise Forbidden(f"{caller.who} may not use source {name!r}: access.sources gives its groups "
                        f"{allowed}", rule="access.sources")
    rec = await request.app[STORE].get_clone(name)
    if rec is not None and not caller.owns(rec.owner):
        raise Forbidden(f"{caller.who} may not use source {name!r}: it is a clone of another user, and a "
                        "clone is a source only to its owner and admins", rule="clone owner")


async def own_pool(request: web.Request, name: str) -> None:
    """Refuse (403, rule ``pool owner``) a change of another's pool; a missing pool is the keeper's 404."""
    caller = caller_of(request)
    pool = await request.app[STORE].get_pool(name)
    if pool is not None and not caller.owns(pool.owner):
        raise Forbidden(f"{caller.who} may not change pool {name!r}: only its owner (uid {pool.owner}) and "
                        "admins may resize, move or delete it", rule="pool owner")


async def pool_view(request: web.Request, pool: dict[str, Any]) -> dict[str, Any]:
    """``pool`` (the keeper's description) as the caller may see it: another's config redacted, and
    only the caller's own claimed members."""
    caller = caller_of(request)
    if caller.admin:
        return pool
    store = request.app[STORE]
    claimed = [n for n in pool.get("claimed", []) if (rec := await store.get_clone(n)) and caller.owns(rec.owner)]
    out = {**pool, "claimed": claimed}
    if not caller.owns(pool.get("owner")):
        out["config"] = dict.fromkeys(pool.get("config") or {}, REDACTED)
    return out


class EventFilter:
    """Which events a caller sees: an admin all; anyone else those of its own jobs (by job owner)."""

    def __init__(self, caller: Caller, store: Store) -> None:
        self.caller, self.store = caller, store
        self._jobs: dict[str, bool] = {}

    async def visible(self, events: list[Event]) -> list[Event]:
        if self.caller.admin:
            return events
        out = []
        for e in events:
            if e.job_id is None:
                continue  # pool and source events: admins' and webhooks'
            if e.job_id not in self._jobs:
                job = await self.store.get_job(e.job_id)
                self._jobs[e.job_id] = job is not None and self.caller.owns(job.owner)
            if self._jobs[e.job_id]:
                out.append(e)
        return out
