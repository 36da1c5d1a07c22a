"""Handlers: the daemon's health and clone jobs."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from . import answers as a, models as m
from .access import caller_of
from .common import ENGINE, GC, PEER, STORE, log
from .owners import own_job, usable_source
from .routes import SOURCE_FORBIDDEN, Call, Reply, Route


async def health(request: web.Request, _call: Call) -> web.Response:
    engine = request.app[ENGINE]
    out = {
        "version": __version__,
        "libvirt_connected": await engine.libvirt_connected(),
        "active_jobs": engine.active_jobs,
        "accepting": engine.accepting,
        "storage_backend": engine.storage_backend,
        "memory_backend": engine.memory_backend,
    }
    gc = request.app.get(GC)
    if gc is not None:
        out["disk"] = await gc.disk_usage()
    return web.json_response(out)


async def create_job(request: web.Request, call: Call) -> web.Response:
    req = call.body_as(m.CreateJobBase).to_request(owner=caller_of(request).uid)
    wait = call.query_as(m.WaitQuery).wait
    engine = request.app[ENGINE]
    await usable_source(request, req.source)
    job = await engine.submit(req)
    log.info("api.clone_requested", job_id=job.id, source=job.source, peer=request.get(PEER))
    if wait:
        await engine.wait(job.id, wait)
        job = await request.app[STORE].get_job(job.id) or job
    return web.json_response({"job": job.to_dict()}, status=202 if not job.state.terminal else 201)


async def list_jobs(request: web.Request, _call: Call) -> web.Response:
    caller = caller_of(request)
    if caller.admin:
        jobs = await request.app[STORE].list_jobs()
    else:  # its own newest (an unidentified caller owns none)
        jobs = await request.app[STORE].list_jobs(owner=caller.uid) if caller.uid is not None else []
    return web.json_response({"jobs": [j.to_dict() for j in jobs]})


async def get_job(request: web.Request, call: Call) -> web.Response:
    job_id = call.path_as(m.JobPath).job_id
    wait = call.query_as(m.WaitQuery).wait
    await own_job(request, job_id)  # before waiting: another's job is not there to wait for
    if wait:
        await request.app[ENGINE].wait(job_id, wait)
    job = await own_job(request, job_id)
    return web.json_response({"job": job.to_dict()})


_UNAVAILABLE = "shutting_down (the daemon is stopping), libvirt_unavailable (retry later)"
#: Admission by capacity (jobs/capacity.py): the error's resource, need, free and unit say what is short.
_NO_ROOM = ("insufficient_capacity: resource memory or disk, with need and free in MiB (and path, for disk); "
            "nothing was made; retry when clones are gone")
_BUSY = "insufficient_capacity: resource queue (admission.max_queued_jobs unfinished jobs; retry later)"

ROUTES = [
    Route("GET", "/v1/health", health, "the daemon's status",
          ok={200: Reply("version, libvirt connection, jobs, backends; disk: bytes per source", a.Health)}),
    Route("POST", "/v1/jobs", create_job, "clone a source",
          description="Validates the request and queues a job; with ?wait=S answers when it is done (201) "
                      "or after S seconds (202).",
          ok={201: Reply("the job finished (see its state)", a.JobAnswer),
              202: Reply("the job is accepted and running", a.JobAnswer)},
          errors={403: SOURCE_FORBIDDEN, 404: "source_not_found", 409: "name_in_use, source_not_cloneable",
                  500: "libvirt_error (the hypervisor failed while the request was checked)",
                  503: f"{_UNAVAILABLE}, {_BUSY}", 507: _NO_ROOM},
          query=m.WaitQuery, body=lambda config: m.create_job_model(config.clone.max_count)),
    Route("GET", "/v1/jobs", list_jobs, "every job of the caller (an admin: every job), newest first",
          ok={200: Reply("jobs", a.Jobs)}),
    Route("GET", "/v1/jobs/{job_id}", get_job, "one job (?wait=S: when it is done, or after S seconds)",
          ok={200: Reply("the job", a.JobAnswer)}, errors={404: "not_found (none, or another user's)"},
          path_params=m.JobPath, query=m.WaitQuery),
]
