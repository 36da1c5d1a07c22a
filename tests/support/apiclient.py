"""A minimal client of the control socket for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp


class Api:
    """Minimal client of the control socket."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.sock)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        assert self._session is not None
        kw: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with self._session.request(method, f"http://x{path}", **kw) as r:
            return r.status, await r.json(content_type=None)
