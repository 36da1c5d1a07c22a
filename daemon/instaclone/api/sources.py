"""Handlers: clones, frozen sources, and a source's preflight (check, prepare)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from aiohttp import web

from ..errors import DomainNotFound, InstacloneError, SourceNotFound
from ..hv import hostfs
from ..hv.records import DomainInfo
from ..jobs import preflight, prepare
from ..jobs.customize import has_agent
from . import answers as a, models as m
from .access import caller_of
from .common import ENGINE, PEER, STORE, log
from .owners import own_clone, usable_source
from .routes import CLONE_NOT_FOUND, HV_FAILED, LIBVIRT_DOWN, SOURCE_FORBIDDEN, Call, Reply, Route

#: How long ``check`` waits for the source's guest agent to answer guest-ping.
AGENT_PING_S = 3


async def list_clones(request: web.Request, _call: Call) -> web.Response:
    engine = request.app[ENGINE]
    caller = caller_of(request)
    out = []
    for c in await request.app[STORE].list_clones():
        if not caller.owns(c.owner):
            continue
        d = c.to_dict()
        try:
            d["state"] = await engine.virt.state(c.name)
        except InstacloneError:
            d["state"] = "missing"
        out.append(d)
    return web.json_response({"clones": out})


async def destroy_clone(request: web.Request, call: Call) -> web.Response:
    name = call.path_as(m.ClonePath).name
    await own_clone(request, name)
    rec = await request.app[ENGINE].destroy_clone(name)
    log.info("api.clone_destroyed", clone=name, peer=request.get(PEER))
    return web.json_response({"destroyed": rec.to_dict()})


async def freeze(request: web.Request, call: Call) -> web.Response:
    name = call.path_as(m.SourcePath).name
    await usable_source(request, name)
    entry = await request.app[ENGINE].freeze(name)
    log.info("api.frozen", source=entry["name"], peer=request.get(PEER))
    return web.json_response({"frozen": entry})


async def unfreeze(request: web.Request, call: Call) -> web.Response:
    name = call.path_as(m.SourcePath).name
    await usable_source(request, name)
    entry = await request.app[ENGINE].unfreeze(name)
    log.info("api.unfrozen", source=entry["name"], peer=request.get(PEER))
    return web.json_response({"unfrozen": entry})


async def list_frozen(request: web.Request, _call: Call) -> web.Response:
    return web.json_response({"frozen": [f.to_dict() for f in (await request.app[STORE].frozen()).values()]})


async def _agent_ping(request: web.Request, name: str) -> tuple[bool, str | None]:
    """(whether the guest agent of ``name`` answers guest-ping, why not)."""
    try:
        await request.app[ENGINE].virt.agent(name, "guest-ping", timeout_s=AGENT_PING_S)
    except InstacloneError as exc:
        return False, exc.message
    return True, None


async def _chain_depths(request: web.Request, info: DomainInfo) -> dict[str, int | str]:
    """Backing chain depth of each writable disk (or why it could not be read)."""
    engine = request.app[ENGINE]
    depths: dict[str, int | str] = {}
    for disk in info.disks:
        if disk.readonly:
            continue
        try:
            depths[disk.target] = await engine.storage.chain_depth(path=disk.path, fmt=disk.format)
        except InstacloneError as exc:
            depths[disk.target] = exc.message
        except OSError as exc:
            depths[disk.target] = str(exc)
    return depths


def local_system_uri(uri: str) -> bool:
    """Does ``uri`` name the QEMU driver of this host's system libvirtd (whose qemu.conf is /etc/libvirt)?"""
    u = urlsplit(uri)
    return u.scheme in ("qemu", "qemu+unix") and not u.netloc and u.path.rstrip("/") == "/system"


async def _ram_dir(request: web.Request) -> hostfs.RamDir | None:
    """libvirt's memory backing directory and its filesystem, when libvirt runs on this host."""
    if not local_system_uri(request.app[ENGINE].config.libvirt.uri):
        return None
    return await asyncio.to_thread(hostfs.ram_dir)


async def _source_facts(request: web.Request, name: str) -> tuple[preflight.Facts, str]:
    """(the live facts preflight needs, the XML to check: live if the domain runs) of ``name``."""
    engine = request.app[ENGINE]
    store = request.app[STORE]
    try:
        info = await engine.virt.lookup(name)
    except DomainNotFound:
        raise SourceNotFound(f"source domain {name!r} does not exist") from None
    inactive = await engine.virt.inactive_xml(name) if info.active else None
    ping: bool | None = None
    ping_error = None
    if info.state == "running" and has_agent(info.xml):
        ping, ping_error = await _agent_ping(request, name)
    clone = await store.get_clone(name)
    facts = preflight.Facts(
        state=info.state, frozen=name in await store.frozen(), clone_of=clone.source if clone else None,
        agent_ping=ping, agent_error=ping_error, chain_depths=await _chain_depths(request, info),
        max_chain_depth=engine.config.clone.max_chain_depth,
        memory_backends=[(m.name, m.can_serve(info)) for m in engine.memories],
        storage_backend=engine.storage.name, backends=[engine.storage, *engine.memories], inactive_xml=inactive,
        ram_dir=await _ram_dir(request))
    return facts, info.xml


async def check_source(request: web.Request, call: Call) -> web.Response:
    """Preflight report of a domain: per capability, ok or not and the exact change."""
    name = call.path_as(m.SourcePath).name
    await usable_source(request, name)
    facts, xml = await _source_facts(request, name)
    return web.json_response({"check": preflight.check(xml, facts).to_dict()})


def _prepare_note(name: str, *, changed: bool, dry_run: bool, active: bool, pending: list[str]) -> str:
    if not changed:
        return "nothing to change" + (f"; pending until the next boot: {', '.join(pending)}" if pending else "")
    if dry_run:
        return "dry run: nothing was changed"
    if active:
        return (f"the changes apply at the next boot of {name}: shut it down and start it again (a reboot "
                "inside the guest is not enough); the running domain is unchanged")
    return f"the changes apply when {name} is started"


async def prepare_source(request: web.Request, call: Call) -> web.Response:
    """Write what instant clones need into a domain's persistent definition (or, dry run, show it)."""
    dry_run = call.body_as(m.DryRun).dry_run
    name = call.path_as(m.SourcePath).name
    await usable_source(request, name)
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
        prep = prepare.prepare_definition(before, [engine.storage, *engine.memories])
        after = prep.xml
        if prep.changed and not dry_run:
            await engine.virt.define(prep.xml)
            after = await engine.virt.inactive_xml(name)  # libvirt's own rendering, with what it filled in
    # What the definition has and the running domain not yet (for a dry run: before any change).
    parts = [engine.storage, *engine.memories]
    pending = prepare.pending(info.xml, before if dry_run else after, parts) if info.active else []
    note = _prepare_note(name, changed=bool(prep.changed), dry_run=dry_run, active=info.active, pending=pending)
    if prep.changed and not dry_run:
        log.info("api.source_prepared", source=name, changed=[c.split(":")[0] for c in prep.changed],
                 peer=request.get(PEER))
    return web.json_response({"prepare": {
        "source": name, "state": info.state, "dry_run": dry_run, "applied": bool(prep.changed) and not dry_run,
        **prep.to_dict(), "diff": prepare.diff(before, after, name), "pending": pending, "note": note}})



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
