"""filecow's precopy mode on the fake world: order of calls, fallback, the deadline from the stop.

The real thing (QEMU pre-copy into a shadow) is in tests/integration/test_precopy.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from instaclone.errors import LibvirtTimeout
from instaclone.hv import QemuFacts
from tests.support.contract import harness
from tests.support.contract.fakeworld import FakeWorld


async def run_job(world: FakeWorld, **config_changes: object) -> Any:
    if config_changes:
        world.config = replace(world.config, clone=replace(world.config.clone, **config_changes))
    storage, memory = harness.make_backends(world.config, world.virt, world.storage, world.memory)
    engine = harness.make_engine(world.config, world.store, world.virt, storage, memory)
    try:
        job_id = await harness.submit(engine, source=world.source, name="pc", count=2, customize=False)
        await harness.wait(engine, job_id)
        job = await world.store.get_job(job_id)
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
        await world.store.close()


async def test_precopy_that_does_not_converge_falls_back_to_copy(tmp_path: Path) -> None:
    world = await world_at(tmp_path)
    world.virt.fail["wait_migration"] = LibvirtTimeout("the migration of 'src' was not pre-switchover within 60 s")
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
        await world.store.close()


async def test_stun_deadline_is_lifted_at_switchover(tmp_path: Path) -> None:
    """Steps after the switchover may take longer than the deadline: the source runs again by then."""
    world = await world_at(tmp_path)
    world.virt.delay["define"] = 0.4  # each clone's definition (Configured) is slow
    try:
        out = await run_job(world, stun_deadline_ms=200)
        assert out.state.value == "Unstunned", out
        assert out.result["stun_ms"] < 200
    finally:
        await world.store.close()


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
        await world.store.close()


# -- the shadow's copy verified against the stopped source (TCG loses writes) -------------

PAGE = 4096


def _ram_pair(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A sparse 'source' RAM file and a 'shadow' copy of it with 3 lost writes and a stale page in a hole."""
    import os

    src, dst = tmp_path / "src.ram", tmp_path / "dst.ram"
    size = 1024 * PAGE
    with open(src, "wb") as f:
        f.truncate(size)
        for first, count in ((0, 3), (100, 300), (700, 1)):  # data ranges; the rest are holes
            f.seek(first * PAGE)
            f.write(os.urandom(count * PAGE))
    truth = src.read_bytes()
    with open(dst, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(truth)  # fully allocated, as QEMU's incoming side leaves it
        for page in (1, 250, 700):  # writes the migration lost: older contents
            f.seek(page * PAGE + 17)
            f.write(b"stale")
        f.seek(900 * PAGE)  # a page the source no longer has (a hole now)
        f.write(b"x" * PAGE)
    return src, dst, truth


def test_verify_ram_repairs_what_the_migration_lost(tmp_path: Path) -> None:
    from instaclone_plugins import _shadow, filecow

    src, dst, truth = _ram_pair(tmp_path)
    assert dst.read_bytes() != truth
    got = _shadow.verify_ram(src, dst, chunk=64 * PAGE, threads=2)
    assert got.repaired_pages == 3
    assert got.compared_bytes == (3 + 300 + 1) * PAGE
    assert got.holes == [(3 * PAGE, 97 * PAGE), (400 * PAGE, 300 * PAGE), (701 * PAGE, 323 * PAGE)]
    filecow.punch_ranges(dst, got.holes)
    assert dst.read_bytes() == truth
    # A second look finds nothing left to repair.
    assert _shadow.verify_ram(src, dst).repaired_pages == 0


def test_verify_ram_of_files_of_different_sizes_fails(tmp_path: Path) -> None:
    import pytest

    from instaclone_plugins import _shadow

    src, dst, _ = _ram_pair(tmp_path)
    with open(dst, "r+b") as f:
        f.truncate(2048 * PAGE)
    with pytest.raises(OSError, match="different sizes"):
        _shadow.verify_ram(src, dst)


def test_verify_decision_follows_the_sources_qemu() -> None:
    from instaclone import backends
    from instaclone.hv import QemuFacts
    from instaclone_plugins.filecow import FileCowMemory, FileCowSettings
    from tests.support.fakes import FakeHypervisor

    def decide(facts: QemuFacts, verify: str = "auto") -> tuple[bool, str]:
        config = backends.config_from_dict({}).with_section("memory.filecow", FileCowSettings(precopy_verify=verify))
        return FileCowMemory(config=config, virt=FakeHypervisor()).verify_decision(facts)

    old_tcg, new_tcg, old_kvm = QemuFacts((7, 2, 22), "tcg"), QemuFacts((10, 0, 2), "tcg"), QemuFacts((7, 2, 22), "kvm")
    assert decide(old_tcg) == (True, "QEMU 7.2.22 with TCG can lose guest writes while it migrates (fixed in QEMU 9.0)")
    assert decide(new_tcg)[0] is False and "tracks the pages" in decide(new_tcg)[1]
    assert decide(old_kvm)[0] is False
    assert decide(new_tcg, "always")[0] is True
    verified, why = decide(old_tcg, "never")
    assert verified is False and "not checked" in why


async def test_precopy_image_is_the_source_ram_at_stun(tmp_path: Path) -> None:
    """The fake's migration copies nothing (the shadow's RAM has its own first page): the verify copies it.

    A TCG source on QEMU 7.2 is verified before it runs again; the clones map
    an image equal to the source's RAM byte for byte, and the job says what
    was repaired and why it was verified.
    """
    world = await world_at(tmp_path)
    world.virt.qemu = QemuFacts((7, 2, 22), "tcg")
    try:
        out = await run_job(world)
        assert out.state.value == "Unstunned", out
        memory = out.result["memory"]
        assert memory["mode"] == "precopy" and memory["verified"] is True, memory
        assert memory["repaired_pages"] == 1 and memory["verified_bytes"] >= PAGE, memory
        assert (memory["qemu"], memory["accel"]) == ("7.2.22", "tcg") and "lose guest writes" in memory["verify_reason"]
        source_ram = await world.virt.ram_file("src")
        assert source_ram is not None
        for clone in ("pc-1", "pc-2"):
            ram = await world.virt.ram_file(clone)
            assert ram is not None and not ram[1]
            assert ram[0].read_bytes() == source_ram[0].read_bytes(), clone
        # Both RAM files were looked up before the pre-copy started, not in the stun.
        order = [m for m, _ in world.virt.calls]
        looks = [i for i, (m, n) in enumerate(world.virt.calls) if m == "ram_file" and (n == "src" or
                                                                                         n.startswith("instaclone-shadow-"))]
        assert looks and looks[1] < order.index("migrate_live")
    finally:
        await world.store.close()


async def test_auto_mode_precopies_where_no_verification_is_needed(tmp_path: Path) -> None:
    """source_mode "auto": QEMU 10 under TCG pre-copies unverified; QEMU 7.2 under TCG copies, saying why."""
    for facts, mode in ((QemuFacts((10, 0, 2), "tcg"), "precopy"), (QemuFacts((7, 2, 22), "tcg"), "copy"),
                        (QemuFacts((7, 2, 22), "kvm"), "precopy")):
        world = await FakeWorld.create(tmp_path / f"w-{facts.text}-{facts.accel}", storage="fake", memory="filecow")
        world.virt.qemu = facts
        try:
            out = await run_job(world)
            assert out.state.value == "Unstunned", out
            memory = out.result["memory"]
            assert memory["mode"] == mode, (facts, memory)
            if mode == "precopy":
                assert memory["verified"] is False and "exactly" in memory["verify_reason"]
            else:
                assert "lose guest writes" in memory["mode_reason"] and "verified" not in memory
        finally:
            await world.store.close()
