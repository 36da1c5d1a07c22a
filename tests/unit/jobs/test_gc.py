"""Garbage collection with fakes: the pure decision, a property test over random create/clone/destroy
sequences, the API and the CLI.

The property test's oracle is independent of ``jobs/gc.py``: it follows the fake images' ``backing=``
lines from every fake domain's disks (``fakes.image_chain``) and reads the ledger and the registries
itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from instaclone import cli
from instaclone.errors import GcAborted, NameInUse, StorageError
from instaclone.hv import file_disks
from instaclone.jobs import gc
from instaclone.model import ResourceKind
from instaclone.requests import CloneRequest, FreezeRequest
from instaclone.states import State
from instaclone.store.gc import RETAINED
from tests.support.fakes import FakeHypervisor, fake_api, fake_engine, fake_world, image_bytes, image_chain

# -- the pure decision ------------------------------------------------------------------


def test_garbage_is_candidates_minus_reachable_minus_protected():
    cands = {"/s/deltas/a": 1, "/s/deltas/b": 2, "/s/clones/c1/vda": 3, "/s/clones/c10/vda": 4, "/s/jobs/j/x": 5}
    out = gc.garbage(cands, frozenset({"/s/deltas/a"}), ["/s/clones/c1", "/s/jobs/j"])
    # c1's directory is protected, c10 (a name that begins like it) is not.
    assert out == {"/s/deltas/b": 2, "/s/clones/c10/vda": 4}
    assert gc.garbage(cands, frozenset(cands), []) == {}
    assert gc.garbage(cands, frozenset(), ["/s"]) == {}


def test_under():
    assert gc.under("/a/b", "/a") and gc.under("/a", "/a") and gc.under("/a/b", "/a/")
    assert not gc.under("/ab", "/a") and not gc.under("/a", "/a/b")


def test_releasable():
    assert gc.releasable("/s/clones/p", frozenset({"/s/clones/q/vda"}), ["/s/deltas/x"])
    assert not gc.releasable("/s/clones/p", frozenset({"/s/clones/p/vda"}), [])
    assert not gc.releasable("/s/clones/p", frozenset(), ["/s/clones/p/nvram.fd"])


def test_xml_paths_names_every_absolute_path():
    xml = ("<domain><os><nvram>/v/nv.fd</nvram></os><devices><disk type='file'><source file='/d/a.qcow2'/>"
           "<backingStore><source file='/d/base'/></backingStore></disk><serial><source path='/l/s.log'/>"
           "</serial><interface><model type='virtio'/></interface></devices></domain>")
    assert gc.xml_paths(xml) == {"/v/nv.fd", "/d/a.qcow2", "/d/base", "/l/s.log"}


# -- the property test ------------------------------------------------------------------

def _oracle_used(virt: FakeHypervisor) -> set[str]:
    """Every image of every fake domain's disk chains, and every absolute path its XML names."""
    used: set[str] = set()
    for dom in virt.domains.values():
        for xml in filter(None, (dom.xml, dom.inactive)):
            for el in ET.fromstring(xml).iter():
                used.update(v for v in (*el.attrib.values(), (el.text or "").strip()) if v.startswith("/"))
            for src in ET.fromstring(xml).iterfind("./devices/disk/source"):
                used.update(os.path.realpath(p) for p in image_chain(Path(src.get("file", ""))))
    return {os.path.realpath(p) for p in used}


