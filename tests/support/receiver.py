"""A real webhook receiver on loopback (aiohttp), verifying with the standardwebhooks library."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    id: str
    body: bytes
    headers: dict[str, str]
    verified_by: list[int]  # indexes of the secrets that verify it

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """Answers according to ``mode``: ok, 500, 503 (with Retry-After), 410, hang, redirect."""

    secrets: list[str]
    mode: str = "ok"
    retry_after: str = "1"
    received: list[Received] = field(default_factory=list)
    attempts: int = 0  # every request, whatever the answer
    redirect_hits: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None
    _hang: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/elsewhere", self._elsewhere)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        self._hang.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if self.mode == "hang":
            await self._hang.wait()
            return web.Response(status=200)
        if self.mode == "500":
            return web.Response(status=500, text="receiver broken")
        if self.mode == "503":
            return web.Response(status=503, headers={"Retry-After": self.retry_after})
        if self.mode == "410":
            return web.Response(status=410)
        if self.mode == "redirect":
            raise web.HTTPFound("/elsewhere")
        headers = dict(request.headers)
        ok = []
        for i, s in enumerate(self.secrets):
            try:
                Webhook(s).verify(body, headers)
                ok.append(i)
            except WebhookVerificationError:
                pass
        self.received.append(Received(headers.get("webhook-id", ""), body, headers, ok))
        return web.Response(status=204)

    async def _elsewhere(self, request: web.Request) -> web.Response:
        self.redirect_hits += 1
        return web.Response(status=200)

    def ids(self) -> set[str]:
        return {r.id for r in self.received}

    def by_type(self, event_type: str) -> list[Received]:
        return [r for r in self.received if r.payload["type"] == event_type]
