"""Invariant 6 under load: concurrent clone requests on one source, and on several.

The engine runs on the fake hypervisor with a realistic delay on every
libvirt call, so that jobs really overlap; the fake records, per source, how
many jobs hold it paused at once and how many stuns there were. Requests
that wait while a stun is pending are coalesced into one stun; each keeps
its own job, and one failing request never fails another. A real-guest
variant is in tests/integration/test_faults.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from instaclone import config as cfg
from instaclone.errors import LibvirtError
from instaclone.jobs.engine import Engine
from instaclone.requests import CloneRequest
from instaclone.store import Store
from tests.support.fakes import FakeHypervisor, RoomyHost, fake_engine


class CountingHypervisor(FakeHypervisor):
    """Tracks overlapping stuns per source."""

    def __init__(self) -> None:
        super().__init__()
        self.paused_now: Counter[str] = Counter()
        self.max_paused: Counter[str] = Counter()
        self.stuns: Counter[str] = Counter()
        self.bad_define: set[str] = set()  # clone names whose definition fails
        self.bad_start: set[str] = set()  # clone names whose start fails

    async def define(self, xml: str) -> str:
        for name in self.bad_define:
            if f"<name>{name}</name>" in xml:
                raise LibvirtError(f"injected: define {name}")
        return await super().define(xml)

    async def start(self, name: str, *, paused: bool = False) -> None:
        if name in self.bad_start:
            raise LibvirtError(f"injected: start {name}")
        await super().start(name, paused=paused)

    async def suspend(self, name: str) -> None:
        await super().suspend(name)
        self.paused_now[name] += 1
        self.stuns[name] += 1
        self.max_paused[name] = max(self.max_paused[name], self.paused_now[name])

    async def resume(self, name: str) -> None:
        was = self.domains[name].state if name in self.domains else None
        await super().resume(name)
        if was == "paused":
            self.paused_now[name] -= 1


@pytest.fixture
async def world(tmp_path: Path):
    c = cfg.Config()
    c = replace(c, daemon=replace(c.daemon, state_dir=tmp_path / "state", max_concurrent_jobs=8),
                clone=replace(c.clone, stun_deadline_ms=5000, step_timeout_s=30))
    store = Store(c.store_path)
    await store.open()
    virt = CountingHypervisor()
    for i in range(5):
        disk = tmp_path / f"s{i}.qcow2"
        disk.write_bytes(b"base")
        virt.add_source(f"s{i}", disk)
    # Every libvirt call takes a little while: jobs overlap for real.
    virt.delay.update({"suspend": 0.01, "resume": 0.01, "define": 0.005, "start": 0.01, "lookup": 0.002})
    engine = fake_engine(c, store, virt)
    yield engine, virt, store
    await engine.shutdown(10)
    await store.close()


async def submit_all(engine: Engine, requests: list[tuple[str, str]]) -> list[str]:
    jobs = await asyncio.gather(*(engine.submit(CloneRequest(source=s, name=n)) for s, n in requests))
    await asyncio.gather(*(engine.wait(j.id, 120) for j in jobs))
    return [j.id for j in jobs]


@pytest.mark.parametrize("sources", [1, 5])
async def test_fifty_concurrent_requests(world, sources: int):
    engine, virt, store = world
    requests = [(f"s{i % sources}", f"c{i}") for i in range(50)]
    ids = await submit_all(engine, requests)
    jobs = [await store.get_job(i) for i in ids]
    states = Counter(j.state.value for j in jobs if j is not None)
    assert states == {"Unstunned": 50}, [(j.id, j.error) for j in jobs if j and j.error]
    # One stun per source at a time; requests that waited share a stun.
    for i in range(sources):
        assert virt.max_paused[f"s{i}"] == 1, virt.max_paused
        assert virt.domains[f"s{i}"].state == "running"
    stun_ids = {j.result["stun"]["id"] for j in jobs if j is not None}
    assert len(stun_ids) == sum(virt.stuns.values()) == engine.stuns
    assert sum(virt.stuns.values()) < len(requests), virt.stuns  # some requests shared a stun
    # Totals add up: 50 clones registered, 50 domains, no job left running.
    clones = await store.list_clones()
    assert sorted(c.name for c in clones) == sorted(n for _, n in requests)
    assert len([d for d in virt.domains if d.startswith("c")]) == 50
    assert Counter(c.source for c in clones) == Counter(s for s, _ in requests)
    assert engine.active_jobs == 0
    assert not await store.list_jobs(unfinished=True)


async def test_same_name_requested_concurrently_only_one_wins(world):
    engine, _virt, _journal = world
    results = await asyncio.gather(*(engine.submit(CloneRequest(source="s0", name="dup")) for _ in range(20)),
                                   return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(accepted) == 1 and all(getattr(r, "code", None) == "name_in_use" for r in refused)
    await engine.wait(accepted[0].id, 30)


async def hold_first_stun(engine: Engine, virt: CountingHypervisor, source: str) -> tuple[str, asyncio.Event]:
    """Submit one job and keep its stun pending (at SourceDeltaCreated) until the event is set."""
    release = asyncio.Event()
    first = await engine.submit(CloneRequest(source=source, name="first"))

    async def hook(job_id: str, step: str) -> None:
        if job_id == first.id and step == "SourceDeltaCreated":
            await release.wait()

    engine.step_hook = hook
    while virt.stuns[source] == 0:
        await asyncio.sleep(0.005)
    return first.id, release


async def test_hundred_requests_during_a_stun_share_one_stun(world):
    engine, virt, store = world
    engine.config = replace(engine.config, clone=replace(engine.config.clone, max_count=200),
                            admission=replace(engine.config.admission, max_queued_jobs=200))
    # 101 fake full-RAM clones would not fit this host's memory: admission's
    # budget is tested in tests/hostile/test_capacity.py, coalescing here.
    engine.svc.capacity.probe = RoomyHost()
    first, release = await hold_first_stun(engine, virt, "s0")
    jobs = await asyncio.gather(*(engine.submit(CloneRequest(source="s0", name=f"c{i}")) for i in range(100)))
    release.set()
    await asyncio.gather(*(engine.wait(j.id, 120) for j in [*jobs]))
    await engine.wait(first, 60)
    done = [await store.get_job(j.id) for j in jobs]
    assert Counter(j.state.value for j in done if j) == {"Unstunned": 100}
    # The first stun, and one for the hundred that waited for it.
    assert virt.stuns["s0"] == 2 and engine.stuns == 2
    ids = {j.result["stun"]["id"] for j in done if j}
    assert len(ids) == 1
    (only,) = ids
    assert sorted(done[0].result["stun"]["jobs"]) == sorted(j.id for j in jobs)
    assert only == f"stun-{done[0].result['stun']['jobs'][0]}"
    # Each job has its own clone and result.
    assert [c["name"] for j in done if j for c in j.result["clones"]] == [f"c{i}" for i in range(100)]
    assert not await store.owner_ids(prefix="stun-")
    assert not await store.list_jobs(unfinished=True)


async def test_one_failing_request_never_fails_another(world):
    engine, virt, store = world
    virt.bad_define.add("c-bad")
    _first, release = await hold_first_stun(engine, virt, "s0")
    jobs = [await engine.submit(CloneRequest(source="s0", name=n)) for n in ("c-a", "c-bad", "c-b")]
    release.set()
    for j in jobs:
        await engine.wait(j.id, 60)
    a, bad, b = [await store.get_job(j.id) for j in jobs]
    assert bad is not None and bad.state.value == "Failed"
    assert bad.error is not None and "injected: define c-bad" in bad.error["message"]
    assert bad.error["step"] == "Configured"
    assert a is not None and b is not None
    assert (a.state.value, b.state.value) == ("Unstunned", "Unstunned")
    assert a.result["stun"]["id"] == b.result["stun"]["id"]
    assert bad.id in a.result["stun"]["jobs"]
    assert "c-bad" not in virt.domains
    assert sorted(c.name for c in await store.list_clones()) == ["c-a", "c-b", "first"]
    assert virt.stuns["s0"] == 2


async def test_a_clone_that_fails_to_start_is_removed_alone(world, tmp_path: Path):
    engine, virt, store = world
    virt.bad_start.add("p-2")
    job = await engine.submit(CloneRequest(source="s0", name="p", count=3))
    await engine.wait(job.id, 60)
    done = await store.get_job(job.id)
    assert done is not None and done.state.value == "Partial"
    assert [c["name"] for c in done.result["clones"]] == ["p-1", "p-3"]
    (failed,) = done.result["failed_clones"]
    assert failed["name"] == "p-2" and "injected: start p-2" in failed["error"]["message"]
    assert failed["left_behind"] == []
    assert "p-2" not in virt.domains
    assert not (engine.config.clones_dir / "p-2").exists()
    assert sorted(c.name for c in await store.list_clones()) == ["p-1", "p-3"]


async def test_all_clones_failing_to_start_fail_the_job(world):
    engine, virt, store = world
    virt.bad_start.update({"q-1", "q-2"})
    job = await engine.submit(CloneRequest(source="s0", name="q", count=2))
    await engine.wait(job.id, 60)
    done = await store.get_job(job.id)
    assert done is not None and done.state.value == "Failed"
    assert [f["name"] for f in done.error["failed_clones"]] == ["q-1", "q-2"]
    assert not [d for d in virt.domains if d.startswith("q-")]
    assert not await store.list_clones()


async def test_the_source_lock_is_let_go_while_clones_start(world):
    """The next stun of a source may run while the previous job's clones still start."""
    engine, virt, store = world
    virt.delay["start"] = 0.5  # a slow clone start
    j1 = await engine.submit(CloneRequest(source="s0", name="slow"))
    while virt.stuns["s0"] == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # j1's stun is over; its clone is starting
    j2 = await engine.submit(CloneRequest(source="s0", name="next"))
    while virt.stuns["s0"] < 2:
        await asyncio.sleep(0.005)
    first = await store.get_job(j1.id)
    assert first is not None and first.state.value == "Configured"  # still starting its clone
    await engine.wait(j1.id, 30)
    await engine.wait(j2.id, 30)
    assert [(await store.get_job(j.id)).state.value for j in (j1, j2)] == ["Unstunned", "Unstunned"]
