"""Webhook delivery: the outbox sender.

Events and their delivery rows are written by the store in the same
transaction as the state change (see ``instaclone.store.base.insert_event``); this module
only reads due deliveries and sends them, so a crash at any point loses
nothing: a delivery still ``pending`` after a restart is sent again, with the
same ``webhook-id``.

Promises:
 - at most ``max_in_flight`` requests at once per endpoint (a receiver that
   hangs holds its own slots only); each has ``timeout_s``;
 - a failed attempt (connection error, timeout, non-2xx, a redirect, which is
   never followed) is retried with exponential backoff and jitter, or after
   the receiver's ``Retry-After``; after ``max_attempts`` it is ``failed``;
 - ``410 Gone`` disables the endpoint until ``instaclone webhooks enable``;
 - deliveries to an endpoint removed from the config are dropped (logged
   as ``webhook.deliveries_dropped``), at start and after each reload;
 - no request starts while a job holds a source stunned;
 - nothing here is awaited by a clone job: a slow receiver slows no clone.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from .. import __version__
from ..config import WebhookEndpoint, WebhooksConfig
from ..events import headers, matches
from ..log import get as get_logger
from ..model import Delivery, Event
from ..store import DeliveryStatus, Store
from .bus import EventBus

#: How long the sender sleeps at most before looking at the outbox again.
IDLE_POLL_S = 30.0
PRUNE_EVERY_S = 3600.0
#: A Retry-After further away than this is clipped.
MAX_RETRY_AFTER_S = 86400.0


def backoff_s(attempt: int, initial_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number ``attempt`` (1-based): "equal jitter" backoff.

    Half of ``initial * 2^(attempt-1)`` (capped at ``max_s``) is fixed, the
    other half random, so that receivers coming back are not hit by every
    sender at once, and no retry comes sooner than half the nominal delay.
    """
    base: float = min(max_s, initial_s * float(2 ** min(attempt - 1, 60)))
    return base / 2 + rand() * base / 2


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER_S)


