"""The store on its own: migrations, the ledger's owners, the outbox's commit hook."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from instaclone import events
from instaclone.model import (
    CORE,
    CloneRecord,
    Event,
    FreezeStatus,
    JobSpec,
    MemoryImage,
    ResourceKind,
    ResourceStatus,
)
from instaclone.states import State
from instaclone.store import SCHEMA_VERSION, Store
from instaclone.store.schema import _V1, _V2

SPEC = JobSpec(names=("c1",), storage_backend="qcow2", memory_backend="saverestore")


@pytest.fixture
async def store(tmp_path: Path):
    seen: list[Event] = []
    s = Store(tmp_path / "journal.sqlite", on_commit=seen.extend)
    await s.open()
    s.seen = seen  # type: ignore[attr-defined]
    yield s
    await s.close()


def _make_v2(path: Path) -> None:
    """A database as the 0.1 daemon (schema 2) left it: a job with a resource, a frozen source."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.executescript(_V1 + _V2)
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute("INSERT INTO jobs VALUES ('j1', 1, 'src', ?, 'Stunned', NULL, '{}', 1.0, 2.0)",
               ('{"names": ["c1"], "count": 1, "memory_backend": "saverestore"}',))
    db.execute("INSERT INTO job_states VALUES ('j1', 0, 'Requested', 1.0), ('j1', 1, 'Stunned', 2.0)")
    db.execute("INSERT INTO resources(job_id, kind, ref, clone, status, created_at) "
               "VALUES ('j1', 'stun', 'src', NULL, 'planned', 1.5)")
    db.execute("INSERT INTO frozen VALUES ('tpl', 3.0, 'frozen', 1, 'saverestore', '{\"path\": \"/x\"}', 2)")
    db.close()


async def test_a_schema_2_database_migrates_in_place(tmp_path: Path):
    path = tmp_path / "journal.sqlite"
    _make_v2(path)
    s = Store(path)
    await s.open()
    try:
        [res] = await s.resources("j1")
        assert (res.kind, res.ref, res.status, res.owner) == (ResourceKind.STUN, "src", ResourceStatus.PLANNED, CORE)
        job = await s.get_job("j1")
        assert job is not None and job.state is State.STUNNED and job.spec.names == ("c1",)
        tpl = (await s.frozen())["tpl"]
        assert tpl.image == MemoryImage("saverestore", {"path": "/x"}) and tpl.clones == 2
        # New ids continue after the copied ones.
        assert await s.plan("j1", ResourceKind.FILE, "/f") == res.id + 1
    finally:
        await s.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()


async def test_a_newer_database_is_refused_and_left_alone(tmp_path: Path):
    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION + 1),))
    db.close()
    s = Store(path)
    with pytest.raises(RuntimeError, match="has schema"):
        await s.open()
    await s.close()


async def test_the_ledger_takes_owner_ids_that_are_not_jobs_and_keeps_the_owner(store: Store):
    rid = await store.plan("frozen-tpl", ResourceKind.FILE, "/ram", owner="filecow")
    other = await store.plan("frozen-tpl", ResourceKind.STUN, "tpl")
    await store.set_resource(other, ResourceStatus.RELEASED)
    [res] = await store.resources("frozen-tpl")
    assert (res.id, res.owner, res.kind) == (rid, "filecow", ResourceKind.FILE)
    assert [r.id for r in await store.resources("frozen-tpl", active_only=False)] == [rid, other]


async def test_changes_write_their_event_and_announce_it_after_the_commit(store: Store):
    job = await store.create_job("j1", "src", SPEC)
    await store.record_state(job, State.STUNNED)
    rec = CloneRecord("c1", "u", "src", "j1", "/d", 1.0)
    await store.add_clones("j1", [rec], [])
    await store.remove_clone(rec)
    await store.add_frozen("tpl", paused_by_us=True, backend="saverestore")
    assert (await store.frozen())["tpl"].status is FreezeStatus.FREEZING
    await store.set_frozen_image("tpl", MemoryImage("saverestore", {"path": "/x"}), freeze_ms=1.5)
    await store.remove_frozen("tpl")  # a rolled-back freeze: no event
    seen = store.seen  # type: ignore[attr-defined]
    stored = await store.events(since=0)
    assert [e.type for e in seen] == [e.type for e in stored] == [
        "clone.requested", "clone.stunned", events.CLONE_DESTROYED, events.SOURCE_FROZEN]
    assert stored[1].to_dict()["data"]["clones"] == ["c1"]


async def test_a_cancelled_writer_still_announces_what_it_committed(store: Store):
    job = await store.create_job("j1", "src", SPEC)
    task = asyncio.ensure_future(store.record_state(job, State.STUNNED))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    seen = store.seen  # type: ignore[attr-defined]
    assert [e.cursor for e in seen] == [e.cursor for e in await store.events(since=0)]


async def test_a_failed_transaction_announces_nothing(store: Store):
    job = await store.create_job("j1", "src", SPEC)
    with pytest.raises(sqlite3.IntegrityError):
        await store.create_job("j1", "src", SPEC)  # same id
    assert len(store.seen) == 1  # type: ignore[attr-defined]
    assert job.state is State.REQUESTED


async def test_a_transition_cancelled_mid_write_stays_in_the_history(store: Store):
    """The rollback's Failed must follow a state that was written while its writer was cancelled."""
    job = await store.create_job("j1", "src", SPEC)
    blocker = asyncio.ensure_future(store._db.write(lambda db: time.sleep(0.3)))
    await asyncio.sleep(0.05)
    write = asyncio.ensure_future(store.record_state(job, State.STUNNED))
    await asyncio.sleep(0.05)
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    await blocker
    assert job.state is State.STUNNED
    await store.record_state(job, State.FAILED, error={"code": "interrupted"})
    stored = await store.get_job("j1")
    assert stored is not None
    assert [e.state for e in stored.history.entries] == [State.REQUESTED, State.STUNNED, State.FAILED]
