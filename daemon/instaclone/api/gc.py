"""Handler: garbage collection (``POST /v1/gc``)."""

from __future__ import annotations

from aiohttp import web

from ..errors import InvalidRequest, NotFound
from .common import GC, PEER, body, log, unknown_fields


async def collect(request: web.Request) -> web.Response:
    """Delete (``dry_run``: list) every file under instaclone's directories that nothing uses."""
    data = await body(request)
    unknown_fields(data, {"dry_run"})
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidRequest("dry_run must be true or false")
    gc = request.app.get(GC)
    if gc is None:
        raise NotFound("garbage collection is not available on this daemon")
    report = await gc.collect(dry_run=dry_run)
    log.info("api.gc", dry_run=dry_run, files=len(report["deleted"]), bytes=report["bytes"], peer=request.get(PEER))
    return web.json_response({"gc": report})
