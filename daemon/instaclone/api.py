"""Control API: HTTP+JSON on a Unix socket, versioned under /v1.

Every error is a JSON body ``{"error": {"code", "message", ...}}`` with a 4xx
or 5xx status; a bug gives a 500 with a generic message (details go to the
log), never a traceback to the client.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Awaitable, Callable

from aiohttp import web

from . import __version__
from .engine import Engine
from .errors import BodyTooLarge, InstacloneError, InvalidRequest, NotFound
from .journal import Journal
from .log import get as get_logger

MAX_BODY_BYTES = 64 * 1024
MAX_WAIT_S = 600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENGINE = web.AppKey("engine", Engine)
JOURNAL = web.AppKey("journal", Journal)
PEER = web.RequestKey("peer", dict)

log = get_logger(component="api")


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InstacloneError as exc:
        return web.json_response({"error": exc.to_dict()}, status=exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        return _error(exc.status, code, exc.reason)
    except Exception:
        log.exception("api.unhandled", path=request.path, method=request.method)
        return _error(500, "internal_error", "internal error; see the daemon log")


@web.middleware
async def peer_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identify the caller by SO_PEERCRED (pid, uid, gid) for the log."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
            request[PEER] = {"pid": pid, "uid": uid, "gid": gid}
        except OSError:
            pass
    return await handler(request)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    raw = await request.read()
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def _wait_param(request: web.Request) -> float:
    raw = request.query.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        raise InvalidRequest(f"wait must be a number of seconds, got {raw!r}") from None
    if not 0 <= wait <= MAX_WAIT_S:
        raise InvalidRequest(f"wait must be between 0 and {MAX_WAIT_S:g} seconds")
    return wait


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({
        "version": __version__,
        "libvirt_connected": await engine.virt.is_connected(),
        "active_jobs": engine.active_jobs,
        "accepting": engine.accepting,
        "storage_backend": engine.storage.name,
        "memory_backend": engine.memory.name,
    })


async def create_job(request: web.Request) -> web.Response:
    body = await _body(request)
    allowed = {"source", "name", "count", "keep_network", "customize", "config"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    if "source" not in body or "name" not in body:
        raise InvalidRequest("fields 'source' and 'name' are required")
    engine = request.app[ENGINE]
    peer = request.get(PEER)
    job = await engine.submit(source=body["source"], name=body["name"], count=body.get("count", 1),
                              keep_network=body.get("keep_network", False),
                              customize=body.get("customize", True), config=body.get("config"))
    log.info("api.clone_requested", job_id=job.id, source=job.source, peer=peer)
    wait = _wait_param(request)
    if wait:
        await engine.wait(job.id, wait)
        job = await request.app[JOURNAL].get_job(job.id) or job
    return web.json_response({"job": job.to_dict()}, status=202 if not job.state.terminal else 201)


async def list_jobs(request: web.Request) -> web.Response:
    jobs = await request.app[JOURNAL].list_jobs()
    return web.json_response({"jobs": [j.to_dict() for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    wait = _wait_param(request)
    if wait:
        await request.app[ENGINE].wait(job_id, wait)
    job = await request.app[JOURNAL].get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return web.json_response({"job": job.to_dict()})


async def list_clones(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    out = []
    for c in await request.app[JOURNAL].list_clones():
        d = c.to_dict()
        try:
            d["state"] = await engine.virt.state(c.name)
        except InstacloneError:
            d["state"] = "missing"
        out.append(d)
    return web.json_response({"clones": out})


async def destroy_clone(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    rec = await request.app[ENGINE].destroy_clone(name)
    log.info("api.clone_destroyed", clone=name, peer=request.get(PEER))
    return web.json_response({"destroyed": rec.to_dict()})


async def freeze(request: web.Request) -> web.Response:
    entry = await request.app[ENGINE].freeze(request.match_info["name"])
    log.info("api.frozen", source=entry["name"], peer=request.get(PEER))
    return web.json_response({"frozen": entry})


async def unfreeze(request: web.Request) -> web.Response:
    entry = await request.app[ENGINE].unfreeze(request.match_info["name"])
    log.info("api.unfrozen", source=entry["name"], peer=request.get(PEER))
    return web.json_response({"unfrozen": entry})


async def list_frozen(request: web.Request) -> web.Response:
    return web.json_response({"frozen": list((await request.app[JOURNAL].frozen()).values())})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


def make_app(engine: Engine, journal: Journal) -> web.Application:
    app = web.Application(middlewares=[errors_as_json, peer_credentials], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[JOURNAL] = journal
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_post("/v1/jobs", create_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_get("/v1/clones", list_clones)
    app.router.add_delete("/v1/clones/{name}", destroy_clone)
    app.router.add_get("/v1/frozen", list_frozen)
    app.router.add_post("/v1/sources/{name}/freeze", freeze)
    app.router.add_post("/v1/sources/{name}/unfreeze", unfreeze)
    return app


_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "instaclone control API", "version": __version__},
    "paths": {
        "/v1/health": {"get": {"responses": {"200": {"description": "daemon status"}}}},
        "/v1/jobs": {
            "get": {"responses": {"200": {"description": "jobs, newest first"}}},
            "post": {
                "parameters": [{"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0,
                                                                           "maximum": MAX_WAIT_S}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "required": ["source", "name"],
                    "properties": {
                        "source": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"},
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"},
                        "count": {"type": "integer", "minimum": 1},
                        "keep_network": {"type": "boolean"},
                        "customize": {"type": "boolean"},
                        "config": {"type": "object", "additionalProperties": {"type": "string"}},
                    }}}}},
                "responses": {"201": {"description": "job finished"}, "202": {"description": "job accepted"},
                              "400": _ERR, "404": _ERR, "409": _ERR},
            },
        },
        "/v1/jobs/{job_id}": {"get": {
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "one job"}, "404": _ERR}}},
        "/v1/clones": {"get": {"responses": {"200": {"description": "clones made by instaclone"}}}},
        "/v1/frozen": {"get": {"responses": {"200": {"description": "frozen sources"}}}},
        "/v1/sources/{name}/freeze": {"post": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "frozen"}, "404": _ERR, "409": _ERR}}},
        "/v1/sources/{name}/unfreeze": {"post": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "unfrozen"}, "404": _ERR}}},
        "/v1/clones/{name}": {"delete": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "destroyed"}, "404": _ERR}}},
    },
    "components": {"schemas": {"Error": {"type": "object", "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "step": {"type": "string"}}}}}}},
}
