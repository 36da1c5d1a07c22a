"""Handlers: webhook endpoints and their deliveries (list, enable, replay)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import InvalidRequest, NotFound
from ..outbox.webhooks import WebhookSender
from ..store import DeliveryStatus
from .common import PEER, STORE, WEBHOOKS, body, int_param, log, unknown_fields

DELIVERY_STATUSES = tuple(s.value for s in DeliveryStatus)


def _sender(request: web.Request) -> WebhookSender:
    sender = request.app.get(WEBHOOKS)
    if sender is None:
        raise NotFound("webhooks are not enabled in this daemon")
    return sender


def _status_param(value: Any) -> str | None:
    if value is None:
        return None
    if value not in DELIVERY_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(DELIVERY_STATUSES)}, got {value!r}")
    return str(value)


async def list_webhooks(request: web.Request) -> web.Response:
    return web.json_response({"webhooks": await _sender(request).status()})


async def enable_webhook(request: web.Request) -> web.Response:
    sender = _sender(request)
    name = request.match_info["name"]
    if name not in sender.endpoints:
        raise NotFound(f"no webhook endpoint {name!r} in the config")
    was = await sender.enable(name)
    log.info("api.webhook_enabled", webhook=name, was_disabled=was, peer=request.get(PEER))
    return web.json_response({"webhook": name, "enabled": True, "was_disabled": was})


async def list_deliveries(request: web.Request) -> web.Response:
    _sender(request)
    q = request.query
    rows = await request.app[STORE].list_deliveries(
        status=_status_param(q.get("status")), webhook=q.get("webhook"), job_id=q.get("job"),
        event_id=q.get("event"), limit=int_param(request, "limit", 100, 1, 10_000) or 100)
    return web.json_response({"deliveries": [d.to_dict() for d in rows]})


def _replay_request(data: dict[str, Any]) -> list[int] | None:
    """Validate a replay body; returns its ``ids`` (None: by filter)."""
    unknown_fields(data, {"ids", "status", "webhook", "event_id"})
    ids = data.get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(ids) > 10_000):
        raise InvalidRequest("ids must be a list of delivery ids (integers)")
    for key in ("webhook", "event_id"):
        if key in data and not isinstance(data[key], str):
            raise InvalidRequest(f"{key} must be a string")
    if not data:
        raise InvalidRequest("say what to replay: ids, or a filter (status, webhook, event_id)")
    return ids


async def replay_deliveries(request: web.Request) -> web.Response:
    """Queue deliveries again: by ``ids``, or by ``status``/``webhook``/``event_id``."""
    sender = _sender(request)
    data = await body(request)
    ids = _replay_request(data)
    replayed = await request.app[STORE].replay_deliveries(
        ids=ids, status=_status_param(data.get("status")), webhook=data.get("webhook"),
        event_id=data.get("event_id"))
    if ids and len(replayed) != len(set(ids)):
        missing = sorted(set(ids) - set(replayed))
        log.warning("api.replay_unknown_ids", ids=missing)
    sender.wake()
    log.info("api.deliveries_replayed", count=len(replayed), peer=request.get(PEER))
    return web.json_response({"replayed": replayed})
