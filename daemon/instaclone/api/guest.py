"""Handlers: commands and files inside a clone (``/v1/clones/{name}/exec``, ``/v1/clones/{name}/files``).

All three need write access, the GET included (reading any file of a guest
as root is no less than running a command there); each call is logged with
its peer. Bodies are validated here by hand; the app's 64 KiB body limit
does not fit these routes, so each reads ``request.content`` itself: an
exec body up to MAX_EXEC_BODY_BYTES, a file up to MAX_FILE_BYTES, streamed
to the guest in chunks and never held whole.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from typing import Any

from aiohttp import web

from ..errors import BodyTooLarge, Forbidden, InstacloneError, InvalidRequest
from .access import ACCESS
from .common import ENGINE, PEER, log, unknown_fields

#: Largest stdin of an exec, decoded.
MAX_STDIN_BYTES = 8 << 20
#: Largest exec request body (the stdin's base64 and the rest).
MAX_EXEC_BODY_BYTES = MAX_STDIN_BYTES * 4 // 3 + (1 << 20)
#: Largest file put.
MAX_FILE_BYTES = 4 << 30
MAX_ARGV = 4096
MAX_TIMEOUT_S = 86400.0
DEFAULT_TIMEOUT_S = 300.0
SHA_HEADER = "X-Instaclone-SHA256"
_MODE = re.compile(r"0?[0-7]{3}|[0-7]{4}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _require_write(request: web.Request) -> None:
    """Forbidden unless the caller may write (the access middleware lets a GET through on read access)."""
    peer: Any = request.get(PEER)
    if not request.app[ACCESS].allows(peer, write=True):
        who = f"uid {peer['uid']}" if peer else "an unidentified caller"
        log.warning("api.forbidden", method=request.method, path=request.path, peer=peer)
        raise Forbidden(f"{who} may not change anything here: write access needs root or membership in "
                        f"access.write_groups")


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise InvalidRequest(f"{what} must not contain a NUL character")
    return value


def parse_exec(data: dict[str, Any]) -> dict[str, Any]:
    """An exec body as ``guest_exec``'s keyword arguments; raises InvalidRequest."""
    unknown_fields(data, {"argv", "env", "timeout_s", "stdin"})
    argv = data.get("argv")
    if not isinstance(argv, list) or not 1 <= len(argv) <= MAX_ARGV:
        raise InvalidRequest(f"argv must be a list of 1 to {MAX_ARGV} strings")
    argv = [_string(a, f"argv[{i}]") for i, a in enumerate(argv)]
    if not argv[0]:
        raise InvalidRequest("argv[0] (the program) must not be empty")
    env = data.get("env")
    if env is not None:
        if not isinstance(env, dict):
            raise InvalidRequest("env must be an object of string values")
        for k, v in env.items():
            _string(v, f"env[{k!r}]")
            if not k or "=" in k or "\0" in k:
                raise InvalidRequest(f"env name {k!r} must be non-empty, without '=' or NUL")
    timeout = data.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise InvalidRequest(f"timeout_s must be a number of seconds, more than 0 and at most {MAX_TIMEOUT_S:g}")
    stdin = data.get("stdin")
    raw: bytes | None = None
    if stdin is not None:
        try:
            raw = base64.b64decode(_string(stdin, "stdin"), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("stdin must be base64") from None
        if len(raw) > MAX_STDIN_BYTES:
            raise BodyTooLarge(f"stdin is larger than {MAX_STDIN_BYTES} bytes")
    return {"argv": argv, "env": env, "timeout_s": float(timeout), "stdin": raw}


def parse_path(request: web.Request) -> str:
    """The ``path`` query parameter: an absolute path of a file; raises InvalidRequest."""
    path = request.query.get("path")
    if not path:
        raise InvalidRequest("path is required (?path=/absolute/path/in/the/guest)")
    _string(path, "path")
    if not path.startswith("/") or path.endswith("/") or any(p in ("", ".", "..") for p in path[1:].split("/")):
        raise InvalidRequest(f"path must be an absolute path of a file, without '.', '..' or '//', got {path!r}")
    return path


def parse_mode(request: web.Request) -> str:
    """The ``mode`` query parameter (octal, default 0644) as four digits; raises InvalidRequest."""
    mode = request.query.get("mode", "0644")
    if not _MODE.fullmatch(mode):
        raise InvalidRequest(f"mode must be an octal file mode such as 0644, got {mode!r}")
    return mode.zfill(4)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body is larger than {limit} bytes")
    buf = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
    return bytes(buf)


async def exec_in_clone(request: web.Request) -> web.StreamResponse:
    """Run a command in a clone; its output as NDJSON lines (see OPENAPI_PATHS)."""
    name = request.match_info["name"]
    _require_write(request)
    try:
        data = json.loads(await _read_limited(request, MAX_EXEC_BODY_BYTES) or b"{}")
    except web.RequestPayloadError as exc:
        raise InvalidRequest(f"request body could not be decoded: {exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    args = parse_exec(data)
    proc = await request.app[ENGINE].guest_exec(name, **args)
    log.info("api.exec", clone=name, argv0=args["argv"][0], pid=proc.pid, peer=request.get(PEER))
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
    try:
        await resp.prepare(request)
        async with aclosing(proc.events()) as events:
            async for ev in events:
                if "data" in ev:
                    ev = {**ev, "data": base64.b64encode(ev["data"]).decode()}
                await resp.write(json.dumps(ev).encode() + b"\n")
        with suppress(ConnectionError):
            await resp.write_eof()
    except ConnectionError:
        log.info("api.exec_client_gone", clone=name, pid=proc.pid)
    except InstacloneError as exc:  # the guest failed mid-stream: the stream's last line says so
        log.warning("api.exec_failed", clone=name, pid=proc.pid, error=exc.message)
        with suppress(ConnectionError):
            await resp.write(json.dumps({"type": "error", "error": {"code": exc.code, "message": exc.message}})
                             .encode() + b"\n")
            await resp.write_eof()
    finally:
        await proc.close()
    return resp


async def put_file(request: web.Request) -> web.Response:
    """Write the body to a file in a clone, verified in the guest (see OPENAPI_PATHS)."""
    name = request.match_info["name"]
    _require_write(request)
    path, mode = parse_path(request), parse_mode(request)
    want = request.headers.get(SHA_HEADER)
    if want is not None and not _HEX64.fullmatch(want):
        raise InvalidRequest(f"{SHA_HEADER} must be 64 hex digits (a sha256)")
    if request.content_length is not None and request.content_length > MAX_FILE_BYTES:
        raise BodyTooLarge(f"a file may have at most {MAX_FILE_BYTES} bytes")

    async def body() -> AsyncIterator[bytes]:
        total = 0
        try:
            async for chunk in request.content.iter_chunked(1 << 20):
                total += len(chunk)
                if total > MAX_FILE_BYTES:
                    raise BodyTooLarge(f"a file may have at most {MAX_FILE_BYTES} bytes")
                yield chunk
        except web.RequestPayloadError as exc:
            raise InvalidRequest(f"request body could not be read: {exc}") from None

    result = await request.app[ENGINE].put_guest_file(name, path=path, mode=mode, chunks=body(), sha256=want)
    log.info("api.file_put", clone=name, path=path, bytes=result["bytes"], peer=request.get(PEER))
    return web.json_response({"file": result})


async def get_file(request: web.Request) -> web.StreamResponse:
    """A clone's file as the body, with its size and sha256 in the headers (see OPENAPI_PATHS)."""
    name = request.match_info["name"]
    _require_write(request)
    path = parse_path(request)
    reader = await request.app[ENGINE].open_guest_file(name, path=path)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", SHA_HEADER: reader.sha256,
                                       "Cache-Control": "no-store"})
    resp.content_length = reader.size
    sent = 0
    try:
        await resp.prepare(request)
        async with aclosing(reader.chunks()) as chunks:
            async for chunk in chunks:
                await resp.write(chunk)
                sent += len(chunk)
        await resp.write_eof()
    except ConnectionError:
        pass
    except InstacloneError as exc:
        # Too late for an error answer: the connection is cut short, so the
        # client sees fewer bytes than Content-Length.
        log.warning("api.file_get_failed", clone=name, path=path, error=exc.message)
        if request.transport is not None:
            request.transport.close()
    finally:
        await reader.close()
        log.info("api.file_get", clone=name, path=path, bytes=sent, size=reader.size, peer=request.get(PEER))
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/clones/{name}/exec", exec_in_clone)
    app.router.add_put("/v1/clones/{name}/files", put_file)
    app.router.add_get("/v1/clones/{name}/files", get_file, allow_head=False)