class WebhookSender:
    """Sends pending deliveries from the store's outbox.

    It routes new events to endpoints (the store's router) from construction
    on, and wakes on each event ``bus`` publishes.
    """

    def __init__(self, config: WebhooksConfig, store: Store, *, bus: EventBus,
                 gate: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.gate = gate
        self.log = get_logger(component="webhooks")
        self._wake = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._inflight_to: dict[int, str] = {}  # delivery id -> endpoint name
        self._disabled: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        #: Attempts by (endpoint, outcome): delivered, retry, failed, disabled.
        self.outcomes: Counter[tuple[str, str]] = Counter()
        #: Called with (endpoint, outcome) after each attempt (metrics).
        self.on_outcome: Callable[[str, str], None] | None = None
        self.configure(config)
        store.set_router(self.route)
        bus.subscribe(self._on_event)

    def configure(self, config: WebhooksConfig) -> None:
        """Apply (new) settings; safe at any time, e.g. on SIGHUP."""
        self.config = config
        self.endpoints: dict[str, WebhookEndpoint] = {e.name: e for e in config.endpoints}
        self._endpoints_changed = True
        self._wake.set()

    def route(self, event_type: str) -> list[str]:
        """Names of the endpoints that want ``event_type`` (called inside store transactions)."""
        return [e.name for e in self.config.endpoints if matches(event_type, e.events)]

    def _on_event(self, event: Event) -> None:
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Send until cancelled; in-flight requests are cancelled with it and stay pending."""
        self._disabled = set(await self.store.disabled_webhooks())
        timeout = aiohttp.ClientTimeout(total=None)
        # Slots are per endpoint: one that hangs holds only its own.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.config.max_in_flight)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector,
                                              headers={"user-agent": f"instaclone/{__version__}"})
        next_prune = time.monotonic() + 60.0
        try:
            while True:
                self._wake.clear()
                if self._endpoints_changed:
                    self._endpoints_changed = False
                    await self.drop_removed()
                if self.gate is not None:
                    await self.gate()
                busy = Counter(self._inflight_to.values())
                free = {n: self.config.max_in_flight - busy[n] for n in self._active_names()}
                full = True
                for name, slots in free.items():
                    if slots <= 0:
                        continue
                    due = await self.store.due_deliveries(time.time(), [name], exclude=set(self._inflight),
                                                            limit=slots)
                    full = full and len(due) == slots
                    for d in due:
                        self._start(d, self.endpoints[d.webhook])
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    await self._prune()
                open_names = [n for n, slots in free.items() if slots > 0]
                if open_names and full:
                    wait_s = 0.0  # every open endpoint filled its slots: there may be more
                else:
                    nxt = await self.store.next_due_at(open_names, exclude=set(self._inflight))
                    wait_s = IDLE_POLL_S if nxt is None else min(IDLE_POLL_S, max(0.0, nxt - time.time()))
                if wait_s > 0:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                    # cancellation that races with the wake-up, and this loop would
                    # never stop.
                    with suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            await self._wake.wait()
        finally:
            tasks = list(self._inflight.values())
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks)
            await self._session.close()
            self._session = None

    def _start(self, d: Delivery, ep: WebhookEndpoint) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(d, ep), name=f"webhook-{d.id}")
        self._inflight[d.id] = task
        self._inflight_to[d.id] = ep.name
        delivery_id = d.id

        def done(_task: asyncio.Task[None]) -> None:
            self._done(delivery_id)

        task.add_done_callback(done)

    def _outcome(self, endpoint: str, outcome: str) -> None:
        self.outcomes[(endpoint, outcome)] += 1
        if self.on_outcome is not None:
            self.on_outcome(endpoint, outcome)

    def _done(self, delivery_id: int) -> None:
        self._inflight.pop(delivery_id, None)
        self._inflight_to.pop(delivery_id, None)
        self._wake.set()

    def _active_names(self) -> list[str]:
        return [n for n in self.endpoints if n not in self._disabled]

    async def drop_removed(self) -> dict[str, int]:
        """Drop the deliveries to endpoints no longer in the config; {endpoint: count dropped}."""
        dropped = await self.store.drop_deliveries(list(self.endpoints))
        for name, n in dropped.items():
            self._disabled.discard(name)
            self.log.warning("webhook.deliveries_dropped", webhook=name, count=n,
                             why="the endpoint is no longer in [[webhooks.endpoints]]")
        return dropped

    async def _prune(self) -> None:
        if self.config.retention_days > 0:
            n = await self.store.prune_events(time.time() - self.config.retention_days * 86400)
            if n:
                self.log.info("events.pruned", count=n)

    # -- one attempt ----------------------------------------------------------------------------

    async def _deliver(self, d: Delivery, ep: WebhookEndpoint) -> None:
        """One attempt of ``d``, then its outcome settled in the outbox."""
        t0 = time.monotonic()
        http_status, retry_after, error = await self._post(d, ep)
        ms = round((time.monotonic() - t0) * 1000.0, 1)
        await self._settle(d, ep, http_status=http_status, retry_after=retry_after, error=error, ms=ms)

    async def _post(self, d: Delivery, ep: WebhookEndpoint) -> tuple[int | None, float | None, str | None]:
        """POST the signed body once: (HTTP status, Retry-After in s, error; None if it was delivered)."""
        assert self._session is not None
        body = d.body.encode()
        http_status: int | None = None
        retry_after: float | None = None
        error: str | None = None
        try:
            async with self._session.post(
                ep.url, data=body, headers=headers(ep.keys(), d.event_id, int(time.time()), body),
                allow_redirects=False, timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            ) as resp:
                http_status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                if not 200 <= resp.status < 300:
                    snippet = (await resp.content.read(200)).decode(errors="replace").strip()
                    if 300 <= resp.status < 400:
                        error = (f"HTTP {resp.status} redirect to {resp.headers.get('Location', '?')!r} "
                                 "not followed")
                    else:
                        error = f"HTTP {resp.status}" + (f": {snippet}" if snippet else "")
        except TimeoutError:
            error = f"no answer within {self.config.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        return http_status, retry_after, error

    async def _settle(self, d: Delivery, ep: WebhookEndpoint, *, http_status: int | None,
                      retry_after: float | None, error: str | None, ms: float) -> None:
        """Record an attempt's outcome: delivered, disabled (410), failed (out of attempts) or retry later."""
        attempt = d.attempts + 1
        log = self.log.bind(webhook=ep.name, event_id=d.event_id, type=d.event_type, job_id=d.job_id,
                            attempt=attempt, ms=ms)
        now = time.time()
        settle = functools.partial(self.store.settle_delivery, d.id, attempts=attempt, http_status=http_status,
                                   error=error)
        if error is None:
            self._outcome(ep.name, "delivered")
            await settle(status=DeliveryStatus.DELIVERED, next_at=now)
            log.debug("webhook.delivered", http_status=http_status)
        elif http_status == 410:
            self._outcome(ep.name, "disabled")
            self._disabled.add(ep.name)
            await settle(status=DeliveryStatus.DISABLED, next_at=now)
            n = await self.store.disable_webhook(ep.name, f"HTTP 410 Gone from {ep.url}")
            log.warning("webhook.endpoint_disabled", url=ep.url, parked=n + 1,
                        hint=f"instaclone webhooks enable {ep.name}")
        elif attempt >= self.config.max_attempts:
            self._outcome(ep.name, "failed")
            await settle(status=DeliveryStatus.FAILED, next_at=now)
            log.error("webhook.gave_up", error=error, hint=f"instaclone webhooks deliveries replay {d.id}")
        else:
            delay = retry_after if retry_after is not None else backoff_s(
                attempt, self.config.backoff_initial_s, self.config.backoff_max_s)
            self._outcome(ep.name, "retry")
            await settle(status=DeliveryStatus.PENDING, next_at=now + delay)
            log.warning("webhook.retry", error=error, retry_in_s=round(delay, 2),
                        retry_after=retry_after is not None)

    # -- operator actions -------------------------------------------------------------------------

    async def enable(self, name: str) -> bool:
        was = await self.store.enable_webhook(name)
        self._disabled.discard(name)
        self._wake.set()
        return was

    async def status(self) -> list[dict[str, Any]]:
        counts = await self.store.delivery_counts()
        disabled = await self.store.disabled_webhooks()
        out = []
        for ep in self.config.endpoints:
            out.append({"name": ep.name, "url": ep.url, "events": list(ep.events), "secrets": len(ep.secrets),
                        "enabled": ep.name not in disabled, **({"disabled": disabled[ep.name]}
                                                               if ep.name in disabled else {}),
                        "deliveries": counts.get(ep.name, {})})
        return out
