"""Pools on real guests: fill, claim, SIGKILL during replenish, reconciliation; coalesced stuns.

The daemon runs as a process (tests/support/proclib.py); the guests are the busybox
test guest under real libvirtd + QEMU.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from instaclone.hv import LibvirtHypervisor as Hypervisor
from tests.support.host import libvirt_ready
from tests.support.proclib import DaemonProcess, NotifySocket, write_config
from tests.support.vmlib import Api, Scratch, boot_source

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))]

PREFIX = "pl-"
RAM_ROOT = Path("/var/lib/libvirt/qemu/ram")


async def pool(api: Api, name: str) -> dict[str, Any]:
    status, body = await api.call("GET", f"/v1/pools/{name}")
    assert status == 200, body
    return body["pool"]


async def until_idle(api: Api, name: str, n: int, timeout_s: float = 240.0) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while True:
        p = await pool(api, name)
        if len(p["idle"]) == n and p["pending"] == 0 and not p["idle_old_source"]:
            return p
        assert time.monotonic() < end, f"pool {name} never had {n} idle members: {p}"
        await asyncio.sleep(0.3)


async def start(conf: Path, notify: NotifySocket, procs: list[DaemonProcess],
                env: dict[str, str] | None = None) -> DaemonProcess:
    d = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path), **(env or {})}).start()
    procs.append(d)
    await notify.wait("READY", "1")
    return d


async def test_sigkill_during_replenish_then_reconciliation(tmp_path: Path):
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    notify = NotifySocket(tmp_path / "notify")
    conf = write_config(tmp_path / "d.toml", scratch.path, pools={"check_interval_s": 1.0},
                        clone={"stun_deadline_ms": 60000})
    src = f"{PREFIX}src"
    procs: list[DaemonProcess] = []
    sock = scratch.path / "ctl.sock"
    try:
        await boot_source(virt, scratch, src, file_backed_ram=True)
        d = await start(conf, notify, procs)
        async with Api(sock) as api:
            status, body = await api.call("POST", "/v1/pools", {"name": "p", "source": src, "size": 2,
                                                                "freeze": True})
            assert status == 201, body
            await until_idle(api, "p", 2)
            status, body = await api.call("POST", "/v1/pools/p/claim", {"wait_s": 60})
            assert status == 200, body
            claimed = body["claim"]["clone"]["name"]
            assert await virt.state(claimed) == "running"
            p = await until_idle(api, "p", 2)
            idle = p["idle"]
        d.signal(signal.SIGTERM)
        await d.wait()
        # Replenishment cut short: the daemon stops every job at Configured
        # (its clones defined, not started) and is killed there.
        marker = tmp_path / "marker"
        d = await start(conf, notify, procs, env={"INSTACLONE_FAULT_PAUSE": f"Configured:600:{marker}"})
        async with Api(sock) as api:
            status, body = await api.call("PATCH", "/v1/pools/p", {"size": 4})
            assert status == 200, body
            end = time.monotonic() + 120
            while not marker.exists():
                assert time.monotonic() < end, "the replenish job never reached Configured"
                await asyncio.sleep(0.1)
            half_job = marker.read_text()
            status, body = await api.call("GET", f"/v1/jobs/{half_job}")
            half_made = body["job"]["spec"]["names"]
            # Paused before its definitions: its clone directories and deltas exist.
            clones_dir = scratch.path / "state" / "clones"
            assert all((clones_dir / n).is_dir() for n in half_made), half_made
        d.signal(signal.SIGKILL)
        await d.wait()
        # While it is down, an idle member dies.
        dead = idle[0]
        await virt.destroy(dead)
        await start(conf, notify, procs)
        async with Api(sock) as api:
            status, body = await api.call("GET", f"/v1/jobs/{half_job}")
            assert body["job"]["state"] == "Failed" and body["job"]["error"]["code"] == "interrupted"
            p = await until_idle(api, "p", 4)
            names = set(await virt.list_names())
            assert not set(half_made) & names, "the half-made members were not rolled back"
            assert not any((clones_dir / n).exists() for n in half_made), "half-made members' files are left"
            assert dead not in names and dead not in p["idle"]
            assert idle[1] in p["idle"]
            assert p["claimed"] == [claimed]
            assert await virt.state(claimed) == "running"  # never touched
            for m in p["idle"]:
                assert await virt.state(m) == "running"
            # Release: the claimed member goes; the pool keeps its 4.
            status, body = await api.call("POST", f"/v1/clones/{claimed}/release")
            assert status == 200, body
            assert claimed not in await virt.list_names()
            status, body = await api.call("DELETE", "/v1/pools/p")
            assert status == 200 and len(body["deleted"]["destroyed"]) == 4, body
            status, body = await api.call("POST", f"/v1/sources/{src}/unfreeze")
            assert status == 200, body
            assert await virt.state(src) == "running"
    finally:
        for p_ in procs:
            p_.kill()
        for name in await virt.list_names():
            if name.startswith((PREFIX, "p-")):
                await virt.undefine(name)
        # A run cut short leaves the source frozen: its memory image goes with it.
        shutil.rmtree(RAM_ROOT / "instaclone" / f"frozen-{src}", ignore_errors=True)
        await virt.close()
        notify.close()
        scratch.cleanup()


async def test_coalesced_requests_on_a_real_source(tmp_path: Path):
    """Eight requests sent at once to one running guest: at most two stuns, each job its own clone."""
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    notify = NotifySocket(tmp_path / "notify")
    conf = write_config(tmp_path / "d.toml", scratch.path)
    src = f"{PREFIX}csrc"
    procs: list[DaemonProcess] = []
    try:
        await boot_source(virt, scratch, src, file_backed_ram=True)
        await start(conf, notify, procs)
        async with Api(scratch.path / "ctl.sock") as api:
            answers = await asyncio.gather(*(api.call("POST", "/v1/jobs?wait=300", {
                "source": src, "name": f"{PREFIX}c{i}", "keep_network": True}) for i in range(8)))
            jobs = [b["job"] for _, b in answers]
            assert [j["state"] for j in jobs] == ["Unstunned"] * 8, [j.get("error") for j in jobs]
            stuns = {j["result"]["stun"]["id"] for j in jobs}
            assert len(stuns) <= 2, stuns
            assert sorted(c["name"] for j in jobs for c in j["result"]["clones"]) == \
                sorted(f"{PREFIX}c{i}" for i in range(8))
            for j in jobs:
                assert await virt.state(j["result"]["clones"][0]["name"]) == "running"
            assert await virt.state(src) == "running"
            for i in range(8):
                status, _ = await api.call("DELETE", f"/v1/clones/{PREFIX}c{i}")
                assert status == 200
    finally:
        for p_ in procs:
            p_.kill()
        for name in await virt.list_names():
            if name.startswith(PREFIX):
                await virt.undefine(name)
        await virt.close()
        notify.close()
        scratch.cleanup()
