"""Prometheus metrics, fed from the event outbox and the webhook sender.

config/grafana/instaclone.json and config/prometheus/instaclone-alerts.yml
are built on these names (tests/ops/test_ops_kit.py checks them against a scrape).

Served by prometheus_client's aiohttp handler at ``/metrics`` on the control
socket and, if ``daemon.metrics_listen`` is set, on a loopback TCP port.
"""

from __future__ import annotations

import json
from contextlib import suppress
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

from ..model import Event, PoolRecord
from ..states import HAPPY_PATH, TERMINAL, State

#: Step durations run from a few ms (a pause) to seconds (QEMU start-up under TCG).
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: A stun as a fraction of its deadline: an alert "a stun took over 80% of it"
#: reads one bucket, whatever clone.stun_deadline_ms is.
_DEADLINE_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5)


class Metrics:
    """The daemon's Prometheus registry; :meth:`on_event` listens on the event bus."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.state_seconds = Histogram(
            "instaclone_state_duration_seconds", "Time the step that reached each state took",
            ["state"], buckets=_STEP_BUCKETS, registry=r)
        self.stun_seconds = Histogram(
            "instaclone_stun_duration_seconds", "How long a source stayed stunned per job",
            buckets=_STEP_BUCKETS, registry=r)
        self.stun_deadline = Gauge("instaclone_stun_deadline_seconds",
                                   "clone.stun_deadline_ms, the longest a source may stay stunned", registry=r)
        self.stun_ratio = Histogram(
            "instaclone_stun_deadline_ratio", "Each stun's length as a fraction of clone.stun_deadline_ms",
            buckets=_DEADLINE_BUCKETS, registry=r)
        self.clones = Counter("instaclone_clones",
                              "Clones asked for, by their job's result (ready, partial, failed, needs_attention)",
                              ["result"], registry=r)
        self.jobs_finished = Counter("instaclone_jobs_finished", "Jobs by final state", ["state"], registry=r)
        self.job_errors = Counter("instaclone_job_errors", "Jobs that ended with an error, by its code",
                                  ["code"], registry=r)
        self.jobs_active = Gauge("instaclone_jobs_active", "Unfinished jobs by current state", ["state"],
                                 registry=r)
        self.events = Counter("instaclone_events", "Events written to the outbox, by type", ["type"], registry=r)
        self.deliveries = Counter("instaclone_webhook_deliveries", "Webhook delivery attempts by outcome",
                                  ["webhook", "outcome"], registry=r)
        self.webhook_outbox = Gauge("instaclone_webhook_outbox",
                                    "Deliveries in the outbox by status (pending, failed, disabled, delivered)",
                                    ["webhook", "status"], registry=r)
        self.webhook_in_flight = Gauge("instaclone_webhook_in_flight", "Webhook requests in flight", registry=r)
        self.libvirt_up = Gauge("instaclone_libvirt_up", "1 if the libvirt connection is alive", registry=r)
        self.pool_members = Gauge("instaclone_pool_members", "Pool members by state (idle, claimed, pending)",
                                  ["pool", "state"], registry=r)
        self.pool_size = Gauge("instaclone_pool_size", "Idle members each pool keeps (its size)", ["pool"],
                               registry=r)
        self.pool_claims = Counter("instaclone_pool_claims", "Members handed out, per pool", ["pool"], registry=r)
        self.pool_claim_wait = Histogram("instaclone_pool_claim_wait_seconds",
                                         "How long a claim waited for an idle member", buckets=_STEP_BUCKETS,
                                         registry=r)
        self.pool_replenish = Histogram("instaclone_pool_replenish_seconds",
                                        "From a replenish job's request until its members were ready",
                                        buckets=_STEP_BUCKETS, registry=r)
        for s in (*HAPPY_PATH, State.FAILED, State.NEEDS_ATTENTION):
            if s not in TERMINAL:
                self.jobs_active.labels(s.value).set(0)
        self._job_state: dict[str, str] = {}
        self._webhook_series: set[tuple[str, str]] = set()
        self.stun_deadline_ms = 0.0

    def configure(self, stun_deadline_ms: float) -> None:
        """The stun deadline in force (at start and after each reload)."""
        self.stun_deadline_ms = float(stun_deadline_ms)
        self.stun_deadline.set(stun_deadline_ms / 1000.0)

    def set_pools(self, pools: list[PoolRecord]) -> None:
        """The pools in the store at start (later changes arrive as pool events)."""
        for p in pools:
            self.pool_size.labels(p.name).set(p.size)

    def set_deliveries(self, counts: dict[str, dict[str, int]]) -> None:
        """The outbox's {webhook: {status: count}}; statuses gone from it read 0."""
        seen = set()
        for webhook, by_status in counts.items():
            for status, n in by_status.items():
                self.webhook_outbox.labels(webhook, status).set(n)
                seen.add((webhook, status))
        for webhook, status in self._webhook_series - seen:
            self.webhook_outbox.labels(webhook, status).set(0)
        self._webhook_series |= seen

    def on_event(self, event: Event) -> None:
        """Event bus listener: update counters from one committed event."""
        self.events.labels(event.type).inc()
        data: dict[str, Any] = json.loads(event.body)["data"]
        if event.type.startswith("pool."):
            self._on_pool_event(event.type, data)
            return
        state = data.get("state")
        if event.job_id is None or state is None:
            return
        if data.get("duration_ms") is not None:
            self.state_seconds.labels(state).observe(data["duration_ms"] / 1000.0)
        prev = self._job_state.pop(event.job_id, None)
        if prev is not None:
            self.jobs_active.labels(prev).dec()
        if State(state) in TERMINAL:
            self.jobs_finished.labels(state).inc()
            result = {"Unstunned": "ready", "Partial": "partial", "Failed": "failed",
                      "NeedsAttention": "needs_attention"}[state]
            self.clones.labels(result).inc(len(data.get("clones", [])))
            error = data.get("error")
            if isinstance(error, dict) and isinstance(error.get("code"), str):
                self.job_errors.labels(error["code"]).inc()
            if data.get("stun_ms") is not None:
                self.stun_seconds.observe(data["stun_ms"] / 1000.0)
                if self.stun_deadline_ms > 0:
                    self.stun_ratio.observe(data["stun_ms"] / self.stun_deadline_ms)
        else:
            self._job_state[event.job_id] = state
            self.jobs_active.labels(state).inc()

    def _on_pool_event(self, type_: str, data: dict[str, Any]) -> None:
        pool = data.get("pool")
        if not isinstance(pool, str):
            return
        if type_ in ("pool.created", "pool.updated") and isinstance(data.get("size"), int):
            self.pool_size.labels(pool).set(data["size"])
        elif type_ == "pool.deleted":
            # A deleted pool is not "below its size": its series go.
            with suppress(KeyError):
                self.pool_size.remove(pool)
            for state in ("idle", "claimed", "pending"):
                with suppress(KeyError):
                    self.pool_members.remove(pool, state)

    def on_pool(self, kind: str, pool: str, data: dict[str, float]) -> None:
        """The pool keeper's observations: ``members`` counts, a ``claim``'s wait, a ``replenished`` job."""
        if kind == "members":
            for state, n in data.items():
                self.pool_members.labels(pool, state).set(n)
        elif kind == "claim":
            self.pool_claims.labels(pool).inc()
            self.pool_claim_wait.observe(data["wait_s"])
        elif kind == "replenished":
            self.pool_replenish.observe(data["seconds"])

    def on_delivery(self, webhook: str, outcome: str) -> None:
        self.deliveries.labels(webhook, outcome).inc()

    def handler(self) -> Any:
        return make_aiohttp_handler(self.registry)

    def app(self) -> web.Application:
        """A TCP-side app serving only ``/metrics``."""
        app = web.Application()
        app.router.add_get("/metrics", self.handler())
        return app
