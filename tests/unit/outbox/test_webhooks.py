"""Events, the outbox and webhook delivery, against a real aiohttp receiver on loopback.

Clone jobs run on the fake hypervisor here: what is tested is delivery, not
cloning (tests/integration/test_clone.py checks webhooks for real guests).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from instaclone import config as cfg, events
from instaclone.errors import ConfigError
from instaclone.outbox.webhooks import backoff_s, parse_retry_after
from instaclone.requests import CloneRequest
from tests.support.apiclient import Api
from tests.support.receiver import Receiver
from tests.support.webhooklib import SECRET_A, SECRET_B, Hub, settled, until


@pytest.fixture
async def receiver():
    r = await Receiver([SECRET_A, SECRET_B]).start()
    yield r
    await r.stop()


@pytest.fixture
async def hub(tmp_path: Path, receiver: Receiver):
    h = await Hub(tmp_path, receiver).start()
    yield h
    await h.stop()


# -- pure parts ----------------------------------------------------------------------------


def test_signature_verifies_with_reference_library_for_every_secret():
    body = events.body_bytes(events.envelope("clone.ready", time.time(), {"job_id": "j"}))
    keys = [events.decode_secret(SECRET_A), events.decode_secret(SECRET_B)]
    h = events.headers(keys, "evt_1", int(time.time()), body)
    for secret in (SECRET_A, SECRET_B):  # a receiver that knows either secret accepts it (rotation)
        assert Webhook(secret).verify(body, h) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(events.new_secret()).verify(body, h)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(body + b" ", h)


def test_backoff_grows_is_jittered_and_capped():
    lo = [backoff_s(n, 1.0, 60.0, rand=lambda: 0.0) for n in range(1, 10)]
    hi = [backoff_s(n, 1.0, 60.0, rand=lambda: 1.0) for n in range(1, 10)]
    assert lo[:4] == [0.5, 1.0, 2.0, 4.0] and hi[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(hi) == 60.0 and max(lo) == 30.0
    assert backoff_s(10_000, 1.0, 60.0) <= 60.0


def test_retry_after_forms():
    now = 1_800_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Wed, 15 Jan 2027 08:00:00 GMT", 1_800_000_000.0 - 100) is not None
    assert parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30)), now) == 30.0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None
    assert parse_retry_after("99999999", now) == 86400.0


@pytest.mark.parametrize("endpoint,key", [
    ({"url": "ftp://x/y", "secret": SECRET_A}, "webhooks.endpoints[0].url"),
    ({"url": "http:///nohost", "secret": SECRET_A}, "webhooks.endpoints[0].url"),
    ({"url": "https://user:pw@h/x", "secret": SECRET_A}, "webhooks.endpoints[0].url"),
    ({"url": "https://h:99999/x", "secret": SECRET_A}, "webhooks.endpoints[0].url"),
    ({"url": "https://h/x"}, "webhooks.endpoints[0].secret"),
    ({"url": "https://h/x", "secret": "plain"}, "webhooks.endpoints[0].secret"),
    ({"url": "https://h/x", "secret": "whsec_!!!"}, "webhooks.endpoints[0].secret"),
    ({"url": "https://h/x", "secret": "whsec_c2hvcnQ="}, "webhooks.endpoints[0].secret"),
    ({"url": "https://h/x", "secrets": [SECRET_A, 3]}, "webhooks.endpoints[0].secrets"),
    ({"url": "https://h/x", "secret": SECRET_A, "events": ["clone.nope"]}, "webhooks.endpoints[0].events"),
    ({"url": "https://h/x", "secret": SECRET_A, "name": "a b"}, "webhooks.endpoints[0].name"),
    ({"url": "https://h/x", "secret": SECRET_A, "retries": 3}, "webhooks.endpoints[0].retries"),
])
def test_bad_endpoint_config_names_the_key(endpoint, key):
    with pytest.raises(ConfigError) as err:
        cfg.from_dict({"webhooks": {"endpoints": [endpoint]}})
    assert err.value.message.startswith(key + ":"), err.value.message


def test_endpoint_config_accepted():
    c = cfg.from_dict({"webhooks": {"timeout_s": 3, "endpoints": [
        {"name": "ops", "url": "https://hooks.example.com/ic", "secrets": [SECRET_A, SECRET_B],
         "events": ["clone.ready", "clone.failed"]},
        {"url": "http://127.0.0.1:9000/", "secret": SECRET_A, "events": ["clone.*"]}]}})
    assert [e.name for e in c.webhooks.endpoints] == ["ops", "endpoint1"]
    assert c.webhooks.timeout_s == 3.0 and len(c.webhooks.endpoints[0].keys()) == 2


# -- delivery ---------------------------------------------------------------------------------


async def test_every_state_change_delivered_signed_in_order(hub: Hub, receiver: Receiver):
    job_id = await hub.clone("c1")
    want = ["clone.requested", "clone.stunned", "clone.source_delta_created", "clone.clone_delta_created",
            "clone.memory_linked", "clone.configured", "clone.ready"]
    await until(lambda: len(receiver.received) == len(want), what="7 deliveries")
    got = sorted((r.payload for r in receiver.received), key=lambda p: p["data"]["sequence"])
    assert [p["type"] for p in got] == want
    assert [p["data"]["sequence"] for p in got] == list(range(1, 8))
    for r in receiver.received:
        assert r.verified_by == [0, 1], "each message is signed with both secrets while rotating"
        assert r.payload["data"]["job_id"] == job_id and r.payload["data"]["clones"] == ["c1"]
        assert r.id.startswith("evt_") and r.headers["webhook-timestamp"].isdigit()
    ready = receiver.by_type("clone.ready")[0].payload["data"]
    assert ready["state"] == "Unstunned" and ready["error"] is None and "Stunned" in ready["durations_ms"]
    assert receiver.ids() == await hub.event_ids()
    rows = await settled(hub)
    assert {d.status for d in rows} == {"delivered"} and all(d.attempts == 1 for d in rows)


async def test_failed_job_and_destroy_events(hub: Hub, receiver: Receiver):
    hub.virt.fail["define"] = RuntimeError("define exploded")
    job = await hub.engine.submit(CloneRequest(source="src", name="bad"))
    await hub.engine.wait(job.id, 10)
    hub.virt.fail.clear()
    await hub.clone("good")
    await hub.engine.destroy_clone("good")
    await until(lambda: receiver.by_type("clone.destroyed") and receiver.by_type("clone.failed"), what="events")
    failed = receiver.by_type("clone.failed")[0].payload["data"]
    assert failed["job_id"] == job.id and "define exploded" in failed["error"]["message"]
    assert receiver.by_type("clone.destroyed")[0].payload["data"]["clone"] == "good"


async def test_receiver_down_then_up_gets_every_event_once_per_id(hub: Hub, receiver: Receiver):
    receiver.mode = "500"
    for i in range(3):
        await hub.clone(f"d{i}")
    await until(lambda: receiver.attempts >= 40, what="retries against a failing receiver")
    assert receiver.received == []
    receiver.mode = "ok"
    all_ids = await hub.event_ids()
    assert len(all_ids) == 21
    await until(lambda: receiver.ids() == all_ids, what="all events after recovery")
    await asyncio.sleep(0.5)  # let any straggling retry land
    bodies: dict[str, set[bytes]] = {}
    for r in receiver.received:
        bodies.setdefault(r.id, set()).add(r.body)
    assert all(len(b) == 1 for b in bodies.values()), "a repeated id must carry the same body"
    assert len(receiver.received) == len(all_ids), "nothing is sent again once delivered"
    rows = await settled(hub)
    assert all(d.status == "delivered" for d in rows) and max(d.attempts for d in rows) > 1


async def test_daemon_restart_mid_retry_loses_nothing(tmp_path: Path, receiver: Receiver):
    receiver.mode = "503"
    receiver.retry_after = "0"
    h = await Hub(tmp_path, receiver).start()
    try:
        await h.clone("r1")
        await until(lambda: receiver.attempts >= 7, what="first attempts")
        ids_before = await h.event_ids()
    finally:
        await h.stop()  # the outbox still holds pending deliveries
    receiver.mode = "ok"
    h2 = Hub(tmp_path, receiver)
    h2.virt = h.virt
    await h2.start()
    try:
        await h2.clone("r2")
        await until(lambda: len(receiver.ids()) == 14, what="all 14 events after restart")
        assert ids_before <= receiver.ids()
        assert receiver.ids() == await h2.event_ids()
    finally:
        await h2.stop()


async def test_retry_after_is_honoured(tmp_path: Path, receiver: Receiver):
    receiver.mode = "503"
    receiver.retry_after = "30"
    h = await Hub(tmp_path, receiver).start()
    try:
        await h.clone("ra")
        await until(lambda: receiver.attempts >= 7, what="one attempt per event")
        await asyncio.sleep(0.5)
        assert receiver.attempts == 7, "no retry before Retry-After, despite a 50 ms backoff"
        rows = await h.store.list_deliveries()
        assert all(d.status == "pending" and d.last_status == 503 for d in rows)
        assert all(d.next_at - d.updated_at >= 29.9 for d in rows)
    finally:
        await h.stop()


async def test_410_disables_endpoint_until_enabled_and_replayed(hub: Hub, receiver: Receiver):
    receiver.mode = "410"
    await hub.clone("g1")
    await until(lambda: receiver.attempts >= 1, what="first attempt")
    await asyncio.sleep(0.3)
    attempts = receiver.attempts
    await hub.clone("g2")  # an endpoint that is gone gets no new deliveries
    await asyncio.sleep(0.3)
    assert receiver.attempts == attempts
    all_ids = await hub.event_ids()
    async with Api(hub.sock) as api:
        status, body = await api.call("GET", "/v1/webhooks")
        assert status == 200 and body["webhooks"][0]["enabled"] is False
        receiver.mode = "ok"
        status, body = await api.call("POST", "/v1/webhooks/rx/enable")
        assert status == 200 and body["was_disabled"] is True
        status, body = await api.call("POST", "/v1/webhooks/deliveries/replay", {"status": "disabled"})
        assert status == 200 and len(body["replayed"]) == 14, "events while disabled are parked, not lost"
    await until(lambda: receiver.ids() == all_ids, what="replayed deliveries")


async def test_redirect_is_not_followed(hub: Hub, receiver: Receiver):
    receiver.mode = "redirect"
    await hub.clone("rd")
    await until(lambda: receiver.attempts >= 14, what="retries")
    assert receiver.redirect_hits == 0
    rows = await hub.store.list_deliveries()
    assert all(d.status == "pending" and "redirect" in (d.last_error or "") for d in rows)


async def test_hanging_receiver_never_slows_clones_and_times_out(hub: Hub, receiver: Receiver):
    receiver.mode = "hang"
    for i in range(3):  # each clone finishes while every delivery is stuck in the receiver
        await hub.clone(f"h{i}")
    await until(lambda: receiver.attempts >= 8, what="attempts to the hanging receiver")
    assert hub.sender.in_flight <= hub.config.webhooks.max_in_flight
    await asyncio.sleep(1.3)  # timeout_s is 1 s
    rows = await hub.store.list_deliveries(limit=1000)
    assert any("no answer within 1 s" in (d.last_error or "") for d in rows)


async def test_nothing_is_sent_inside_the_stun_window(hub: Hub, receiver: Receiver):
    seen_during_stun: list[int] = []

    async def hook(job_id: str, step: str) -> None:
        if step == "MemoryLinked":  # the source is stunned here; clone.stunned is in the outbox
            before = receiver.attempts
            await asyncio.sleep(0.5)
            seen_during_stun.append(receiver.attempts - before)

    hub.engine.step_hook = hook
    await hub.clone("s1")
    assert seen_during_stun == [0]
    await until(lambda: len(receiver.received) == 7, what="deliveries after the stun")


# -- the event stream -----------------------------------------------------------------------


async def read_lines(api: Api, path: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    assert api._session is not None
    out: list[dict[str, Any]] = []
    async with api._session.get(f"http://x{path}") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
        async with asyncio.timeout(timeout):
            async for line in r.content:
                if line.strip():
                    out.append(json.loads(line))
                if len(out) >= n:
                    break
    return out


async def test_event_stream_follow_with_filters(hub: Hub):
    async with Api(hub.sock) as api:
        follower = asyncio.ensure_future(read_lines(api, "/v1/events?follow=1&tail=0&type=clone.ready,clone.stunned",
                                                    4))
        await asyncio.sleep(0.2)
        j1 = await hub.clone("f1")
        j2 = await hub.clone("f2")
        got = await follower
        assert [(e["type"], e["data"]["job_id"]) for e in got] == [
            ("clone.stunned", j1), ("clone.ready", j1), ("clone.stunned", j2), ("clone.ready", j2)]
        assert [e["cursor"] for e in got] == sorted(e["cursor"] for e in got)
        # History, filtered by job: all 7 of j2's events, in order.
        hist = await read_lines(api, f"/v1/events?job={j2}", 7)
        assert [e["data"]["sequence"] for e in hist] == list(range(1, 8))
        # Resume after a cursor.
        after = await read_lines(api, f"/v1/events?since={got[1]['cursor']}&type=clone.ready", 1)
        assert after[0]["data"]["job_id"] == j2
        status, body = await api.call("GET", "/v1/events?type=nope")
        assert status == 400 and body["error"]["code"] == "invalid_request"
        status, body = await api.call("GET", "/v1/events?since=-4")
        assert status == 400


async def test_deliveries_listing_and_replay_by_id(hub: Hub, receiver: Receiver):
    await hub.clone("l1")
    await until(lambda: len(receiver.received) == 7, what="deliveries")
    async with Api(hub.sock) as api:
        status, body = await api.call("GET", "/v1/webhooks/deliveries?status=delivered&limit=3")
        assert status == 200 and len(body["deliveries"]) == 3
        one = body["deliveries"][0]
        assert one["webhook"] == "rx" and one["last_status"] == 204
        status, body = await api.call("POST", "/v1/webhooks/deliveries/replay", {"ids": [one["id"]]})
        assert body["replayed"] == [one["id"]]
        for bad in ({}, {"ids": "x"}, {"status": "weird"}, {"what": 1}):
            status, body = await api.call("POST", "/v1/webhooks/deliveries/replay", bad)
            assert status == 400, bad
    await until(lambda: len(receiver.received) == 8, what="the replayed delivery")
    assert receiver.received[-1].id == one["event_id"], "a replay keeps the event id"


async def test_cli_events_and_webhooks(hub: Hub, receiver: Receiver, capsys: pytest.CaptureFixture[str]):
    from instaclone import cli

    exe = Path(__import__("sys").executable).parent / "instaclone"
    follow = await asyncio.create_subprocess_exec(
        str(exe), "--socket", str(hub.sock), "-o", "json", "events", "-f", "--tail", "0", "--type", "clone.ready",
        stdout=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(1.0)  # the CLI process connects
        job_id = await hub.clone("cli1")
        assert follow.stdout is not None
        line = await asyncio.wait_for(follow.stdout.readline(), 20)
        assert json.loads(line)["data"]["job_id"] == job_id
    finally:
        follow.terminate()
        await follow.wait()
    await until(lambda: len(receiver.received) == 7, what="deliveries")
    sock = str(hub.sock)
    capsys.readouterr()

    def cli_lines() -> list[str]:  # the CLI's output, without the in-process daemon's log lines
        return [ln for ln in capsys.readouterr().out.splitlines() if " [" not in ln[:30]]

    assert await asyncio.to_thread(cli.main, ["--socket", sock, "events", "--job", job_id]) == 0
    out = cli_lines()
    assert len(out) == 7 and "clone.ready" in out[-1] and "stun" in out[-1]
    assert await asyncio.to_thread(cli.main, ["--socket", sock, "webhooks", "ls"]) == 0
    assert "rx" in "".join(cli_lines())
    assert await asyncio.to_thread(cli.main, ["--socket", sock, "webhooks", "deliveries", "ls", "--job", job_id]) == 0
    assert len(cli_lines()) == 8  # header + 7
    assert await asyncio.to_thread(cli.main, ["--socket", sock, "webhooks", "deliveries", "replay",
                                              "--event", json.loads(line)["id"]]) == 0
    assert "queued 1 deliveries again" in "".join(cli_lines())
    assert await asyncio.to_thread(cli.main, ["--socket", sock, "events", "--type", "bogus"]) == 1


async def test_a_hanging_endpoint_does_not_hold_up_another(hub: Hub, receiver: Receiver):
    receiver.mode = "hang"  # takes all of its own slots, for good
    other = await Receiver([SECRET_A]).start()
    try:
        endpoints = (*hub.config.webhooks.endpoints, cfg.WebhookEndpoint("other", other.url, (SECRET_A,)))
        hub.sender.configure(replace(hub.config.webhooks, endpoints=endpoints, max_in_flight=2, timeout_s=60))
        for i in range(3):
            await hub.clone(f"two{i}")
        await until(lambda: len(other.received) == 21, what="every event at the healthy endpoint")
        assert receiver.attempts == 2, "the hanging endpoint holds exactly its own 2 slots"
    finally:
        await other.stop()
