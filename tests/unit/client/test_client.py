"""instaclone.client against the real API app over the fake engine (tests/support/fakes.py ``fake_api``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from instaclone import client as ic
from tests.support.fakes import fake_api


@pytest.fixture
async def api(tmp_path: Path, monkeypatch):
    # fake_api has no event bus: followers see new events at their next check, made short here.
    monkeypatch.setattr("instaclone.api.stream.FOLLOW_CHECK_S", 0.1)
    async with fake_api(tmp_path) as (_raw, virt, sock), ic.Client(sock, timeout_s=60) as c:
        yield c, virt


async def test_clone_wait_job_jobs_clones(api):
    c, _virt = api
    health = await c.health()
    assert health.libvirt_connected is True and health.accepting and health.version
    job = await c.clone("src", name="c1", wait=True, timeout_s=20, config={"role": "ci"}, ttl_s=3600)
    assert isinstance(job, ic.Job) and job.state == "Unstunned" and job.terminal and job.ok
    assert job.clones == ("c1",) and job.source == "src" and job.raise_for_state() is job
    assert job.history[0].state == "Requested" and job.history[-1].state == "Unstunned"
    assert job.raw["spec"]["ttl_s"] == 3600 and job.exception() is None
    again = await c.job(job.id, wait_s=1)
    assert again.id == job.id and again.state == "Unstunned"
    assert [j.id for j in await c.jobs()] == [job.id]
    clones = await c.clones()
    assert [(x.name, x.source, x.state) for x in clones] == [("c1", "src", "running")]
    assert clones[0].expires_at is not None
    gone = await c.destroy("c1")
    assert gone.name == "c1" and await c.clones() == []


async def test_clone_without_wait_then_watch(api):
    c, _virt = api
    job = await c.clone("src", name="w1", count=2)
    assert not job.terminal or job.state == "Unstunned"
    states = [ev.state async for ev in c.watch(job.id)]
    assert states[0] == "Requested" and states[-1] == "Unstunned"
    assert (await c.job(job.id)).clones == ("w1-1", "w1-2")


async def test_errors_are_typed(api):
    c, virt = api
    with pytest.raises(ic.SourceNotFound) as e:
        await c.clone("ghost", name="x")
    err = e.value
    assert isinstance(err, ic.NotFound) and isinstance(err, ic.ApiError)
    assert err.code == "source_not_found" and err.status == 404 and "ghost" in err.message
    assert "[source_not_found]" in str(err)
    with pytest.raises(ic.InvalidName):
        await c.clone("src", name="a/b")
    with pytest.raises(ic.NameInUse):
        await c.clone("src", name="src")
    with pytest.raises(ic.InvalidRequest) as e2:
        await c.clone("src", name="c", count=-1)
    assert e2.value.code == "invalid_request"
    with pytest.raises(ic.NotFound) as e3:
        await c.job("nope")
    assert type(e3.value) is ic.NotFound
    with pytest.raises(ic.NotFound):
        await c.watch("nope").__anext__()
    with pytest.raises(ic.NotFound):
        await c.destroy("src")  # not a clone instaclone made
    with pytest.raises((ic.NotFound, ic.InvalidName)):  # one path segment, never another route
        await c.pool("a/../b")
    assert set(virt.domains) == {"src"}


async def test_failed_job_is_returned_and_raises_its_error(api):
    c, virt = api
    virt.fail["define"] = RuntimeError("boom")  # see FakeHypervisor._hook
    job = await c.clone("src", name="f1", wait=True, timeout_s=20)
    virt.fail.clear()
    assert job.failed and job.error is not None
    exc = job.exception()
    assert isinstance(exc, ic.ApiError) and exc.code == job.error["code"]
    with pytest.raises(ic.ApiError):
        job.raise_for_state()


async def test_events_since_resume_and_filters(api):
    c, _virt = api
    j1 = await c.clone("src", name="e1", wait=True, timeout_s=20)
    first = [ev async for ev in c.events(tail=1000)]
    assert first and all(isinstance(ev, ic.Event) for ev in first)
    assert [ev.cursor for ev in first] == sorted(ev.cursor for ev in first)
    assert first[-1].type == "clone.ready" and first[-1].job_id == j1.id and first[-1].id.startswith("evt_")
    last = first[-1].cursor
    assert [ev async for ev in c.events(since=last)] == []
    j2 = await c.clone("src", name="e2", wait=True, timeout_s=20)
    resumed = [ev async for ev in c.events(since=last)]
    assert resumed and {ev.job_id for ev in resumed} == {j2.id} and resumed[0].cursor > last
    only = [ev async for ev in c.events(since=0, types=["clone.ready"])]
    assert [ev.job_id for ev in only] == [j1.id, j2.id]
    assert [ev.job_id for ev in only] == [ev.job_id async for ev in c.events(since=0, types="clone.ready")]
    by_job = [ev async for ev in c.events(since=0, job=j1.id)]
    assert by_job and {ev.job_id for ev in by_job} == {j1.id}
    assert len([ev async for ev in c.events(tail=2)]) == 2
    with pytest.raises(ic.InvalidRequest):
        [ev async for ev in c.events(types=["nothing.like.this"])]


async def test_events_follow_sees_new_events(api):
    c, _virt = api
    top = [ev async for ev in c.events(tail=1)]
    since = top[-1].cursor if top else 0
    seen: list[ic.Event] = []

    async def follow() -> None:
        async for ev in c.events(since=since, follow=True, types=["clone.ready"]):
            seen.append(ev)
            return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    job = await c.clone("src", name="f2", wait=True, timeout_s=20)
    await asyncio.wait_for(task, 20)
    assert [ev.job_id for ev in seen] == [job.id]


async def test_pool_claim_context_manager_releases(api):
    c, virt = api
    pool = await c.create_pool("p", source="src", size=0)
    assert isinstance(pool, ic.Pool) and pool.size == 0 and pool.source == "src"
    assert pool.held is None and pool.last_error is None and pool.failures == 0 and pool.raw["name"] == "p"
    with pytest.raises(ic.PoolEmpty) as e:
        await c.claim("p", wait_s=0.1)
    assert e.value.status == 503
    assert (await c.resize_pool("p", 1)).size == 1
    async with c.claim("p", wait_s=30, ttl_s=3600) as vm:
        assert isinstance(vm, ic.Claim) and vm.pool == "p" and vm.name in virt.domains
        assert (await c.pool("p")).claimed == (vm.name,)
        name = vm.name
    assert name not in virt.domains
    assert name not in [x.name for x in await c.clones()]
    # On an exception the clone is released too, and the body's error is what propagates.
    with pytest.raises(ZeroDivisionError):
        async with c.claim("p", wait_s=30) as vm:
            name = vm.name
            _ = 1 / 0
    assert name not in virt.domains
    # Awaited: a Claim that stays claimed until released.
    held = await c.claim("p", wait_s=30)
    assert held.name in virt.domains and (await c.pool("p")).claimed == (held.name,)
    out = await c.release(held)
    assert out["clone"] == held.name and held.name not in virt.domains
    # Released in the body: exit finds it gone, which is fine.
    async with c.claim("p", wait_s=30) as vm:
        await c.release(vm)
    assert [p.name for p in await c.pools()] == ["p"]
    assert (await c.update_pool("p", size=0)).size == 0
    assert (await c.delete_pool("p"))["pool"] == "p"


async def test_claim_released_on_cancel(api):
    c, virt = api
    await c.create_pool("p", source="src", size=1)
    entered = asyncio.Event()
    names: list[str] = []

    async def body() -> None:
        async with c.claim("p", wait_s=30) as vm:
            names.append(vm.name)
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await asyncio.wait_for(entered.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert names and names[0] not in virt.domains
    await c.update_pool("p", size=0)


async def test_failed_release_on_exit_is_raised(api, monkeypatch):
    c, _virt = api
    await c.create_pool("p", source="src", size=1)

    async def broken(_clone: object) -> dict[str, object]:
        raise ic.StorageError("disk on fire", code="storage_error", status=500)

    async with c.claim("p", wait_s=30) as vm:
        name = vm.name
        monkeypatch.setattr(c, "release", broken)
        with pytest.raises(ic.StorageError):
            async with c.claim("p", wait_s=30):
                pass
        # ...but not over the body's own error, which gets a note instead.
        with pytest.raises(KeyError) as e:
            async with c.claim("p", wait_s=30):
                raise KeyError("body")
        assert any("disk on fire" in n for n in getattr(e.value, "__notes__", []))
        monkeypatch.undo()
    assert name  # released by the outer exit (release restored)
    await c.update_pool("p", size=0)


async def test_webhooks_deliveries_replay(tmp_path):
    from tests.support.receiver import Receiver
    from tests.support.webhooklib import SECRET_A, SECRET_B, Hub, settled

    receiver = await Receiver([SECRET_A, SECRET_B]).start()
    hub = await Hub(tmp_path, receiver).start()
    try:
        async with ic.Client(hub.sock) as c:
            job = await c.clone("src", name="wh1", wait=True, timeout_s=20)
            await settled(hub)
            hooks = await c.webhooks()
            assert [h["name"] for h in hooks] == ["rx"] and hooks[0]["enabled"] is True
            rows = await c.deliveries(job=job.id, limit=50)
            assert rows and {d["job_id"] for d in rows} == {job.id} and {d["status"] for d in rows} == {"delivered"}
            assert await c.replay([rows[0]["id"]]) == [rows[0]["id"]]
            assert (await c.enable_webhook("rx"))["was_disabled"] is False
            with pytest.raises(ic.NotFound):
                await c.enable_webhook("ghost")
            with pytest.raises(ic.InvalidRequest):
                await c.deliveries(status="bogus")
            with pytest.raises(ic.InvalidRequest):
                await c.replay()  # neither ids nor a filter
            # The escape hatch for a call without a method yet: same errors, raw JSON.
            assert "paths" in await c.request("GET", "/v1/openapi.json")
            with pytest.raises(ic.NotFound):
                await c.request("GET", "/v1/nothing")
    finally:
        await hub.stop()
        await receiver.stop()


async def test_webhook_routes_absent_is_not_found(api):
    c, _virt = api
    with pytest.raises(ic.NotFound, match="webhooks are not enabled"):
        await c.webhooks()


def test_error_classes_are_named_alike_in_daemon_and_client() -> None:
    """Each API error code has the same class name on both sides (one vocabulary for users and code)."""
    from instaclone import errors as daemon_errors
    from instaclone.client import errors as client_errors

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    by_code: dict[str, set[str]] = {}
    for cls in subclasses(daemon_errors.InstacloneError)[1:]:  # the roots differ: InstacloneError, ApiError
        by_code.setdefault(cls.code, set()).add(cls.__name__)
    unlike = {code: (client_errors.CODES[code].__name__, sorted(names)) for code, names in by_code.items()
              if code in client_errors.CODES and client_errors.CODES[code].__name__ not in names}
    assert not unlike, f"client class name differs from the daemon's for these codes: {unlike}"
