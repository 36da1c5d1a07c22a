"""Pools of ready clones, and clone expiry (TTL).

A pool keeps ``size`` idle members of one source: clones that run, are
customized and have their network up. ``claim`` hands one out at once (it
leaves the pool's count, so the keeper makes another); ``release`` destroys
a claimed member. The keeper reconciles each pool against what the store
says: dead or surplus idle members go, members of an older source
generation (``pool update --source``) are replaced once new ones are ready,
and the missing ones are made by *one* job per pool and round, so that a
running source is stunned once for all of them (and jobs waiting for the
same source share a stun, see ``jobs/engine.py``). It never touches a
claimed member. Everything it keeps is in the store; the in-memory part is
only wake-ups and backoff.

The reaper destroys clones whose expiry (``clone --ttl``, ``claim --ttl``)
has passed, across restarts too (the expiry is in the store).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import events
from ..errors import (
    Conflict,
    DomainReplaced,
    InstacloneError,
    InsufficientCapacity,
    InvalidRequest,
    NotFound,
    SourceNotCloneable,
)
from ..hv import domxml
from ..model import CloneRecord, JobRecord, PoolRecord
from ..requests import ClaimRequest, CloneRequest, FreezeRequest, PoolRequest, PoolUpdate
from ..store.pools import RETIRING
from . import guestscript
from .admission import active_source, pick_memory
from .context import JobContext


class PoolEmpty(InstacloneError):
    """No idle member became ready within the claim's wait."""

    code = "pool_empty"
    http_status = 503
    retryable = True


Submit = Callable[[CloneRequest], Awaitable[JobRecord]]
Destroy = Callable[..., Awaitable[CloneRecord]]
Freeze = Callable[[FreezeRequest], Awaitable[dict[str, Any]]]
#: (kind, pool, figures): ``members`` {idle, claimed, pending}, ``claim`` {wait_s}, ``replenished`` {seconds}.
Observer = Callable[[str, str, dict[str, float]], None]


def _ignore(_kind: str, _pool: str, _data: dict[str, float]) -> None:
    return None


