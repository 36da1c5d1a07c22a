"""Handlers: the daemon's health and clone jobs."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from ..errors import InvalidRequest, NotFound
from .common import ENGINE, GC, PEER, STORE, body, log, unknown_fields, wait_param

_JOB_FIELDS = {"source", "name", "count", "keep_network", "customize", "config", "keep_ssh_host_keys", "script",
               "ttl_s"}


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    out = {
        "version": __version__,
        "libvirt_connected": await engine.virt.ensure_connected(),
        "active_jobs": engine.active_jobs,
        "accepting": engine.accepting,
        "storage_backend": engine.storage.name,
        "memory_backend": engine.memory.name,
    }
    gc = request.app.get(GC)
    if gc is not None:
        out["disk"] = await gc.disk_usage()
    return web.json_response(out)


async def create_job(request: web.Request) -> web.Response:
    data = await body(request)
    unknown_fields(data, _JOB_FIELDS)
    if "source" not in data or "name" not in data:
        raise InvalidRequest("fields 'source' and 'name' are required")
    engine = request.app[ENGINE]
    wait = wait_param(request)  # before submit: a refused request must not start a job
    job = await engine.submit(source=data["source"], name=data["name"], count=data.get("count", 1),
                              keep_network=data.get("keep_network", False),
                              customize=data.get("customize", True), config=data.get("config"),
                              keep_ssh_host_keys=data.get("keep_ssh_host_keys"), script=data.get("script"),
                              ttl_s=data.get("ttl_s"))
    log.info("api.clone_requested", job_id=job.id, source=job.source, peer=request.get(PEER))
    if wait:
        await engine.wait(job.id, wait)
        job = await request.app[STORE].get_job(job.id) or job
    return web.json_response({"job": job.to_dict()}, status=202 if not job.state.terminal else 201)


async def list_jobs(request: web.Request) -> web.Response:
    jobs = await request.app[STORE].list_jobs()
    return web.json_response({"jobs": [j.to_dict() for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    wait = wait_param(request)
    if wait:
        await request.app[ENGINE].wait(job_id, wait)
    job = await request.app[STORE].get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return web.json_response({"job": job.to_dict()})
