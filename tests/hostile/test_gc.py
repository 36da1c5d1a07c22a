"""Hostile: garbage collection and destroy delete only what instaclone made, and teardown stays fast.

Foreign files and symlinks to a canary outside are planted in every directory
GC and destroy look at, while a job runs and after; a recorded file replaced
by another inode, a source's own top image in a shared ``delta_dir`` while the
source is undefined: none of them is ever deleted. The fakes (tests/support/fakes.py,
which satisfy the typed hypervisor protocol) stand in for libvirt and
qemu-img: the claims here are about host files, and the fake images name
their backing file as a qcow2 header does. The last test does the same on a
real busybox guest, its real images and the logs and sockets its QEMU makes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from instaclone.jobs import gc
from instaclone.requests import CloneRequest, FreezeRequest
from instaclone.states import State
from tests.support.fakes import fake_engine, fake_world, image_bytes
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api, boot_source, daemon_world

CANARY = b"the host's own file\n" * 64


@pytest.fixture
async def env(tmp_path):
    c, store, virt = await fake_world(tmp_path)
    engine = fake_engine(c, store, virt)
    yield engine, virt, store, c
    await engine.shutdown(5)
    await store.close()


async def _clone(engine, store, source: str, name: str) -> None:
    job = await engine.submit(CloneRequest(source=source, name=name))
    await engine.wait(job.id, 20)
    rec = await store.get_job(job.id)
    assert rec is not None and rec.state is State.UNSTUNNED, rec


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Planter:
    """Foreign files and symlinks to canaries outside, planted in a directory; checked intact afterwards."""

    def __init__(self, outside: Path) -> None:
        self.outside = outside
        outside.mkdir(exist_ok=True)
        self.planted: list[Path] = []
        self.canaries: dict[Path, str] = {}

    def plant(self, where: Path, tag: str) -> None:
        if not where.is_dir():
            return
        canary = self.outside / f"canary-{tag}.qcow2"
        canary.write_bytes(CANARY + tag.encode())
        self.canaries[canary] = _sha(canary)
        foreign = where / f"foreign-{tag}.qcow2"
        foreign.write_bytes(image_bytes("foreign", ""))
        link = where / f"link-{tag}.qcow2"
        link.symlink_to(canary)
        self.planted += [foreign, link]

    def check(self) -> None:
        for p in self.planted:
            assert os.path.lexists(p), f"{p}, which instaclone did not make, was deleted"
        for p, digest in self.canaries.items():
            assert p.exists() and _sha(p) == digest, f"canary {p} was touched"


async def test_foreign_files_and_symlinks_in_every_directory_survive_jobs_destroy_and_gc(env, tmp_path):
    engine, virt, store, c = env
    planter = Planter(tmp_path / "outside")
    for d in (c.delta_dir, c.clones_dir, c.jobs_dir, c.daemon.state_dir / "frozen"):
        d.mkdir(parents=True, exist_ok=True)
        planter.plant(d, f"root-{d.name}")

    async def while_running(job_id: str, step: str) -> None:
        # In the clones' directories, between the job's steps. (A job's own scratch directory
        # under jobs/ is removed whole by the job when it ends; GC and destroy never look in it.)
        for d in c.clones_dir.iterdir():
            if d.is_dir() and not d.is_symlink() and not any(p.parent == d for p in planter.planted):
                planter.plant(d, f"{d.name}-{step}")

    engine.svc.step_hook = while_running
    await _clone(engine, store, "src", "mid")
    await _clone(engine, store, "mid", "kid")
    await _clone(engine, store, "src", "solo")
    engine.svc.step_hook = None
    await engine.freeze(FreezeRequest("src"))  # (unfreeze removes the frozen directory whole: not GC's, not destroy's)
    await engine.unfreeze(FreezeRequest("src"))
    # A clone's directory whose name was taken by a symlink to a directory outside.
    evil = tmp_path / "outside" / "evil"
    evil.mkdir()
    (evil / "vda.qcow2").write_bytes(CANARY)
    planter.canaries[evil / "vda.qcow2"] = _sha(evil / "vda.qcow2")
    (c.clones_dir / "ghost").symlink_to(evil)
    planter.planted.append(c.clones_dir / "ghost")

    for name in ("mid", "solo", "kid"):
        await engine.destroy_clone(name)
        planter.check()
    report = await gc.collect(engine.svc)
    planter.check()
    assert report.failed == []
    # The directories that hold a foreign file are kept, and said so; the rest of what was made is gone.
    kept = {k["path"]: k["reason"] for k in report.kept}
    for name in ("mid", "kid", "solo"):
        d = c.clones_dir / name
        assert not (d / "vda.qcow2").exists()
        assert d.exists() == any(p.parent == d for p in planter.planted)
    assert all(r == "not empty" for r in kept.values()), kept
    assert "src" in virt.domains and virt.domains["src"].state == "running"


async def test_a_recorded_path_replaced_by_another_inode_survives(env, tmp_path):
    engine, _virt, store, c = env
    await _clone(engine, store, "src", "c1")
    await _clone(engine, store, "src", "c2")
    disk, other = c.clones_dir / "c1" / "vda.qcow2", c.clones_dir / "c2" / "vda.qcow2"
    # While the clones run, their recorded disks' names are taken by something else (their QEMU's
    # user may write there): a new file, and a symlink to a canary outside.
    replacement = disk.with_suffix(".new")
    replacement.write_bytes(b"someone else's image")
    os.replace(replacement, disk)
    canary = tmp_path / "canary"
    canary.write_bytes(CANARY)
    other.unlink()
    other.symlink_to(canary)

    await engine.destroy_clone("c1")
    await engine.destroy_clone("c2")
    assert disk.read_bytes() == b"someone else's image"
    assert other.is_symlink() and canary.read_bytes() == CANARY
    report = await gc.collect(engine.svc)
    assert disk.exists() and other.is_symlink() and canary.read_bytes() == CANARY
    # Their directories hold what instaclone did not make: kept, and said so.
    assert report.deleted == {}
    assert sorted(k["path"] for k in report.kept) == [str(disk.parent), str(other.parent)]
    assert {k["reason"] for k in report.kept} == {"not empty"}


async def test_a_source_top_in_a_shared_delta_dir_survives_gc_while_the_source_is_undefined(tmp_path):
    # delta_dir is the directory the source's own disk lives in.
    c, store, virt = await fake_world(tmp_path, qcow2={"delta_dir": tmp_path})
    engine = fake_engine(c, store, virt)
    try:
        await _clone(engine, store, "src", "c1")
        top = next(d.path for d in (await virt.lookup("src")).disks)
        base = tmp_path / "base.qcow2"
        assert top.parent == tmp_path and top != base
        before = {p: _sha(p) for p in (top, base)}
        await engine.destroy_clone("c1")
        # The source is undefined for a moment (redefined by its owner, moved between hosts, ...).
        dom = virt.domains.pop("src")
        report = await gc.collect(engine.svc)
        assert {p: _sha(p) for p in (top, base) if p.exists()} == before, report.deleted
        virt.domains["src"] = dom
        assert all(p.exists() for p in (top, base))
    finally:
        await engine.shutdown(5)
        await store.close()


async def test_destroy_reads_each_chain_once_not_every_chain_per_destroy(env):
    """Teardown: destroying N clones reads each domain's chain from its images once, not N times."""
    engine, _virt, store, c = env
    names = [f"c{i}" for i in range(8)]
    for name in names:
        await _clone(engine, store, "src", name)
    calls = 0
    chain = engine.svc.storage.chain

    async def counted(*, path: Path, fmt: str) -> list[Path]:
        nonlocal calls
        calls += 1
        return await chain(path=path, fmt=fmt)

    engine.svc.storage.chain = counted
    for name in names:
        await engine.destroy_clone(name)
    # Before: a full collection per destroy read every domain's chains (8 + 7 + ... + 1 + 8 sources = 44).
    assert calls <= len(names) + 2, calls
    assert not any((c.clones_dir / n).exists() for n in names)


