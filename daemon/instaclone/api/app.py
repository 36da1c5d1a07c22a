"""Control API: HTTP+JSON on a Unix socket, versioned under /v1.

Every error is a JSON body ``{"error": {"code", "message", ...}}`` with a 4xx
or 5xx status; a bug gives a 500 with a generic message (details go to the
log), never a traceback to the client.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..config import AccessConfig
from ..errors import InstacloneError
from ..outbox.bus import EventBus
from ..outbox.metrics import Metrics
from ..outbox.webhooks import WebhookSender
from ..store import Store
from . import gc as gc_api, guest, jobs, pools, sources, stream, webhooks
from .access import ACCESS, Access, Handler, peer_credentials
from .common import BUS, CLOSING, ENGINE, GC, MAX_BODY_BYTES, STORE, WEBHOOKS, error, log
from .openapi import openapi
from .protocol import EngineView, GcView


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Our errors as their JSON (stable ``code``), HTTP errors as JSON, anything else as a logged 500."""
    try:
        return await handler(request)
    except InstacloneError as exc:
        return web.json_response({"error": exc.to_dict()}, status=exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        return error(exc.status, code, exc.reason)
    except Exception:  # noqa: BLE001 -- a bug: logged with its traceback, the client gets a generic 500
        log.exception("api.unhandled", path=request.path, method=request.method)
        return error(500, "internal_error", "internal error; see the daemon log")


def _routes(app: web.Application) -> None:
    app.router.add_get("/v1/events", stream.stream_events)
    app.router.add_get("/v1/webhooks", webhooks.list_webhooks)
    app.router.add_post("/v1/webhooks/{name}/enable", webhooks.enable_webhook)
    app.router.add_get("/v1/webhooks/deliveries", webhooks.list_deliveries)
    app.router.add_post("/v1/webhooks/deliveries/replay", webhooks.replay_deliveries)
    app.router.add_get("/v1/health", jobs.health)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_post("/v1/jobs", jobs.create_job)
    app.router.add_get("/v1/jobs", jobs.list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", jobs.get_job)
    app.router.add_get("/v1/clones", sources.list_clones)
    app.router.add_delete("/v1/clones/{name}", sources.destroy_clone)
    app.router.add_post("/v1/clones/{name}/release", pools.release)
    app.router.add_post("/v1/pools", pools.create_pool)
    app.router.add_get("/v1/pools", pools.list_pools)
    app.router.add_get("/v1/pools/{name}", pools.get_pool)
    app.router.add_patch("/v1/pools/{name}", pools.update_pool)
    app.router.add_delete("/v1/pools/{name}", pools.delete_pool)
    app.router.add_post("/v1/pools/{name}/claim", pools.claim)
    app.router.add_get("/v1/frozen", sources.list_frozen)
    app.router.add_post("/v1/sources/{name}/freeze", sources.freeze)
    app.router.add_post("/v1/sources/{name}/unfreeze", sources.unfreeze)
    app.router.add_get("/v1/sources/{name}/check", sources.check_source)
    app.router.add_post("/v1/sources/{name}/prepare", sources.prepare_source)
    app.router.add_post("/v1/gc", gc_api.collect)
    guest.add_routes(app)


def make_app(engine: EngineView, store: Store, webhooks: WebhookSender | None = None, *,
             bus: EventBus | None = None, access: AccessConfig | None = None,
             metrics: Metrics | None = None, gc: GcView | None = None) -> web.Application:
    """The control API's aiohttp application.

    ``webhooks``: the sender (without it the webhook routes answer 404).
    ``bus``: wakes followers of the event stream on each commit; without it
    they see new events at their next check (every 15 s).
    ``access``: defaults to the engine's ``config.access``.
    ``gc``: garbage collection (without it ``/v1/gc`` answers 404 and the
    health has no disk use).
    """
    app = web.Application(middlewares=[errors_as_json, peer_credentials], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[STORE] = store
    app[ACCESS] = Access(access if access is not None else engine.config.access)
    if metrics is not None:
        app.router.add_get("/metrics", metrics.handler())
    if webhooks is not None:
        app[WEBHOOKS] = webhooks
    if bus is not None:
        app[BUS] = bus
    if gc is not None:
        app[GC] = gc
    app[CLOSING] = asyncio.Event()

    async def on_shutdown(app: web.Application) -> None:
        app[CLOSING].set()

    app.on_shutdown.append(on_shutdown)
    _routes(app)
    return app
