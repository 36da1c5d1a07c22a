"""State-machine tests with fault injection at every step (fakes for libvirt).

Each test asserts the exact state sequence, that the source runs afterwards,
and that nothing the job created is left behind.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from instaclone.errors import (
    InvalidName,
    InvalidRequest,
    LibvirtError,
    LibvirtTimeout,
    NameInUse,
    NotFound,
    ShuttingDown,
    SourceNotCloneable,
    SourceNotFound,
)
from instaclone.model import JobSpec, ResourceKind
from instaclone.requests import CloneRequest, FreezeRequest
from instaclone.states import HAPPY_PATH, State
from tests.support.enginelib import AGENT, leftover_files, run_job

STEPS = [s.value for s in HAPPY_PATH[1:]]


async def test_happy_path(env):
    engine, virt, store, c = env
    job = await run_job(engine, store, name="c1")
    assert [e.state for e in job.history.entries] == list(HAPPY_PATH)
    assert virt.domains["src"].state == "running"
    assert virt.domains["c1"].state == "running"
    assert "-incoming" not in virt.domains["c1"].xml  # persistent definition is clean
    assert job.result["clones"][0]["name"] == "c1"
    assert set(job.durations_ms if hasattr(job, "durations_ms") else job.history.durations_ms()) == set(STEPS)
    clones = await store.list_clones()
    assert [x.name for x in clones] == ["c1"]
    assert not (await store.resources(job.id))  # all handed over
    assert not list(c.jobs_dir.iterdir())  # scratch removed


async def test_nic_is_held_down_then_replugged(env):
    engine, virt, store, _ = env
    job = await run_job(engine, store, name="c1")
    assert job.state is State.UNSTUNNED
    seq = [m for m, n in virt.calls if n == "c1" and m in ("set_link", "resume", "replace_nic")]
    assert seq == ["set_link", "resume", "replace_nic"]
    job = await run_job(engine, store, name="c2", keep_network=True)
    seq = [m for m, n in virt.calls if n == "c2" and m in ("set_link", "resume", "replace_nic")]
    assert seq == ["resume", "replace_nic"]


async def test_nic_release_has_its_own_timeout_and_a_timeout_fails_the_job_cleanly(env):
    engine, virt, store, c = env
    engine.config = replace(engine.config, clone=replace(engine.config.clone, nic_release_timeout_s=7.0))
    budgets = []

    async def never_released(name: str, mac: str, *, link_up: bool, timeout_s: float) -> None:
        budgets.append(timeout_s)
        raise LibvirtTimeout(f"the guest of {name!r} did not release its NIC {mac} within {timeout_s:g} s")

    virt.replace_nic = never_released  # type: ignore[method-assign]
    job = await run_job(engine, store, name="c1")
    assert budgets == [7.0]  # not clone.customize_timeout_s
    assert job.state is State.FAILED
    assert job.error["code"] == "libvirt_timeout" and "did not release its NIC" in job.error["message"]
    assert set(virt.domains) == {"src"} and virt.domains["src"].state == "running"
    assert leftover_files(c) == []


async def test_count_makes_n_clones_from_one_stun(env):
    engine, virt, store, _ = env
    job = await run_job(engine, store, name="pool", count=3)
    assert job.state is State.UNSTUNNED
    assert {"pool-1", "pool-2", "pool-3"} <= set(virt.domains)
    assert [m for m, n in virt.calls if n == "src"].count("suspend") == 1
    macs = [r["macs"][0] for r in job.result["clones"]]
    assert len(set(macs)) == 3
    uuids = {virt.domains[n].uuid for n in ("pool-1", "pool-2", "pool-3", "src")}
    assert len(uuids) == 4


@pytest.mark.parametrize("step", STEPS)
async def test_fault_at_every_step_rolls_back(env, step):
    engine, virt, store, c = env

    async def hook(job_id: str, at: str) -> None:
        if at == step:
            raise LibvirtError(f"injected failure at {at}")

    engine.step_hook = hook
    job = await run_job(engine, store, name="c1", count=2)
    assert job.state is State.FAILED, job.error
    assert job.error["step"] == step
    assert "injected failure" in job.error["message"]
    expected = [*list(HAPPY_PATH[:HAPPY_PATH.index(State(step))]), State.FAILED]
    assert [e.state for e in job.history.entries] == expected
    assert virt.domains["src"].state == "running"
    assert set(virt.domains) == {"src"}
    assert leftover_files(c) == []
    assert not (await store.resources(job.id))
    assert await store.list_clones() == []


@pytest.mark.parametrize("method", ["suspend", "snapshot_disks", "save_state", "define", "start", "load_state",
                                    "set_link", "replace_nic"])
async def test_backend_failure_rolls_back(env, method):
    engine, virt, store, c = env
    virt.fail[method] = LibvirtError(f"{method} broke")
    job = await run_job(engine, store, name="c1")
    assert job.state is State.FAILED
    assert f"{method} broke" in job.error["message"]
    assert virt.domains["src"].state == "running"
    assert set(virt.domains) == {"src"}
    assert leftover_files(c) == []


async def test_stun_deadline_aborts_and_resumes(env):
    engine, virt, store, c = env
    virt.delay["save_state"] = 2.0  # deadline is 500 ms
    job = await run_job(engine, store, name="c1")
    assert job.state is State.FAILED
    assert job.error["code"] == "stun_deadline_exceeded"
    assert job.error["step"] == "MemoryLinked"
    assert virt.domains["src"].state == "running"
    assert set(virt.domains) == {"src"}
    assert leftover_files(c) == []


async def test_rollback_failure_is_needs_attention(env):
    engine, virt, store, _ = env
    virt.fail["start"] = LibvirtError("start broke")
    virt.fail["undefine"] = LibvirtError("undefine broke too")
    job = await run_job(engine, store, name="c1")
    assert job.state is State.NEEDS_ATTENTION
    assert any("undefine c1" in x for x in job.error["left_behind"])
    assert virt.domains["src"].state == "running"


async def test_paused_source_is_used_frozen_and_stays_paused(env):
    engine, virt, store, _ = env
    virt.domains["src"].state = "paused"
    job = await run_job(engine, store, name="c1")
    assert job.state is State.UNSTUNNED
    assert State.STUNNED not in [e.state for e in job.history.entries]
    assert virt.domains["src"].state == "paused"
    assert ("suspend", "src") not in virt.calls and ("resume", "src") not in virt.calls


@pytest.mark.parametrize("kw,err", [
    ({"name": "../etc"}, InvalidName),
    ({"name": "a b"}, InvalidName),
    ({"name": "x" * 64}, InvalidName),
    ({"name": "<x>"}, InvalidName),
    ({"name": ""}, InvalidName),
    ({"name": 7}, InvalidName),
    ({"name": "ok", "count": 0}, InvalidRequest),
    ({"name": "ok", "count": -3}, InvalidRequest),
    ({"name": "ok", "count": "2"}, InvalidRequest),
    ({"name": "ok", "count": 10_000}, InvalidRequest),
    ({"name": "src"}, NameInUse),
    ({"name": "ok", "source": "nosuch"}, SourceNotFound),
    ({"name": "ok", "source": "a;rm -rf"}, InvalidName),
])
async def test_bad_input_is_refused_before_anything_happens(env, kw, err):
    engine, virt, store, _ = env
    with pytest.raises(err):
        await engine.submit(CloneRequest(source=kw.pop("source", "src"), **kw))
    assert await store.list_jobs() == []
    assert virt.calls == [] or all(m == "lookup" for m, _ in virt.calls)


async def test_shut_off_source_is_refused(env):
    engine, virt, _, _ = env
    virt.domains["src"].state = "shutoff"
    with pytest.raises(SourceNotCloneable):
        await engine.submit(CloneRequest(source="src", name="c1"))


async def test_duplicate_names_across_jobs(env):
    engine, virt, _journal, _ = env
    virt.delay["save_state"] = 0.2
    await engine.submit(CloneRequest(source="src", name="dup"))
    with pytest.raises(NameInUse):
        await engine.submit(CloneRequest(source="src", name="dup"))
    await engine.shutdown(5)


async def test_same_source_is_serialized(env):
    engine, virt, store, _ = env
    virt.delay["save_state"] = 0.05
    jobs = [await engine.submit(CloneRequest(source="src", name=f"s{i}")) for i in range(5)]
    for j in jobs:
        await engine.wait(j.id, 10)
    states = [(await store.get_job(j.id)).state for j in jobs]
    assert states == [State.UNSTUNNED] * 5
    # stuns never overlap: suspend/resume of src strictly alternate; the
    # four submitted while the first stun ran share the second.
    seq = [m for m, n in virt.calls if n == "src" and m in ("suspend", "resume")]
    assert seq == ["suspend", "resume"] * 2
    assert engine.stuns == 2


async def test_destroy_removes_clone_and_files_not_source(env):
    engine, virt, store, _c = env
    job = await run_job(engine, store, name="c1")
    clone_dir = Path(job.result["clones"][0]["dir"])
    assert clone_dir.exists()
    await engine.destroy_clone("c1")
    assert "c1" not in virt.domains and "src" in virt.domains
    assert not clone_dir.exists()
    with pytest.raises(NotFound):
        await engine.destroy_clone("src")  # not ours
    assert "src" in virt.domains


async def test_recovery_resumes_stunned_source_and_removes_orphans(env):
    """Model a SIGKILL after Configured: only the journal and the world remain."""
    engine, virt, store, c = env
    job = await store.create_job("deadbeef", "src", JobSpec.from_dict({"names": ["c1"], "count": 1}))
    job_dir = c.jobs_dir / job.id
    clone_dir = c.clones_dir / "c1"
    await store.plan(job.id, ResourceKind.FILE, str(job_dir))
    job_dir.mkdir(parents=True)
    (job_dir / "memory.state").write_bytes(b"x")
    await store.plan(job.id, ResourceKind.STUN, "src")
    await virt.suspend("src")
    await store.record_state(job, State.STUNNED)
    orphan_delta = c.delta_dir / "src.vda.deadbeef.qcow2"
    await store.plan(job.id, ResourceKind.SOURCE_DELTA, str(orphan_delta), owner="fake")
    c.delta_dir.mkdir(parents=True, exist_ok=True)
    orphan_delta.write_bytes(b"never attached")
    await store.record_state(job, State.SOURCE_DELTA_CREATED)
    await store.plan(job.id, ResourceKind.FILE, str(clone_dir), clone="c1")
    clone_dir.mkdir(parents=True)
    (clone_dir / "vda.qcow2").write_bytes(b"d")
    await store.record_state(job, State.CLONE_DELTA_CREATED)
    await store.plan(job.id, ResourceKind.DOMAIN, "c1", clone="c1")
    await virt.define(virt.domains["src"].xml.replace("<name>src</name>", "<name>c1</name>"))
    # ... daemon killed here. A new engine recovers:
    handled = await engine.recover()
    assert handled == [job.id]
    rec = await store.get_job(job.id)
    assert rec.state is State.FAILED
    assert rec.error["code"] == "interrupted"
    assert virt.domains["src"].state == "running"
    assert set(virt.domains) == {"src"}
    assert not job_dir.exists() and not clone_dir.exists() and not orphan_delta.exists()
    assert not (await store.resources(job.id))


async def test_recovery_requeues_untouched_requested_jobs(env):
    engine, virt, store, _ = env
    job = await store.create_job("cafe", "src", JobSpec.from_dict({"names": ["c9"], "count": 1}))
    assert await engine.recover() == [job.id]
    await engine.wait(job.id, 10)
    assert (await store.get_job(job.id)).state is State.UNSTUNNED
    assert "c9" in virt.domains


async def test_shutdown_mid_job_rolls_back_and_resumes(env):
    """SIGTERM path: in-flight jobs past the grace period are cancelled and rolled back."""
    engine, virt, store, c = env
    virt.delay["save_state"] = 5.0
    job = await engine.submit(CloneRequest(source="src", name="c1"))
    for _ in range(200):
        if virt.domains["src"].state == "paused":
            break
        await asyncio.sleep(0.01)
    await engine.shutdown(0.05)
    rec = await store.get_job(job.id)
    assert rec.state is State.FAILED
    assert rec.error["code"] == "interrupted"
    assert virt.domains["src"].state == "running"
    assert set(virt.domains) == {"src"}
    assert leftover_files(c) == []
    with pytest.raises(ShuttingDown, match="shutting down"):
        await engine.submit(CloneRequest(source="src", name="c2"))


async def test_customization_runs_with_links_down_then_up(env):
    engine, virt, store, _ = env
    virt.domains["src"].xml = virt.domains["src"].xml.replace("</devices>", AGENT + "</devices>")
    job = await run_job(engine, store, name="c1", config={"a": "b"})
    assert job.state is State.UNSTUNNED, job.error
    seq = [m for m, n in virt.calls if n == "c1" and m in ("set_link", "resume", "replace_nic", "agent_exec")]
    assert seq == ["set_link", "resume", "replace_nic", "agent_exec", "set_link", "agent_exec"]
    ident = job.result["clones"][0]["identity"]
    assert ident["hostname"] == "c1" and ident["interfaces"][0]["addresses"] == ["10.0.2.15/24"]


async def test_customization_failure_fails_the_job_and_removes_the_clone(env):
    engine, virt, store, c = env
    virt.domains["src"].xml = virt.domains["src"].xml.replace("</devices>", AGENT + "</devices>")
    virt.fail["agent_exec"] = LibvirtError("guest-exec: permission denied")
    job = await run_job(engine, store, name="c1")
    assert job.state is State.FAILED
    assert job.error["code"] == "customization_failed"
    assert "c1" in job.error["message"] and "permission denied" in job.error["message"]
    assert set(virt.domains) == {"src"} and virt.domains["src"].state == "running"
    assert leftover_files(c) == []


@pytest.mark.parametrize("config", [{"k": 1}, ["a"], "x", {"k": "v" * 20_000}])
async def test_bad_guest_config_is_refused(env, config):
    engine, _, _journal, _ = env
    with pytest.raises(InvalidRequest, match="config"):
        await engine.submit(CloneRequest(source="src", name="c1", config=config))


async def test_recovery_undoes_a_freeze_cut_short(env):
    engine, virt, store, c = env
    await store.add_frozen("src", paused_by_us=True, backend="saverestore")
    await virt.suspend("src")
    (c.daemon.state_dir / "frozen" / "src").mkdir(parents=True)
    await engine.recover()
    assert virt.domains["src"].state == "running"
    assert await store.frozen() == {}
    assert not (c.daemon.state_dir / "frozen" / "src").exists()


async def test_recovery_undoes_a_freeze_cut_short_from_its_ledger(env):
    """Model a SIGKILL inside the memory capture of a freeze: the ledger knows what it made."""
    engine, virt, store, c = env
    frozen_dir = c.daemon.state_dir / "frozen" / "src"
    await store.add_frozen("src", paused_by_us=True, backend="saverestore")
    await store.plan("frozen-src", ResourceKind.STUN, "src")
    await virt.suspend("src")
    await store.plan("frozen-src", ResourceKind.FILE, str(frozen_dir))
    frozen_dir.mkdir(parents=True)
    await store.plan("frozen-src", ResourceKind.FILE, str(frozen_dir / "memory.state"), owner="saverestore")
    (frozen_dir / "memory.state").write_bytes(b"half a RAM image")
    await engine.recover()
    assert virt.domains["src"].state == "running"
    assert await store.frozen() == {}
    assert not frozen_dir.exists()
    assert await store.resources("frozen-src") == []


async def test_failed_freeze_capture_leaves_nothing(env):
    engine, virt, store, c = env
    virt.fail["save_state"] = LibvirtError("save broke")
    with pytest.raises(LibvirtError, match="save broke"):
        await engine.freeze(FreezeRequest("src"))
    assert virt.domains["src"].state == "running"
    assert await store.frozen() == {}
    assert not (c.daemon.state_dir / "frozen" / "src").exists()
    assert await store.resources("frozen-src") == []


async def test_freeze_clone_unfreeze_with_fakes(env):
    engine, virt, store, _ = env
    entry = await engine.freeze(FreezeRequest("src"))
    assert entry["status"] == "frozen" and virt.domains["src"].state == "paused"
    job = await run_job(engine, store, name="f1")
    assert job.state is State.UNSTUNNED and State.STUNNED not in [e.state for e in job.history.entries]
    assert virt.domains["src"].state == "paused"
    snapshots_before = [m for m, n in virt.calls if m == "snapshot_disks"]
    await engine.unfreeze(FreezeRequest("src"))
    assert virt.domains["src"].state == "running"
    # the source got a new delta before it ran again (its clone is backed by the old top)
    assert len([m for m, n in virt.calls if m == "snapshot_disks"]) == len(snapshots_before) + 1
    assert await store.frozen() == {}
    assert await store.resources("frozen-src") == []


async def test_destroy_of_a_clone_with_clones_of_its_own_keeps_them_running(env):
    engine, virt, store, c = env
    assert (await run_job(engine, store, name="parent")).state is State.UNSTUNNED
    assert (await run_job(engine, store, source="parent", name="child")).state is State.UNSTUNNED
    parent_disk = c.clones_dir / "parent" / "vda.qcow2"
    await engine.destroy_clone("parent")
    assert "parent" not in virt.domains and virt.domains["child"].state == "running"
    assert parent_disk.exists()  # the child's chain uses it
    with pytest.raises(NameInUse):  # its directory is kept: a new "parent" would make and remove it
        await engine.submit(CloneRequest(source="src", name="parent"))
    await engine.destroy_clone("child")
    assert not (c.clones_dir / "parent").exists() and not (c.clones_dir / "child").exists()
    assert (await run_job(engine, store, name="parent")).state is State.UNSTUNNED