def _files(roots: list[Path]) -> set[str]:
    return {os.path.realpath(os.path.join(d, f)) for r in roots for d, _, fs in os.walk(r) for f in fs}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Sequence:
    """One random sequence of clone, destroy, gc, freeze, unfreeze, stray and in-flight files on the fakes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0
        self.inflight_files: list[Path] = []
        self.stray_files: list[Path] = []
        self.retained: set[str] = set()
        self.stats = {"deleted": 0, "destroyed_with_children": 0, "released": 0}

    async def run(self, ops: list[tuple[str, int]]) -> dict[str, int]:
        self.c, self.store, self.virt = await fake_world(self.root)
        self.engine = fake_engine(self.c, self.store, self.virt)
        self.roots = list(gc.roots(self.engine.svc).values())
        outside = self.root / "src_VARS.fd"
        outside.write_bytes(os.urandom(4096))
        self.outside = {p: _digest(p) for p in (self.root / "base.qcow2", outside)}
        try:
            for op, k in ops:
                await getattr(self, op)(k)
                await self.check(after=op)
        finally:
            await self.engine.shutdown(5)
            await self.store.close()
        return self.stats

    # -- operations ---------------------------------------------------------------------
    async def clones(self) -> list[str]:
        return [c.name for c in await self.store.list_clones()]

    async def clone(self, k: int) -> None:
        sources = ["src", *await self.clones()]
        self.n += 1
        job = await self.engine.submit(CloneRequest(source=sources[k % len(sources)], name=f"c{self.n}",
                                       count=1 + k % 2 if k % 5 == 0 else 1))
        await self.engine.wait(job.id, 20)
        rec = await self.store.get_job(job.id)
        assert rec is not None and rec.state is State.UNSTUNNED, rec

    async def destroy(self, k: int) -> None:
        names = await self.clones()
        if not names:
            return
        parents = sorted({c.source for c in await self.store.list_clones()} & set(names))
        # Half the time a clone with clones of its own, when there is one.
        name = parents[k % len(parents)] if parents and k % 2 == 0 else names[k % len(names)]
        if name in parents:
            self.stats["destroyed_with_children"] += 1
        before = _files(self.roots)
        await self.engine.destroy_clone(name)  # collects what it released
        self.stats["deleted"] += len(before - _files(self.roots))
        assert name not in self.virt.domains

    async def collect(self, k: int) -> None:
        before = _files(self.roots)
        dry = await gc.collect(self.engine.svc, dry_run=True)
        assert _files(self.roots) == before, "a dry run deleted something"
        real = await gc.collect(self.engine.svc)
        assert set(real.deleted) == set(dry.deleted) and real.released == dry.released
        assert real.failed == []
        self.stats["deleted"] += len(real.deleted)

    async def freeze(self, k: int) -> None:
        if "src" in await self.store.frozen():
            await self.engine.unfreeze(FreezeRequest("src"))
        else:
            await self.engine.freeze(FreezeRequest("src"))

    async def stray(self, k: int) -> None:
        """An image nothing uses and nobody recorded: another program's, or planted (never deleted)."""
        where = [self.c.delta_dir / f"src.vda.stray{self.n}.qcow2", self.c.clones_dir / f"ghost{k}" / "vda.qcow2",
                 self.c.jobs_dir / f"deadbeef{k}" / "memory.state"][k % 3]
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(image_bytes("stray", str(self.root / "base.qcow2")))
        self.n += 1
        self.stray_files.append(where)

    async def inflight(self, k: int) -> None:
        """A file an in-flight job recorded (the ledger, then the file): never touched."""
        self.n += 1
        job_id = f"inflight{self.n}"
        path = [self.c.jobs_dir / job_id / "memory.state", self.c.delta_dir / f"src.vda.{job_id}.qcow2"][k % 2]
        await self.store.plan(job_id, ResourceKind.FILE if k % 2 == 0 else ResourceKind.SOURCE_DELTA, str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes("inflight", ""))
        self.inflight_files.append(path)

    # -- invariants ---------------------------------------------------------------------
    async def check(self, *, after: str) -> None:
        used = _oracle_used(self.virt)
        for dom in self.virt.domains.values():  # every chain is whole
            for src in ET.fromstring(dom.xml).iterfind("./devices/disk/source"):
                for p in image_chain(Path(src.get("file", ""))):
                    assert p.exists(), f"after {after}: {p} of {dom.name}'s chain is gone"
        for rec in await self.store.list_clones():  # clones of a destroyed clone keep running
            assert self.virt.domains[rec.name].state == "running", rec.name
        for p in self.inflight_files:
            assert p.exists(), f"after {after}: in-flight {p} was deleted"
        for p, digest in self.outside.items():
            assert _digest(p) == digest, f"after {after}: {p} changed"
        if after not in ("collect", "destroy"):
            return
        # Right after a collection: everything left is used or protected, retained dirs are needed.
        protected = [os.path.realpath(r.dir) for r in await self.store.list_clones()]
        protected += [os.path.realpath(p) for p in self.inflight_files]
        # A file nobody recorded is never deleted (before the ledger kept identities, it was).
        protected += [os.path.realpath(p) for p in self.stray_files]
        protected += [os.path.realpath(self.c.daemon.state_dir / "frozen" / n) for n in await self.store.frozen()]
        for f in _files(self.roots):
            assert f in used or any(gc.under(f, p) for p in protected), f"after {after}: {f} is unused and left"
        for p in self.stray_files:
            assert p.exists(), f"after {after}: {p}, which instaclone did not make, was deleted"
        retained = [r for r in await self.store.active_resources() if r.job_id.startswith(RETAINED)]
        now = {r.job_id for r in retained}
        self.stats["released"] += len(self.retained - now)
        self.retained = now
        for r in retained:
            assert any(gc.under(u, os.path.realpath(r.ref)) for u in used), f"{r.ref} kept for nothing"
            with pytest.raises(NameInUse):
                await self.engine.submit(CloneRequest(source="src", name=r.clone))
        for name in await self.clones():
            assert Path(self.c.clones_dir / name).is_dir()


