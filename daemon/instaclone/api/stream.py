"""The event stream: ``GET /v1/events`` (NDJSON), its backlog and ``follow``."""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress

from aiohttp import web

from ..model import Event
from ..store import Store
from . import answers as a, models as m
from .access import caller_of
from .common import BUS, CLOSING, STORE
from .owners import EventFilter
from .routes import Call, Reply, Route

#: How long a follower waits for a wake-up before it looks at the outbox anyway.
FOLLOW_CHECK_S = 15.0
#: A non-admin's ``tail``: its last events are looked for among this many times more of everyone's.
TAIL_WIDEN = 20


class _Query:
    """The filters of one stream request, and what its caller may see (events of its own jobs)."""

    def __init__(self, store: Store, job_id: str | None, types: list[str], owners: EventFilter) -> None:
        self.store, self.job_id, self.types, self.owners = store, job_id, types, owners

    async def matching(self, after: int | None, upto: int, limit: int) -> list[Event]:
        """Events passing the filters with ``after < cursor <= upto`` (``after=None``: the last ``limit``)."""
        # A non-admin's tail: the last ``limit`` of its own, looked for among more of everyone's.
        wider = limit if after is not None or self.owners.caller.admin else min(100_000, limit * TAIL_WIDEN)
        found = await self.owners.visible(
            [e for e in await self.store.events(since=after, job_id=self.job_id, types=self.types, limit=wider)
             if e.cursor <= upto])
        return found[-limit:] if after is None else found


async def _write(resp: web.StreamResponse, evs: list[Event]) -> None:
    if evs:
        await resp.write(b"".join(json.dumps(e.to_dict(), sort_keys=True).encode() + b"\n" for e in evs))


async def _follow(request: web.Request, resp: web.StreamResponse, query: _Query, cursor: int) -> None:
    """Write events committed after ``cursor`` as they come, until the client or the daemon goes."""
    wake = asyncio.Event()
    closing = request.app[CLOSING]
    bus = request.app.get(BUS)
    unsubscribe = bus.subscribe(lambda _ev: wake.set()) if bus is not None else None
    try:
        while not closing.is_set() and request.transport is not None and not request.transport.is_closing():
            wake.clear()
            top = await query.store.last_cursor()
            if top > cursor:
                await _write(resp, await query.matching(cursor, top, 100_000))
                cursor = top
                continue
            waiter = asyncio.ensure_future(wake.wait())
            stopper = asyncio.ensure_future(closing.wait())
            try:
                await asyncio.wait([waiter, stopper], timeout=FOLLOW_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away
    finally:
        if unsubscribe is not None:
            unsubscribe()


async def stream_events(request: web.Request, call: Call) -> web.StreamResponse:
    """Events as NDJSON, one JSON object per line, oldest first.

    ``since=CURSOR`` gives the events after that cursor, else the last
    ``tail`` (default 100). With ``follow=true`` (or 1) the answer stays open
    and new events follow as they are committed. Filters: ``job=ID``,
    ``type=T[,T...]`` (types, ``*`` or ``<kind>.*`` such as ``clone.*``).
    """
    args = call.query_as(m.EventsQuery)
    follow, since, tail = args.follow, args.since, args.tail
    store = request.app[STORE]
    query = _Query(store, args.job or None, [t for t in args.type.split(",") if t],
                   EventFilter(caller_of(request), store))
    # Taken first, so that nothing committed from here on is missed.
    top = await query.store.last_cursor()
    if since is not None:
        backlog = await query.matching(since, top, 100_000)
    else:
        backlog = await query.matching(None, top, tail) if tail else []
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
    await resp.prepare(request)
    if request.method == "HEAD":
        # A StreamResponse does not drop its body for HEAD by itself: bytes
        # after the headers would corrupt the client's next read.
        await resp.write_eof()
        return resp
    await _write(resp, backlog)
    if follow:
        await _follow(request, resp, query, max(top, since or 0))
    with suppress(ConnectionError):
        await resp.write_eof()
    return resp


ROUTES = [
    Route("GET", "/v1/events", stream_events,
          "the event stream (NDJSON), oldest first: the caller's own jobs' (an admin: every event)",
          ok={200: Reply("one event per line (application/x-ndjson); with follow, new ones as they come",
                         a.Event, media_type="application/x-ndjson")},
          query=m.EventsQuery),
]
