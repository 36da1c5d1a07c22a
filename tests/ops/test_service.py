"""The daemon as a real process, the way systemd runs it.

Readiness and status on a real NOTIFY_SOCKET, socket activation with a passed
fd, SIGHUP reload, SIGTERM in the middle of a real clone, metrics scraped,
config errors named by key, access control by SO_PEERCRED, libvirtd restarts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from instaclone.api import make_app
from instaclone.hv import LibvirtHypervisor as Hypervisor

from .conftest import libvirt_ready
from .fakes import fake_engine, fake_world
from .proclib import EXE, DaemonProcess, NotifySocket, free_port, write_config
from .test_systemd import parse_journal
from .vmlib import Api, Scratch, boot_source, make_config, running_daemon, wait_state

REPO = Path(__file__).resolve().parent.parent

needs_libvirt = pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("toml,key", [
    ("[clone]\nstun_deadline_ms = 5\n", "clone.stun_deadline_ms"),
    ("[daemon]\nmetrics_listen = \"0.0.0.0:9464\"\n", "daemon.metrics_listen"),
    ("[daemon]\nshutdown_grace_s = \"long\"\n", "daemon.shutdown_grace_s"),
    ("[access]\nwrite_groups = \"wheel\"\n", "access.write_groups"),
    ("[[webhooks.endpoints]]\nurl = \"gopher://x\"\nsecret = \"whsec_AAAAAAAAAAAAAAAAAAAAAA==\"\n",
     "webhooks.endpoints[0].url"),
    ("[daemon]\nsocket_group = \"no-such-group-ic\"\n", "daemon.socket_group"),
    ("[clone\n", "c.toml"),
])
def test_check_config_names_the_key(tmp_path: Path, toml: str, key: str):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    r = subprocess.run([str(EXE), "--check-config", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr, r.stderr
    good = tmp_path / "good.toml"
    good.write_text((Path(__file__).parent.parent / "config" / "instaclone.toml").read_text())
    r = subprocess.run([str(EXE), "--check-config", "--config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "config OK" in r.stdout


# -- lifecycle under a (simulated) systemd -------------------------------------------------


@needs_libvirt
async def test_notify_ready_status_watchdog_reload_stop_and_metrics(tmp_path: Path):
    scratch = Scratch()
    notify = NotifySocket(tmp_path / "notify")
    port = free_port()
    conf = write_config(tmp_path / "d.toml", scratch.path, daemon={"metrics_listen": f"127.0.0.1:{port}"})
    d = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}).start()
    assert d.proc is not None
    try:
        ready = await notify.wait("READY", "1")
        assert "jobs active" in ready.get("STATUS", "") and "libvirt connected" in ready["STATUS"]
        # READY comes only after recovery and the API are up: the socket answers now.
        async with Api(scratch.path / "ctl.sock") as api:
            status, body = await api.call("GET", "/v1/health")
            assert status == 200 and body["libvirt_connected"] is True
        await notify.wait("WATCHDOG", "1", timeout=5)  # fed from the event loop
        # Metrics, on the control socket and on the loopback port.
        conn = aiohttp.UnixConnector(path=str(scratch.path / "ctl.sock"))
        async with aiohttp.ClientSession(connector=conn) as s, s.get("http://x/metrics") as r:
            text = await r.text()
        assert "instaclone_libvirt_up 1.0" in text and "instaclone_jobs_active" in text
        assert "instaclone_stun_deadline_seconds 60.0" in text  # clone.stun_deadline_ms = 60000
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200 and "instaclone_state_duration_seconds" in await r.text()
        # SIGHUP: reload what is safe (here clone.max_count), report the rest.
        write_config(conf, scratch.path, daemon={"metrics_listen": f"127.0.0.1:{port}"},
                     clone={"max_count": 2, "storage_backend": "qcow2"})
        d.signal(signal.SIGHUP)
        await notify.wait("RELOADING", "1")
        await notify.wait("READY", "1")
        async with Api(scratch.path / "ctl.sock") as api:
            status, body = await api.call("POST", "/v1/jobs", {"source": "nope", "name": "x", "count": 3})
            assert status == 400 and "between 1 and 2" in body["error"]["message"]
        d.signal(signal.SIGTERM)
        await notify.wait("STOPPING", "1")
        assert await d.wait() == 0
        reloaded = [e for e in d.log_events() if e.get("event") == "config.reloaded"]
        assert reloaded and "clone.max_count" in reloaded[0]["changed"]
    finally:
        d.kill()
        notify.close()
        scratch.cleanup()


@needs_libvirt
async def test_own_socket_group_and_a_broken_reload_keeps_the_old_config(tmp_path: Path):
    """Without socket activation the socket is root:daemon.socket_group 0660; a bad SIGHUP changes nothing."""
    import grp

    if not _group_exists("kvm"):
        pytest.skip("needs a group named kvm")
    scratch = Scratch()
    notify = NotifySocket(tmp_path / "notify")
    conf = write_config(tmp_path / "d.toml", scratch.path, daemon={"socket_group": "kvm"},
                        clone={"max_count": 2})
    d = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    try:
        await notify.wait("READY", "1")
        st = os.stat(scratch.path / "ctl.sock")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (os.getuid(), grp.getgrnam("kvm").gr_gid, 0o660)
        # What ExecReload's first line runs: the broken file fails it, exit 2, the key named.
        conf.write_text(conf.read_text().replace("max_count = 2", "max_count = 0"))
        r = subprocess.run([str(EXE), "--check-config", "--config", str(conf)], capture_output=True, text=True)
        assert r.returncode == 2 and "clone.max_count" in r.stderr, r.stderr
        # A SIGHUP with that file anyway: logged, refused, the old config stays in force.
        d.signal(signal.SIGHUP)
        await notify.wait("RELOADING", "1")
        await notify.wait("READY", "1")
        failed = [e for e in d.log_events() if e.get("event") == "config.reload_failed"]
        assert failed and "clone.max_count" in failed[0]["error"]
        # The watch loop's first round read the outbox's delivery counts for the metrics.
        assert not [e for e in d.log_events() if e.get("event", "").startswith("watch.")], d.log_text()
        async with Api(scratch.path / "ctl.sock") as api:
            status, body = await api.call("POST", "/v1/jobs", {"source": "nope", "name": "x", "count": 3})
            assert status == 400 and "between 1 and 2" in body["error"]["message"], body
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    finally:
        d.kill()
        notify.close()
        scratch.cleanup()


@needs_libvirt
async def test_socket_activation_with_passed_fd(tmp_path: Path):
    scratch = Scratch()
    listen_path = scratch.path / "activated.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(listen_path))
    lsock.listen(16)
    notify = NotifySocket(tmp_path / "notify")
    conf = write_config(tmp_path / "d.toml", scratch.path)
    fd = lsock.fileno()
    d = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path)}, listen_fd=fd).start()
    try:
        await notify.wait("READY", "1")
        async with Api(listen_path) as api:
            status, body = await api.call("GET", "/v1/health")
            assert status == 200 and body["accepting"] is True
        assert not (scratch.path / "ctl.sock").exists(), "with a passed socket the daemon binds none itself"
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    finally:
        d.kill()
        lsock.close()
        notify.close()
        scratch.cleanup()


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


def restart_libvirtd() -> None:
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    for _ in range(100):
        if subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    # As setup.sh starts it (under a reaper), waiting until it answers.
    subprocess.run([str(REPO / "scripts" / "start-libvirtd.sh")], check=True, timeout=60)


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


# -- access control ---------------------------------------------------------------------------


CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
method, path = sys.argv[2], sys.argv[3]
body = b'{"source": "src", "name": "acl-1"}' if method == "POST" else b""
s.sendall(f"{method} {path} HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: {len(body)}\\r\\n"
          f"Content-Type: application/json\\r\\nConnection: close\\r\\n\\r\\n".encode() + body)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b" ", 2)[1].decode())
"""


