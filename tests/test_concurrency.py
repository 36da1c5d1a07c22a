"""Invariant 6 under load: 50 concurrent clone requests on one source, and on several.

The engine runs on the fake hypervisor with a realistic delay on every
libvirt call, so that jobs really overlap; the fake records, per source, how
many jobs hold it paused at once. A real-guest variant is in
tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from instaclone import config as cfg
from instaclone.jobs.engine import Engine
from instaclone.store import Store as Journal

from .fakes import FakeHypervisor, fake_engine


class CountingHypervisor(FakeHypervisor):
    """Tracks overlapping stuns per source."""

    def __init__(self) -> None:
        super().__init__()
        self.paused_now: Counter[str] = Counter()
        self.max_paused: Counter[str] = Counter()
        self.stuns: Counter[str] = Counter()

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
    journal = Journal(c.journal_path)
    await journal.open()
    virt = CountingHypervisor()
    for i in range(5):
        disk = tmp_path / f"s{i}.qcow2"
        disk.write_bytes(b"base")
        virt.add_source(f"s{i}", disk)
    # Every libvirt call takes a little while: jobs overlap for real.
    virt.delay.update({"suspend": 0.01, "resume": 0.01, "define": 0.005, "start": 0.01, "lookup": 0.002})
    engine = fake_engine(c, journal, virt)
    yield engine, virt, journal
    await engine.shutdown(10)
    await journal.close()


async def submit_all(engine: Engine, requests: list[tuple[str, str]]) -> list[str]:
    jobs = await asyncio.gather(*(engine.submit(source=s, name=n) for s, n in requests))
    await asyncio.gather(*(engine.wait(j.id, 120) for j in jobs))
    return [j.id for j in jobs]


@pytest.mark.parametrize("sources", [1, 5])
async def test_fifty_concurrent_requests(world, sources: int):
    engine, virt, journal = world
    requests = [(f"s{i % sources}", f"c{i}") for i in range(50)]
    ids = await submit_all(engine, requests)
    jobs = [await journal.get_job(i) for i in ids]
    states = Counter(j.state.value for j in jobs if j is not None)
    assert states == {"Unstunned": 50}, [(j.id, j.error) for j in jobs if j and j.error]
    # One stun per source at a time, and one stun per job.
    for i in range(sources):
        assert virt.max_paused[f"s{i}"] == 1, virt.max_paused
        assert virt.domains[f"s{i}"].state == "running"
    assert sum(virt.stuns.values()) == 50
    # Totals add up: 50 clones registered, 50 domains, no job left running.
    clones = await journal.list_clones()
    assert sorted(c.name for c in clones) == sorted(n for _, n in requests)
    assert len([d for d in virt.domains if d.startswith("c")]) == 50
    assert Counter(c.source for c in clones) == Counter(s for s, _ in requests)
    assert engine.active_jobs == 0
    assert not await journal.list_jobs(unfinished=True)


async def test_same_name_requested_concurrently_only_one_wins(world):
    engine, _virt, _journal = world
    results = await asyncio.gather(*(engine.submit(source="s0", name="dup") for _ in range(20)),
                                   return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(accepted) == 1 and all(getattr(r, "code", None) == "name_in_use" for r in refused)
    await engine.wait(accepted[0].id, 30)
