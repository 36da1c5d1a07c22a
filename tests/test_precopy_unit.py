"""filecow's precopy mode on the fake world: order of calls, fallback, the deadline from the stop.

The real thing (QEMU pre-copy into a shadow) is in test_precopy_integration.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from instaclone.errors import VirtTimeout

from .contract import harness
from .contract.fakeworld import FakeWorld


async def run_job(world: FakeWorld, **config_changes: object) -> Any:
    if config_changes:
        world.config = replace(world.config, clone=replace(world.config.clone, **config_changes))
    storage, memory = harness.make_backends(world.config, world.virt, world.storage, world.memory)
    engine = harness.make_engine(world.config, world.journal, world.virt, storage, memory)
    try:
        job_id = await harness.submit(engine, source=world.source, name="pc", count=2, customize=False)
        await harness.wait(engine, job_id)
        job = await world.journal.get_job(job_id)
        assert job is not None
        return job
    finally:
        await harness.shutdown(engine)


async def world_at(tmp_path: Path) -> FakeWorld:
    return await FakeWorld.create(tmp_path / "w", storage="fake", memory="filecow-precopy")


async def test_precopy_stops_the_source_only_around_the_snapshot(tmp_path: Path) -> None:
    world = await world_at(tmp_path)
    try:
        out = await run_job(world)
        assert out.state.value == "Unstunned", out
        memory = out.result["memory"]
        assert memory["mode"] == "precopy" and "fallback" not in memory
        assert {"precopy_s", "transferred_bytes", "qemu_downtime_ms"} <= memory.keys()
        calls = [c for c in world.virt.calls if c[1] in ("src", "") or c[1].startswith("instaclone-shadow-")]
        order = [m for m, _ in calls]
        # Pre-copy, then the snapshot while QEMU holds the source, then the
        # switchover and resume, all before any clone is defined or started.
        first = {m: order.index(m) for m in ("migrate_live", "snapshot_disks", "continue_migration", "resume")}
        assert first["migrate_live"] < first["snapshot_disks"] < first["continue_migration"] < first["resume"]
        assert ("suspend", "src") not in world.virt.calls
        assert not [d for d in world.virt.domains if d.startswith("instaclone-shadow-")]
        assert world.virt.domains["src"].state == "running"
    finally:
        await world.journal.close()


async def test_precopy_that_does_not_converge_falls_back_to_copy(tmp_path: Path) -> None:
    world = await world_at(tmp_path)
    world.virt.fail["wait_migration"] = VirtTimeout("the migration of 'src' was not pre-switchover within 60 s")
    try:
        out = await run_job(world)
        assert out.state.value == "Unstunned", out
        memory = out.result["memory"]
        assert memory["mode"] == "copy"
        assert "pre-copy gave up" in memory["fallback"] and "within 60 s" in memory["fallback"]
        assert ("cancel_migration", "src") in world.virt.calls and ("suspend", "src") in world.virt.calls
        assert not [d for d in world.virt.domains if d.startswith("instaclone-shadow-")]
        assert world.virt.domains["src"].state == "running"
    finally:
        await world.journal.close()


async def test_stun_deadline_is_lifted_at_switchover(tmp_path: Path) -> None:
    """Steps after the switchover may take longer than the deadline: the source runs again by then."""
    world = await world_at(tmp_path)
    world.virt.delay["define"] = 0.4  # each clone's definition (Configured) is slow
    try:
        out = await run_job(world, stun_deadline_ms=200)
        assert out.state.value == "Unstunned", out
        assert out.result["stun_ms"] < 200
    finally:
        await world.journal.close()


async def test_stun_deadline_counts_while_qemu_holds_the_source(tmp_path: Path) -> None:
    """A slow snapshot at switchover exceeds the deadline: the job fails, the migration is cancelled."""
    world = await world_at(tmp_path)
    world.virt.delay["snapshot_disks"] = 0.5
    try:
        out = await run_job(world, stun_deadline_ms=200)
        assert out.state.value == "Failed", out
        assert out.error["code"] == "stun_deadline_exceeded", out.error
        assert ("cancel_migration", "src") in world.virt.calls
        assert world.virt.domains["src"].state == "running"
        assert not [d for d in world.virt.domains if d.startswith("instaclone-shadow-")]
        await asyncio.sleep(0)
    finally:
        await world.journal.close()
