"""Control API: HTTP+JSON on a Unix socket, versioned under /v1.

Every error is a JSON body ``{"error": {"code", "message", ...}}`` with a 4xx
or 5xx status; a bug gives a 500 with a generic message (details go to the
log), never a traceback to the client.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import socket
import struct
from contextlib import suppress
from typing import Any, Awaitable, Callable

from aiohttp import web

from . import __version__, events, identity, journal as jr, preflight
from .engine import Engine
from .config import AccessConfig
from .errors import (BodyTooLarge, DomainNotFound, Forbidden, InstacloneError, InvalidRequest, NotFound,
                     SourceNotFound)
from .journal import Event, Journal
from .log import get as get_logger
from .metrics import Metrics
from .webhooks import WebhookSender

MAX_BODY_BYTES = 64 * 1024
MAX_WAIT_S = 600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENGINE = web.AppKey("engine", Engine)
JOURNAL = web.AppKey("journal", Journal)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
SUBSCRIBERS = web.AppKey("subscribers", set)
CLOSING = web.AppKey("closing", asyncio.Event)
PEER = web.RequestKey("peer", object)

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


class Access:
    """Who may call what, decided from the caller's SO_PEERCRED credentials.

    root and the daemon's own user may do anything; members of a write group
    may also mutate (POST, DELETE); members of a read group may read. With no
    read groups configured, anyone who can open the socket may read: the
    socket's mode and group are then the read gate.
    """

    def __init__(self, config: AccessConfig) -> None:
        self.write_gids = _gids(config.write_groups, "access.write_groups")
        self.read_gids = _gids(config.read_groups, "access.read_groups")
        self.open_read = not config.read_groups
        self.own_uid = os.getuid()

    def allows(self, peer: dict[str, Any] | None, *, write: bool) -> bool:
        if peer is None:
            return not write and self.open_read
        if peer["uid"] in (0, self.own_uid):
            return True
        groups = set(peer["groups"])
        if groups & self.write_gids:
            return True
        return not write and (self.open_read or bool(groups & self.read_gids))


ACCESS = web.AppKey("access", Access)


def _gids(names: tuple[str, ...], key: str) -> set[int]:
    out = set()
    for n in names:
        try:
            out.add(grp.getgrnam(n).gr_gid)
        except KeyError:
            log.warning("access.unknown_group", key=key, group=n)
    return out


def _peer(request: web.Request) -> dict[str, Any] | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except OSError:
        return None
    groups = {gid}
    try:  # supplementary groups: SO_PEERCRED carries only the primary one
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return {"pid": pid, "uid": uid, "gid": gid, "groups": sorted(groups)}


_MUTATING = ("POST", "PUT", "PATCH", "DELETE")


@web.middleware
async def peer_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identify the caller (SO_PEERCRED), enforce read/write access, log every mutating call."""
    peer = _peer(request)
    request[PEER] = peer
    write = request.method in _MUTATING
    if not request.app[ACCESS].allows(peer, write=write):
        who = f"uid {peer['uid']}" if peer else "an unidentified caller"
        log.warning("api.forbidden", method=request.method, path=request.path, peer=peer)
        raise Forbidden(f"{who} may not {'change' if write else 'read'} anything here: "
                        f"{'write' if write else 'read'} access needs root or membership in "
                        f"access.{'write' if write else 'read'}_groups")
    response = await handler(request)
    if write:
        log.info("api.call", method=request.method, path=request.path, status=response.status, peer=peer)
    return response


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip on a body that is not
        raise InvalidRequest(f"request body could not be decoded: {exc}") from None
    try:
        data = json.loads(raw or b"{}")
    except RecursionError:
        raise InvalidRequest("request body is not valid JSON: nested too deeply") from None
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
        "libvirt_connected": await engine.virt.ensure_connected(),
        "active_jobs": engine.active_jobs,
        "accepting": engine.accepting,
        "storage_backend": engine.storage.name,
        "memory_backend": engine.memory.name,
    })