@pytest.fixture
async def acl_api(tmp_path: Path):
    import grp

    if not (_group_exists("kvm") and _group_exists("disk")):
        pytest.skip("needs groups named kvm and disk")
    kvm, disk = grp.getgrnam("kvm").gr_gid, grp.getgrnam("disk").gr_gid
    c, journal, virt = await fake_world(tmp_path, access={"write_groups": ("kvm",), "read_groups": ("disk",)})
    engine = fake_engine(c, journal, virt)
    runner = web.AppRunner(make_app(engine, journal))
    await runner.setup()
    scratch = Scratch()  # reachable by other users, unlike pytest's tmp_path
    sock = scratch.path / "ctl.sock"
    await web.UnixSite(runner, str(sock)).start()
    os.chmod(sock, 0o666)  # let the file mode through: the daemon's own check is under test
    yield sock, kvm, disk, virt
    await engine.shutdown(5)
    await runner.cleanup()
    await journal.close()
    scratch.cleanup()


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


async def _as_user(sock: Path, method: str, path: str, *, uid: int, groups: list[int]) -> int:
    # The venv's interpreter lives under /root, which nobody cannot reach.
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", CLIENT, str(sock), method, path, user=uid, group=65534, extra_groups=groups,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return int(out.decode().strip())


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs Debian's python3 (scripts/setup.sh installs it)")
async def test_access_by_peer_credentials(acl_api):
    sock, kvm, disk, virt = acl_api
    nobody = 65534
    # Not in any configured group: neither read nor write.
    assert await _as_user(sock, "GET", "/v1/clones", uid=nobody, groups=[]) == 403
    assert await _as_user(sock, "POST", "/v1/jobs", uid=nobody, groups=[]) == 403
    assert "acl-1" not in virt.domains
    # Member of a read group: reads only.
    assert await _as_user(sock, "GET", "/v1/clones", uid=nobody, groups=[disk]) == 200
    assert await _as_user(sock, "POST", "/v1/jobs", uid=nobody, groups=[disk]) == 403
    assert "acl-1" not in virt.domains
    # Member of the write group (a supplementary group, not the primary one).
    assert await _as_user(sock, "GET", "/v1/clones", uid=nobody, groups=[kvm]) == 200
    assert await _as_user(sock, "POST", "/v1/jobs", uid=nobody, groups=[kvm]) == 202
    # root may always.
    async with Api(sock) as api:
        status, _ = await api.call("GET", "/v1/jobs")
        assert status == 200


# Installing as a service (docs/operations/install.md): tests/test_install.py.
