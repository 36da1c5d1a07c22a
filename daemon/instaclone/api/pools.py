"""Handlers: pools of ready clones (create, list, show, resize, update, delete, claim) and release."""

from __future__ import annotations

from aiohttp import web

from . import answers as a, models as m
from .access import caller_of
from .common import ENGINE, PEER, STORE, log
from .owners import own_clone, own_pool, pool_view, usable_source
from .routes import CLONE_NOT_FOUND, HV_FAILED, LIBVIRT_DOWN, SOURCE_FORBIDDEN, Call, Reply, Route


async def create_pool(request: web.Request, call: Call) -> web.Response:
    req = call.body_as(m.CreatePool).to_request(owner=caller_of(request).uid)
    await usable_source(request, req.source)
    pool = await request.app[ENGINE].pools.create(req)
    log.info("api.pool_created", pool=pool["name"], peer=request.get(PEER))
    return web.json_response({"pool": await pool_view(request, pool)}, status=201)


async def list_pools(request: web.Request, _call: Call) -> web.Response:
    return web.json_response({"pools": [await pool_view(request, p)
                                        for p in await request.app[ENGINE].pools.list_all()]})


async def get_pool(request: web.Request, call: Call) -> web.Response:
    pool = await request.app[ENGINE].pools.show(call.path_as(m.PoolPath).name)
    return web.json_response({"pool": await pool_view(request, pool)})


async def update_pool(request: web.Request, call: Call) -> web.Response:
    """PATCH: ``size`` resizes; ``source`` moves the pool to a new source (image push)."""
    name = call.path_as(m.PoolPath).name
    data = call.body_as(m.UpdatePool)
    req = data.to_request(name)
    sent = data.model_fields_set
    await own_pool(request, name)
    if req.source is not None:
        await usable_source(request, req.source)
    pool = await request.app[ENGINE].pools.update(req)
    log.info("api.pool_updated", pool=name, peer=request.get(PEER), **data.model_dump(include=sent))
    return web.json_response({"pool": await pool_view(request, pool) if pool is not None else None})


async def delete_pool(request: web.Request, call: Call) -> web.Response:
    name = call.path_as(m.PoolPath).name
    await own_pool(request, name)
    out = await request.app[ENGINE].pools.delete(name)
    log.info("api.pool_deleted", pool=out["pool"], peer=request.get(PEER))
    return web.json_response({"deleted": out})


async def claim(request: web.Request, call: Call) -> web.Response:
    peer = request.get(PEER)
    claimed_by = {k: peer.get(k) for k in ("pid", "uid")} if isinstance(peer, dict) else None
    req = call.body_as(m.Claim).to_request(call.path_as(m.PoolPath).name, owner=caller_of(request).uid,
                                            claimed_by=claimed_by)
    pool = await request.app[STORE].get_pool(req.pool)
    if pool is not None:  # a claim is a clone of the pool's source: the same rule (a missing pool: the keeper's 404)
        await usable_source(request, pool.source)
    out = await request.app[ENGINE].pools.claim(req)
    log.info("api.pool_claimed", pool=out["pool"], clone=out["clone"]["name"], waited_ms=out["waited_ms"],
             peer=peer)
    return web.json_response({"claim": out})


async def release(request: web.Request, call: Call) -> web.Response:
    name = call.path_as(m.ClonePath).name
    await own_clone(request, name)
    out = await request.app[ENGINE].pools.release(name)
    log.info("api.clone_released", clone=out["clone"], pool=out["pool"], peer=request.get(PEER))
    return web.json_response({"released": out})


_NO_POOL = "not_found (no such pool)"
_NOT_OWNER = "forbidden: rule pool owner (only the pool's creator and admins may change or delete it)"

ROUTES = [
    Route("POST", "/v1/pools", create_pool, "create a pool; it fills in the background",
          ok={201: Reply("the pool", a.PoolAnswer)},
          errors={403: SOURCE_FORBIDDEN, 404: "source_not_found",
                  409: "conflict (the pool exists), source_not_cloneable, name_in_use",
                  500: HV_FAILED, 503: LIBVIRT_DOWN},
          body=m.CreatePool),
    Route("GET", "/v1/pools", list_pools,
          "every pool with its idle, claimed (the caller's own; an admin: all) and pending members",
          description="Another user's pool shows its guest config's values redacted.",
          ok={200: Reply("pools", a.Pools)}),
    Route("GET", "/v1/pools/{name}", get_pool, "one pool", ok={200: Reply("the pool", a.PoolAnswer)},
          errors={404: _NO_POOL}, path_params=m.PoolPath),
    Route("PATCH", "/v1/pools/{name}", update_pool, "resize a pool, or move it to a new source",
          description="size: resize; source: move the pool to a new source (image push: idle members are "
                      "replaced in the background, claimed ones stay until released)",
          ok={200: Reply("the pool", a.PoolAnswer)},
          errors={403: f"{_NOT_OWNER}; {SOURCE_FORBIDDEN}", 404: f"{_NO_POOL}, source_not_found",
                  409: "source_not_cloneable", 500: HV_FAILED, 503: LIBVIRT_DOWN},
          path_params=m.PoolPath, body=m.UpdatePool),
    Route("DELETE", "/v1/pools/{name}", delete_pool, "delete a pool",
          description="Destroy the idle members; claimed members stay as plain clones.",
          ok={200: Reply("deleted", a.PoolDeleted)}, errors={403: _NOT_OWNER, 404: _NO_POOL},
          path_params=m.PoolPath),
    Route("POST", "/v1/pools/{name}/claim", claim, "hand out a ready member",
          description="An idle member at once; with none idle, wait (bounded by wait_s, default "
                      "pools.claim_wait_s) for the next one; the answer says how long it waited. The member "
                      "becomes the caller's: only it (and admins) may reach it.",
          ok={200: Reply("claimed", a.Claimed)},
          errors={400: "invalid_request (also: the member's config could not be written)",
                  403: SOURCE_FORBIDDEN, 404: _NO_POOL,
                  503: "pool_empty (no member became ready in time; retry), libvirt_unavailable"},
          path_params=m.PoolPath, body=m.Claim, body_required=False),
    Route("POST", "/v1/clones/{name}/release", release, "destroy a pool member; its pool makes another",
          ok={200: Reply("released", a.Released)},
          errors={404: CLONE_NOT_FOUND,
                  409: "conflict (not a pool member), domain_replaced (its domain is gone and another domain has "
                       "its name: left alone, the member forgotten)",
                  500: HV_FAILED, 503: LIBVIRT_DOWN},
          path_params=m.ClonePath),
]
