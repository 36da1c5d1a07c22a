"""Integration: copy-on-write memory clones (filecow) of real running and frozen guests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api, boot_source, clone_log, cmd_sock, first_counter

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]

HOG = "dd if=/dev/urandom of=/tmp/hog bs=1M count={mib} 2>/dev/null; sync; echo done"


async def clone(api: Api, source: str, name: str, count: int = 1) -> dict:
    status, body = await api.call("POST", "/v1/jobs?wait=180", {"source": source, "name": name, "count": count})
    assert status in (201, 202), body
    job = body["job"]
    assert job["state"] == "Unstunned", job
    return job


async def test_running_source_filecow_isolation(world):
    scratch, virt, _daemon, config = world
    src = await boot_source(virt, scratch, "fc-src", file_backed_ram=True)
    s = await devguest.GuestChannel.connect(src.cmd_sock)
    try:
        assert (await s.run("echo BEFORE-STUN > /tmp/pre; echo ok"))[0] == 0
        async with Api(config.daemon.socket) as api:
            job = await clone(api, "fc-src", "fc-c", count=2)
        assert job["result"]["memory_backend"] == "filecow"
        print("filecow per-state ms:", job["durations_ms"], "stun_ms:", job["result"]["stun_ms"],
              "state bytes:", job["result"]["memory"]["state_bytes"])
        assert job["result"]["memory"]["state_bytes"] < 8 * 1024 * 1024  # device state only, no RAM
        # The job's link to the image is gone; the clones keep the data alive by mapping it.
        image = Path(job["result"]["memory"]["ram"])
        assert not image.exists() and not image.parent.exists()

        # Source: resumed in place (copy mode), same boot, counter continues, memory intact.
        boot_src = devguest.read_counter(src.serial_log)[0]
        _, n = await devguest.wait_counter(src.serial_log, above=0)
        await devguest.wait_counter(src.serial_log, above=n + 1, timeout=30)
        assert devguest.read_counter(src.serial_log)[0] == boot_src
        assert "BEFORE-STUN" in (await s.run("cat /tmp/pre"))[1]

        chans = [await devguest.GuestChannel.connect(cmd_sock(config, f"fc-c-{i}")) for i in (1, 2)]
        try:
            for i, c in enumerate(chans, 1):
                boot, _ = await devguest.wait_counter(clone_log(config, f"fc-c-{i}"), above=0)
                assert boot == boot_src
                # The clone has the source's memory at stun...
                assert "BEFORE-STUN" in (await c.run("cat /tmp/pre"))[1]
            # ...and after unstun nobody sees anybody else's writes (RAM: tmpfs).
            await s.run("echo SRC-AFTER > /tmp/mark")
            await chans[0].run("echo C1-AFTER > /tmp/mark")
            await chans[1].run("echo C2-AFTER > /tmp/mark")
            assert (await s.run("cat /tmp/mark"))[1].strip() == "SRC-AFTER"
            assert (await chans[0].run("cat /tmp/mark"))[1].strip() == "C1-AFTER"
            assert (await chans[1].run("cat /tmp/mark"))[1].strip() == "C2-AFTER"
            # Heavy writes in the source must not reach the clones' memory.
            assert (await s.run(HOG.format(mib=96), timeout=120))[1].strip().endswith("done")
            await asyncio.sleep(2)
            for i, c in enumerate(chans, 1):
                assert (await c.run("cat /tmp/mark; ls /tmp"))[1].startswith(f"C{i}-AFTER")
                assert "hog" not in (await c.run("ls /tmp"))[1]
                _, before = devguest.read_counter(clone_log(config, f"fc-c-{i}"))
                await devguest.wait_counter(clone_log(config, f"fc-c-{i}"), above=before + 1, timeout=20)
                text = clone_log(config, f"fc-c-{i}").read_text(errors="replace")
                assert "Kernel panic" not in text and "Oops" not in text
        finally:
            for c in chans:
                await c.close()
    finally:
        await s.close()
    assert await virt.state("fc-src") == "running"


async def test_frozen_source_clones_without_stun(world):
    scratch, virt, _daemon, config = world
    src = await boot_source(virt, scratch, "fz-src", file_backed_ram=True)
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("POST", "/v1/sources/fz-src/freeze")
        assert status == 200, body
        assert body["frozen"]["backend"] == "filecow"
        status, body = await api.call("POST", "/v1/sources/fz-src/freeze")
        assert status == 409
        assert await virt.state("fz-src") == "paused"
        _, frozen_at = devguest.read_counter(src.serial_log)
        jobs = [await clone(api, "fz-src", name) for name in ("fz-a", "fz-b")]
        for job in jobs:
            states = [h["state"] for h in job["history"]]
            assert "Stunned" not in states and states[-1] == "Unstunned"
            assert job["result"]["frozen_source"] is True
        # Both jobs share the one image made at freeze.
        assert jobs[0]["result"]["memory"]["ram"] == jobs[1]["result"]["memory"]["ram"]
        assert await virt.state("fz-src") == "paused"
        boot = devguest.read_counter(src.serial_log)[0]
        chans = {}
        for n in ("fz-a", "fz-b"):
            b, _ = await devguest.wait_counter(clone_log(config, n), above=0)
            assert b == boot
            first = first_counter(clone_log(config, n))
            assert first is not None and first[1] >= frozen_at
            chans[n] = await devguest.GuestChannel.connect(cmd_sock(config, n))
        try:
            await chans["fz-a"].run("echo A > /tmp/who")
            await chans["fz-b"].run("echo B > /tmp/who")
            assert (await chans["fz-a"].run("cat /tmp/who"))[1].strip() == "A"
            assert (await chans["fz-b"].run("cat /tmp/who"))[1].strip() == "B"

            status, body = await api.call("POST", "/v1/sources/fz-src/unfreeze")
            assert status == 200, body
            assert await virt.state("fz-src") == "running"
            await devguest.wait_counter(src.serial_log, above=frozen_at + 2, timeout=30)
            s = await devguest.GuestChannel.connect(src.cmd_sock)
            try:
                assert (await s.run(HOG.format(mib=64), timeout=120))[1].strip().endswith("done")
                assert "who" not in (await s.run("ls /tmp"))[1]
            finally:
                await s.close()
            # The clones outlive the unfreeze and the source's writes.
            for n, c in chans.items():
                assert (await c.run("cat /tmp/who"))[1].strip() == n[-1].upper()
                _, k = devguest.read_counter(clone_log(config, n))
                await devguest.wait_counter(clone_log(config, n), above=k + 1, timeout=20)
        finally:
            for c in chans.values():
                await c.close()
        status, body = await api.call("POST", "/v1/sources/fz-src/unfreeze")
        assert status == 404


async def test_respawn_mode_then_fallback(tmp_path):
    """source_mode=respawn: the source restarts privately on the image; its next clone uses saverestore."""
    from instaclone.hv import LibvirtHypervisor as Hypervisor
    from instaclone_plugins.filecow import FileCowSettings
    from tests.support.vmlib import Scratch, make_config, running_daemon

    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    config = make_config(scratch)
    config = config.with_section("memory.filecow", FileCowSettings(source_mode="respawn"))
    daemon = await running_daemon(config)
    try:
        src = await boot_source(virt, scratch, "fc-resp", file_backed_ram=True)
        boot = devguest.read_counter(src.serial_log)[0]
        async with Api(config.daemon.socket) as api:
            job = await clone(api, "fc-resp", "fc-resp-c")
            assert job["result"]["memory_backend"] == "filecow"
            assert job["result"]["memory"]["mode"] == "respawn"
            assert await virt.state("fc-resp") == "running"
            # Same guest, no reboot (the serial log restarts with the new QEMU).
            b, _ = await devguest.wait_counter(src.serial_log, above=0, timeout=30)
            assert b == boot
            b, _ = await devguest.wait_counter(clone_log(config, "fc-resp-c"), above=0, timeout=30)
            assert b == boot
            # The source's RAM is private now: the next clone falls back.
            job2 = await clone(api, "fc-resp", "fc-resp-d")
            assert job2["result"]["memory_backend"] == "saverestore"
            b, _ = await devguest.wait_counter(clone_log(config, "fc-resp-d"), above=0, timeout=30)
            assert b == boot
    finally:
        await daemon.stop()
        for name in ("fc-resp-d", "fc-resp-c", "fc-resp"):
            await virt.undefine(name)
        await virt.close()
        scratch.cleanup()
