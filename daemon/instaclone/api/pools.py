"""Handlers: pools of ready clones (create, list, show, resize, update, delete, claim) and release."""

from __future__ import annotations

from aiohttp import web

from ..errors import InvalidRequest
from .common import ENGINE, PEER, body, log, unknown_fields

_CREATE_FIELDS = {"name", "source", "size", "config", "customize", "keep_network", "freeze"}
_UPDATE_FIELDS = {"size", "source"}
_CLAIM_FIELDS = {"ttl_s", "config", "wait_s"}


async def create_pool(request: web.Request) -> web.Response:
    data = await body(request)
    unknown_fields(data, _CREATE_FIELDS)
    for key in ("name", "source", "size"):
        if key not in data:
            raise InvalidRequest("fields 'name', 'source' and 'size' are required")
    pool = await request.app[ENGINE].pools.create(
        name=data["name"], source=data["source"], size=data["size"], config=data.get("config"),
        customize=data.get("customize", True), keep_network=data.get("keep_network", False),
        freeze=data.get("freeze", False))
    log.info("api.pool_created", pool=pool["name"], peer=request.get(PEER))
    return web.json_response({"pool": pool}, status=201)


async def list_pools(request: web.Request) -> web.Response:
    return web.json_response({"pools": await request.app[ENGINE].pools.list_all()})


async def get_pool(request: web.Request) -> web.Response:
    return web.json_response({"pool": await request.app[ENGINE].pools.show(request.match_info["name"])})


async def update_pool(request: web.Request) -> web.Response:
    """PATCH: ``size`` resizes; ``source`` moves the pool to a new source (image push)."""
    name = request.match_info["name"]
    data = await body(request)
    unknown_fields(data, _UPDATE_FIELDS)
    if not data:
        raise InvalidRequest("give 'size' or 'source' (or both)")
    pools = request.app[ENGINE].pools
    pool = None
    if "source" in data:
        pool = await pools.update_source(name, data["source"])
    if "size" in data:
        pool = await pools.resize(name, data["size"])
    log.info("api.pool_updated", pool=name, peer=request.get(PEER), **data)
    return web.json_response({"pool": pool})


async def delete_pool(request: web.Request) -> web.Response:
    out = await request.app[ENGINE].pools.delete(request.match_info["name"])
    log.info("api.pool_deleted", pool=out["pool"], peer=request.get(PEER))
    return web.json_response({"deleted": out})


async def claim(request: web.Request) -> web.Response:
    data = await body(request)
    unknown_fields(data, _CLAIM_FIELDS)
    peer = request.get(PEER)
    claimed_by = {k: peer.get(k) for k in ("pid", "uid")} if isinstance(peer, dict) else None
    out = await request.app[ENGINE].pools.claim(request.match_info["name"], ttl_s=data.get("ttl_s"),
                                                 config=data.get("config"), wait_s=data.get("wait_s"),
                                                 claimed_by=claimed_by)
    log.info("api.pool_claimed", pool=out["pool"], clone=out["clone"]["name"], waited_ms=out["waited_ms"],
             peer=peer)
    return web.json_response({"claim": out})


async def release(request: web.Request) -> web.Response:
    out = await request.app[ENGINE].pools.release(request.match_info["name"])
    log.info("api.clone_released", clone=out["clone"], pool=out["pool"], peer=request.get(PEER))
    return web.json_response({"released": out})