_ERR = {"$ref": "#/components/schemas/Error"}
_CLONE = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_PATH = {"name": "path", "in": "query", "required": True, "schema": {"type": "string"},
         "description": "absolute path in the guest"}


def _errors(*codes: tuple[int, str]) -> dict[str, Any]:
    return {str(s): {"description": d, "content": {"application/json": {"schema": _ERR}}} for s, d in codes}


#: The OpenAPI description of these routes (``paths`` entries), for the API's document.
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/clones/{name}/exec": {"post": {
        "summary": "Run a command in a clone through its guest agent (write access)",
        "parameters": [_CLONE],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "required": ["argv"],
            "properties": {
                "argv": {"type": "array", "minItems": 1, "maxItems": MAX_ARGV, "items": {"type": "string"}},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S,
                              "default": DEFAULT_TIMEOUT_S},
                "stdin": {"type": "string", "format": "byte", "description": f"base64, up to {MAX_STDIN_BYTES} "
                                                                             "bytes decoded"}}}}}},
        "responses": {
            "200": {"description": "NDJSON, one object per line: started {pid}; stdout/stderr {data: base64} as "
                                   "they come; last exit {exit_code, signal, duration_ms} or error {error: "
                                   "{code, message}} (code exec_timeout: killed after timeout_s)",
                    "content": {"application/x-ndjson": {"schema": {"type": "object", "required": ["type"],
                                                                     "properties": {"type": {"type": "string", "enum": [
                                                                         "started", "stdout", "stderr", "exit",
                                                                         "error"]}}}}}},
            **_errors((400, "invalid_request"), (403, "forbidden"), (404, "not_found: no such clone"),
                      (409, "agent_unavailable, domain_state_invalid"), (413, "body_too_large"))}}},
    "/v1/clones/{name}/files": {
        "put": {
            "summary": "Write a file in a clone (temp name, size and sha256 checked in the guest, renamed)",
            "parameters": [_CLONE, _PATH,
                           {"name": "mode", "in": "query", "schema": {"type": "string", "default": "0644"}},
                           {"name": SHA_HEADER, "in": "header", "schema": {"type": "string"},
                            "description": "sha256 of the body, checked"}],
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {
                "200": {"description": "written", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"file": {"type": "object", "properties": {
                        "path": {"type": "string"}, "bytes": {"type": "integer"}, "sha256": {"type": "string"},
                        "mode": {"type": "string"}}}}}}}},
                **_errors((400, "invalid_request"), (403, "forbidden"),
                          (404, "not_found, guest_file_not_found: no such directory"),
                          (409, "agent_unavailable, guest_file_error, domain_state_invalid"),
                          (413, "body_too_large"), (422, "checksum_mismatch"))}},
        "get": {
            "summary": "Read a file of a clone (write access); size and sha256 in the headers",
            "parameters": [_CLONE, _PATH],
            "responses": {
                "200": {"description": f"the file; Content-Length and {SHA_HEADER} taken in the guest",
                        "headers": {SHA_HEADER: {"schema": {"type": "string"}}},
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors((400, "invalid_request"), (403, "forbidden"),
                          (404, "not_found, guest_file_not_found"),
                          (409, "agent_unavailable, guest_file_error, domain_state_invalid"))}}},
}
