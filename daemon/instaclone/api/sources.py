"""Handlers: clones, frozen sources, and a source's preflight (check, prepare)."""

from __future__ import annotations

from aiohttp import web

from ..requests import CheckRequest, FreezeRequest
from . import answers as a, models as m
from .access import caller_of
from .common import ENGINE, PEER, STORE, log
from .owners import own_clone, usable_source
from .routes import CLONE_NOT_FOUND, HV_FAILED, LIBVIRT_DOWN, SOURCE_FORBIDDEN, Call, Reply, Route


async def list_clones(request: web.Request, _call: Call) -> web.Response:
    engine = request.app[ENGINE]
    caller = caller_of(request)
    out = []
    for c in await request.app[STORE].list_clones():
        if not caller.owns(c.owner):
            continue
        out.append({**c.to_dict(), "state": await engine.clone_state(c.name)})
    return web.json_response({"clones": out})


async def destroy_clone(request: web.Request, call: Call) -> web.Response:
    name = call.path_as(m.ClonePath).name
    await own_clone(request, name)
    rec = await request.app[ENGINE].destroy_clone(name)
    log.info("api.clone_destroyed", clone=name, peer=request.get(PEER))
    return web.json_response({"destroyed": rec.to_dict()})


async def freeze(request: web.Request, call: Call) -> web.Response:
    req = FreezeRequest(call.path_as(m.SourcePath).name)
    await usable_source(request, req.source)
    entry = await request.app[ENGINE].freeze(req)
    log.info("api.frozen", source=entry["name"], peer=request.get(PEER))
    return web.json_response({"frozen": entry})


async def unfreeze(request: web.Request, call: Call) -> web.Response:
    req = FreezeRequest(call.path_as(m.SourcePath).name)
    await usable_source(request, req.source)
    entry = await request.app[ENGINE].unfreeze(req)
    log.info("api.unfrozen", source=entry["name"], peer=request.get(PEER))
    return web.json_response({"unfrozen": entry})


async def list_frozen(request: web.Request, _call: Call) -> web.Response:
    return web.json_response({"frozen": [f.to_dict() for f in (await request.app[STORE].frozen()).values()]})


async def check_source(request: web.Request, call: Call) -> web.Response:
    """Preflight report of a domain: per capability, ok or not and the exact change."""
    name = call.path_as(m.SourcePath).name
    await usable_source(request, name)
    return web.json_response({"check": await request.app[ENGINE].check_source(CheckRequest(name))})


async def prepare_source(request: web.Request, call: Call) -> web.Response:
    """Write what instant clones need into a domain's persistent definition (or, dry run, show it)."""
    req = call.body_as(m.DryRun).to_request(call.path_as(m.SourcePath).name)
    await usable_source(request, req.source)
    out = await request.app[ENGINE].prepare_source(req)
    if out["applied"]:
        log.info("api.source_prepared", source=req.source, changed=[c.split(":")[0] for c in out["changed"]],
                 peer=request.get(PEER))
    return web.json_response({"prepare": out})


ROUTES = [
    Route("GET", "/v1/clones", list_clones,
          "clones made by instaclone of the caller (an admin: all), with their domain's state",
          ok={200: Reply("clones", a.Clones)}),
    Route("DELETE", "/v1/clones/{name}", destroy_clone, "destroy a clone",
          description="Undefine the clone by the UUID recorded for it (its own clones keep running), then "
                      "collect garbage.",
          ok={200: Reply("destroyed", a.Destroyed)},
          errors={404: CLONE_NOT_FOUND,
                  409: "conflict (frozen as a template), domain_replaced (its domain is gone and another domain "
                       "has its name: left alone, the clone forgotten)",
                  500: HV_FAILED, 503: LIBVIRT_DOWN}, path_params=m.ClonePath),
    Route("GET", "/v1/frozen", list_frozen, "frozen sources", ok={200: Reply("frozen sources", a.FrozenList)}),
    Route("POST", "/v1/sources/{name}/freeze", freeze, "freeze a source as a template",
          ok={200: Reply("frozen", a.FrozenAnswer)},
          errors={403: SOURCE_FORBIDDEN, 404: "source_not_found, domain_not_found",
                  409: "conflict (already frozen), source_not_cloneable, domain_state_invalid",
                  500: HV_FAILED, 503: LIBVIRT_DOWN}, path_params=m.SourcePath),
    Route("POST", "/v1/sources/{name}/unfreeze", unfreeze, "unfreeze a source",
          ok={200: Reply("unfrozen", a.UnfrozenAnswer)},
          errors={403: SOURCE_FORBIDDEN, 404: "not_found (not frozen), domain_not_found",
                  409: "domain_state_invalid",
                  500: HV_FAILED, 503: LIBVIRT_DOWN}, path_params=m.SourcePath),
    Route("GET", "/v1/sources/{name}/check", check_source,
          "preflight: per capability, whether the domain has it and the exact change",
          ok={200: Reply("the report", {"type": "object", "required": ["check"],
                                        "properties": {"check": {"$ref": "#/components/schemas/Check"}}})},
          errors={403: SOURCE_FORBIDDEN, 404: "source_not_found", 500: HV_FAILED, 503: LIBVIRT_DOWN},
          path_params=m.SourcePath),
    Route("POST", "/v1/sources/{name}/prepare", prepare_source,
          "write shared file-backed RAM, <acpi/>, a guest agent channel and <genid/> into the persistent "
          "definition; a running domain gets them at its next boot",
          ok={200: Reply("what was (or would be) changed", {
              "type": "object", "required": ["prepare"],
              "properties": {"prepare": {"$ref": "#/components/schemas/Prepare"}}})},
          errors={403: SOURCE_FORBIDDEN, 404: "source_not_found", 500: HV_FAILED, 503: LIBVIRT_DOWN},
          path_params=m.SourcePath, body=m.DryRun, body_required=False),
]
