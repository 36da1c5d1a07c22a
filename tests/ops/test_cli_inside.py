"""``instaclone exec`` and ``instaclone cp`` as subprocesses against a fake server of the protocol.

The fake speaks the common protocol of ``POST /v1/clones/{name}/exec`` (NDJSON: started,
stdout/stderr base64 chunks, exit or error) and ``PUT/GET /v1/clones/{name}/files``, with a
pretend guest: clone ``c1`` runs the commands below, ``noagent`` has no guest agent, anything
else is not a clone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

CLI = [sys.executable, "-m", "instaclone.cli"]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class Guest:
    """The pretend guest: its files, and what it was asked to run."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {"/etc/hostname": (b"c1\n", "0644")}
        self.execs: list[dict[str, Any]] = []
        self.corrupt_downloads = False

    def check(self, request: web.Request) -> web.Response | None:
        name = request.match_info["name"]
        if name == "noagent":
            return _error(409, "agent_unavailable", f"clone {name} has no guest agent channel")
        if name != "c1":
            return _error(404, "not_found", f"no clone {name!r}")
        return None

    async def exec(self, request: web.Request) -> web.StreamResponse:
        if (bad := self.check(request)) is not None:
            return bad
        body = await request.json()
        self.execs.append(body)
        argv, env = body["argv"], body.get("env") or {}
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)

        async def send(**line: Any) -> None:
            await resp.write(json.dumps(line).encode() + b"\n")

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        await send(type="started", pid=42)
        if argv[0] == "slow":  # output, a pause, more output, exit 3
            await send(type="stdout", data=b64(b"first\n"))
            await asyncio.sleep(1.0)
            await send(type="stderr", data=b64(b"oops\n"))
            await send(type="stdout", data=b64(b"second\n"))
            await send(type="exit", exit_code=3, signal=None, duration_ms=1000.0)
        elif argv[0] == "cat":
            await send(type="stdout", data=b64(base64.b64decode(body.get("stdin", ""))))
            await send(type="exit", exit_code=0, signal=None, duration_ms=1.0)
        elif argv[0] == "env":
            out = "".join(f"{k}={v}\n" for k, v in sorted(env.items())) + f"timeout={body.get('timeout_s')}\n"
            await send(type="stdout", data=b64(out.encode()))
            await send(type="exit", exit_code=0, signal=None, duration_ms=1.0)
        elif argv[0] == "killed":
            await send(type="exit", exit_code=-1, signal=9, duration_ms=1.0)
        elif argv[0] == "hang":
            await send(type="error", error={"code": "exec_timeout",
                                            "message": f"killed after {body.get('timeout_s')} s"})
        else:
            await send(type="stdout", data=b64(" ".join(argv).encode() + b"\n"))
            await send(type="exit", exit_code=0, signal=None, duration_ms=1.0)
        await resp.write_eof()
        return resp

    async def put(self, request: web.Request) -> web.Response:
        if (bad := self.check(request)) is not None:
            return bad
        path = request.query.get("path", "")
        if not path.startswith("/"):
            return _error(400, "invalid_request", "path must be absolute")
        if os.path.dirname(path) not in ("/", "/tmp", "/etc"):
            return _error(404, "guest_file_not_found", f"no directory {os.path.dirname(path)}")
        h, data = hashlib.sha256(), bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            h.update(chunk)
            data += chunk
        want = request.headers.get("X-Instaclone-SHA256")
        if want and want != h.hexdigest():
            return _error(422, "checksum_mismatch", "the body does not match X-Instaclone-SHA256")
        mode = request.query.get("mode", "0644")
        self.files[path] = (bytes(data), mode)
        return web.json_response({"file": {"path": path, "bytes": len(data), "sha256": h.hexdigest(), "mode": mode}})

    async def get(self, request: web.Request) -> web.StreamResponse:
        if (bad := self.check(request)) is not None:
            return bad
        path = request.query.get("path", "")
        if path == "/tmp":
            return _error(409, "guest_file_error", "/tmp is a directory")
        if path not in self.files:
            return _error(404, "guest_file_not_found", f"no file {path}")
        data = self.files[path][0]
        sha = hashlib.sha256(data).hexdigest()
        if self.corrupt_downloads:
            sha = hashlib.sha256(b"something else").hexdigest()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "X-Instaclone-SHA256": sha})
        resp.content_length = len(data)
        await resp.prepare(request)
        for i in range(0, len(data), 1 << 16):
            await resp.write(data[i:i + (1 << 16)])
        await resp.write_eof()
        return resp


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[tuple[Guest, Path]]:
    g = Guest()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/v1/clones/{name}/exec", g.exec)
    app.router.add_put("/v1/clones/{name}/files", g.put)
    app.router.add_get("/v1/clones/{name}/files", g.get)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "api.sock"
    await web.UnixSite(runner, str(sock)).start()
    yield g, sock
    await runner.cleanup()


async def run(sock: Path, *args: str, stdin: bytes | None = None, cwd: Path | None = None) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--socket", str(sock), *args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    assert "Traceback" not in err.decode(), err.decode()
    return proc.returncode, out, err.decode()


