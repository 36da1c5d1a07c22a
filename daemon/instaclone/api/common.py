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
#: What an AppRunner serving the API is given: a request line may carry a guest file's path of up
#: to 4096 characters, percent-encoded (up to 12 bytes each), past aiohttp's default 8190 bytes.
RUNNER_ARGS: dict[str, Any] = {"max_line_size": 64 * 1024}

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


async def body(request: web.Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's JSON object body (``{}`` if empty), at most ``max_bytes``; raises BodyTooLarge,
    InvalidRequest."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BodyTooLarge(f"request body is larger than {max_bytes} bytes")
    try:
        if max_bytes <= MAX_BODY_BYTES:
            raw = await request.read()  # bounded by the app's client_max_size
        else:  # a route with a larger limit (an exec's stdin): past client_max_size, counted here
            buf = bytearray()
            async for chunk in request.content.iter_chunked(1 << 16):
                buf += chunk
                if len(buf) > max_bytes:
                    raise BodyTooLarge(f"request body is larger than {max_bytes} bytes")
            raw = bytes(buf)
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