OPS = st.lists(st.tuples(st.sampled_from(["clone", "clone", "clone", "destroy", "destroy", "collect", "freeze",
                                          "stray", "inflight"]), st.integers(0, 1000)),
               min_size=4, max_size=30)


async def test_gc_never_deletes_a_used_image_and_deletes_every_unused_one(tmp_path):
    totals: dict[str, int] = {}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(ops=OPS)
    def prop(ops: list[tuple[str, int]]) -> None:
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        stats = asyncio.run(Sequence(root).run(ops))
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v

    await asyncio.to_thread(prop)
    # The sequences did reach the cases that matter.
    assert totals["destroyed_with_children"] > 0 and totals["deleted"] > 0


async def test_a_long_seeded_sequence(tmp_path):
    """One long sequence (deep chains, many destroys): the same invariants at every step."""
    rnd = random.Random(14)
    names = ["clone", "clone", "clone", "destroy", "destroy", "collect", "freeze", "stray", "inflight"]
    ops = [(rnd.choice(names), rnd.randrange(1000)) for _ in range(150)]
    stats = await Sequence(tmp_path).run(ops)
    # A clone with clones of its own was destroyed, and its directory went once they were gone too.
    assert stats["destroyed_with_children"] > 0 and stats["released"] > 0, stats


# -- the engine's destroy and its collection ----------------------------------------------

@pytest.fixture
async def env(tmp_path):
    c, store, virt = await fake_world(tmp_path)
    engine = fake_engine(c, store, virt)
    yield engine, virt, store, c
    await engine.shutdown(5)
    await store.close()


async def _clone(engine, store, source, name):
    job = await engine.submit(CloneRequest(source=source, name=name))
    await engine.wait(job.id, 10)
    assert (await store.get_job(job.id)).state is State.UNSTUNNED


async def test_middle_clone_destroyed_then_child_then_everything_unused_goes(env):
    engine, virt, store, c = env
    await _clone(engine, store, "src", "mid")
    await _clone(engine, store, "mid", "kid")
    mid_disk = c.clones_dir / "mid" / "vda.qcow2"
    assert mid_disk in image_chain(file_disks(virt.domains["kid"].xml)[0].path)
    await engine.destroy_clone("mid")
    assert virt.domains["kid"].state == "running" and mid_disk.exists()
    # mid's own deltas (its top after the clone of it) are no one's: gone.
    assert not list(c.delta_dir.glob("mid.*"))
    report = await gc.collect(engine.svc, dry_run=True)
    assert report.deleted == {} and [r["clone"] for r in report.retained] == ["mid"]
    await engine.destroy_clone("kid")
    assert not (c.clones_dir / "mid").exists() and not (c.clones_dir / "kid").exists()
    assert await store.active_resources() == []
    assert await store.names_in_use() == set()


async def test_gc_aborts_without_deleting_when_a_chain_cannot_be_read(env, monkeypatch):
    engine, virt, store, c = env
    await _clone(engine, store, "src", "c1")
    stray = c.delta_dir / "stray.qcow2"
    stray.write_bytes(b"x")

    async def broken(*, path: Path, fmt: str) -> list[Path]:
        raise StorageError("qemu-img info failed: Permission denied")

    monkeypatch.setattr(engine.svc.storage, "chain", broken)
    with pytest.raises(GcAborted, match="deleted nothing"):
        await gc.collect(engine.svc)
    assert stray.exists()
    # destroy still works; its files wait for a collection that can tell.
    await engine.destroy_clone("c1")
    assert "c1" not in virt.domains and (c.clones_dir / "c1").exists()
    with pytest.raises(NameInUse):
        await engine.submit(CloneRequest(source="src", name="c1"))
    monkeypatch.undo()
    report = await gc.collect(engine.svc)
    assert report.released == ["c1"] and not (c.clones_dir / "c1").exists()
    # A file nobody recorded is never deleted (it was, before the ledger kept identities).
    assert stray.exists() and not any(p.endswith("stray.qcow2") for p in report.deleted)


