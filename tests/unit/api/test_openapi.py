"""The OpenAPI document: valid, complete, and saying what the server enforces (issue 15, item 2).

Each case the issue found (the server refusing what the document called
valid, or answering what it did not list) is pinned twice: the document
now refuses the request (checked with a JSON Schema validator over the
document itself), and the server refuses it with a 400 the operation lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
from openapi_spec_validator import validate as validate_openapi
from structlog.testing import capture_logs

from instaclone.api import ROUTES, document, make_app
from instaclone.config import Config
from instaclone.identity import MAX_NAME_LEN
from tests.support.fakes import fake_api


@pytest.fixture
async def api(tmp_path: Path):
    async with fake_api(tmp_path) as (client, _virt, sock):
        _, doc = await client.call("GET", "/v1/openapi.json")
        yield client, doc, sock


def valid(doc: dict[str, Any], schema: dict[str, Any], instance: Any) -> bool:
    """Does ``instance`` conform to ``schema`` (which may $ref the document's components)?

    jsonschema_rs (schemathesis' validator), not jsonschema: its regexes are ECMA-262's as JSON
    Schema has them, where ``$`` is the end of the string; Python's ``re`` lets it match before a
    trailing newline, and would take "a\\n" as a name.
    """
    return bool(jsonschema_rs.Draft202012Validator({**schema, "components": doc["components"]}).is_valid(instance))


def body_schema(doc: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    schema: dict[str, Any] = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return schema


def param_schema(doc: dict[str, Any], path: str, method: str, name: str) -> dict[str, Any]:
    for p in doc["paths"][path][method]["parameters"]:
        if p["name"] == name:
            schema: dict[str, Any] = p["schema"]
            return schema
    raise AssertionError(f"{method} {path} has no parameter {name!r}")


def listed(doc: dict[str, Any], path: str, method: str, status: int) -> bool:
    return str(status) in doc["paths"][path][method]["responses"]


# -- the document --------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document(ROUTES, Config())
    assert doc["openapi"].startswith("3.1")
    validate_openapi(doc)
    json.dumps(doc)  # plain JSON, nothing Python-only in it


@pytest.mark.parametrize("with_metrics", [False, True])
def test_the_document_lists_every_route_of_the_app(with_metrics: bool) -> None:
    """Every (method, path) the app routes is in its document, and nothing else (HEAD is aiohttp's
    companion of each GET)."""
    from types import SimpleNamespace

    from instaclone.api.openapi import current_document
    from instaclone.outbox.metrics import Metrics

    engine = SimpleNamespace(config=Config())  # make_app keeps the engine and the store: no calls
    app = make_app(engine, object(), gc=object(), metrics=Metrics() if with_metrics else None)  # type: ignore[arg-type]
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    doc = current_document(app)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    assert ("GET", "/metrics") in served or not with_metrics
    assert len(served) == len(ROUTES) + with_metrics


def test_no_constraint_is_lost_in_the_document() -> None:
    """A pydantic constraint it cannot place (on a union, after a validator) lands in the schema as
    its Python name ("ge", "max_length"), which no JSON Schema validator reads: none may."""
    python_names = {"ge", "le", "gt", "lt", "max_length", "min_length", "allow_inf_nan", "strict", "multiple_of"}
    found: list[str] = []

    def walk(x: Any, where: str) -> None:
        if isinstance(x, dict):
            found.extend(f"{where}/{k}" for k in x if k in python_names)
            if x.get("type") == "array" and "maxLength" in x:
                found.append(f"{where}/maxLength (an array's bound is maxItems)")
            for k, v in x.items():
                walk(v, f"{where}/{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")

    walk(document(ROUTES, Config()), "")
    assert not found


def test_the_document_follows_the_config() -> None:
    """Bounds taken from the config: count's maximum is clone.max_count, and the name rule with it."""
    from dataclasses import replace

    c = Config()
    c = replace(c, clone=replace(c.clone, max_count=1000))
    doc = document(ROUTES, c)
    schema = doc["components"]["schemas"]["CreateJob"]
    assert schema["properties"]["count"]["maximum"] == 1000
    assert valid(doc, body_schema(doc, "/v1/jobs", "post"), {"source": "s", "name": "n" * 58, "count": 1000})
    assert not valid(doc, body_schema(doc, "/v1/jobs", "post"), {"source": "s", "name": "n" * 59, "count": 1000})
    assert valid(doc, body_schema(doc, "/v1/jobs", "post"), {"source": "s", "name": "n" * MAX_NAME_LEN})


def test_mutating_routes_list_403_and_bodies_413() -> None:
    doc = document(ROUTES, Config())
    writes = {(r.path, r.method) for r in ROUTES if r.write}  # a guest file's GET needs write access
    # A read that may refuse on its own: admins only, or a source outside access.sources.
    guarded = {(r.path, r.method) for r in ROUTES if r.needs_admin or 403 in r.errors}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method in ("post", "put", "patch", "delete"):
                assert "403" in op["responses"], (method, path)
            if "requestBody" in op:
                assert "413" in op["responses"] and "400" in op["responses"], (method, path)
            if method == "get" and (path, "GET") not in writes | guarded:
                assert "403" not in op["responses"], (method, path)  # reads are open without read_groups
    with_groups = document(ROUTES, Config(), read_groups=True)
    assert "403" in with_groups["paths"]["/v1/jobs"]["get"]["responses"]


# -- the cases of the issue ------------------------------------------------------------------


async def test_count_3035_is_refused_by_the_document_and_the_server(api) -> None:
    client, doc, _ = api
    request = {"source": "src", "name": "c", "count": 3035}
    assert not valid(doc, body_schema(doc, "/v1/jobs", "post"), request)
    assert valid(doc, body_schema(doc, "/v1/jobs", "post"), {**request, "count": 64})
    status, body = await client.call("POST", "/v1/jobs", request)
    assert (status, body["error"]["code"]) == (400, "invalid_request") and listed(doc, "/v1/jobs", "post", 400)
    assert "count" in body["error"]["message"] and "64" in body["error"]["message"]


async def test_delivery_status_empty_is_refused_by_the_document_and_the_server(api) -> None:
    client, doc, _ = api
    schema = param_schema(doc, "/v1/webhooks/deliveries", "get", "status")
    assert not valid(doc, schema, "") and valid(doc, schema, "failed")
    # Without webhooks the route answers 404 first; with them (the contract test) it is 400.
    status, _ = await client.call("GET", "/v1/webhooks/deliveries?status=")
    assert status in (400, 404) and listed(doc, "/v1/webhooks/deliveries", "get", 400)


async def test_source_name_main_is_refused_by_the_document_and_the_server(api) -> None:
    client, doc, _ = api
    request = {"source": "__main__", "name": "c"}
    assert not valid(doc, body_schema(doc, "/v1/jobs", "post"), request)
    assert not valid(doc, param_schema(doc, "/v1/sources/{name}/freeze", "post", "name"), "__main__")
    status, body = await client.call("POST", "/v1/jobs", request)
    assert (status, body["error"]["code"]) == (400, "invalid_name")
    status, body = await client.call("POST", "/v1/sources/__main__/freeze")
    assert (status, body["error"]["code"]) == (400, "invalid_name")


@pytest.mark.parametrize("name", ["a..b", "-a", "a/b", "é", "x" * 64, ".a", "a\n"])
def test_the_name_pattern_is_the_engine_rule(name: str) -> None:
    """The document's name pattern refuses what identity.validate_name refuses, and takes the rest."""
    from instaclone.errors import InvalidName
    from instaclone.identity import validate_name

    doc = document(ROUTES, Config())
    schema = param_schema(doc, "/v1/clones/{name}", "delete", "name")
    with pytest.raises(InvalidName):
        validate_name(name)
    assert not valid(doc, schema, name)
    for good in ("a", "a.", "a.b-c_d", "9" * MAX_NAME_LEN, "null"):
        assert valid(doc, schema, good) and validate_name(good) == good


async def test_replay_of_nothing_is_refused_by_the_document_and_the_server(api) -> None:
    """(The server's 400 for these: the contract test, whose daemon has webhooks.)"""
    _client, doc, _ = api
    schema = body_schema(doc, "/v1/webhooks/deliveries/replay", "post")
    assert not valid(doc, schema, {})
    assert not valid(doc, schema, {"webhook": None})  # null is no filter: it would replay everything
    assert valid(doc, schema, {"status": "failed"}) and valid(doc, schema, {"ids": [1, 2]})
    assert listed(doc, "/v1/webhooks/deliveries/replay", "post", 400)


async def test_freeze_and_unfreeze_list_their_400(api) -> None:
    client, doc, _ = api
    for op in ("freeze", "unfreeze"):
        assert listed(doc, f"/v1/sources/{{name}}/{op}", "post", 400)
        status, body = await client.call("POST", f"/v1/sources/a..b/{op}")
        assert (status, body["error"]["code"]) == (400, "invalid_name")


@pytest.mark.parametrize("value,status", [("null", 400), ("yes", 400), ("", 400), ("True", 400),
                                          ("true", 200), ("false", 200), ("1", 200), ("0", 200)])
async def test_follow_is_a_strict_boolean(api, value: str, status: int) -> None:
    """follow: true/false or 1/0, as documented; anything else 400 (follow=null was accepted)."""
    client, doc, sock = api
    schema = param_schema(doc, "/v1/events", "get", "follow")
    documented = {"true": True, "false": False, "1": 1, "0": 0}
    assert (value in documented) == (status == 200)
    if value in documented:
        assert valid(doc, schema, documented[value])
    if status == 200 and value in ("true", "1"):
        return  # a followed stream does not end; the stream tests follow it
    got, body = await client.call("GET", f"/v1/events?tail=0&follow={value}") if status == 400 else \
        await _status_only(sock, f"/v1/events?tail=0&follow={value}")
    assert got == status, body


async def _status_only(sock: Path, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s, \
            s.get(f"http://x{path}") as r:
        return r.status, await r.text()


@pytest.mark.parametrize("method,path,allow", [("PUT", "/v1/jobs", {"GET", "HEAD", "POST"}),
                                               ("POST", "/v1/health", {"GET", "HEAD"}),
                                               ("GET", "/v1/gc", {"POST"})])
async def test_405_has_an_allow_header_and_a_json_body(api, method: str, path: str, allow: set[str]) -> None:
    _client, _doc, sock = api
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s, \
            s.request(method, f"http://x{path}") as r:
        assert r.status == 405
        assert {m.strip() for m in r.headers["Allow"].split(",")} == allow
        body = await r.json()
    assert body["error"]["code"] == "method_not_allowed"


async def test_unknown_route_is_a_json_404(api) -> None:
    client, _doc, _ = api
    status, body = await client.call("GET", "/v1/nothing/here")
    assert (status, body["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize("body,field", [({"source": "src"}, "name"), ({"source": "src", "name": "c", "x": 1}, "x"),
                                        ({"source": "src", "name": "c", "count": "2"}, "count"),
                                        ({"source": "src", "name": "c", "keep_network": 1}, "keep_network"),
                                        ({"source": "src", "name": "c", "config": {"a": 1}}, "config.a")])
async def test_a_refusal_names_the_field_and_is_not_a_pydantic_dump(api, body: dict[str, Any], field: str) -> None:
    client, _doc, _ = api
    status, answer = await client.call("POST", "/v1/jobs", body)
    message = answer["error"]["message"]
    assert status == 400 and field in message, message
    assert "pydantic" not in message and "errors.pydantic.dev" not in message and "\n" not in message


async def test_integral_numbers_are_integers(api) -> None:
    """JSON has numbers: 2.0 is the integer 2 (as the document's JSON Schema says); 2.5 is not."""
    client, doc, _ = api
    assert valid(doc, body_schema(doc, "/v1/jobs", "post"), {"source": "s", "name": "n", "count": 2.0})
    status, body = await client.call("POST", "/v1/jobs?wait=10", {"source": "src", "name": "f", "count": 2.0})
    assert status == 201 and body["job"]["spec"]["names"] == ["f-1", "f-2"]
    status, _ = await client.call("POST", "/v1/jobs", {"source": "src", "name": "g", "count": 2.5})
    assert status == 400


# -- item 6: a failing mutating call is logged with its peer -----------------------------------


async def test_a_mutating_call_that_fails_in_its_handler_is_logged_with_its_peer(api) -> None:
    client, _doc, _ = api
    with capture_logs() as logs:
        status, _ = await client.call("DELETE", "/v1/clones/nope")  # NotFound raised in the handler
        assert status == 404
        status, _ = await client.call("POST", "/v1/jobs", {"source": "src", "name": "a..b"})  # refused input
        assert status == 400
        status, _ = await client.call("GET", "/v1/jobs/nope")  # a read: not logged
    calls = [e for e in logs if e["event"] == "api.call"]
    assert [(e["method"], e["path"], e["status"]) for e in calls] == [
        ("DELETE", "/v1/clones/nope", 404), ("POST", "/v1/jobs", 400)]
    assert all(isinstance(e["peer"], dict) and "uid" in e["peer"] and "pid" in e["peer"] for e in calls)


async def test_a_bug_in_a_mutating_handler_is_logged_as_500(api, monkeypatch) -> None:
    client, _doc, _ = api
    async def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("boom")

    with capture_logs() as logs:
        monkeypatch.setattr("instaclone.jobs.engine.Engine.freeze", broken)
        status, body = await client.call("POST", "/v1/sources/src/freeze")
    assert (status, body["error"]["code"]) == (500, "internal_error")
    calls = [e for e in logs if e["event"] == "api.call"]
    assert [(e["path"], e["status"]) for e in calls] == [("/v1/sources/src/freeze", 500)]
    assert calls[0]["peer"] is not None


# -- the route mechanism: what a later module (guest exec and files) needs ----------------------


async def test_a_route_module_can_declare_raw_bodies_headers_and_ndjson(tmp_path: Path) -> None:
    """A raw octet-stream body streamed by its handler, a request header, a query model, an NDJSON
    answer and answer headers: declared, documented, validated and served like the others."""
    import hashlib
    from types import SimpleNamespace

    from aiohttp import web
    from pydantic import BaseModel, ConfigDict, Field

    from instaclone.api import ACCESS, Call, RawBody, Reply, Route
    from instaclone.api.models import ClonePath, Query
    from instaclone.api.openapi import current_document
    from tests.support.openaccess import OpenAccess

    class FileQuery(Query):
        path: str = Field(pattern=r"^/", description="absolute path in the guest")

    class Sha(BaseModel):
        model_config = ConfigDict(populate_by_name=True)
        sha256: str | None = Field(None, alias="X-Instaclone-SHA256", pattern=r"^[0-9a-f]{64}$")

    async def put_file(request: web.Request, call: Call) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 16):  # streamed, never the whole body
            digest.update(chunk)
            size += len(chunk)
        want = call.headers_as(Sha).sha256
        if want is not None and want != digest.hexdigest():
            return web.json_response({"error": {"code": "checksum_mismatch", "message": "differs"}}, status=422)
        return web.json_response({"file": {"path": call.query_as(FileQuery).path, "bytes": size,
                                           "sha256": digest.hexdigest(), "clone": call.path_as(ClonePath).name}})

    async def run(request: web.Request, call: Call) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"type": "started", "pid": 1}\n{"type": "exit", "exit_code": 0}\n')
        await resp.write_eof()
        return resp

    async def get_file(request: web.Request, call: Call) -> web.Response:
        return web.Response(body=b"abc", content_type="application/octet-stream",
                            headers={"X-Instaclone-SHA256": hashlib.sha256(b"abc").hexdigest()})

    routes = [
        Route("GET", "/v1/things/{name}/files", get_file, "read a file", path_params=ClonePath, query=FileQuery,
              needs_write=True, ok={200: Reply("the bytes", {"type": "string", "format": "binary"},
                                               media_type="application/octet-stream",
                                               headers={"X-Instaclone-SHA256": {"schema": {"type": "string"}}})}),
        Route("PUT", "/v1/things/{name}/files", put_file, "write a file", path_params=ClonePath, query=FileQuery,
              headers=Sha, body=RawBody("application/octet-stream", max_bytes=4 << 30, description="the bytes"),
              ok={200: Reply("written", {"type": "object"})}, errors={422: "checksum_mismatch"}),
        Route("PUT", "/v1/things/{name}/small", put_file, "write a small file", path_params=ClonePath,
              query=FileQuery, headers=Sha, body=RawBody(max_bytes=1000), operation_id="put_small_file",
              ok={200: Reply("written", {"type": "object"})}),
        Route("POST", "/v1/things/{name}/run", run, "run", path_params=ClonePath,
              ok={200: Reply("one JSON object per line", {"type": "object", "required": ["type"]},
                             media_type="application/x-ndjson",
                             headers={"X-Instaclone-Job": {"schema": {"type": "string"}}})}),
    ]
    app = make_app(SimpleNamespace(config=Config()), object(), extra_routes=routes)  # type: ignore[arg-type]
    app[ACCESS] = OpenAccess(Config().access)
    doc = current_document(app)
    validate_openapi(doc)
    put = doc["paths"]["/v1/things/{name}/files"]["put"]
    assert put["requestBody"]["content"] == {"application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}
    assert {(p["in"], p["name"]) for p in put["parameters"]} == {
        ("path", "name"), ("query", "path"), ("header", "X-Instaclone-SHA256")}
    assert {"400", "403", "413", "422"} <= set(put["responses"])
    assert "application/x-ndjson" in doc["paths"]["/v1/things/{name}/run"]["post"]["responses"]["200"]["content"]
    get = doc["paths"]["/v1/things/{name}/files"]["get"]
    assert "403" in get["responses"] and "X-Instaclone-SHA256" in get["responses"]["200"]["headers"]

    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "t.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        data = b"x" * 300_000  # over the JSON body limit: a raw body is the handler's to bound
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
            sha = hashlib.sha256(data).hexdigest()
            async with s.put("http://x/v1/things/c1/files?path=/etc/x", data=data,
                             headers={"X-Instaclone-SHA256": sha}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["file"] == {"path": "/etc/x", "bytes": len(data), "sha256": sha, "clone": "c1"}
            async with s.put("http://x/v1/things/c1/small?path=/x", data=data) as r:  # Content-Length > 1000
                assert (r.status, (await r.json())["error"]["code"]) == (413, "body_too_large")
            async with s.put("http://x/v1/things/c1/files?path=etc", data=data) as r:
                assert r.status == 400 and "path" in (await r.json())["error"]["message"]
            bad_sha = {"X-Instaclone-SHA256": "z"}
            async with s.put("http://x/v1/things/c1/files?path=/x", data=b"", headers=bad_sha) as r:
                assert r.status == 400 and "X-Instaclone-SHA256" in (await r.json())["error"]["message"]
            with capture_logs() as logs:  # a read guarded as a write is logged as one
                async with s.get("http://x/v1/things/c1/files?path=/etc/x") as r:
                    assert r.status == 200 and await r.read() == b"abc"
            assert [(e["method"], e["status"]) for e in logs if e["event"] == "api.call"] == [("GET", 200)]
            async with s.post("http://x/v1/things/c1/run") as r:
                assert r.content_type == "application/x-ndjson"
                assert [json.loads(line)["type"] for line in (await r.read()).splitlines()] == ["started", "exit"]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("script,ok", [("true", True), (" \x1c\t\n", False), ("\u3000", False), ("a\x00b", False),
                                       ("\ufeff", True), (" x ", True)])
def test_the_script_pattern_is_the_engine_rule(script: str, ok: bool) -> None:
    """The document's script rule is validate_script's: not only (Python's) white space, no NUL."""
    from instaclone.errors import InvalidRequest
    from instaclone.requests import validate_script

    doc = document(ROUTES, Config())
    schema = {"$ref": "#/components/schemas/CreateJob"}
    assert valid(doc, schema, {"source": "s", "name": "n", "script": script}) == ok
    if ok:
        assert validate_script(script) == script
    else:
        with pytest.raises(InvalidRequest):
            validate_script(script)


async def test_validation_and_document_follow_a_reloaded_config(tmp_path: Path) -> None:
    """A reload (the daemon sets engine.config and the app's access) moves the API's bounds with
    it: count's maximum is validated and documented as clone.max_count is now, not at start."""
    from dataclasses import replace

    from aiohttp import web

    from instaclone.api import ACCESS, RUNNER_ARGS, Access
    from tests.support.apiclient import Api
    from tests.support.fakes import fake_engine, fake_world

    c, store, virt = await fake_world(tmp_path)
    engine = fake_engine(c, store, virt)
    app = make_app(engine, store)
    runner = web.AppRunner(app, **RUNNER_ARGS)
    await runner.setup()
    sock = tmp_path / "ctl.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        async with Api(sock) as client:
            request = {"source": "no-such-source", "name": "c", "count": 100}
            status, body = await client.call("POST", "/v1/jobs", request)
            assert (status, body["error"]["code"]) == (400, "invalid_request"), body
            engine.config = replace(engine.config, clone=replace(engine.config.clone, max_count=100))
            app[ACCESS] = Access(replace(engine.config.access, read_groups=("root",)))
            status, body = await client.call("POST", "/v1/jobs", request)
            assert (status, body["error"]["code"]) == (404, "source_not_found"), body  # past the model now
            _, doc = await client.call("GET", "/v1/openapi.json")
            assert doc["components"]["schemas"]["CreateJob"]["properties"]["count"]["maximum"] == 100
            assert listed(doc, "/v1/jobs", "get", 403)  # read_groups set: reads may be refused
    finally:
        await engine.shutdown(5)
        await runner.cleanup()
        await store.close()
