"""Control API: HTTP+JSON on a Unix socket, versioned under /v1.

Every error is a JSON body ``{"error": {"code", "message", ...}}`` with a 4xx
or 5xx status; a bug gives a 500 with a generic message (details go to the
log), never a traceback to the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

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
from .openapi import DOCUMENT, ROUTE as OPENAPI_ROUTE, DocumentCache
from .protocol import EngineView, GcView
from .routes import Call, Reply, Route, bind


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
        answer = error(exc.status, code, exc.reason)
        if "Allow" in exc.headers:  # 405: the methods the path has (RFC 9110 15.5.6)
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer
    except Exception:  # noqa: BLE001 -- a bug: logged with its traceback, the client gets a generic 500
        log.exception("api.unhandled", path=request.path, method=request.method)
        return error(500, "internal_error", "internal error; see the daemon log")


#: Every route of the API, in the order the document lists them.
ROUTES: tuple[Route, ...] = (*jobs.ROUTES, *sources.ROUTES, *pools.ROUTES, *stream.ROUTES, *webhooks.ROUTES,
                             *gc_api.ROUTES, *guest.ROUTES, OPENAPI_ROUTE)


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    """Register ``routes``, each validating its inputs through its models (:func:`.routes.bind`)."""
    for r in routes:
        if r.method == "GET":
            app.router.add_get(r.path, bind(r))  # and HEAD
        else:
            app.router.add_route(r.method, r.path, bind(r))


def _metrics_route(metrics: Metrics) -> Route:
    serve = metrics.handler()

    async def metrics_text(request: web.Request, _call: Call) -> web.StreamResponse:
        answer: web.StreamResponse = await serve(request)
        return answer

    return Route("GET", "/metrics", metrics_text, "Prometheus metrics (text exposition format)",
                 ok={200: Reply("the metrics", {"type": "string"}, media_type="text/plain")})


def make_app(engine: EngineView, store: Store, webhooks: WebhookSender | None = None, *,
             bus: EventBus | None = None, access: AccessConfig | None = None,
             metrics: Metrics | None = None, gc: GcView | None = None,
             extra_routes: Iterable[Route] = ()) -> web.Application:
    """The control API's aiohttp application.

    ``webhooks``: the sender (without it the webhook routes answer 404).
    ``bus``: wakes followers of the event stream on each commit; without it
    they see new events at their next check (every 15 s).
    ``access``: defaults to the engine's ``config.access``.
    ``gc``: garbage collection (without it ``/v1/gc`` answers 404 and the
    health has no disk use).
    ``extra_routes``: more routes (:class:`.routes.Route`), registered and documented like the others.
    """
    app = web.Application(middlewares=[errors_as_json, peer_credentials], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[STORE] = store
    app[ACCESS] = Access(access if access is not None else engine.config.access)
    routes = [*ROUTES, *extra_routes]
    if metrics is not None:
        routes.append(_metrics_route(metrics))
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
    add_routes(app, routes)
    app[DOCUMENT] = DocumentCache(routes)
    return app