async def test_a_file_a_domain_not_ours_names_is_kept(env):
    """A domain instaclone did not make, whose disk is a clone's image, keeps that image."""
    engine, virt, store, c = env
    await _clone(engine, store, "src", "c1")
    disk = c.clones_dir / "c1" / "vda.qcow2"
    virt.add_source("mine", disk, state="shutoff")
    await engine.destroy_clone("c1")
    assert disk.exists() and (await gc.collect(engine.svc)).retained[0]["clone"] == "c1"
    await virt.undefine("mine")
    assert (await gc.collect(engine.svc)).released == ["c1"] and not disk.exists()


async def test_disk_usage_per_source(env):
    engine, _virt, store, _c = env
    await _clone(engine, store, "src", "a")
    await _clone(engine, store, "a", "b")
    usage = await gc.disk_usage(engine.svc)
    by = {s["source"]: s for s in usage["sources"]}
    assert set(by) == {"src", "a"} and by["src"]["clones"] == 1 and by["a"]["clones"] == 1
    assert by["src"]["deltas_bytes"] > 0 and by["src"]["clones_bytes"] > 0
    assert usage["total_bytes"] == sum(s["bytes"] for s in usage["sources"]) + usage["other_bytes"]
    await engine.destroy_clone("a")
    by = {s["source"]: s for s in (await gc.disk_usage(engine.svc))["sources"]}
    assert by["src"]["retained_bytes"] > 0 and by["src"]["clones"] == 0


# -- API and CLI -----------------------------------------------------------------------

async def test_api_gc_and_status(tmp_path, capsys):
    async with fake_api(tmp_path) as (client, virt, sock):
        for name in ("c1", "c2"):
            status, body = await client.call("POST", "/v1/jobs?wait=10", {"source": "src", "name": name})
            assert status == 201
        # c1 is destroyed while a domain not ours uses its disk: the disk waits for a collection.
        disk = tmp_path / "state" / "clones" / "c1" / "vda.qcow2"
        disk.write_bytes(disk.read_bytes() + b"x" * 8192)
        virt.add_source("mine", disk, state="shutoff")
        status, _ = await client.call("DELETE", "/v1/clones/c1")
        assert status == 200 and disk.exists()
        await virt.undefine("mine")
        # A file nobody recorded is never deleted (before the ledger kept identities, it was).
        stray = tmp_path / "state" / "deltas" / "old.qcow2"
        stray.write_bytes(b"x" * 8192)
        status, body = await client.call("POST", "/v1/gc", {"dry_run": True})
        assert status == 200 and body["gc"]["dry_run"] is True and stray.exists() and disk.exists()
        assert [d["path"] for d in body["gc"]["deleted"]] == [str(disk.parent), str(disk)]
        for bad in ({"dry_run": "yes"}, {"dry_run": True, "force": 1}):
            status, err = await client.call("POST", "/v1/gc", bad)
            assert status == 400 and err["error"]["code"] == "invalid_request"
        status, body = await client.call("GET", "/v1/health")
        assert [s["source"] for s in body["disk"]["sources"]] == ["src"]
        run = lambda *argv: asyncio.to_thread(cli.main, ["--socket", str(sock), *argv])  # noqa: E731
        assert await run("gc", "--dry-run") == 0
        out = capsys.readouterr().out
        assert f"would delete {disk}" in out and stray.exists() and str(stray) not in out
        assert await run("-o", "json", "gc") == 0
        out = capsys.readouterr().out  # the daemon's log lines (same process) come first
        report: dict[str, Any] = json.loads(out[out.index("{\n"):])
        assert report["bytes"] >= 8192 and not disk.exists() and stray.exists()
        assert await run("status") == 0
        out = capsys.readouterr().out
        assert "disk used per source:" in out and "SOURCE" in out and "\nsrc " in out
        status, doc = await client.call("GET", "/v1/openapi.json")
        assert "post" in doc["paths"]["/v1/gc"] and "Gc" in doc["components"]["schemas"]
