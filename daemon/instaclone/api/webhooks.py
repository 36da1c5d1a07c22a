"""Handlers: webhook endpoints and their deliveries (list, enable, replay).

Deliveries carry every user's events, and an endpoint serves them all: but for the list of endpoints,
these routes are for admins (``needs_admin``).
"""

from __future__ import annotations

from aiohttp import web

from ..errors import NotFound
from ..outbox.webhooks import WebhookSender
from ..store import DeliveryStatus
from . import answers as a, models as m
from .common import PEER, STORE, WEBHOOKS, log
from .routes import Call, Reply, Route


def _sender(request: web.Request) -> WebhookSender:
    sender = request.app.get(WEBHOOKS)
    if sender is None:
        raise NotFound("webhooks are not enabled in this daemon")
    return sender


def _status(value: DeliveryStatus | None) -> str | None:
    return None if value is None else value.value


async def list_webhooks(request: web.Request, _call: Call) -> web.Response:
    return web.json_response({"webhooks": await _sender(request).status()})


async def enable_webhook(request: web.Request, call: Call) -> web.Response:
    sender = _sender(request)
    name = call.path_as(m.EndpointPath).name
    if name not in sender.endpoints:
        raise NotFound(f"no webhook endpoint {name!r} in the config")
    was = await sender.enable(name)
    log.info("api.webhook_enabled", webhook=name, was_disabled=was, peer=request.get(PEER))
    return web.json_response({"webhook": name, "enabled": True, "was_disabled": was})


async def list_deliveries(request: web.Request, call: Call) -> web.Response:
    _sender(request)
    q = call.query_as(m.DeliveriesQuery)
    rows = await request.app[STORE].list_deliveries(status=_status(q.status), webhook=q.webhook, job_id=q.job,
                                                    event_id=q.event, limit=q.limit)
    return web.json_response({"deliveries": [d.to_dict() for d in rows]})


async def replay_deliveries(request: web.Request, call: Call) -> web.Response:
    """Queue deliveries again: by ``ids``, or by ``status``/``webhook``/``event_id``."""
    sender = _sender(request)
    data = call.body_as(m.Replay)
    ids = data.ids
    replayed = await request.app[STORE].replay_deliveries(ids=ids, status=_status(data.status),
                                                          webhook=data.webhook, event_id=data.event_id)
    if ids and len(replayed) != len(set(ids)):
        missing = sorted(set(ids) - set(replayed))
        log.warning("api.replay_unknown_ids", ids=missing)
    sender.wake()
    log.info("api.deliveries_replayed", count=len(replayed), peer=request.get(PEER))
    return web.json_response({"replayed": replayed})


_OFF = "not_found (webhooks are not enabled in this daemon)"

ROUTES = [
    Route("GET", "/v1/webhooks", list_webhooks, "endpoints and their delivery counts",
          ok={200: Reply("endpoints", a.Webhooks)}, errors={404: _OFF}),
    Route("POST", "/v1/webhooks/{name}/enable", enable_webhook, "enable an endpoint that was disabled",
          ok={200: Reply("enabled", a.WebhookEnabled)}, errors={404: f"{_OFF}; no such endpoint"},
          path_params=m.EndpointPath, needs_admin=True),
    Route("GET", "/v1/webhooks/deliveries", list_deliveries, "deliveries, newest first",
          ok={200: Reply("deliveries", a.Deliveries)}, errors={404: _OFF}, query=m.DeliveriesQuery,
          needs_admin=True),
    Route("POST", "/v1/webhooks/deliveries/replay", replay_deliveries,
          "queue deliveries again: by ids, or by filter (status, webhook, event_id)",
          ok={200: Reply("the ids queued again", a.Replayed)}, errors={404: _OFF}, body=m.Replay,
          needs_admin=True),
]