async def test_exec_streams_and_exits_with_the_commands_status(guest: tuple[Guest, Path]) -> None:
    g, sock = guest
    proc = await asyncio.create_subprocess_exec(*CLI, "--socket", str(sock), "exec", "c1", "--", "slow", "-x",
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    got_first = time.monotonic()
    assert first == b"first\n"
    rest, err = await proc.communicate()
    # The first chunk came as it was sent, a second before the command ended.
    assert time.monotonic() - got_first > 0.7
    assert (proc.returncode, rest, err) == (3, b"second\n", b"oops\n")
    assert g.execs[-1]["argv"] == ["slow", "-x"]


async def test_exec_options_stdin_env_timeout(guest: tuple[Guest, Path]) -> None:
    g, sock = guest
    rc, out, err = await run(sock, "exec", "-i", "c1", "--", "cat", stdin=b"\x00binary\xffdata")
    assert (rc, out) == (0, b"\x00binary\xffdata"), err
    rc, out, err = await run(sock, "exec", "--env", "A=1", "c1", "--env", "B=x=y", "--timeout", "7", "--", "env")
    assert (rc, out.decode()) == (0, "A=1\nB=x=y\ntimeout=7.0\n"), err
    # Options after CLONE but before "--", and a command without "--".
    rc, out, _ = await run(sock, "exec", "c1", "echo", "hi")
    assert (rc, out) == (0, b"echo hi\n")
    assert "stdin" not in g.execs[-1]


async def test_exec_exit_statuses_of_its_own(guest: tuple[Guest, Path], tmp_path: Path) -> None:
    _, sock = guest
    rc, _, err = await run(sock, "exec", "c1", "--", "killed")
    assert rc == 128 + 9, err
    rc, _, err = await run(sock, "exec", "c1", "--timeout", "2", "--", "hang")
    assert rc == 124 and "killed after 2" in err and "exec_timeout" in err
    rc, _, err = await run(sock, "exec", "noagent", "--", "true")
    assert rc == 125 and "agent_unavailable" in err and "qemu-guest-agent" in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = await run(sock, "exec", "nosuch", "--", "true")
    assert rc == 125 and "not_found" in err
    rc, _, err = await run(tmp_path / "none.sock", "exec", "c1", "--", "true")
    assert rc == 125 and "cannot reach instacloned" in err
    rc, _, err = await run(sock, "exec", "c1", "--env", "novalue", "--", "true")
    assert rc == 2 and "K=V" not in err and "KEY=VALUE" in err


async def test_cp_both_ways_with_checks(guest: tuple[Guest, Path], tmp_path: Path) -> None:
    g, sock = guest
    big = os.urandom(3 << 20) + b"tail"
    src = tmp_path / "blob.bin"
    src.write_bytes(big)
    src.chmod(0o750)
    rc, _, err = await run(sock, "cp", str(src), "c1:/tmp/blob.bin")
    assert rc == 0, err
    assert g.files["/tmp/blob.bin"] == (big, "0750")
    # A directory as the guest side takes the file's name; stdin needs a name.
    rc, _, err = await run(sock, "cp", str(src), "c1:/tmp/")
    assert rc == 0 and g.files["/tmp/blob.bin"][0] == big, err
    rc, _, err = await run(sock, "cp", "-", "c1:/tmp/from-stdin", stdin=b"piped\n")
    assert rc == 0 and g.files["/tmp/from-stdin"] == (b"piped\n", "0644"), err
    # Out again: to a file, into a directory (the source's basename), to stdout.
    out_file = tmp_path / "back.bin"
    rc, _, err = await run(sock, "cp", "c1:/tmp/blob.bin", str(out_file))
    assert rc == 0 and out_file.read_bytes() == big, err
    outdir = tmp_path / "d"
    outdir.mkdir()
    rc, _, err = await run(sock, "cp", "c1:/etc/hostname", str(outdir))
    assert rc == 0 and (outdir / "hostname").read_bytes() == b"c1\n", err
    rc, out, err = await run(sock, "cp", "c1:/tmp/blob.bin", "-")
    assert rc == 0 and out == big, err
    rc, out, err = await run(sock, "-o", "json", "cp", "c1:/etc/hostname", str(outdir / "h2"))
    assert rc == 0 and json.loads(out)["sha256"] == hashlib.sha256(b"c1\n").hexdigest(), err


async def test_cp_errors(guest: tuple[Guest, Path], tmp_path: Path) -> None:
    g, sock = guest
    rc, _, err = await run(sock, "cp", str(tmp_path), "c1:/tmp/x")
    assert rc == 2 and "is a directory" in err
    rc, _, err = await run(sock, "cp", "c1:/tmp", str(tmp_path / "t"))
    assert rc == 1 and "guest_file_error" in err
    rc, _, err = await run(sock, "cp", "c1:/nope", str(tmp_path / "n"))
    assert rc == 1 and "guest_file_not_found" in err and not (tmp_path / "n").exists()
    (tmp_path / "f").write_bytes(b"x")
    rc, _, err = await run(sock, "cp", str(tmp_path / "f"), "c1:/no/dir/f")
    assert rc == 1 and "guest_file_not_found" in err
    rc, _, err = await run(sock, "cp", str(tmp_path / "f"), "c1:relative")
    assert rc == 2 and "name a clone" in err  # not CLONE:/abs: two local paths
    rc, _, err = await run(sock, "cp", "c1:/a", "c1:/b")
    assert rc == 2 and "one side must be local" in err
    rc, _, err = await run(sock, "cp", "-", "c1:/tmp/", stdin=b"")
    assert rc == 2 and "name the file" in err
    rc, _, err = await run(sock, "cp", str(tmp_path / "f"), "noagent:/tmp/f")
    assert rc == 1 and "agent_unavailable" in err
    # A download whose bytes do not match the guest's checksum: an error, and the target untouched.
    target = tmp_path / "keep"
    target.write_bytes(b"old")
    g.corrupt_downloads = True
    rc, _, err = await run(sock, "cp", "c1:/etc/hostname", str(target))
    assert rc == 1 and "checksum" in err.lower() and target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".keep")) == []
