"""What the API's handlers share: app keys, request parsing, limits."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from ..errors import BodyTooLarge, InvalidRequest
from ..log import get as get_logger
from ..outbox.bus import EventBus
from ..outbox.webhooks import WebhookSender
from ..store import Store
from .protocol import EngineView, GcView

MAX_BODY_BYTES = 64 * 1024
MAX_WAIT_S = 600.0

ENGINE = web.AppKey("engine", EngineView)
STORE = web.AppKey("store", Store)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
BUS = web.AppKey("bus", EventBus)
CLOSING = web.AppKey("closing", asyncio.Event)
GC = web.AppKey("gc", GcView)
PEER = web.RequestKey("peer", object)

log = get_logger(component="api")


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


async def body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body (``{}`` if empty); raises BodyTooLarge, InvalidRequest."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip on a body that is not
        raise InvalidRequest(f"request body could not be decoded: {exc}") from None
    try:
        data = json.loads(raw or b"{}")
    except RecursionError:
        raise InvalidRequest("request body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data
