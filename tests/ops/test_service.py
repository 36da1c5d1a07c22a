"""The daemon as a real process, the way systemd runs it.

Readiness and status on a real NOTIFY_SOCKET, socket activation with a passed
fd, SIGHUP reload, metrics scraped, config errors named by key, access control
by SO_PEERCRED. With real guests (SIGTERM in the middle of a clone, libvirtd
restarts): tests/integration/test_service.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from instaclone.api import make_app
from tests.support.fakes import fake_engine, fake_world
from tests.support.host import libvirt_ready
from tests.support.proclib import EXE, DaemonProcess, NotifySocket, free_port, write_config
from tests.support.vmlib import Api, Scratch

REPO = Path(__file__).resolve().parents[2]

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
    good.write_text((Path(__file__).resolve().parents[2] / "config" / "instaclone.toml").read_text())
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


# Installing as a service (docs/operations/install.md): tests/ops/test_install.py.
