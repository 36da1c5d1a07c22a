"""Pools, claims, releases, image push, the host budget and TTLs, on the fake hypervisor.

The engine and its pool keeper run for real (store, pipeline, coalescing);
only libvirt is the fake. Real guests: tests/integration/test_pools.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from instaclone.errors import Conflict, InvalidRequest, NotFound
from instaclone.jobs.pools import PoolEmpty
from instaclone.requests import ClaimRequest, CloneRequest, PoolRequest
from tests.support.fakes import FakeHypervisor, fake_engine, fake_world


@asynccontextmanager
async def running(engine: Any) -> AsyncIterator[Any]:
    """The engine with its services (pool keeper, TTL reaper) running."""
    await engine.recover()
    task = asyncio.get_running_loop().create_task(engine.run_background())
    try:
        yield engine
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.shutdown(10)


@pytest.fixture
async def world(tmp_path: Path):
    c, store, virt = await fake_world(tmp_path, pools={"check_interval_s": 0.2},
                                        clone={"stun_deadline_ms": 5000, "step_timeout_s": 30})
    yield c, store, virt
    await store.close()


async def until(pred: Any, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


def idle_count(engine: Any, name: str, n: int) -> Any:
    async def pred() -> bool:
        p = await engine.pools.show(name)
        return len(p["idle"]) == n and p["pending"] == 0
    return pred


def stuns(virt: FakeHypervisor) -> int:
    return sum(1 for m, n in virt.calls if m == "suspend" and n == "src")


async def test_a_pool_fills_with_one_stun_and_hands_out_members_at_once(world):
    c, store, virt = world
    async with running(fake_engine(c, store, virt)) as engine:
        await engine.pools.create(PoolRequest(name="vdi", source="src", size=3, config={"role": "desk"}))
        await until(idle_count(engine, "vdi", 3))
        assert stuns(virt) == 1  # three members, one job, one stun
        members = (await engine.pools.show("vdi"))["idle"]
        assert all(virt.domains[m].state == "running" for m in members)
        t0 = time.monotonic()
        out = await engine.pools.claim(ClaimRequest("vdi", ttl_s=600))
        assert time.monotonic() - t0 < 0.5
        assert out["clone"]["name"] in members and out["clone"]["claimed_at"]
        assert out["clone"]["expires_at"] == pytest.approx(time.time() + 600, abs=5)
        assert out["waited_ms"] < 500
        # The keeper makes a new member; the claimed one leaves the pool's idle count.
        await until(idle_count(engine, "vdi", 3))
        shown = await engine.pools.show("vdi")
        assert shown["claimed"] == [out["clone"]["name"]]
        # Release: the claimed member is destroyed, the pool keeps 3 idle.
        rel = await engine.pools.release(out["clone"]["name"])
        assert rel["pool"] == "vdi" and out["clone"]["name"] not in virt.domains
        assert (await engine.pools.show("vdi"))["claimed"] == []
        types = [e.type for e in await store.events(since=0, limit=1000)]
        for t in ("pool.created", "pool.replenishing", "pool.claimed", "pool.released"):
            assert t in types, t


async def test_a_claim_on_an_empty_pool_waits_bounded(world):
    c, store, virt = world
    async with running(fake_engine(c, store, virt)) as engine:
        await engine.pools.create(PoolRequest(name="empty", source="src", size=0))
        t0 = time.monotonic()
        with pytest.raises(PoolEmpty) as info:
            await engine.pools.claim(ClaimRequest("empty", wait_s=0.3))
        assert 0.3 <= time.monotonic() - t0 < 2.0
        assert info.value.code == "pool_empty" and "within 0.3 s" in info.value.message
        # A slow member: the claim waits for it and says how long.
        virt.delay["start"] = 0.5
        await engine.pools.resize("empty", 1)
        out = await engine.pools.claim(ClaimRequest("empty", wait_s=20))
        assert out["waited_ms"] >= 300


async def test_resize_and_delete(world):
    c, store, virt = world
    async with running(fake_engine(c, store, virt)) as engine:
        await engine.pools.create(PoolRequest(name="p", source="src", size=3))
        await until(idle_count(engine, "p", 3))
        claimed = (await engine.pools.claim(ClaimRequest("p")))["clone"]["name"]
        await engine.pools.resize("p", 1)
        await until(idle_count(engine, "p", 1))
        await engine.pools.resize("p", 2)
        await until(idle_count(engine, "p", 2))
        idle = (await engine.pools.show("p"))["idle"]
        out = await engine.pools.delete("p")
        assert sorted(out["destroyed"]) == sorted(idle)
        assert all(m not in virt.domains for m in idle)
        # The claimed member stays, as a plain clone.
        assert virt.domains[claimed].state == "running"
        rec = await store.get_clone(claimed)
        assert rec is not None and rec.pool is None
        with pytest.raises(NotFound):
            await engine.pools.show("p")
        with pytest.raises(Conflict):
            await engine.pools.release(claimed)


async def test_image_push_replaces_idle_members_and_keeps_claimed_ones(world, tmp_path: Path):
    c, store, virt = world
    disk = tmp_path / "src2.qcow2"
    disk.write_bytes(b"base2")
    virt.add_source("src2", disk)
    async with running(fake_engine(c, store, virt)) as engine:
        await engine.pools.create(PoolRequest(name="ci", source="src", size=2))
        await until(idle_count(engine, "ci", 2))
        old_idle = set((await engine.pools.show("ci"))["idle"])
        claimed = (await engine.pools.claim(ClaimRequest("ci")))["clone"]["name"]
        await until(idle_count(engine, "ci", 2))
        await engine.pools.update_source("ci", "src2")

        async def replaced() -> bool:
            p = await engine.pools.show("ci")
            return len(p["idle"]) == 2 and not p["idle_old_source"] and p["pending"] == 0
        await until(replaced)
        p = await engine.pools.show("ci")
        assert p["source"] == "src2" and p["generation"] == 2
        assert [(await store.get_clone(m)).source for m in p["idle"]] == ["src2", "src2"]
        assert not (old_idle - {claimed}) & set(virt.domains)
        assert virt.domains[claimed].state == "running" and p["claimed"] == [claimed]


async def test_replenishment_stays_within_the_host_budget(world, tmp_path: Path):
    c, store, virt = world
    from dataclasses import replace
    c = replace(c, pools=replace(c.pools, max_clones=2))
    async with running(fake_engine(c, store, virt)) as engine:
        await engine.pools.create(PoolRequest(name="big", source="src", size=5))
        await until(idle_count(engine, "big", 2))
        await asyncio.sleep(0.5)
        p = await engine.pools.show("big")
        assert len(p["idle"]) == 2 and p["pending"] == 0 and "host budget" in (p["held"] or "")
        assert len(await store.list_clones()) == 2


async def test_reconcile_at_start_replaces_dead_idle_members_and_never_touches_claimed(world):
    c, store, virt = world
    async with running(fake_engine(c, store, virt)) as engine:
        await engine.pools.create(PoolRequest(name="r", source="src", size=2))
        await until(idle_count(engine, "r", 2))
        claimed = (await engine.pools.claim(ClaimRequest("r")))["clone"]["name"]
        await until(idle_count(engine, "r", 2))
    # The daemon is down; one idle member and the claimed one die meanwhile.
    dead_idle = (await store.pool_members("r"))[-1].name
    assert (await store.get_clone(dead_idle)).claimed_at is None
    await virt.destroy(dead_idle)
    await virt.destroy(claimed)
    async with running(fake_engine(c, store, virt)) as engine:
        async def replaced() -> bool:
            p = await engine.pools.show("r")
            return dead_idle not in p["idle"] and await idle_count(engine, "r", 2)()
        await until(replaced)
        p = await engine.pools.show("r")
        assert dead_idle not in p["idle"] and dead_idle not in virt.domains
        # The claimed member is its claimer's: left as it is, still registered.
        assert p["claimed"] == [claimed] and virt.domains[claimed].state == "shutoff"


async def test_ttl_destroys_clones_across_a_restart(world):
    c, store, virt = world
    async with running(fake_engine(c, store, virt)) as engine:
        job = await engine.submit(CloneRequest(source="src", name="short", ttl_s=1))
        keep = await engine.submit(CloneRequest(source="src", name="long", ttl_s=3600))
        await engine.wait(job.id, 20)
        await engine.wait(keep.id, 20)
        rec = await store.get_clone("short")
        assert rec is not None and rec.expires_at is not None
    # Down while it expires; destroyed once the daemon is back.
    await asyncio.sleep(max(0.0, rec.expires_at - time.time()) + 0.1)
    assert "short" in virt.domains
    async with running(fake_engine(c, store, virt)):
        async def gone() -> bool:
            return await store.get_clone("short") is None
        await until(gone, 10)
        assert "short" not in virt.domains and "long" in virt.domains
    types = [e.type for e in await store.events(since=0, limit=1000)]
    assert "clone.expired" in types


async def test_a_claimed_member_with_a_ttl_expires_and_is_replaced(world):
    c, store, virt = world
    async with running(fake_engine(c, store, virt)) as engine:
        await engine.pools.create(PoolRequest(name="t", source="src", size=1))
        await until(idle_count(engine, "t", 1))
        name = (await engine.pools.claim(ClaimRequest("t", ttl_s=1)))["clone"]["name"]

        async def expired() -> bool:
            return name not in virt.domains
        await until(expired, 10)
        await until(idle_count(engine, "t", 1))


@pytest.mark.parametrize(("kw", "message"), [
    ({"name": "x", "source": "src", "size": -1}, "size must be"),
    ({"name": "x", "source": "src", "size": True}, "size must be"),
    ({"name": "bad name", "source": "src", "size": 1}, "pool name"),
    ({"name": "x", "source": "src", "size": 1, "config": {"a": 1}}, "config must be"),
    ({"name": "x", "source": "src", "size": 1, "freeze": "yes"}, "freeze must be"),
])
async def test_bad_pool_requests_are_refused(world, kw: dict[str, Any], message: str):
    c, store, virt = world
    engine = fake_engine(c, store, virt)
    with pytest.raises(InvalidRequest) as info:
        await engine.pools.create(PoolRequest(**kw))
    assert message in info.value.message
    assert await store.list_pools() == []


async def test_claim_and_source_errors(world):
    c, store, virt = world
    engine = fake_engine(c, store, virt)
    with pytest.raises(NotFound):
        await engine.pools.claim(ClaimRequest("nope"))
    with pytest.raises(NotFound):
        await engine.pools.create(PoolRequest(name="x", source="missing", size=1))
    await engine.pools.create(PoolRequest(name="x", source="src", size=0))
    with pytest.raises(Conflict):
        await engine.pools.create(PoolRequest(name="x", source="src", size=0))
    with pytest.raises(InvalidRequest):
        await engine.pools.claim(ClaimRequest("x", ttl_s=0))
    with pytest.raises(NotFound):
        await engine.pools.release("nope")


async def test_a_member_is_either_claimed_or_retired_never_both(world):
    """The keeper's destroy of a surplus member and a claim race: exactly one wins, in the store."""
    c, store, virt = world
    async with running(fake_engine(c, store, virt)) as engine:
        await engine.pools.create(PoolRequest(name="race", source="src", size=2))
        await until(idle_count(engine, "race", 2))
        a, b = (await engine.pools.show("race"))["idle"]
        claimed = await store.claim_member("race", [a], ttl_s=None)
        assert claimed is not None and claimed.name == a
        assert await store.retire_member("race", a) is False  # claimed: the keeper leaves it
        assert await store.retire_member("race", b) is True
        assert await store.claim_member("race", [b], ttl_s=None) is None  # retiring: no claim takes it
        await until(idle_count(engine, "race", 2))
        p = await engine.pools.show("race")
        assert p["claimed"] == [a] and b not in p["idle"] and b not in virt.domains
