"""instaclone.client's transport: unreachable and permission messages, bad answers, reconnects, the sync wrapper."""

from __future__ import annotations

import asyncio
import grp
import inspect
import json
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from instaclone import client as ic, errors as daemon_errors
from instaclone.jobs import pools as daemon_pools
from tests.support.fakes import fake_api


def test_every_daemon_error_code_has_its_class():
    """Each code the daemon can answer (instaclone.errors' tree, PoolEmpty, the guest codes) has a typed class."""
    codes = set()
    for mod in (daemon_errors, daemon_pools):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, daemon_errors.InstacloneError):
                codes.add(cls.code)
    codes |= {"agent_unavailable", "guest_file_not_found", "guest_file_error", "checksum_mismatch", "exec_timeout",
              "not_found", "method_not_allowed", "body_too_large", "http_error", "internal_error"}
    missing = sorted(c for c in codes if c not in ic.CODES)
    assert not missing, f"no client class for: {missing}"
    for code, cls in ic.CODES.items():
        err = ic.errors.error_for(code, "m", step="Stunned", status=409)
        assert type(err) is cls and err.code == code and err.step == "Stunned" and err.status == 409
    # The client's tree mirrors the daemon's: catching the parent catches the child.
    for mod in (daemon_errors, daemon_pools):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, daemon_errors.InstacloneError) and cls is not daemon_errors.InstacloneError:
                parent = cls.__mro__[1]
                if parent is not daemon_errors.InstacloneError:
                    assert issubclass(ic.CODES[cls.code], ic.CODES[parent.code]), cls


def test_unknown_code_is_the_base_class():
    err = ic.errors.from_answer(418, {"error": {"code": "teapot", "message": "short and stout", "extra": 1}})
    assert type(err) is ic.ApiError and err.code == "teapot" and err.details == {"extra": 1} and err.status == 418
    assert type(ic.errors.from_answer(500, "not an object")) is ic.HttpError


def test_socket_resolution(monkeypatch):
    monkeypatch.delenv("INSTACLONE_SOCKET", raising=False)
    assert ic.Client().socket == "/run/instaclone/control.sock" == ic.DEFAULT_SOCKET
    monkeypatch.setenv("INSTACLONE_SOCKET", "/tmp/env.sock")
    assert ic.Client().socket == "/tmp/env.sock"
    assert ic.Client(Path("/tmp/arg.sock")).socket == "/tmp/arg.sock"


async def test_missing_socket_is_unreachable(tmp_path):
    async with ic.Client(tmp_path / "nope.sock") as c:
        with pytest.raises(ic.DaemonUnreachable) as e:
            await c.health()
    assert not isinstance(e.value, ic.PermissionDenied)
    assert "nope.sock" in str(e.value) and "no such socket" in str(e.value)


async def test_refused_socket_is_unreachable(tmp_path):
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    async with ic.Client(path) as c:
        with pytest.raises(ic.DaemonUnreachable, match="connection refused"):
            await c.jobs()
        with pytest.raises(ic.DaemonUnreachable):
            [ev async for ev in c.events()]


_AS_NOBODY = r"""
import asyncio, os, sys
from instaclone import client as ic
groups = [int(g) for g in sys.argv[2].split(",") if g]
os.setgroups(groups); os.setgid(65534); os.setuid(65534)
async def main():
    async with ic.Client(sys.argv[1]) as c:
        try:
            await c.health()
        except ic.PermissionDenied as exc:
            print("PermissionDenied:", exc)
        except Exception as exc:
            print("other:", type(exc).__name__, exc)
asyncio.run(main())
"""


