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


def unknown_fields(data: dict[str, Any], allowed: set[str]) -> None:
    """Raise InvalidRequest naming the fields of ``data`` not in ``allowed``."""
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def wait_param(request: web.Request) -> float:
    """``?wait=SECONDS`` (default 0), between 0 and MAX_WAIT_S; raises InvalidRequest."""
    raw = request.query.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        raise InvalidRequest(f"wait must be a number of seconds, got {raw!r}") from None
    if not 0 <= wait <= MAX_WAIT_S:
        raise InvalidRequest(f"wait must be between 0 and {MAX_WAIT_S:g} seconds")
    return wait


def int_param(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    """Integer query parameter ``name`` in ``[lo, hi]``, or ``default`` if absent; raises InvalidRequest."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}, got {value}")
    return value
