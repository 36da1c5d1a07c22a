"""Handler: garbage collection (``POST /v1/gc``): admins only, it reaches every user's files."""

from __future__ import annotations

from aiohttp import web

from ..errors import NotFound
from . import models as m
from .common import GC, PEER, log
from .routes import Call, Reply, Route


async def collect(request: web.Request, call: Call) -> web.Response:
    """Delete (``dry_run``: list) every file instaclone made that nothing uses."""
    dry_run = call.body_as(m.DryRun).dry_run
    gc = request.app.get(GC)
    if gc is None:
        raise NotFound("garbage collection is not available on this daemon")
    report = await gc.collect(dry_run=dry_run)
    log.info("api.gc", dry_run=dry_run, files=len(report["deleted"]), bytes=report["bytes"], peer=request.get(PEER))
    return web.json_response({"gc": report})


ROUTES = [
    Route("POST", "/v1/gc", collect, "collect garbage",
          description="Delete every file the ledger recorded as made by instaclone (by path and inode) that "
                      "no domain's backing chain or definition uses and no job in flight holds; a file nobody "
                      "recorded is never deleted. dry_run lists them.",
          ok={200: Reply("what was (or would be) deleted", {
              "type": "object", "required": ["gc"], "properties": {"gc": {"$ref": "#/components/schemas/Gc"}}})},
          errors={404: "not_found (no garbage collector in this daemon)",
                  503: "gc_aborted (could not tell which images are in use; nothing deleted), "
                       "libvirt_unavailable"},
          body=m.DryRun, body_required=False, needs_admin=True),
]
