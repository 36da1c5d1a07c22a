"""instaclone.client's exec and files against a fake server of the shared exec/files protocol.

The fake answers exactly as the common protocol says (NDJSON exec stream;
PUT/GET files with X-Instaclone-SHA256), plus misbehaviours a real daemon
must never show, to see that the client catches them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from instaclone import client as ic
from tests.support.guestroutes import FakeGuestRoutes


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[tuple[FakeGuestRoutes, Path]]:
    fake = FakeGuestRoutes()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    sock = tmp_path / "guest.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield fake, sock
    finally:
        await runner.cleanup()


async def test_exec_collects_output_and_exit(guest):
    _fake, sock = guest
    async with ic.Client(sock) as c:
        r = await c.exec("vm", ["echo", "hello", "world"])
        assert r == ic.ExecResult(0, b"hello world\n", b"warn\n", 12.5, None, 4242) and r.ok
        r = await c.exec("vm", ["cat"], stdin=b"\x00in\xff", env={"A": "1"}, timeout_s=5)
        assert r.exit_code == 3 and not r.ok and r.stdout == b"\x00in\xff" and json.loads(r.stderr) == {"A": "1"}
        assert (await c.exec("vm", ["big"])).stdout == b"x" * 3_000_000
    assert _fake.execs[1] == {"argv": ["cat"], "env": {"A": "1"}, "timeout_s": 5,
                              "stdin": base64.b64encode(b"\x00in\xff").decode()}


async def test_exec_stream_yields_chunks_then_exit(guest):
    _fake, sock = guest
    async with ic.Client(sock) as c:
        items = [i async for i in c.exec_stream("vm", ["echo", "hi"])]
    assert items == [ic.ExecOutput("stdout", b"hi"), ic.ExecOutput("stderr", b"warn\n"),
                     ic.ExecOutput("stdout", b"\n"), ic.ExecExit(0, None, 12.5, 4242)]


async def test_exec_errors_are_typed(guest):
    _fake, sock = guest
    async with ic.Client(sock) as c:
        with pytest.raises(ic.ExecTimeout) as e:
            await c.exec("vm", ["sleep", "10"], timeout_s=1)
        assert e.value.code == "exec_timeout" and e.value.details["stdout"] == b"partial"
        with pytest.raises(ic.AgentUnavailable) as e2:
            await c.exec("noagent", ["true"])
        assert e2.value.status == 409 and isinstance(e2.value, ic.Conflict)
        with pytest.raises(ic.NotFound):
            await c.exec("ghost", ["true"])
        with pytest.raises(ic.ProtocolError):
            await c.exec("vm", ["broken"])


async def test_put_file_streams_path_and_bytes(guest, tmp_path):
    fake, sock = guest
    src = tmp_path / "repo.tar"
    payload = bytes(range(256)) * 20_000  # 5 MB: several chunks
    src.write_bytes(payload)
    async with ic.Client(sock) as c:
        info = await c.put_file("vm", src, "/tmp/repo.tar", mode=0o600)
        assert info.path == "/tmp/repo.tar" and info.size == len(payload)
        assert info.sha256 == hashlib.sha256(payload).hexdigest() and info.mode == "0600"
        sent: list[int] = []  # progress: each chunk as it goes, from the file or from bytes
        await c.put_file("vm", src, "/tmp/again.tar", progress=sent.append)
        assert len(sent) > 1 and sum(sent) == len(payload)
        sent.clear()
        await c.put_file("vm", payload, "/tmp/again.tar", progress=sent.append)
        assert len(sent) > 1 and sum(sent) == len(payload) and fake.files["/tmp/again.tar"] == payload
        small = await c.put_file("vm", b"#!/bin/sh\necho ok\n", "/usr/local/bin/t", mode="0755")
        assert small.size == 18 and fake.files["/usr/local/bin/t"] == b"#!/bin/sh\necho ok\n"
        with pytest.raises(ic.GuestFileNotFound):
            await c.put_file("vm", b"x", "/nodir/x")
        with pytest.raises(ic.InvalidRequest):
            await c.put_file("vm", b"x", "relative")
        with pytest.raises(ic.ChecksumMismatch):  # the answer's checksum is not what was sent
            await c.put_file("vm", b"x", "/lie")
        with pytest.raises(FileNotFoundError):
            await c.put_file("vm", tmp_path / "missing", "/tmp/x")
        sparse = tmp_path / "huge"
        with sparse.open("wb") as f:
            f.truncate(ic._async.MAX_FILE_BYTES + 1)
        with pytest.raises(ic.BodyTooLarge):  # refused before it is read or sent
            await c.put_file("vm", sparse, "/tmp/huge")
        sparse.unlink()
    assert fake.files["/tmp/repo.tar"] == payload
    assert fake.puts[0]["sha"] == hashlib.sha256(payload).hexdigest() and fake.puts[0]["mode"] == "0600"
    assert fake.puts[0]["length"] == len(payload) and not fake.puts[0]["chunked"] and fake.puts[0]["chunks"] > 1


async def test_get_file_to_path_and_writer(guest, tmp_path):
    fake, sock = guest
    payload = b"results " * 300_000
    fake.files["/out/results.xml"] = payload
    async with ic.Client(sock) as c:
        dest = tmp_path / "results.xml"
        info = await c.get_file("vm", "/out/results.xml", dest)
        assert dest.read_bytes() == payload and info.size == len(payload)
        assert info.sha256 == hashlib.sha256(payload).hexdigest()
        buf = io.BytesIO()
        await c.get_file("vm", "/out/results.xml", buf)
        assert buf.getvalue() == payload
        with pytest.raises(ic.GuestFileNotFound):
            await c.get_file("vm", "/nothing", tmp_path / "n")
        assert not (tmp_path / "n").exists()


async def test_get_file_mismatch_leaves_no_partial_file(guest, tmp_path):
    fake, sock = guest
    fake.files["/x.corrupt"] = b"data" * 100_000
    dest = tmp_path / "x"
    async with ic.Client(sock) as c:
        with pytest.raises(ic.ChecksumMismatch) as e:
            await c.get_file("vm", "/x.corrupt", dest)
        assert e.value.code == "checksum_mismatch" and e.value.status is None
        dest.write_bytes(b"old")
        with pytest.raises(ic.ChecksumMismatch):
            await c.get_file("vm", "/x.corrupt", dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest.sock", "x"] and dest.read_bytes() == b"old"


async def test_get_file_cut_short_is_a_guest_file_error(guest, tmp_path):
    fake, sock = guest
    fake.files["/big.cut"] = b"z" * 1_000_000
    async with ic.Client(sock) as c:
        with pytest.raises(ic.GuestFileError, match="cut short after"):
            await c.get_file("vm", "/big.cut", tmp_path / "big")
        assert (await c.exec("vm", ["echo", "still", "fine"])).ok  # the session survives it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest.sock"]


async def test_sync_wrapper_exec_files_iterators(guest, tmp_path):
    _fake, sock = guest

    def blocking() -> None:
        with ic.SyncClient(sock) as c:
            assert c.exec("vm", ["echo", "a"]).stdout == b"a\n"
            items = list(c.exec_stream("vm", ["echo", "b"]))
            assert items[-1] == ic.ExecExit(0, None, 12.5, 4242)
            c.put_file("vm", b"abc", "/f")
            assert c.get_file("vm", "/f", tmp_path / "f").size == 3
            with pytest.raises(ic.AgentUnavailable):
                c.exec("noagent", ["true"])
            # An iterator left early is closed on the client's loop.
            it = c.exec_stream("vm", ["echo", "c"])
            assert next(it) == ic.ExecOutput("stdout", b"c")
            it.close()  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError):
            c.health()

    await asyncio.to_thread(blocking)