@dataclass
class _PoolState:
    """What the keeper remembers of a pool between rounds (lost at restart, rebuilt from the store)."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set when a member became idle
    failures: int = 0
    retry_at: float = 0.0  # monotonic: no new job before this (backoff after a failed one)
    last_error: dict[str, Any] | None = None
    held: str | None = None  # why replenishment waits (the host budget)


class PoolKeeper:
    """Keeps every pool at its size; hands out and takes back members; destroys expired clones."""

    def __init__(self, svc: JobContext, *, submit: Submit, destroy: Destroy, freeze: Freeze) -> None:
        self.svc = svc
        self._submit, self._destroy, self._freeze = submit, destroy, freeze
        self._wake = asyncio.Event()
        self._ttl_wake = asyncio.Event()
        self._state: dict[str, _PoolState] = {}
        self._round = asyncio.Lock()
        self.observe: Observer = _ignore  # the daemon hands its metrics in

    def _st(self, name: str) -> _PoolState:
        return self._state.setdefault(name, _PoolState())

    def wake(self) -> None:
        """Reconcile soon (after a claim, a release, a finished job, a change of a pool)."""
        self._wake.set()
        self._ttl_wake.set()

    # -- commands ---------------------------------------------------------------------

    async def create(self, req: PoolRequest) -> dict[str, Any]:
        """Define a pool of ``req.owner`` (a uid; None: the daemon's), optionally freezing its source first;
        the keeper fills it in the background (its members are the daemon's until claimed). Raises
        Conflict (it exists), SourceNotFound, SourceNotCloneable."""
        pool_name, src = req.name, req.source
        if await self.svc.store.get_pool(pool_name) is not None:
            raise Conflict(f"pool {pool_name!r} exists")
        await self._check_source(src)
        if req.freeze and src not in await self.svc.store.frozen():
            await self._freeze(FreezeRequest(src))
        try:
            pool = await self.svc.store.create_pool(PoolRecord(
                pool_name, src, req.size, dict(req.config or {}), req.customize, req.keep_network,
                owner=os.getuid() if req.owner is None else req.owner))
        except ValueError:
            raise Conflict(f"pool {pool_name!r} exists") from None
        self.svc.log.info("pool.created", pool=pool_name, source=src, size=req.size)
        self.wake()
        return await self.show(pool.name)

    async def update(self, req: PoolUpdate) -> dict[str, Any] | None:
        """Move the pool to ``req.source`` (if given), then resize it to ``req.size`` (if given); the pool
        after, or None if neither was given. Raises NotFound, SourceNotFound, SourceNotCloneable."""
        pool = None
        if req.source is not None:
            pool = await self.update_source(req.name, req.source)
        if req.size is not None:
            pool = await self.resize(req.name, req.size)
        return pool

    async def resize(self, name: str, size: int) -> dict[str, Any]:
        """Set the pool's size (0..MAX_POOL_SIZE, as PoolUpdate has it); raises NotFound."""
        await self._get(name)
        try:
            await self.svc.store.update_pool(name, size=size)
        except KeyError:
            raise NotFound(f"no pool {name!r}") from None
        self.wake()
        return await self.show(name)

    async def update_source(self, name: str, source: str) -> dict[str, Any]:
        """Image push: move the pool to a new source; idle members are replaced, claimed ones stay."""
        await self._get(name)
        await self._check_source(source)
        try:
            await self.svc.store.update_pool(name, source=source)
        except KeyError:
            raise NotFound(f"no pool {name!r}") from None
        self._st(name).failures = 0
        self._st(name).retry_at = 0.0
        self.wake()
        return await self.show(name)

    async def delete(self, name: str) -> dict[str, Any]:
        """Forget the pool and destroy its idle members; claimed members stay as plain clones."""
        await self._get(name)
        async with self._round:  # not while the keeper destroys members of it too
            try:
                idle = await self.svc.store.delete_pool(name)
            except KeyError:
                raise NotFound(f"no pool {name!r}") from None
            destroyed, failed = [], {}
            for member in idle:
                try:
                    await self._destroy(member, reason="pool")
                    destroyed.append(member)
                except InstacloneError as exc:
                    failed[member] = exc.message
        self._state.pop(name, None)
        return {"pool": name, "destroyed": destroyed, "not_destroyed": failed}

    async def show(self, name: str) -> dict[str, Any]:
        pool = await self._get(name)
        return await self._describe(pool)

    async def list_all(self) -> list[dict[str, Any]]:
        return [await self._describe(p) for p in await self.svc.store.list_pools()]

    async def claim(self, req: ClaimRequest) -> dict[str, Any]:
        """Hand out an idle member at once, or wait (bounded) for the next one; raises NotFound, PoolEmpty.

        The member becomes ``req.owner``'s (a uid; None: the daemon's).
        """
        t0 = time.monotonic()
        name, ttl, extra = req.pool, req.ttl_s, dict(req.config or {})
        claimed_by = dict(req.claimed_by) if req.claimed_by is not None else None
        owner = req.owner
        limit = self.svc.config.pools.claim_wait_s if req.wait_s is None else req.wait_s
        deadline = t0 + limit
        pool = await self._get(name)
        st = self._st(name)
        while True:
            st.ready.clear()
            rec = await self._claim_one(pool, ttl, claimed_by, os.getuid() if owner is None else owner)
            if rec is not None:
                break
            self.wake()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pending = await self._pending(pool)
                raise PoolEmpty(
                    f"pool {name!r} has no idle member; none became ready within {limit:g} s "
                    f"({pending} being made{'; ' + st.held if st.held else ''}); retry later")
            try:
                async with asyncio.timeout(remaining):
                    await st.ready.wait()
            except TimeoutError:
                pass
            pool = await self._get(name)
        waited_ms = round((time.monotonic() - t0) * 1000.0, 3)
        config_written = None
        if extra:
            config_written = await self._push_config(rec, {**pool.config, **extra})
        self.wake()  # the pool is one short now
        self.observe("claim", name, {"wait_s": waited_ms / 1000.0})
        self.svc.log.info("pool.claimed", pool=name, clone=rec.name, waited_ms=waited_ms, ttl_s=ttl)
        return {"pool": name, "clone": rec.to_dict(), "waited_ms": waited_ms, "config_path": config_written}

    async def release(self, clone: str) -> dict[str, Any]:
        """Destroy a pool member (Horizon's delete at logoff); the pool makes a new one."""
        rec = await self.svc.store.get_clone(clone)
        if rec is None:
            raise NotFound(f"{clone!r} is not a clone made by instaclone")
        if rec.pool is None:
            raise Conflict(f"{clone!r} is not a pool member; destroy it with 'instaclone destroy {clone}'")
        await self._destroy(clone, reason="released")
        await self.svc.store.emit_pool_event(events.POOL_RELEASED, rec.pool, clone=clone,
                                             claimed_at=rec.claimed_at)
        self.wake()
        return {"pool": rec.pool, "clone": clone, "destroyed": True}

    # -- the keeper -------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile every pool now and then, and at once when woken; never raises."""
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.svc.log.exception("pool.reconcile_failed")
            try:
                async with asyncio.timeout(self.svc.config.pools.check_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def reconcile(self) -> None:
        """One round over every pool; also on start (dead idle members replaced, claimed never touched)."""
        async with self._round:
            pools = await self.svc.store.list_pools()
            for pool in pools:
                await self._reconcile_one(pool)
            # Made for a pool deleted meanwhile: an idle member of no pool.
            names = {p.name for p in pools}
            for c in await self.svc.store.list_clones():
                if c.pool is not None and c.pool not in names and c.claimed_at in (None, RETIRING):
                    await self._try_destroy(c.name, reason="pool")

    async def _sweep(self, pool: PoolRecord, members: list[CloneRecord]) -> tuple[list[CloneRecord], list[CloneRecord]]:
        """Finish cut-short retirements, retire dead and surplus idle members; (current, old) idle ones left."""
        for m in members:
            if m.claimed_at == RETIRING:  # a destroy cut short (a crash): finish it
                await self._try_destroy(m.name, reason="pool")
        alive = []
        for m in members:
            if m.claimed_at is not None:
                continue
            state = await self._state_of(m)
            if state == "running":
                alive.append(m)
            else:
                self.svc.log.warning("pool.member_dead", pool=pool.name, clone=m.name, state=state)
                await self._retire(pool, m.name)
        current = [m for m in alive if m.generation == pool.generation]
        old = [m for m in alive if m.generation != pool.generation]
        # Old generation first, then the newest surplus: never more idle than the size.
        surplus = len(current) + len(old) - pool.size
        for m in (old + current[::-1])[:max(0, surplus)]:
            await self._retire(pool, m.name)
        return current, old

    async def _reconcile_one(self, pool: PoolRecord) -> None:
        svc, st = self.svc, self._st(pool.name)
        recorded = await svc.store.pool_members(pool.name)
        current, old = await self._sweep(pool, recorded)
        members = [m for m in recorded if m.claimed_at != RETIRING]
        if current:
            st.ready.set()
        idle = [m for m in members if m.claimed_at is None]
        unfinished = await svc.store.list_jobs(unfinished=True)
        pending = sum(j.spec.count for j in unfinished
                      if j.spec.pool == pool.name and j.spec.pool_generation == pool.generation)
        self.observe("members", pool.name, {"idle": float(min(len(current) + len(old), pool.size)),
                                            "claimed": float(len(members) - len(idle)), "pending": float(pending)})
        deficit = pool.size - min(len(current), pool.size) - pending
        if deficit <= 0 or time.monotonic() < st.retry_at:
            return
        room = await self._room(pool, unfinished)
        if room < deficit and old:
            # An image push on a full host: an old idle member makes room for a new one.
            for m in old[:deficit - max(room, 0)]:
                await self._retire(pool, m.name)
            room = await self._room(pool, unfinished)
        if room <= 0:
            st.held = "replenishment held by the host budget (pools.max_clones / pools.max_memory_mib)"
            return
        fit, short = await self._fit(pool, min(deficit, room, svc.config.clone.max_count))
        if fit <= 0:
            # Admission would refuse the job: wait for room instead of failing (and backing off).
            st.held = f"replenishment held by the host's capacity: {short.message if short else 'no room'}"
            return
        st.held = None
        count = fit
        base = f"{pool.name}-{secrets.token_hex(3)}"
        try:
            job = await self._submit(CloneRequest(
                source=pool.source, name=base, count=count, customize=pool.customize,
                keep_network=pool.keep_network, config=dict(pool.config) or None, pool=pool.name,
                pool_generation=pool.generation))
        except InsufficientCapacity as exc:  # the host changed since _fit: wait, as above
            st.held = f"replenishment held by the host's capacity: {exc.message}"
            return
        except InstacloneError as exc:
            self._failed(pool.name, exc.to_dict())
            return
        svc.log.info("pool.replenishing", pool=pool.name, job_id=job.id, count=count, source=pool.source)
        await svc.store.emit_pool_event(events.POOL_REPLENISHING, pool.name, job_id=job.id, count=count,
                                        source=pool.source, idle=len(current), pending=pending + count)

    def job_finished(self, job: JobRecord) -> None:
        """A pool's job ended: remember a failure (backoff), wake claims and the keeper."""
        pool = job.spec.pool
        if pool is None:
            return
        st = self._st(pool)
        if job.state.failed:
            self._failed(pool, job.error)
        else:
            st.failures, st.retry_at, st.last_error = 0, 0.0, None
            st.ready.set()
            self.observe("replenished", pool, {"seconds": max(0.0, job.updated_at - job.created_at)})
        self.wake()

    def _failed(self, pool: str, error: dict[str, Any] | None) -> None:
        st = self._st(pool)
        st.failures += 1
        st.last_error = error
        st.retry_at = time.monotonic() + min(60.0, 2.0 ** st.failures)
        self.svc.log.warning("pool.replenish_failed", pool=pool, error=error, failures=st.failures)

    # -- TTL --------------------------------------------------------------------------

    async def reap(self) -> None:
        """Destroy clones whose expiry passed; sleeps until the next one (or a wake-up); never raises."""
        while True:
            self._ttl_wake.clear()
            try:
                for rec in await self.svc.store.expired_clones(time.time()):
                    await self._try_destroy(rec.name, reason="expired")
                nxt = await self.svc.store.next_expiry()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.svc.log.exception("ttl.reap_failed")
                nxt = None
            sleep = self.svc.config.pools.check_interval_s
            if nxt is not None:
                sleep = max(0.05, min(sleep, nxt - time.time()))
            try:
                async with asyncio.timeout(sleep):
                    await self._ttl_wake.wait()
            except TimeoutError:
                pass

    # -- helpers ----------------------------------------------------------------------

    async def _get(self, name: str) -> PoolRecord:
        pool = await self.svc.store.get_pool(name)
        if pool is None:
            raise NotFound(f"no pool {name!r}")
        return pool

    async def _check_source(self, src: str) -> None:
        await active_source(self.svc, src)
        rec = await self.svc.store.get_clone(src)
        if rec is not None and rec.pool is not None and rec.claimed_at is None:
            raise SourceNotCloneable(f"{src!r} is an idle member of pool {rec.pool!r}; claim it first")

    async def _state_of(self, member: CloneRecord) -> str:
        try:
            # By its UUID: a domain that took a dead member's name is not a live member.
            return (await self.svc.virt.lookup_id(member.name, member.uuid)).state
        except InstacloneError:
            return "absent"

    async def _retire(self, pool: PoolRecord, name: str) -> None:
        """Destroy an idle member, unless a claim took it meanwhile."""
        if await self.svc.store.retire_member(pool.name, name):
            await self._try_destroy(name, reason="pool")

    async def _try_destroy(self, name: str, *, reason: str) -> None:
        try:
            await self._destroy(name, reason=reason)
        except DomainReplaced as exc:
            # Forgotten; the domain that has its name now is not ours and was left alone.
            self.svc.log.warning("clone.forgotten", clone=name, reason=reason, why=exc.message)
        except InstacloneError as exc:
            self.svc.log.warning("pool.destroy_failed", clone=name, reason=reason, error=exc.message)

    async def _claim_one(self, pool: PoolRecord, ttl: float | None,
                         claimed_by: dict[str, Any] | None, owner: int) -> CloneRecord | None:
        members = [m for m in await self.svc.store.pool_members(pool.name) if m.claimed_at is None]
        # The current source's members first (oldest first), then an older generation's.
        members.sort(key=lambda m: (m.generation != pool.generation, m.created_at))
        for m in members:
            # A member that died since the last round is the keeper's to replace.
            if await self._state_of(m) != "running":
                continue
            rec = await self.svc.store.claim_member(pool.name, [m.name], ttl_s=ttl, claimed_by=claimed_by,
                                                     owner=owner)
            if rec is not None:
                return rec
        return None

    async def _pending(self, pool: PoolRecord) -> int:
        """Clones being made for ``pool`` (its unfinished jobs)."""
        return sum(j.spec.count for j in await self.svc.store.list_jobs(unfinished=True) if j.spec.pool == pool.name)

    async def _room(self, pool: PoolRecord, unfinished: list[JobRecord]) -> int:
        """How many more clones the host budget allows now (``unfinished``: every job being made)."""
        cfg = self.svc.config.pools
        clones = await self.svc.store.list_clones()
        room = cfg.max_clones - len(clones) - sum(j.spec.count for j in unfinished)
        if cfg.max_memory_mib:
            # Clones are defined with their source's RAM: one look per source.
            sources = [*(c.source for c in clones), *(j.source for j in unfinished for _ in range(j.spec.count))]
            mib = {src: await self._memory_mib(src) for src in {*sources, pool.source}}
            per_clone = mib[pool.source]
            if per_clone:
                room = min(room, (cfg.max_memory_mib - sum(mib[s] for s in sources)) // per_clone)
        return room

    async def _fit(self, pool: PoolRecord, limit: int) -> tuple[int, InsufficientCapacity | None]:
        """How many of ``limit`` clones of the pool's source admission would take now, and why not more."""
        try:
            info = await active_source(self.svc, pool.source)
            memory = pick_memory(self.svc.memories, info)
        except InstacloneError:
            return limit, None  # admission says why, and the job's failure backs off
        return self.svc.capacity.fit(self.svc.config, source=pool.source, ram_mib=domxml.memory_mib(info.xml),
                                     backend=memory, limit=limit,
                                     frozen=pool.source in await self.svc.store.frozen())

    async def _memory_mib(self, source: str) -> int:
        try:
            info = await self.svc.virt.lookup(source)
        except InstacloneError:
            return 0
        return domxml.memory_mib(info.xml)

    async def _push_config(self, rec: CloneRecord, config: dict[str, str]) -> str:
        """Write the claim's config (over the pool's) to the member, where customization puts it."""
        path = guestscript.CONFIG_PATH
        script = f"mkdir -p {path.rsplit('/', 1)[0]} && umask 077 && cat > {path}"
        try:
            await self.svc.virt.lookup_id(rec.name, rec.uuid)  # the member, not a domain that took its name
            rc, out = await self.svc.virt.agent_exec(rec.name, ["/bin/sh", "-c", script],
                                                     stdin=json.dumps(config).encode(), timeout_s=10)
        except InstacloneError as exc:
            raise InvalidRequest(f"claimed {rec.name!r}, but could not write its config: {exc.message}") from None
        if rc != 0:
            raise InvalidRequest(f"claimed {rec.name!r}, but writing its config exited {rc}: {out.strip()[-200:]}")
        return path

    async def _describe(self, pool: PoolRecord) -> dict[str, Any]:
        members = [m for m in await self.svc.store.pool_members(pool.name) if m.claimed_at != RETIRING]
        idle = [m for m in members if m.claimed_at is None]
        st = self._st(pool.name)
        return {**pool.to_dict(),
                "idle": [m.name for m in idle if m.generation == pool.generation],
                "idle_old_source": [m.name for m in idle if m.generation != pool.generation],
                "claimed": [m.name for m in members if m.claimed_at is not None],
                "pending": await self._pending(pool),
                "held": st.held, "last_error": st.last_error, "failures": st.failures}

