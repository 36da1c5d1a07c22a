"""A fake server of the shared exec/files protocol (``/v1/clones/{name}/exec`` and ``/files``).

It answers exactly as the common protocol says (NDJSON exec stream; PUT/GET files with
X-Instaclone-SHA256), plus misbehaviours a real daemon must never show, so that the
client's tests see it catch them; the client page's examples run against it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from aiohttp import web

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
