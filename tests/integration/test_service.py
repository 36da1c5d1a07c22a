"""The daemon as a real process with real guests: SIGTERM in the middle of a clone, libvirtd restarts.

Without guests (readiness, reload, socket activation, access control): tests/ops/test_service.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from instaclone.hv import LibvirtHypervisor as Hypervisor
from tests.support.host import libvirt_ready
from tests.support.journald import parse_journal
from tests.support.proclib import DaemonProcess, NotifySocket, restart_libvirtd, write_config
from tests.support.vmlib import Api, Scratch, boot_source, make_config, running_daemon, wait_state

needs_libvirt = pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))


# -- SIGTERM in the middle of a real clone ------------------------------------------------


@pytest.mark.integration
@needs_libvirt
async def test_sigterm_mid_clone_rolls_back_and_leaves_source_running(tmp_path: Path):
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    notify = NotifySocket(tmp_path / "notify")
    marker = tmp_path / "paused-at"
    conf = write_config(tmp_path / "d.toml", scratch.path, daemon={"shutdown_grace_s": 1.0})
    d = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path),
                                 "INSTACLONE_FAULT_PAUSE": f"MemoryLinked:600:{marker}"}).start()
    try:
        await boot_source(virt, scratch, "sv-src")
        await notify.wait("READY", "1")
        async with Api(scratch.path / "ctl.sock") as api:
            status, body = await api.call("POST", "/v1/jobs", {"source": "sv-src", "name": "sv-clone"})
            assert status == 202, body
            job_id = body["job"]["id"]
        for _ in range(600):
            if marker.exists():
                break
            await asyncio.sleep(0.1)
        assert marker.read_text() == job_id
        assert await virt.state("sv-src") == "paused"  # stunned, paused at MemoryLinked
        d.signal(signal.SIGTERM)
        await notify.wait("STOPPING", "1")
        assert await d.wait() == 0, d.log_text()
        assert await virt.state("sv-src") == "running", "SIGTERM must never leave a source paused"
        assert not await virt.exists("sv-clone")
        # The job is recorded as rolled back; its files are gone; a restart clones normally.
        # The restarted daemon runs "under systemd": it logs to journald, with fields.
        journal = NotifySocket(tmp_path / "journal")  # a datagram socket, as journald's
        d2 = DaemonProcess(conf.with_name("d2.toml"), env={
            "NOTIFY_SOCKET": str(notify.path), "INVOCATION_ID": "0" * 32,
            "INSTACLONE_JOURNAL_SOCKET": str(journal.path)})
        write_config(d2.config, scratch.path, daemon={"shutdown_grace_s": 1.0, "log_format": "auto"})
        d2.start()
        try:
            await notify.wait("READY", "1")
            async with Api(scratch.path / "ctl.sock") as api:
                status, body = await api.call("GET", f"/v1/jobs/{job_id}")
                assert body["job"]["state"] == "Failed" and body["job"]["error"]["code"] == "interrupted", body
                assert not (scratch.path / "state" / "jobs" / job_id).exists()
                status, body = await api.call("POST", "/v1/jobs?wait=120", {"source": "sv-src", "name": "sv-c2",
                                                                             "customize": False})
                assert status == 201 and body["job"]["state"] == "Unstunned", body
            conn = aiohttp.UnixConnector(path=str(scratch.path / "ctl.sock"))
            async with aiohttp.ClientSession(connector=conn) as s, s.get("http://x/metrics") as r:
                text = await r.text()
            assert 'instaclone_clones_total{result="ready"} 1.0' in text
            assert 'instaclone_state_duration_seconds_count{state="Stunned"} 1.0' in text
            assert "instaclone_stun_duration_seconds_count 1.0" in text
            d2.signal(signal.SIGTERM)
            assert await d2.wait() == 0
            entries = [e for e in await journal.drain_raw() if b"JOB_ID=" in e]
            fields = [{k: v[0] for k, v in parse_journal(e).items()} for e in entries]
            ready = [f for f in fields if f.get("STATE") == "Unstunned"]
            assert ready and ready[0]["CLONE"] == "sv-c2" and ready[0]["SYSLOG_IDENTIFIER"] == "instacloned"
            assert ready[0]["PRIORITY"] == "6" and ready[0]["MESSAGE"].startswith("job.transition")
            assert "job.transition" not in d2.log_text(), "entries journald took are not printed twice"
        finally:
            d2.kill()
            journal.close()
    finally:
        d.kill()
        for name in ("sv-c2", "sv-clone", "sv-src"):
            await virt.undefine(name)
        await virt.close()
        notify.close()
        scratch.cleanup()


# -- libvirtd restarts under a running daemon ------------------------------------------------


@pytest.mark.integration
@needs_libvirt
@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="restarts libvirtd by hand (no systemd here)")
async def test_libvirtd_restart_daemon_reconnects_and_clones(tmp_path: Path):
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    config = make_config(scratch)
    daemon = await running_daemon(config)
    try:
        await boot_source(virt, scratch, "lr-src")
        await asyncio.to_thread(restart_libvirtd)
        async with Api(config.daemon.socket) as api:
            status, body = await api.call("POST", "/v1/jobs?wait=120", {"source": "lr-src", "name": "lr-clone",
                                                                         "customize": False})
            assert status == 201 and body["job"]["state"] == "Unstunned", body
            status, body = await api.call("GET", "/v1/health")
            assert body["libvirt_connected"] is True
        await wait_state(virt, "lr-clone", "running")
        assert await virt.state("lr-src") == "running"
    finally:
        await daemon.stop()
        for name in ("lr-clone", "lr-src"):
            await virt.undefine(name)
        await virt.close()
        scratch.cleanup()
