"""Handlers: commands and files inside a clone (``/v1/clones/{name}/exec``, ``/v1/clones/{name}/files``).

All three need write access, the GET included (reading any file of a guest
as root is no less than running a command there: its route says
``needs_write``); each call is logged with its peer. The app's 64 KiB body
limit does not fit these routes: an exec body may carry up to
MAX_STDIN_BYTES of stdin, and a file up to MAX_FILE_BYTES is streamed to the
guest in chunks and never held whole.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from typing import Annotated, Any

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..errors import BodyTooLarge, InstacloneError, InvalidRequest
from ..requests import ExecRequest, GetFileRequest, PutFileRequest
from . import models as m
from .common import ENGINE, PEER, log
from .owners import own_clone
from .routes import CLONE_NOT_FOUND, LIBVIRT_DOWN, Call, RawBody, Reply, Route

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

#: An absolute file path: components without NUL, none empty, "." or ".." (no look-arounds: see
#: models.NAME_PATTERN).
PATH_PATTERN = r"^(?:/(?:[^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+))+$"
#: Standard base64 (what the stdin field carries).
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

Arg = Annotated[str, Field(pattern=r"^[^\x00]*$")]
EnvName = Annotated[str, Field(min_length=1, pattern=r"^[^=\x00]+$")]


def _program(argv: list[str]) -> list[str]:
    if not argv[0]:
        raise ValueError("argv[0] (the program) must not be empty")
    return argv


def _stdin(text: str) -> bytes:
    raw = base64.b64decode(text, validate=True)  # the pattern has made sure it decodes
    if len(raw) > MAX_STDIN_BYTES:
        raise BodyTooLarge(f"stdin is larger than {MAX_STDIN_BYTES} bytes")
    return raw


def _env_schema(schema: dict[str, Any]) -> None:
    """pydantic renders constrained keys as patternProperties, which lets other keys through: say
    the key rule as propertyNames, so the document refuses what the server refuses."""
    schema.pop("patternProperties", None)
    schema["propertyNames"] = {"minLength": 1, "pattern": r"^[^=\x00]+$"}
    schema["additionalProperties"] = {"type": "string", "pattern": r"^[^\x00]*$"}


class ExecBody(m.Body):
    """``POST /v1/clones/{name}/exec``: run ``argv`` in the clone."""

    argv: Annotated[list[Arg], Field(min_length=1, max_length=MAX_ARGV,
                                     json_schema_extra={"prefixItems": [{"type": "string", "minLength": 1,
                                                                      "pattern": r"^[^\x00]*$"}]},
                                     description="the program and its arguments (argv[0] not empty)"),
                    AfterValidator(_program)]
    env: dict[EnvName, Arg] | m.Absent = Field(None, description="added to a standard PATH",
                                               json_schema_extra=_env_schema)
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False,
                             description="seconds; past it the command is killed (stream error exec_timeout)")
    stdin: Annotated[str, Field(pattern=BASE64_PATTERN, max_length=(MAX_STDIN_BYTES + 2) // 3 * 4,
                                description=f"the command's stdin, base64 (at most {MAX_STDIN_BYTES} bytes "
                                            "decoded)")] | m.Absent = None
    NOT_NULL = frozenset({"env", "stdin"})

    def to_request(self, clone: str) -> ExecRequest:
        """The engine's record of this command for clone ``clone``."""
        return ExecRequest(clone=clone, argv=tuple(self.argv), env=self.env, timeout_s=self.timeout_s,
                           stdin=_stdin(self.stdin) if self.stdin is not None else None)


class FileQuery(m.Query):
    path: str = Field(pattern=PATH_PATTERN, max_length=4096,
                      description="absolute path of a file in the guest (no '.', '..' or '//')")

    def to_request(self, clone: str) -> GetFileRequest:
        """The engine's record of a read of this file of clone ``clone``."""
        return GetFileRequest(clone=clone, path=self.path)


class PutFileQuery(FileQuery):
    mode: str = Field("0644", pattern=r"^(?:0?[0-7]{3}|[0-7]{4})$", description="octal file mode")

    def to_put_request(self, clone: str, *, sha256: str | None) -> PutFileRequest:
        """The engine's record of a write of this file of clone ``clone`` (``sha256``: the header's)."""
        return PutFileRequest(clone=clone, path=self.path, mode=self.mode, sha256=sha256)


class ShaHeader(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True, extra="ignore")
    sha256: str | None = Field(None, alias="X-Instaclone-SHA256", pattern=r"^[0-9a-fA-F]{64}$",
                               description="sha256 of the body (hex): the server checks the body against it")


