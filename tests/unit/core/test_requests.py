"""The request contract: records valid by construction, and the edge's models built on the same limits."""

from __future__ import annotations

from typing import Any

import pytest

from instaclone import requests as r
from instaclone.api import models as m
from instaclone.api.guest import ExecBody, PutFileQuery
from instaclone.errors import InvalidName, InvalidRequest


@pytest.mark.parametrize(("build", "error", "words"), [
    (lambda: r.CloneRequest(source="bad name", name="c"), InvalidName, "source name"),
    (lambda: r.CloneRequest(source="s", name="c..d"), InvalidName, "clone name"),
    (lambda: r.CloneRequest(source="s", name="c", count=0), InvalidRequest, "count"),
    (lambda: r.CloneRequest(source="s", name="c", count=True), InvalidRequest, "count"),
    (lambda: r.CloneRequest(source="s", name="x" * 60, count=1000), InvalidName, "with count 1000"),
    (lambda: r.CloneRequest(source="s", name="c", ttl_s=0), InvalidRequest, "ttl_s"),
    (lambda: r.CloneRequest(source="s", name="c", config={"k": "v" * r.MAX_GUEST_CONFIG_BYTES}),
     InvalidRequest, "config"),
    (lambda: r.CloneRequest(source="s", name="c", script=" \n"), InvalidRequest, "script"),
    (lambda: r.CloneRequest(source="s", name="c", customize="yes"), InvalidRequest, "customize"),  # type: ignore[arg-type]
    (lambda: r.PoolRequest(name="p", source="s", size=r.MAX_POOL_SIZE + 1), InvalidRequest, "size"),
    (lambda: r.PoolUpdate(name="p", size=-1), InvalidRequest, "size"),
    (lambda: r.ClaimRequest(pool="p", wait_s=r.MAX_CLAIM_WAIT_S + 1), InvalidRequest, "wait_s"),
    (lambda: r.ExecRequest(clone="c", argv=("",)), InvalidRequest, "argv"),
    (lambda: r.PutFileRequest(clone="c", path="etc/x"), InvalidRequest, "absolute"),
    (lambda: r.PutFileRequest(clone="c", path="/etc/x", mode="999"), InvalidRequest, "mode"),
    (lambda: r.FreezeRequest("a/b"), InvalidName, "source name"),
    (lambda: r.PrepareRequest("s", dry_run=1), InvalidRequest, "dry_run"),  # type: ignore[arg-type]
])
def test_a_record_refuses_a_bad_shape_with_the_engines_words(build: Any, error: type[Exception], words: str):
    with pytest.raises(error, match=words):
        build()


def test_records_normalize_and_are_frozen():
    req = r.CloneRequest(source="s", name="c", count=2, ttl_s=60)
    assert req.names == ["c-1", "c-2"] and req.ttl_s == 60.0 and req.config == {}
    with pytest.raises(AttributeError):
        req.name = "d"  # type: ignore[misc]
    assert r.PutFileRequest(clone="c", path="/x", mode="644").mode == "0644"
    assert r.ExecRequest(clone="c", argv=["ls", "-l"]).argv == ("ls", "-l")  # type: ignore[arg-type]


def test_the_edge_builds_the_records():
    job = m.create_job_model(10).model_validate({"source": "s", "name": "c", "count": 2, "config": {"a": "b"}})
    assert job.to_request(owner=1000) == r.CloneRequest(source="s", name="c", count=2, config={"a": "b"}, owner=1000)
    pool = m.CreatePool.model_validate({"name": "p", "source": "s", "size": 3, "freeze": True})
    assert pool.to_request(owner=None) == r.PoolRequest(name="p", source="s", size=3, freeze=True)
    assert m.UpdatePool.model_validate({"size": 2}).to_request("p") == r.PoolUpdate(name="p", size=2)
    claim = m.Claim.model_validate({"ttl_s": 30}).to_request("p", owner=5, claimed_by={"pid": 1})
    assert claim == r.ClaimRequest(pool="p", ttl_s=30.0, claimed_by={"pid": 1}, owner=5)
    assert m.DryRun.model_validate({"dry_run": True}).to_request("s") == r.PrepareRequest("s", dry_run=True)
    run = ExecBody.model_validate({"argv": ["cat"], "stdin": "aGk="}).to_request("c")
    assert run == r.ExecRequest(clone="c", argv=("cat",), stdin=b"hi")
    put = PutFileQuery.model_validate({"path": "/etc/x", "mode": "600"}).to_put_request("c", sha256=None)
    assert put == r.PutFileRequest(clone="c", path="/etc/x", mode="0600")


def test_the_documented_bounds_are_the_records_limits():
    schema = m.CreatePool.model_json_schema()
    assert schema["properties"]["size"]["maximum"] == r.MAX_POOL_SIZE
    claim = m.Claim.model_json_schema()["properties"]
    assert any(s.get("maximum") == r.MAX_TTL_S for s in claim["ttl_s"]["anyOf"])
    assert any(s.get("maximum") == r.MAX_CLAIM_WAIT_S for s in claim["wait_s"]["anyOf"])