async def test_clones_destroyed_at_once_are_collected_together(env):
    """A pool torn down: many destroys at once share a collection, not one full collection each."""
    engine, virt, store, c = env
    job = await engine.submit(CloneRequest(source="src", name="p", count=12))
    await engine.wait(job.id, 20)
    names = [x["name"] for x in (await store.get_job(job.id)).result["clones"]]
    listings = 0
    list_names = virt.list_names

    async def counted() -> list[str]:
        nonlocal listings
        listings += 1
        return await list_names()

    virt.list_names = counted
    virt.delay["undefine"] = 0.05  # QEMU takes a moment to go: the destroys overlap
    await asyncio.gather(*(engine.destroy_clone(n) for n in names))
    assert not any((c.clones_dir / n).exists() for n in names)
    assert await store.list_clones() == []
    # Before: one full collection (one listing of every domain) per destroy, 12.
    assert listings <= 3, listings


async def test_a_full_collection_runs_every_gc_interval(tmp_path):
    c, store, virt = await fake_world(tmp_path, gc={"interval_s": 0.2})
    engine = fake_engine(c, store, virt)
    services = asyncio.get_running_loop().create_task(engine.run_background())
    try:
        await _clone(engine, store, "src", "c1")
        disk = c.clones_dir / "c1" / "vda.qcow2"
        virt.add_source("mine", disk, state="shutoff")
        await engine.destroy_clone("c1")
        assert disk.exists()
        await virt.undefine("mine")
        for _ in range(50):
            if not disk.exists():
                break
            await asyncio.sleep(0.1)
        assert not disk.exists() and not (c.clones_dir / "c1").exists()
    finally:
        services.cancel()
        with pytest.raises(asyncio.CancelledError):
            await services
        await engine.shutdown(5)
        await store.close()


@pytest.mark.integration
@pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))
async def test_real_clone_destroyed_with_foreign_files_and_symlinks_in_its_directories():
    async with daemon_world("hgc-") as (scratch, virt, config):
        await boot_source(virt, scratch, "hgc-src", file_backed_ram=True)
        planter = Planter(scratch.path / "outside")
        async with Api(config.daemon.socket) as api:
            status, body = await api.call("POST", "/v1/jobs?wait=180", {"source": "hgc-src", "name": "hgc-c1"})
            assert status == 201 and body["job"]["state"] == "Unstunned", body
            clone_dir = config.clones_dir / "hgc-c1"
            made = sorted(p.name for p in clone_dir.iterdir())  # its delta, its QEMU's log and sockets
            # While it runs: in its directory, in the source's delta directory, in every root.
            for d in (clone_dir, config.delta_dir / "hgc-src", config.delta_dir, config.clones_dir,
                      config.jobs_dir):
                planter.plant(d, d.name)
            src_top = (await virt.lookup("hgc-src")).disks[0].path
            status, body = await api.call("DELETE", "/v1/clones/hgc-c1")
            assert status == 200, body
            planter.check()
            assert not any((clone_dir / n).exists() for n in made), made
            status, body = await api.call("POST", "/v1/gc", {"dry_run": False})
            assert status == 200 and body["gc"]["deleted"] == [], body
            assert body["gc"]["kept"] == [{"path": str(clone_dir), "reason": "not empty"}], body
            planter.check()
            assert await virt.state("hgc-src") == "running" and src_top.exists()
            assert (await virt.lookup("hgc-src")).disks[0].path == src_top