async def exec_in_clone(request: web.Request, call: Call) -> web.StreamResponse:
    """Run a command in a clone; its output as NDJSON lines (see ROUTES)."""
    name = call.path_as(m.ClonePath).name
    req = call.body_as(ExecBody).to_request(name)
    await own_clone(request, name)
    proc = await request.app[ENGINE].guest_exec(req)
    log.info("api.exec", clone=name, argv0=req.argv[0], pid=proc.pid, peer=request.get(PEER))
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


async def put_file(request: web.Request, call: Call) -> web.Response:
    """Write the body to a file in a clone, verified in the guest (see ROUTES)."""
    name = call.path_as(m.ClonePath).name
    req = call.query_as(PutFileQuery).to_put_request(name, sha256=call.headers_as(ShaHeader).sha256)
    path = req.path
    await own_clone(request, name)

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

    result = await request.app[ENGINE].put_guest_file(req, body())
    log.info("api.file_put", clone=name, path=path, bytes=result["bytes"], peer=request.get(PEER))
    return web.json_response({"file": result})


async def get_file(request: web.Request, call: Call) -> web.StreamResponse:
    """A clone's file as the body, with its size and sha256 in the headers (see ROUTES)."""
    name = call.path_as(m.ClonePath).name
    req = call.query_as(FileQuery).to_request(name)
    path = req.path
    await own_clone(request, name)
    reader = await request.app[ENGINE].open_guest_file(req)
    if request.method == "HEAD":  # the size and checksum, without reading the file
        await reader.close()
        head = web.StreamResponse(headers={"Content-Type": "application/octet-stream", SHA_HEADER: reader.sha256})
        head.content_length = reader.size
        await head.prepare(request)
        await head.write_eof()
        return head
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


_ERRORS = {
    404: CLONE_NOT_FOUND,
    409: "agent_unavailable (no guest agent channel, or it does not answer), domain_state_invalid (not running), "
         "domain_replaced (another domain has the gone clone's name)",
    500: "libvirt_error: the hypervisor failed (see the message and the daemon log)",
    503: LIBVIRT_DOWN,
}
_FILE_ERRORS = {**_ERRORS, 404: f"{CLONE_NOT_FOUND}, guest_file_not_found (no such file or directory)",
                409: _ERRORS[409] + ", guest_file_error (permission denied, a directory, ...)"}
_SHA = {SHA_HEADER: {"schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                     "description": "sha256 of the file, taken in the guest before it is read"}}
_LINE = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["started", "stdout", "stderr", "exit", "error"]},
    "pid": {"type": "integer"}, "data": {"type": "string", "contentEncoding": "base64"},
    "exit_code": {"type": "integer"}, "signal": {"type": ["integer", "null"]}, "duration_ms": {"type": "number"},
    "error": {"type": "object", "required": ["code", "message"],
              "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
_FILE = {"type": "object", "required": ["file"], "properties": {"file": {
    "type": "object", "required": ["path", "bytes", "sha256", "mode"], "properties": {
        "path": {"type": "string"}, "bytes": {"type": "integer"}, "sha256": {"type": "string"},
        "mode": {"type": "string"}}}}}

ROUTES = [
    Route("POST", "/v1/clones/{name}/exec", exec_in_clone, "run a command in a clone through its guest agent",
          description="Answers NDJSON, one object per line: `started` {pid}; `stdout`/`stderr` {data: base64} "
                      "as they come; last `exit` {exit_code, signal, duration_ms} or `error` {error: {code, "
                      "message}} (code exec_timeout: killed after timeout_s).",
          ok={200: Reply("the command's output and exit, one JSON object per line", _LINE,
                         media_type="application/x-ndjson")},
          errors=_ERRORS, path_params=m.ClonePath, body=ExecBody, body_max_bytes=MAX_EXEC_BODY_BYTES,
          operation_id="exec_in_clone"),
    Route("PUT", "/v1/clones/{name}/files", put_file, "write a file in a clone",
          description="Written to a temp name beside the path, its size and sha256 checked in the guest, "
                      "then renamed onto the path.",
          ok={200: Reply("written and verified", _FILE)},
          errors={**_FILE_ERRORS, 422: "checksum_mismatch (the body differs from the header, or the guest's "
                                       "copy from the body)"},
          path_params=m.ClonePath, query=PutFileQuery, headers=ShaHeader,
          body=RawBody(max_bytes=MAX_FILE_BYTES, description="the file's bytes"), operation_id="put_clone_file"),
    Route("GET", "/v1/clones/{name}/files", get_file, "read a file of a clone (needs write access)",
          ok={200: Reply("the file's bytes", {"type": "string", "format": "binary"},
                         media_type="application/octet-stream", headers=_SHA)},
          errors=_FILE_ERRORS, path_params=m.ClonePath, query=FileQuery, needs_write=True,
          operation_id="get_clone_file"),
]
