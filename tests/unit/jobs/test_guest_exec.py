"""Unit tests: exec, file put and get inside clones (jobs.guestexec, api.guest) on a fake guest agent."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from instaclone.api import make_app
from instaclone.api.access import ACCESS, NOBODY, Caller
from instaclone.errors import AgentUnavailable, LibvirtTimeout
from instaclone.model import CloneRecord
from instaclone.requests import ExecRequest, GetFileRequest
from tests.support.fakes import FakeGuestAgent, FakeHypervisor, FakeProcess, fake_engine, fake_world

AGENT = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"


class ReadOnlyAccess:
    """Everyone may read, no one may write."""

    def allows(self, peer: object, *, write: bool) -> bool:
        return not write

    def caller(self, peer: object) -> Caller:
        return NOBODY


@asynccontextmanager
async def world(tmp_path: Path, *, agent_channel: bool = True, read_only: bool = False) -> AsyncIterator[
        tuple[aiohttp.ClientSession, FakeHypervisor, FakeGuestAgent, Any]]:
    """The API over a fake engine with one running clone "c1" whose agent a FakeGuestAgent answers."""
    from aiohttp import web

    c, store, virt = await fake_world(tmp_path)
    engine = fake_engine(c, store, virt)
    dom = virt.add_source("c1", tmp_path / "c1.qcow2")
    if agent_channel:
        dom.xml = dom.xml.replace("</devices>", AGENT + "</devices>")
    guest = FakeGuestAgent()
    virt.guests["c1"] = guest
    await store.add_clones("job-1", [CloneRecord("c1", dom.uuid, "src", "job-1", str(tmp_path), time.time())], [])
    app = make_app(engine, store)
    if read_only:
        app[ACCESS] = ReadOnlyAccess()  # type: ignore[assignment]
    # After a 413 the server reads what is left of the body for lingering_time (10 s by default)
    # before it lets go of the connection: the teardown would wait that long.
    runner = web.AppRunner(app, lingering_time=0.5)
    await runner.setup()
    sock = tmp_path / "ctl.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
            yield s, virt, guest, engine
    finally:
        await runner.cleanup()
        await store.close()


async def exec_lines(s: aiohttp.ClientSession, body: dict[str, Any], clone: str = "c1") -> tuple[int, list[Any]]:
    async with s.post(f"http://x/v1/clones/{clone}/exec", json=body) as r:
        if r.status != 200:
            return r.status, [await r.json()]
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        return r.status, [json.loads(line) async for line in r.content]


def data(lines: list[Any], kind: str) -> list[bytes]:
    return [base64.b64decode(e["data"]) for e in lines if e["type"] == kind]


async def printer(proc: FakeProcess) -> int:
    proc.out += b"one\n"
    await asyncio.sleep(0.15)
    proc.err += b"warn\n"
    proc.out += b"two\n"
    await asyncio.sleep(0.15)
    proc.out += proc.env.get("FOO", "").encode() + b"|" + proc.stdin
    return 3


async def sleeper(proc: FakeProcess) -> int:
    await asyncio.sleep(3600)
    return 0


def no_exec_files(guest: FakeGuestAgent) -> None:
    assert not [p for p in guest.files if "/exec-" in p], guest.files
    assert not guest.handles, "handles left open"
    assert not guest.procs, "processes left running"


async def test_exec_streams_in_order_with_exit_code_env_and_stdin(tmp_path):
    async with world(tmp_path) as (s, _virt, guest, _engine):
        guest.programs["printer"] = printer
        status, lines = await exec_lines(s, {"argv": ["printer", "a b"], "env": {"FOO": "bar"},
                                             "stdin": base64.b64encode(b"input").decode()})
        assert status == 200
        assert lines[0]["type"] == "started" and isinstance(lines[0]["pid"], int)
        assert lines[-1]["type"] == "exit" and lines[-1]["exit_code"] == 3 and lines[-1]["signal"] is None
        assert lines[-1]["duration_ms"] > 250
        # Output came as it was written: more than one stdout chunk, in order.
        assert data(lines, "stdout") == [b"one\n", b"two\n", b"bar|input"]
        assert data(lines, "stderr") == [b"warn\n"]
        assert guest.dirs >= {"/run/instaclone"}  # made on first use
        no_exec_files(guest)


async def test_exec_environment_and_missing_program(tmp_path):
    async with world(tmp_path) as (s, _virt, guest, _engine):
        seen: dict[str, str] = {}

        async def env(proc: FakeProcess) -> int:
            seen.update(proc.env)
            return 0

        guest.programs["env"] = env
        _, lines = await exec_lines(s, {"argv": ["env"], "env": {"PATH": "/opt/bin", "X": "1"}})
        assert lines[-1]["exit_code"] == 0 and seen == {"PATH": "/opt/bin", "X": "1"}
        _, lines = await exec_lines(s, {"argv": ["nope"]})
        assert lines[-1]["exit_code"] == 127 and b"not found" in b"".join(data(lines, "stderr"))


async def test_exec_timeout_kills_and_cleans_up(tmp_path):
    async with world(tmp_path) as (s, virt, guest, _engine):
        guest.programs["sleep"] = sleeper
        t0 = time.monotonic()
        status, lines = await exec_lines(s, {"argv": ["sleep"], "timeout_s": 0.3})
        assert status == 200 and time.monotonic() - t0 < 3
        assert lines[-1]["type"] == "error" and lines[-1]["error"]["code"] == "exec_timeout", lines[-1]
        assert any("kill -STOP" in " ".join(argv) for _, argv, _ in virt.exec_log)
        no_exec_files(guest)


async def test_caller_going_away_kills_the_command(tmp_path):
    async with world(tmp_path) as (_s, virt, guest, engine):
        guest.programs["sleep"] = sleeper
        proc = await engine.guest_exec(ExecRequest("c1", argv=["sleep"], timeout_s=60))
        events = proc.events()
        assert (await anext(events))["type"] == "started"
        await events.aclose()
        await proc.close()
        assert any("kill -STOP" in " ".join(argv) for _, argv, _ in virt.exec_log)
        no_exec_files(guest)


async def test_put_and_get_round_trip(tmp_path):
    async with world(tmp_path) as (s, _virt, guest, _engine):
        blob = bytes(range(256)) * 5000  # 1.28 MB: several write chunks, two read chunks
        sha = hashlib.sha256(blob).hexdigest()
        async with s.put("http://x/v1/clones/c1/files?path=/tmp/blob&mode=755", data=blob,
                         headers={"X-Instaclone-SHA256": sha}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["file"] == {"path": "/tmp/blob", "bytes": len(blob), "sha256": sha, "mode": "0755"}
        assert bytes(guest.files["/tmp/blob"]) == blob
        assert [p for p in guest.files if "instaclone" in p] == []
        assert guest.commands.count("guest-file-write") == 20  # 64 KiB each
        async with s.get("http://x/v1/clones/c1/files?path=/tmp/blob") as r:
            assert r.status == 200
            assert r.headers["X-Instaclone-SHA256"] == sha and int(r.headers["Content-Length"]) == len(blob)
            assert await r.read() == blob
        assert not guest.handles


async def test_checksum_mismatch_leaves_the_file_as_it_was(tmp_path):
    async with world(tmp_path) as (s, _virt, guest, _engine):
        guest.files["/etc/x"] = bytearray(b"old")
        async with s.put("http://x/v1/clones/c1/files?path=/etc/x", data=b"new",
                         headers={"X-Instaclone-SHA256": "0" * 64}) as r:
            assert r.status == 422 and (await r.json())["error"]["code"] == "checksum_mismatch"
        guest.corrupt = True  # the guest's copy differs from what was sent
        async with s.put("http://x/v1/clones/c1/files?path=/etc/x", data=b"new") as r:
            body = await r.json()
            assert r.status == 422 and body["error"]["code"] == "checksum_mismatch", body
        assert guest.files == {"/etc/x": bytearray(b"old")}
        assert not guest.handles


async def test_file_errors(tmp_path):
    async with world(tmp_path) as (s, _virt, _guest, _engine):
        async with s.get("http://x/v1/clones/c1/files?path=/tmp/missing") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "guest_file_not_found"
        async with s.put("http://x/v1/clones/c1/files?path=/nodir/x", data=b"x") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "guest_file_not_found"
        async with s.put("http://x/v1/clones/c1/files?path=/tmp", data=b"x") as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "guest_file_error"
        for q in ("path=relative", "path=/a/../b", "path=/tmp/", "", "path=/tmp/x&mode=999"):
            async with s.put(f"http://x/v1/clones/c1/files?{q}", data=b"x") as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_request", q
        async with s.put("http://x/v1/clones/c1/files?path=/tmp/x", data=b"x",
                         headers={"X-Instaclone-SHA256": "xyz"}) as r:
            assert r.status == 400


async def test_exec_validation_and_reachability(tmp_path):
    async with world(tmp_path) as (s, virt, _guest, _engine):
        for body in ({}, {"argv": []}, {"argv": [""]}, {"argv": ["x", 1]}, {"argv": ["x"], "timeout_s": 0},
                     {"argv": ["x"], "timeout_s": True}, {"argv": ["x"], "env": {"A=B": "c"}},
                     {"argv": ["x"], "stdin": "!!"}, {"argv": ["x"], "other": 1}):
            status, lines = await exec_lines(s, body)
            assert status == 400 and lines[0]["error"]["code"] == "invalid_request", body
        # Only clones instaclone made: the source is no clone.
        status, lines = await exec_lines(s, {"argv": ["true"]}, clone="src")
        assert status == 404 and lines[0]["error"]["code"] == "not_found"
        virt.domains["c1"].state = "paused"
        status, lines = await exec_lines(s, {"argv": ["true"]})
        assert status == 409 and lines[0]["error"]["code"] == "domain_state_invalid"
        virt.domains["c1"].state = "running"
        virt.fail["agent"] = LibvirtTimeout("Guest agent is not responding")
        status, lines = await exec_lines(s, {"argv": ["true"]})
        assert status == 409 and lines[0]["error"]["code"] == "agent_unavailable"
        assert "does not answer guest-ping" in lines[0]["error"]["message"]


async def test_no_agent_channel(tmp_path):
    async with world(tmp_path, agent_channel=False) as (s, _virt, _guest, engine):
        status, lines = await exec_lines(s, {"argv": ["true"]})
        assert status == 409 and lines[0]["error"]["code"] == "agent_unavailable"
        assert "org.qemu.guest_agent.0" in lines[0]["error"]["message"]
        with pytest.raises(AgentUnavailable):
            await engine.open_guest_file(GetFileRequest("c1", path="/etc/x"))


async def test_all_three_need_write_access(tmp_path):
    async with world(tmp_path, read_only=True) as (s, _virt, guest, _engine):
        guest.files["/etc/x"] = bytearray(b"secret")
        status, lines = await exec_lines(s, {"argv": ["true"]})
        assert status == 403 and lines[0]["error"]["code"] == "forbidden"
        async with s.put("http://x/v1/clones/c1/files?path=/etc/y", data=b"x") as r:
            assert r.status == 403
        async with s.get("http://x/v1/clones/c1/files?path=/etc/x") as r:
            body = await r.json()
            assert r.status == 403 and body["error"]["code"] == "forbidden"
            assert "write access" in body["error"]["message"]
        assert "/etc/y" not in guest.files


async def test_large_exec_body_is_accepted_and_limited(tmp_path):
    async with world(tmp_path) as (s, _virt, guest, _engine):
        got = bytearray()

        async def cat(proc: FakeProcess) -> int:
            got.extend(proc.stdin)
            return 0

        guest.programs["cat"] = cat
        stdin = bytes(300_000)  # larger than the app's 64 KiB body limit
        status, lines = await exec_lines(s, {"argv": ["cat"], "stdin": base64.b64encode(stdin).decode()})
        assert status == 200 and lines[-1]["exit_code"] == 0 and bytes(got) == stdin
        with suppress(aiohttp.ClientError):
            status, lines = await exec_lines(s, {"argv": ["cat"], "stdin": "A" * (12 << 20)})
            assert status == 413
