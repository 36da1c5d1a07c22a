"""Integration: instaclone.client against a real daemon (libvirt + QEMU, the busybox test guest)."""

from __future__ import annotations

import asyncio
import time

import pytest

from instaclone import client as ic
from tests.support.host import libvirt_ready
from tests.support.vmlib import boot_source, daemon_world

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]

PREFIX = "cl-"


@pytest.fixture
async def world():
    async with daemon_world(PREFIX) as w:
        yield w


async def test_clone_events_resume_and_pool_round_trip(world):
    scratch, virt, config = world
    await boot_source(virt, scratch, f"{PREFIX}src")
    async with ic.Client(config.daemon.socket) as c:
        assert (await c.health()).libvirt_connected
        t0 = time.monotonic()
        job = await c.clone(f"{PREFIX}src", name=f"{PREFIX}one", wait=True, timeout_s=180)
        print(f"clone with wait: {time.monotonic() - t0:.1f} s, stun {job.stun_ms} ms")
        assert job.ok, job.error
        assert job.clones == (f"{PREFIX}one",) and await virt.state(f"{PREFIX}one") == "running"
        assert [x.name for x in await c.clones()] == [f"{PREFIX}one"]

        # Events: the job's ready event, then resume after it and see only what came later.
        evs = [ev async for ev in c.events(job=job.id, tail=100)]
        assert evs[-1].type == "clone.ready" and evs[-1].job_id == job.id
        cursor = evs[-1].cursor
        gone = await c.destroy(f"{PREFIX}one")
        assert gone.name == f"{PREFIX}one"
        later = [ev async for ev in c.events(since=cursor)]
        assert [ev.type for ev in later] == ["clone.destroyed"] and later[0].cursor > cursor

        # A pool: claim in a context manager, the clone runs, and it is gone after the block.
        await c.create_pool(f"{PREFIX}pool", source=f"{PREFIX}src", size=1)
        async with c.claim(f"{PREFIX}pool", wait_s=180, ttl_s=3600) as vm:
            assert await virt.state(vm.name) == "running"
            claimed = vm.name
        for _ in range(100):
            if claimed not in await virt.list_names():
                break
            await asyncio.sleep(0.2)
        assert claimed not in await virt.list_names()
        await c.resize_pool(f"{PREFIX}pool", 0)
        deleted = await c.delete_pool(f"{PREFIX}pool")
        assert deleted["pool"] == f"{PREFIX}pool"


async def test_exec_and_files_on_a_real_clone(world, tmp_path):
    scratch, virt, config = world
    async with ic.Client(config.daemon.socket) as c:
        await boot_source(virt, scratch, f"{PREFIX}xsrc")
        job = await c.clone(f"{PREFIX}xsrc", name=f"{PREFIX}x", wait=True, timeout_s=180)
        assert job.ok, job.error
        r = await c.exec(f"{PREFIX}x", ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout_s=60)
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        payload = bytes(range(256)) * 4096  # 1 MiB
        info = await c.put_file(f"{PREFIX}x", payload, "/tmp/payload.bin")
        assert info.size == len(payload)
        back = tmp_path / "back.bin"
        got = await c.get_file(f"{PREFIX}x", "/tmp/payload.bin", back)
        assert back.read_bytes() == payload and got.sha256 == info.sha256
        with pytest.raises(ic.GuestFileNotFound):
            await c.get_file(f"{PREFIX}x", "/no/such/file", tmp_path / "none")
        assert not (tmp_path / "none").exists()
        await c.destroy(f"{PREFIX}x")
