"""Control API over a real Unix socket, engine on the fake hypervisor: every error is JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fakes import fake_api


@pytest.fixture
async def api(tmp_path: Path):
    async with fake_api(tmp_path) as (client, virt, _sock):
        yield client, virt


async def test_clone_and_list(api):
    client, _virt = api
    status, body = await client.call("POST", "/v1/jobs?wait=10", {"source": "src", "name": "c1"})
    assert status == 201 and body["job"]["state"] == "Unstunned"
    status, body = await client.call("GET", f"/v1/jobs/{body['job']['id']}")
    assert status == 200 and set(body["job"]["durations_ms"]) >= {"Stunned", "Unstunned"}
    status, body = await client.call("GET", "/v1/clones")
    assert [c["name"] for c in body["clones"]] == ["c1"]
    status, body = await client.call("GET", "/v1/health")
    assert status == 200 and body["libvirt_connected"] is True


@pytest.mark.parametrize("method,path,kw,status,code", [
    ("POST", "/v1/jobs", {"raw": b"{not json"}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"raw": b"[1,2]"}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"raw": b"\xff\xfe"}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"body": {"source": "src"}}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"body": {"source": "src", "name": "c", "evil": 1}}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"body": {"source": "src", "name": "a/b"}}, 400, "invalid_name"),
    ("POST", "/v1/jobs", {"body": {"source": "src", "name": "é"}}, 400, "invalid_name"),
    ("POST", "/v1/jobs", {"body": {"source": "src", "name": "x" * 10_000}}, 400, "invalid_name"),
    ("POST", "/v1/jobs", {"body": {"source": "src", "name": "c", "count": -1}}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"body": {"source": "src", "name": "c", "count": 1.5}}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"body": {"source": "ghost", "name": "c"}}, 404, "source_not_found"),
    ("POST", "/v1/jobs", {"body": {"source": "src", "name": "src"}}, 409, "name_in_use"),
    ("POST", "/v1/jobs?wait=abc", {"body": {"source": "src", "name": "c"}}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"raw": b"{" + b" " * 200_000 + b"}"}, 413, "body_too_large"),
    ("GET", "/v1/jobs/nope", {}, 404, "not_found"),
    ("DELETE", "/v1/clones/src", {}, 404, "not_found"),
    ("GET", "/v1/nothing", {}, 404, "not_found"),
    ("PUT", "/v1/jobs", {}, 405, "method_not_allowed"),
])
async def test_errors_are_json(api, method, path, kw, status, code):
    client, virt = api
    got, body = await client.call(method, path, kw.get("body"), raw=kw.get("raw"))
    assert got == status, body
    assert body["error"]["code"] == code
    assert "Traceback" not in body["error"]["message"]
    assert set(virt.domains) == {"src"}


async def test_openapi_document(api):
    client, _ = api
    status, body = await client.call("GET", "/v1/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.")
    assert "/v1/jobs" in body["paths"]


async def test_head_of_the_event_stream_has_no_body(api, tmp_path):
    """HEAD /v1/events with events in the journal: headers only (a body corrupted the next read)."""
    import asyncio

    client, _ = api
    status, _ = await client.call("POST", "/v1/jobs?wait=10", {"source": "src", "name": "c1"})
    assert status == 201
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "ctl.sock"))
    writer.write(b"HEAD /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"application/x-ndjson" in head
    assert rest in (b"", b"0\r\n\r\n"), rest[:200]


@pytest.mark.parametrize("method,path,body,status,code", [
    ("POST", "/v1/pools", {"name": "p", "source": "src"}, 400, "invalid_request"),
    ("POST", "/v1/pools", {"name": "p", "source": "src", "size": -2}, 400, "invalid_request"),
    ("POST", "/v1/pools", {"name": "p", "source": "src", "size": 1, "evil": 1}, 400, "invalid_request"),
    ("POST", "/v1/pools", {"name": "p", "source": "ghost", "size": 1}, 404, "source_not_found"),
    ("POST", "/v1/pools", {"name": "a/b", "source": "src", "size": 1}, 400, "invalid_name"),
    ("GET", "/v1/pools/nope", None, 404, "not_found"),
    ("PATCH", "/v1/pools/nope", {"size": 1}, 404, "not_found"),
    ("DELETE", "/v1/pools/nope", None, 404, "not_found"),
    ("POST", "/v1/pools/nope/claim", {}, 404, "not_found"),
    ("POST", "/v1/clones/nope/release", None, 404, "not_found"),
    ("POST", "/v1/jobs", {"source": "src", "name": "c", "ttl_s": 0}, 400, "invalid_request"),
    ("POST", "/v1/jobs", {"source": "src", "name": "c", "ttl_s": "1h"}, 400, "invalid_request"),
])
async def test_pool_errors_are_json(api, method, path, body, status, code):
    client, virt = api
    got, out = await client.call(method, path, body)
    assert got == status, out
    assert out["error"]["code"] == code
    assert set(virt.domains) == {"src"}


async def test_pool_over_the_api(api):
    import asyncio

    client, virt = api
    status, out = await client.call("POST", "/v1/pools", {"name": "p", "source": "src", "size": 0})
    assert status == 201 and out["pool"]["size"] == 0
    status, out = await client.call("POST", "/v1/pools/p/claim", {"wait_s": 0.1})
    assert status == 503 and out["error"]["code"] == "pool_empty"
    status, out = await client.call("PATCH", "/v1/pools/p", {"size": 1})
    assert status == 200 and out["pool"]["size"] == 1
    status, out = await client.call("POST", "/v1/pools/p/claim", {"wait_s": 30, "ttl_s": 3600})
    assert status == 200, out
    name = out["claim"]["clone"]["name"]
    assert virt.domains[name].state == "running"
    status, out = await client.call("GET", "/v1/pools")
    assert status == 200 and out["pools"][0]["claimed"] == [name]
    status, out = await client.call("POST", f"/v1/clones/{name}/release")
    assert status == 200 and out["released"]["pool"] == "p"
    status, out = await client.call("DELETE", "/v1/pools/p")
    assert status == 200
    for _ in range(200):  # a member being made when the pool went is destroyed by the keeper
        if set(virt.domains) == {"src"}:
            break
        await asyncio.sleep(0.05)