@pytest.fixture
async def shared_socket() -> AsyncIterator[Path]:
    """A listening socket in a directory anyone may enter (tmp_path is root's own)."""
    d = Path(tempfile.mkdtemp(prefix="ic-client-"))
    d.chmod(0o755)
    async def health(_r: web.Request) -> web.Response:
        return web.json_response({"version": "x"})

    app = web.Application()
    app.router.add_get("/v1/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = d / "control.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield sock
    finally:
        await runner.cleanup()
        sock.unlink(missing_ok=True)
        d.rmdir()


async def _as_nobody(sock: Path, groups: list[int]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _AS_NOBODY, str(sock),
                                                ",".join(map(str, groups)), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
async def test_permission_denied_names_the_group_and_the_fix(shared_socket):
    try:
        gid = grp.getgrnam("instaclone").gr_gid
    except KeyError:
        gid = 0
    group = grp.getgrgid(gid).gr_name
    os.chown(shared_socket, 0, gid)
    shared_socket.chmod(0o660)
    out = await _as_nobody(shared_socket, [])
    assert out.startswith("PermissionDenied:"), out
    assert f"permission denied on {shared_socket}" in out and f"not in the socket's group '{group}'" in out
    assert f"usermod -aG {group} $USER" in out and "log in again" in out
    # In the group, but the mode keeps the group out: the message says so.
    shared_socket.chmod(0o000)
    out = await _as_nobody(shared_socket, [gid])
    assert out.startswith("PermissionDenied:") and f"is in the socket's group '{group}'" in out and "000" in out, out
    # In the group with mode 0660: it connects.
    shared_socket.chmod(0o660)
    assert (await _as_nobody(shared_socket, [gid])).strip() == "", "the group member should connect"
    # The directory is the closed door: its group is the one to join.
    d = shared_socket.parent
    os.chown(d, 0, gid)
    d.chmod(0o750)
    try:
        out = await _as_nobody(shared_socket, [])
    finally:
        d.chmod(0o755)
    assert f"not in the group of its directory {d} '{group}'" in out and f"usermod -aG {group}" in out, out
    # A directory not even its group may enter: said so, no usermod that would not help.
    d.chmod(0o700)
    try:
        out = await _as_nobody(shared_socket, [gid])
    finally:
        d.chmod(0o755)
    assert f"its directory {d} (mode 700, group '{group}') is closed to your user" in out, out
    assert "usermod" not in out


@pytest.fixture
async def odd_server(tmp_path) -> AsyncIterator[tuple[Path, dict[str, Any]]]:
    """A server that misbehaves: HTML for health, and an event stream that drops its connection."""
    state: dict[str, Any] = {"connects": [], "drop_after": 2, "events": list(range(1, 6))}

    async def html(_r: web.Request) -> web.Response:
        return web.Response(text="<html>502 Bad Gateway</html>", status=502, content_type="text/html")

    async def events(request: web.Request) -> web.StreamResponse:
        since = int(request.query.get("since", "0"))
        state["connects"].append(dict(request.query))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        sent = 0
        for cur in state["events"]:
            if cur <= since:
                continue
            await resp.write(json.dumps({"cursor": cur, "id": f"evt_{cur}", "type": "clone.ready",
                                         "timestamp": "", "data": {"job_id": "j"}}).encode() + b"\n")
            sent += 1
            if sent == state["drop_after"]:
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()  # the daemon went away mid-stream
                return resp
        if request.query.get("follow"):
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/v1/health", html)
    app.router.add_get("/v1/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "odd.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield sock, state
    finally:
        await runner.cleanup()


async def test_non_json_answer_is_a_protocol_error(odd_server):
    sock, _ = odd_server
    async with ic.Client(sock) as c:
        with pytest.raises(ic.ProtocolError, match="non-JSON answer \\(HTTP 502\\)"):
            await c.health()


async def test_follow_reconnects_from_the_last_cursor(odd_server):
    sock, state = odd_server
    got = []
    async with ic.Client(sock) as c:
        async for ev in c.events(since=0, follow=True, job="j"):
            got.append(ev.cursor)
            if ev.cursor == 5:
                break
    assert got == [1, 2, 3, 4, 5]
    assert [q.get("since") for q in state["connects"]] == ["0", "2", "4"]
    assert all(q.get("job") == "j" and q.get("follow") == "1" for q in state["connects"])


async def test_dropped_stream_without_follow_raises(odd_server):
    sock, _ = odd_server
    got = []
    async with ic.Client(sock) as c:
        with pytest.raises(ic.DaemonUnreachable, match="went away"):
            async for ev in c.events(since=0):
                got.append(ev.cursor)
    assert got == [1, 2]


async def test_follow_gives_up_after_bounded_retries(odd_server):
    sock, state = odd_server
    state["events"] = []  # every connection: nothing, then dropped
    async with ic.Client(sock) as c:
        with pytest.raises(ic.DaemonUnreachable):
            async for _ev in c.events(follow=True, retries=2):
                pass
    assert len(state["connects"]) == 3


async def test_sync_client_over_the_fake_api(tmp_path):
    async with fake_api(tmp_path) as (_raw, virt, sock):

        def blocking() -> None:
            with ic.SyncClient(sock, timeout_s=60) as c:
                assert c.health().libvirt_connected
                job = c.clone("src", name="s1", wait=True, timeout_s=20)
                assert job.ok and job.clones == ("s1",)
                assert [j.id for j in c.jobs()] == [job.id]
                evs = list(c.events(since=0, job=job.id))
                assert evs[-1].type == "clone.ready"
                assert [ev.state for ev in c.watch(job.id)][-1] == "Unstunned"
                with pytest.raises(ic.SourceNotFound):
                    c.clone("ghost", name="x")
                c.create_pool("p", source="src", size=1)
                with c.claim("p", wait_s=30) as vm:
                    assert isinstance(vm, ic.Claim) and vm.name in virt.domains
                    name = vm.name
                assert name not in virt.domains
                held = c.claim("p", wait_s=30)
                assert held.name in virt.domains
                c.release(held.claim)
                assert held.name not in virt.domains
                c.resize_pool("p", 0)
                assert c.destroy("s1").name == "s1"

        await asyncio.to_thread(blocking)