async def create_job(request: web.Request) -> web.Response:
    body = await _body(request)
    allowed = {"source", "name", "count", "keep_network", "customize", "config", "keep_ssh_host_keys", "script"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    if "source" not in body or "name" not in body:
        raise InvalidRequest("fields 'source' and 'name' are required")
    engine = request.app[ENGINE]
    peer = request.get(PEER)
    wait = _wait_param(request)  # before submit: a refused request must not start a job
    job = await engine.submit(source=body["source"], name=body["name"], count=body.get("count", 1),
                              keep_network=body.get("keep_network", False),
                              customize=body.get("customize", True), config=body.get("config"),
                              keep_ssh_host_keys=body.get("keep_ssh_host_keys"), script=body.get("script"))
    log.info("api.clone_requested", job_id=job.id, source=job.source, peer=peer)
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


#: How long ``check`` waits for the source's guest agent to answer guest-ping.
AGENT_PING_S = 3


async def _source_facts(request: web.Request, name: str) -> tuple[preflight.Facts, str]:
    """(the live facts preflight needs, the XML to check: live if the domain runs) of ``name``."""
    engine = request.app[ENGINE]
    journal = request.app[JOURNAL]
    try:
        info = await engine.virt.lookup(name)
    except DomainNotFound:
        raise SourceNotFound(f"source domain {name!r} does not exist") from None
    inactive = await engine.virt.inactive_xml(name) if info.active else None
    ping: bool | None = None
    ping_error = None
    if info.state == "running" and preflight.agent_channel(info.xml):
        try:
            await engine.virt.agent(name, "guest-ping", timeout_s=AGENT_PING_S)
            ping = True
        except InstacloneError as exc:
            ping, ping_error = False, exc.message
    depths: dict[str, int | str] = {}
    for disk in info.disks:
        if disk.readonly:
            continue
        try:
            depths[disk.target] = await engine.storage.chain_depth(path=disk.path)
        except InstacloneError as exc:
            depths[disk.target] = exc.message
        except OSError as exc:
            depths[disk.target] = str(exc)
    clone = await journal.get_clone(name)
    facts = preflight.Facts(
        state=info.state, frozen=name in await journal.frozen(), clone_of=clone.source if clone else None,
        agent_ping=ping, agent_error=ping_error, chain_depths=depths,
        max_chain_depth=engine.config.clone.max_chain_depth,
        memory_backends=[(m.name, m.can_serve(info)) for m in engine.memories],
        storage_backend=engine.storage.name, inactive_xml=inactive)
    return facts, info.xml


async def check_source(request: web.Request) -> web.Response:
    """Preflight report of a domain: per capability, ok or not and the exact change."""
    name = identity.validate_name(request.match_info["name"], what="source name")
    facts, xml = await _source_facts(request, name)
    return web.json_response({"check": preflight.check(xml, facts).to_dict()})


async def prepare_source(request: web.Request) -> web.Response:
    """Write what instant clones need into a domain's persistent definition (or, dry run, show it)."""
    body = await _body(request)
    unknown = sorted(set(body) - {"dry_run"})
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)} (allowed: dry_run)")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest("dry_run must be true or false")
    name = identity.validate_name(request.match_info["name"], what="source name")
    engine = request.app[ENGINE]
    # Under the source's lock: a clone job's disk snapshot rewrites the
    # definition's disk paths, and writing back one read before it would put
    # the source on an image its clones are backed by.
    async with engine.source_lock(name):
        try:
            info = await engine.virt.lookup(name)
            before = await engine.virt.inactive_xml(name)
        except DomainNotFound:
            raise SourceNotFound(f"source domain {name!r} does not exist") from None
        prep = preflight.prepare(before)
        after = prep.xml
        if prep.changed and not dry_run:
            await engine.virt.define(prep.xml)
            after = await engine.virt.inactive_xml(name)  # libvirt's own rendering, with what it filled in
    # What the definition has and the running domain not yet (for a dry run: before any change).
    pending = preflight.pending(info.xml, before if dry_run else after) if info.active else []
    if not prep.changed:
        note = "nothing to change" + (f"; pending until the next boot: {', '.join(pending)}" if pending else "")
    elif dry_run:
        note = "dry run: nothing was changed"
    elif info.active:
        note = (f"the changes apply at the next boot of {name}: shut it down and start it again (a reboot "
                "inside the guest is not enough); the running domain is unchanged")
    else:
        note = f"the changes apply when {name} is started"
    if prep.changed and not dry_run:
        log.info("api.source_prepared", source=name, changed=[c.split(":")[0] for c in prep.changed],
                 peer=request.get(PEER))
    return web.json_response({"prepare": {
        "source": name, "state": info.state, "dry_run": dry_run, "applied": bool(prep.changed) and not dry_run,
        **prep.to_dict(), "diff": preflight.diff(before, after, name), "pending": pending, "note": note}})


