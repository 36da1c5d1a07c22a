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
from typing import Any

import pytest
from aiohttp import web

from instaclone import client as ic

#: The clone's name when the routes run as a middleware (no route matched them).
CLONE = web.RequestKey("clone", str)


def _err(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class FakeGuestRoutes:
    """The exec/files routes over an in-memory guest filesystem."""

    def __init__(self, *, any_clone: bool = False) -> None:
        self.any_clone = any_clone  # every clone name is a running clone with an agent
        self.files: dict[str, bytes] = {}
        self.puts: list[dict[str, Any]] = []
        self.execs: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/clones/{name}/exec", self.exec)
        app.router.add_put("/v1/clones/{name}/files", self.put)
        app.router.add_get("/v1/clones/{name}/files", self.get)
        return app

    def middleware(self) -> Any:
        """The routes as a middleware, to put in front of another app's own (e.g. the real API's)."""
        routes = {("POST", "exec"): self.exec, ("PUT", "files"): self.put, ("GET", "files"): self.get}

        @web.middleware
        async def guest_routes(request: web.Request, handler: Any) -> web.StreamResponse:
            parts = request.path.split("/")
            if len(parts) == 5 and parts[1:3] == ["v1", "clones"] and (request.method, parts[4]) in routes:
                request[CLONE] = parts[3]
                return await routes[(request.method, parts[4])](request)
            return await handler(request)
        return guest_routes

    def _clone(self, request: web.Request) -> web.Response | None:
        name = request.get(CLONE) or request.match_info["name"]
        if self.any_clone:
            return None
        if name == "noagent":
            return _err(409, "agent_unavailable", "the guest agent of noagent does not answer")
        if name != "vm":
            return _err(404, "not_found", f"no clone {name!r}")
        return None

    async def exec(self, request: web.Request) -> web.StreamResponse:
        if (bad := self._clone(request)) is not None:
            return bad
        body = await request.json()
        self.execs.append(body)
        argv = body["argv"]
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)

        async def line(obj: dict[str, Any]) -> None:
            await resp.write(json.dumps(obj).encode() + b"\n")

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        await line({"type": "started", "pid": 4242})
        if argv[0] == "echo":
            await line({"type": "stdout", "data": b64(" ".join(argv[1:]).encode())})
            await line({"type": "stderr", "data": b64(b"warn\n")})
            await line({"type": "stdout", "data": b64(b"\n")})
            await line({"type": "exit", "exit_code": 0, "signal": None, "duration_ms": 12.5})
        elif argv[0] == "cat":  # stdin back, and the env it was given
            await line({"type": "stdout", "data": body.get("stdin", "")})
            await line({"type": "stderr", "data": b64(json.dumps(body.get("env")).encode())})
            await line({"type": "exit", "exit_code": 3, "signal": None, "duration_ms": 1.0})
        elif argv[0] == "big":  # one line far longer than aiohttp's readline limit
            await line({"type": "stdout", "data": b64(b"x" * 3_000_000)})
            await line({"type": "exit", "exit_code": 0, "signal": None, "duration_ms": 1.0})
        elif argv[0] == "sh":  # the CI example of docs/guide/client.md: "runs the tests", leaves their report
            self.files["/root/results.xml"] = b"<testsuite tests='2' failures='0'/>"
            await line({"type": "stdout", "data": b64(b"2 passed\n")})
            await line({"type": "exit", "exit_code": 0, "signal": None, "duration_ms": 5.0})
        elif argv[0] == "uname":
            await line({"type": "stdout", "data": b64(b"Linux fake 6.1.0\n")})
            await line({"type": "exit", "exit_code": 0, "signal": None, "duration_ms": 1.0})
        elif argv[0] == "sleep":
            await line({"type": "stdout", "data": b64(b"partial")})
            await line({"type": "error", "error": {"code": "exec_timeout", "message": "killed after 1 s"}})
        # "broken": the stream ends without an exit line
        await resp.write_eof()
        return resp

    async def put(self, request: web.Request) -> web.Response:
        if (bad := self._clone(request)) is not None:
            return bad
        path = request.query.get("path", "")
        if not path.startswith("/"):
            return _err(400, "invalid_request", "path must be absolute")
        h = hashlib.sha256()
        data = bytearray()
        chunks = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            data += chunk
            chunks += 1
        digest = h.hexdigest()
        if (want := request.headers.get("X-Instaclone-SHA256")) and want.lower() != digest:
            return _err(422, "checksum_mismatch", f"body sha256 {digest} != header {want}")
        if path.startswith("/nodir/"):
            return _err(404, "guest_file_not_found", "no directory /nodir")
        self.puts.append({"path": path, "mode": request.query.get("mode"), "sha": want, "chunks": chunks,
                          "length": request.content_length, "chunked": "chunked" in request.headers.get(
                              "Transfer-Encoding", "")})
        self.files[path] = bytes(data)
        sha = "0" * 64 if path == "/lie" else digest
        return web.json_response({"file": {"path": path, "bytes": len(data), "sha256": sha,
                                           "mode": request.query.get("mode", "0644")}})

    async def get(self, request: web.Request) -> web.StreamResponse:
        if (bad := self._clone(request)) is not None:
            return bad
        path = request.query.get("path", "")
        if path not in self.files:
            return _err(404, "guest_file_not_found", f"no file {path}")
        data = self.files[path]
        sha = hashlib.sha256(b"something else" if path.endswith(".corrupt") else data).hexdigest()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "X-Instaclone-SHA256": sha})
        resp.content_length = len(data)
        await resp.prepare(request)
        for i in range(0, len(data), 65536):
            await resp.write(data[i:i + 65536])
            if path.endswith(".cut") and i >= 65536:  # the guest's read fails mid-file: the daemon cuts it short
                assert request.transport is not None
                request.transport.close()
                return resp
        await resp.write_eof()
        return resp


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
