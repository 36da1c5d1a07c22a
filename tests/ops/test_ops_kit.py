"""The operators' kit: Prometheus alert rules and the Grafana dashboard.

The rules are checked and unit-tested with promtool (Debian's prometheus
package; scripts/install-promtool.sh takes the binary out of it). Every
metric a rule or a panel queries, and every label it matches on, is checked
against a real scrape of the daemon's registry after real activity: clone
jobs on the fake hypervisor (one aborted at the stun deadline), a pool filled
and claimed, webhooks delivered and given up.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from instaclone import config as cfg, events
from instaclone.outbox.bus import EventBus
from instaclone.outbox.metrics import Metrics
from instaclone.outbox.webhooks import WebhookSender
from instaclone.requests import ClaimRequest, CloneRequest, PoolRequest
from instaclone.store import Store
from tests.support.fakes import FakeHypervisor, fake_engine
from tests.support.proclib import free_port
from tests.support.receiver import Receiver

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "instaclone-alerts.yml"
RULES_TEST = ROOT / "config" / "prometheus" / "instaclone-alerts.test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "instaclone.json"

#: Labels Prometheus adds to every scraped series (and "le" of histogram buckets).
TARGET_LABELS = {"instance", "job"}
#: Series Prometheus makes itself, not the daemon.
PROMETHEUS_SERIES = {"up"}
_FUNCTIONS_AND_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                           "group_left", "group_right", "sum", "min", "max", "avg", "count", "topk"}


# -- promtool ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool's path; installed by scripts/install-promtool.sh (as setup.sh does) if missing."""
    found = shutil.which("promtool") or ("/usr/local/bin/promtool" if os.access("/usr/local/bin/promtool", os.X_OK)
                                         else None)
    if found is None and os.geteuid() == 0:
        r = subprocess.run([str(ROOT / "scripts" / "install-promtool.sh")], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            pytest.skip(f"promtool could not be installed: {r.stderr.strip()[-500:]}")
        found = shutil.which("promtool") or "/usr/local/bin/promtool"
    if found is None:
        pytest.skip("promtool missing and not root: run scripts/install-promtool.sh as root")
    return found


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 10 rules found" in r.stdout, r.stdout + r.stderr


def test_alert_rules_unit_tests(promtool: str) -> None:
    """Each main alert fires (and stays quiet) on the series that should make it, labels and text included."""
    r = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel's PromQL, with Grafana's variables filled in, is valid (as a recording rule for promtool)."""
    rules = [{"record": f"dashboard:panel{i}", "expr": expr} for i, expr in enumerate(grafana_exprs(fill=True))]
    f = tmp_path / "dashboard-rules.yml"
    f.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- what the rules and the dashboard say ------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def grafana_exprs(*, fill: bool = False) -> list[str]:
    """Every target's expr in the dashboard; ``fill``: Grafana's variables replaced by values."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if fill:
                expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
            out.append(expr)
    return out


def selectors(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The metric names an expression reads, each with the labels it matches on, and its grouping labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # string literals say nothing about names
    grouping: set[str] = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouping |= {g.strip() for g in m.group(1).split(",") if g.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)                # range durations
    metrics: dict[str, set[str]] = {}
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = m.group(1), m.group(2), m.group(3)
        if call and not matchers:
            continue  # a function: rate(, histogram_quantile(, ...
        if name in _FUNCTIONS_AND_KEYWORDS or re.fullmatch(r"\d.*|e\d*|inf|nan", name):
            continue
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
        metrics.setdefault(name, set()).update(labels)
    return metrics, grouping


def test_selector_parser() -> None:
    got, grouping = selectors('histogram_quantile(0.95, sum by (le, state) (rate(a_bucket{instance=~"$x", '
                              'job="j"}[5m]))) > ignoring(state) b and c{le="0.8"} unless absent(up{job="i"})')
    assert got == {"a_bucket": {"instance", "job"}, "b": set(), "c": {"le"}, "up": {"job"}}
    assert grouping == {"le", "state"}


# -- the daemon's real exposition ----------------------------------------------------------------


async def until(pred: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


async def scrape_after_activity(tmp: Path) -> str:
    """GET /metrics (the daemon's Metrics app on a loopback port) after jobs, a pool and webhooks ran."""
    secret = events.new_secret()
    failing = await Receiver([secret], mode="500").start()
    healthy = await Receiver([secret]).start()
    c = cfg.Config()
    c = replace(c, daemon=replace(c.daemon, state_dir=tmp / "state"),
                clone=replace(c.clone, stun_deadline_ms=500, step_timeout_s=30),
                pools=replace(c.pools, check_interval_s=0.2),
                webhooks=replace(c.webhooks, timeout_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.1, max_attempts=2,
                                 endpoints=(cfg.WebhookEndpoint("ops", failing.url, (secret,), ("*",)),
                                            cfg.WebhookEndpoint("audit", healthy.url, (secret,), ("*",)))))
    # Wired as Daemon.start wires them.
    bus, metrics = EventBus(), Metrics()
    bus.subscribe(metrics.on_event)
    metrics.configure(c.clone.stun_deadline_ms)
    store = Store(c.store_path, on_commit=bus.publish)
    await store.open()
    virt = FakeHypervisor()
    (tmp / "base.qcow2").write_bytes(b"base")
    virt.add_source("src", tmp / "base.qcow2")
    engine = fake_engine(c, store, virt)
    engine.pools.observe = metrics.on_pool
    metrics.set_pools(await store.list_pools())
    sender = WebhookSender(c.webhooks, store, bus=bus, gate=engine.outside_stun)
    sender.on_outcome = metrics.on_delivery
    await engine.recover()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(sender.run()), loop.create_task(engine.run_background())]
    runner = web.AppRunner(metrics.app())
    try:
        job = await engine.submit(CloneRequest(source="src", name="ok-1", customize=False))
        await engine.wait(job.id, 20)
        virt.delay["save_state"] = 2.0  # past the 500 ms stun deadline: aborted, rolled back
        job = await engine.submit(CloneRequest(source="src", name="slow-1", customize=False))
        await engine.wait(job.id, 20)
        del virt.delay["save_state"]
        await engine.pools.create(PoolRequest(name="ci", source="src", size=1, customize=False))

        async def pool_full() -> bool:
            return len((await engine.pools.show("ci"))["idle"]) == 1
        await until(pool_full)
        await engine.pools.claim(ClaimRequest("ci", ttl_s=600))

        async def deliveries_settled() -> bool:
            counts = await store.delivery_counts()
            return bool(counts.get("ops", {}).get("failed")) and bool(counts.get("audit", {}).get("delivered"))
        await until(deliveries_settled)
        # What Daemon._watch does every few seconds.
        metrics.set_deliveries(await store.delivery_counts())
        metrics.libvirt_up.set(1)
        metrics.webhook_in_flight.set(sender.in_flight)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            return await r.text()
    finally:
        await runner.cleanup()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.shutdown(5)
        await store.close()
        await failing.stop()
        await healthy.stop()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """{sample name: label names} of the scrape, e.g. instaclone_stun_duration_seconds_bucket: {le}."""
    text = asyncio.run(scrape_after_activity(tmp_path_factory.mktemp("ops")))
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_the_scrape_has_the_series_the_kit_needs(exported: dict[str, set[str]]) -> None:
    """The activity above really produced them (else the checks below would prove little)."""
    for name in ("instaclone_stun_duration_seconds_bucket", "instaclone_stun_deadline_ratio_bucket",
                 "instaclone_stun_deadline_seconds", "instaclone_job_errors_total", "instaclone_pool_size",
                 "instaclone_pool_members", "instaclone_pool_claim_wait_seconds_bucket",
                 "instaclone_pool_replenish_seconds_count", "instaclone_webhook_deliveries_total",
                 "instaclone_webhook_outbox", "instaclone_jobs_finished_total", "instaclone_clones_total"):
        assert name in exported, name


def check_exprs(exprs: list[str], exported: dict[str, set[str]]) -> None:
    for expr in exprs:
        metrics, grouping = selectors(expr)
        assert metrics, f"no metric found in {expr!r}"
        known_labels = set(TARGET_LABELS)
        for name, labels in metrics.items():
            if name in PROMETHEUS_SERIES:
                continue
            assert name in exported, f"{name} (in {expr!r}) is not exported; exported: {sorted(exported)}"
            assert labels <= exported[name] | TARGET_LABELS, \
                f"{name} has no label {labels - exported[name] - TARGET_LABELS} (in {expr!r})"
            known_labels |= exported[name]
        assert grouping <= known_labels, f"grouping by {grouping - known_labels}, no such label (in {expr!r})"


def test_alert_rules_query_exported_metrics(exported: dict[str, set[str]]) -> None:
    check_exprs([rule["expr"] for rule in alert_rules()], exported)


def test_dashboard_queries_exported_metrics(exported: dict[str, set[str]]) -> None:
    check_exprs(grafana_exprs(), exported)


def test_stun_deadline_metrics_values(tmp_path: Path) -> None:
    """The ratio histogram divides by the deadline in force; a reload's new deadline applies to later stuns."""
    from instaclone.model import Event

    m = Metrics()
    m.configure(2000)

    def unstunned(job: str, stun_ms: float) -> Event:
        body = json.dumps({"data": {"job_id": job, "state": "Unstunned", "stun_ms": stun_ms, "clones": ["a"],
                                    "duration_ms": 1.0}})
        return Event(cursor=1, id=job, type="clone.ready", job_id=job, at=0.0, body=body)

    m.on_event(unstunned("j1", 1700.0))  # 0.85 of 2 s
    m.configure(4000)
    m.on_event(unstunned("j2", 1700.0))  # 0.425 of 4 s
    reg = m.registry
    assert reg.get_sample_value("instaclone_stun_deadline_seconds") == 4.0
    assert reg.get_sample_value("instaclone_stun_deadline_ratio_bucket", {"le": "0.8"}) == 1.0
    assert reg.get_sample_value("instaclone_stun_deadline_ratio_bucket", {"le": "0.9"}) == 2.0


def test_pool_series_follow_pool_events() -> None:
    from instaclone.model import Event

    m = Metrics()

    def pool_event(type_: str, **data: Any) -> Event:
        return Event(cursor=1, id=type_, type=type_, job_id=None, at=0.0,
                     body=json.dumps({"data": {"pool": "ci", **data}}))

    m.on_event(pool_event("pool.created", size=3))
    m.on_pool("members", "ci", {"idle": 1.0, "claimed": 0.0, "pending": 2.0})
    assert m.registry.get_sample_value("instaclone_pool_size", {"pool": "ci"}) == 3.0
    m.on_event(pool_event("pool.updated", size=5, previous_size=3))
    assert m.registry.get_sample_value("instaclone_pool_size", {"pool": "ci"}) == 5.0
    m.on_event(pool_event("pool.deleted", idle=["ci-1"], claimed_kept=0))
    # A deleted pool's series go: no "below its size" alert for a pool that is not there.
    assert m.registry.get_sample_value("instaclone_pool_size", {"pool": "ci"}) is None
    assert m.registry.get_sample_value("instaclone_pool_members", {"pool": "ci", "state": "idle"}) is None


# -- shape -----------------------------------------------------------------------------------------


def test_every_alert_says_what_and_what_to_do() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for must in ("InstacloneDown", "InstacloneLibvirtDown", "InstacloneStunNearDeadline", "InstacloneWebhooksFailing",
                 "InstacloneWebhookBacklogGrowing", "InstaclonePoolBelowSize"):
        assert must in names
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["alert"]


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "instaclone" and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    titles = []
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        titles.append(p["title"])
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all("$instance" in t["expr"] or "up{" in t["expr"] for t in p["targets"]), p["title"]
    for must in ("Stun duration vs deadline", "Jobs finished per minute, by final state", "Active jobs",
                 "libvirt", "Outbox, by status", "Idle members vs size", "Claim wait"):
        assert must in titles