async def list_frozen(request: web.Request) -> web.Response:
    return web.json_response({"frozen": list((await request.app[JOURNAL].frozen()).values())})


def _int_param(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _type_filter(request: web.Request) -> list[str]:
    types = [t for t in request.query.get("type", "").split(",") if t]
    for t in types:
        if not events.valid_pattern(t):
            raise InvalidRequest(f"type {t!r} matches no event type (types: {', '.join(events.TYPES)})")
    return types


async def stream_events(request: web.Request) -> web.StreamResponse:
    """Events as NDJSON, one JSON object per line, oldest first.

    ``since=CURSOR`` gives the events after that cursor, else the last
    ``tail`` (default 100). With ``follow=1`` the answer stays open and new
    events follow as they are committed. Filters: ``job=ID``, ``type=T[,T...]``
    (globs such as ``clone.*``).
    """
    journal = request.app[JOURNAL]
    follow = request.query.get("follow", "0").lower() in ("1", "true", "yes")
    job_id = request.query.get("job") or None
    types = _type_filter(request)
    since = _int_param(request, "since", None, 0, 2**62)
    tail = _int_param(request, "tail", 100, 0, 10_000)
    wake = asyncio.Event()
    closing = request.app[CLOSING]
    # Taken first, so that nothing committed from here on is missed.
    async def matching(after: int | None, upto: int, limit: int) -> list[Event]:
        """Events passing the filters with ``after < cursor <= upto`` (``after=None``: the last ``limit``)."""
        return [e for e in await journal.events(since=after, job_id=job_id, types=types, limit=limit)
                if e.cursor <= upto]

    top = await journal.last_cursor()
    if since is not None:
        backlog = await matching(since, top, 100_000)
    else:
        backlog = await matching(None, top, tail) if tail else []
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
    await resp.prepare(request)
    if request.method == "HEAD":
        # A StreamResponse does not drop its body for HEAD by itself: bytes
        # after the headers would corrupt the client's next read.
        await resp.write_eof()
        return resp

    async def write(evs: list[Event]) -> None:
        if evs:
            await resp.write(b"".join(json.dumps(e.to_dict(), sort_keys=True).encode() + b"\n" for e in evs))

    await write(backlog)
    cursor = max(top, since or 0)
    if follow:
        request.app[SUBSCRIBERS].add(wake)
        try:
            while not closing.is_set() and request.transport is not None and not request.transport.is_closing():
                wake.clear()
                top = await journal.last_cursor()
                if top > cursor:
                    await write(await matching(cursor, top, 100_000))
                    cursor = top
                    continue
                waiter = asyncio.ensure_future(wake.wait())
                stopper = asyncio.ensure_future(closing.wait())
                try:
                    await asyncio.wait([waiter, stopper], timeout=15.0, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        finally:
            request.app[SUBSCRIBERS].discard(wake)
    with suppress(ConnectionError):
        await resp.write_eof()
    return resp


def _sender(request: web.Request) -> WebhookSender:
    sender = request.app.get(WEBHOOKS)
    if sender is None:
        raise NotFound("webhooks are not enabled in this daemon")
    return sender


async def list_webhooks(request: web.Request) -> web.Response:
    return web.json_response({"webhooks": await _sender(request).status()})


async def enable_webhook(request: web.Request) -> web.Response:
    sender = _sender(request)
    name = request.match_info["name"]
    if name not in sender.endpoints:
        raise NotFound(f"no webhook endpoint {name!r} in the config")
    was = await sender.enable(name)
    log.info("api.webhook_enabled", webhook=name, was_disabled=was, peer=request.get(PEER))
    return web.json_response({"webhook": name, "enabled": True, "was_disabled": was})


_DELIVERY_STATUSES = (jr.PENDING, jr.DELIVERED, jr.FAILED, jr.DISABLED)


def _status_param(value: Any) -> str | None:
    if value is None:
        return None
    if value not in _DELIVERY_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(_DELIVERY_STATUSES)}, got {value!r}")
    return str(value)


async def list_deliveries(request: web.Request) -> web.Response:
    _sender(request)
    q = request.query
    rows = await request.app[JOURNAL].list_deliveries(
        status=_status_param(q.get("status")), webhook=q.get("webhook"), job_id=q.get("job"),
        event_id=q.get("event"), limit=_int_param(request, "limit", 100, 1, 10_000) or 100)
    return web.json_response({"deliveries": [d.to_dict() for d in rows]})


async def replay_deliveries(request: web.Request) -> web.Response:
    """Queue deliveries again: by ``ids``, or by ``status``/``webhook``/``event_id``."""
    sender = _sender(request)
    body = await _body(request)
    allowed = {"ids", "status", "webhook", "event_id"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    ids = body.get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(ids) > 10_000):
        raise InvalidRequest("ids must be a list of delivery ids (integers)")
    for key in ("webhook", "event_id"):
        if key in body and not isinstance(body[key], str):
            raise InvalidRequest(f"{key} must be a string")
    if not body:
        raise InvalidRequest("say what to replay: ids, or a filter (status, webhook, event_id)")
    replayed = await request.app[JOURNAL].replay_deliveries(
        ids=ids, status=_status_param(body.get("status")), webhook=body.get("webhook"),
        event_id=body.get("event_id"))
    if ids and len(replayed) != len(set(ids)):
        missing = sorted(set(ids) - set(replayed))
        log.warning("api.replay_unknown_ids", ids=missing)
    sender.wake()
    log.info("api.deliveries_replayed", count=len(replayed), peer=request.get(PEER))
    return web.json_response({"replayed": replayed})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


def make_app(engine: Engine, journal: Journal, webhooks: WebhookSender | None = None, *,
             access: AccessConfig | None = None, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_as_json, peer_credentials], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[JOURNAL] = journal
    app[ACCESS] = Access(access if access is not None else engine.config.access)
    if metrics is not None:
        app.router.add_get("/metrics", metrics.handler())
    if webhooks is not None:
        app[WEBHOOKS] = webhooks
    subscribers: set[asyncio.Event] = set()
    app[SUBSCRIBERS] = subscribers
    app[CLOSING] = asyncio.Event()
    journal.on_event(lambda _ev: [w.set() for w in subscribers])

    async def on_shutdown(app: web.Application) -> None:
        app[CLOSING].set()

    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/v1/events", stream_events)
    app.router.add_get("/v1/webhooks", list_webhooks)
    app.router.add_post("/v1/webhooks/{name}/enable", enable_webhook)
    app.router.add_get("/v1/webhooks/deliveries", list_deliveries)
    app.router.add_post("/v1/webhooks/deliveries/replay", replay_deliveries)
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
    app.router.add_get("/v1/sources/{name}/check", check_source)
    app.router.add_post("/v1/sources/{name}/prepare", prepare_source)
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
                        "keep_ssh_host_keys": {"type": "boolean",
                                               "description": "keep the source's SSH host keys "
                                                              "(default: clone.keep_ssh_host_keys, false)"},
                        "script": {"type": "string", "minLength": 1, "maxLength": 65536,
                                   "description": "shell script run in each clone after its identity "
                                                  "reset (default: clone.customize_script)"},
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
        "/v1/sources/{name}/check": {"get": {
            "description": "preflight: per capability, whether the domain has it and the exact change",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the report", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"check": {"$ref": "#/components/schemas/Check"}}}}}},
                "400": _ERR, "404": _ERR}}},
        "/v1/sources/{name}/prepare": {"post": {
            "description": "write shared file-backed RAM, <acpi/>, a guest agent channel and <genid/> into "
                           "the persistent definition; a running domain gets them at its next boot",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"dry_run": {"type": "boolean", "default": False}}}}}},
            "responses": {"200": {"description": "what was (or would be) changed", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "prepare": {"$ref": "#/components/schemas/Prepare"}}}}}},
                "400": _ERR, "403": _ERR, "404": _ERR}}},
        "/v1/events": {"get": {
            "description": "NDJSON event stream (application/x-ndjson), oldest first",
            "parameters": [
                {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                {"name": "job", "in": "query", "schema": {"type": "string"}},
                {"name": "type", "in": "query", "schema": {"type": "string"},
                 "description": "comma-separated event types or globs"},
                {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "tail", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 10000}},
            ],
            "responses": {"200": {"description": "events", "content": {"application/x-ndjson": {}}},
                          "400": _ERR}}},
        "/v1/webhooks": {"get": {"responses": {"200": {"description": "endpoints and delivery counts"},
                                               "404": _ERR}}},
        "/v1/webhooks/{name}/enable": {"post": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "enabled"}, "404": _ERR}}},
        "/v1/webhooks/deliveries": {"get": {
            "parameters": [{"name": n, "in": "query", "schema": {"type": "string"}}
                           for n in ("status", "webhook", "job", "event")]
            + [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
            "responses": {"200": {"description": "deliveries, newest first"}, "400": _ERR, "404": _ERR}}},
        "/v1/webhooks/deliveries/replay": {"post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "properties": {
                    "ids": {"type": "array", "items": {"type": "integer"}},
                    "status": {"type": "string", "enum": list(_DELIVERY_STATUSES)},
                    "webhook": {"type": "string"}, "event_id": {"type": "string"}}}}}},
            "responses": {"200": {"description": "ids queued again"}, "400": _ERR, "404": _ERR}}},
        "/v1/clones/{name}": {"delete": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "destroyed"}, "404": _ERR}}},
    },
    "components": {"schemas": {
        "Error": {"type": "object", "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "step": {"type": "string"}}}}},
        "CheckItem": {"type": "object", "required": ["capability", "ok", "level", "detail", "fix"], "properties": {
            "capability": {"type": "string", "enum": ["state", "cow_memory", "mac_reset", "guest_customization",
                                                      "vm_generation_id", "firmware", "tpm", "disk",
                                                      "chain_depth", "host_state"]},
            "ok": {"type": "boolean"},
            "level": {"type": "string", "enum": ["ok", "warn", "error"]},
            "detail": {"type": "string"},
            "fix": {"type": "string", "nullable": True, "description": "the exact XML to add or change"},
            "device": {"type": "string", "description": "disk target or device the item is about"},
            "pending": {"type": "boolean", "description": "in the persistent definition; applies at next boot"}}},
        "Check": {"type": "object", "required": ["source", "state", "cloneable", "checks"], "properties": {
            "source": {"type": "string"}, "state": {"type": "string"}, "frozen": {"type": "boolean"},
            "clone_of": {"type": "string", "nullable": True},
            "cloneable": {"type": "boolean", "description": "false if any item has level error"},
            "pending": {"type": "array", "items": {"type": "string"}},
            "checks": {"type": "array", "items": {"$ref": "#/components/schemas/CheckItem"}}}},
        "Prepare": {"type": "object", "required": ["source", "changed", "not_changed", "diff"], "properties": {
            "source": {"type": "string"}, "state": {"type": "string"}, "dry_run": {"type": "boolean"},
            "applied": {"type": "boolean", "description": "the persistent definition was written"},
            "changed": {"type": "array", "items": {"type": "string"}},
            "not_changed": {"type": "array", "items": {"type": "string"},
                            "description": "what stands in the way and prepare does not change, and why"},
            "diff": {"type": "string", "description": "unified diff of the persistent definition"},
            "pending": {"type": "array", "items": {"type": "string"},
                        "description": "capabilities defined but not yet in the running domain"},
            "note": {"type": "string"}}},
    }},
}
