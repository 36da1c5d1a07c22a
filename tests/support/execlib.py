"""Exec inside a clone through the daemon's API socket (``POST /v1/clones/{name}/exec``, NDJSON)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import aiohttp


async def exec_events(sock: Path, clone: str, body: dict[str, Any]) -> tuple[int, list[tuple[float, dict[str, Any]]]]:
    """POST exec; (status, [(seconds since the request, event)]) or (status, [(0, error body)])."""
    t0 = time.monotonic()
    out: list[tuple[float, dict[str, Any]]] = []
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s, \
            s.post(f"http://x/v1/clones/{clone}/exec", json=body) as r:
        if r.status != 200:
            return r.status, [(0.0, await r.json())]
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        async for line in r.content:
            out.append((time.monotonic() - t0, json.loads(line)))
    return r.status, out


def output(events: list[tuple[float, dict[str, Any]]], kind: str) -> bytes:
    return b"".join(base64.b64decode(e["data"]) for _, e in events if e["type"] == kind)


async def run(sock: Path, clone: str, argv: list[str], **kw: Any) -> tuple[dict[str, Any], bytes, bytes]:
    status, evs = await exec_events(sock, clone, {"argv": argv, **kw})
    assert status == 200, evs
    assert evs[0][1]["type"] == "started"
    return evs[-1][1], output(evs, "stdout"), output(evs, "stderr")
