"""Issue 21, item 3: instaclone acts on the VMs it made by identity (UUID), never by a name alone.

The attack: a clone's (or a job's half-made) domain goes away, and another
domain is defined under the freed name: a user's own VM, or a guest's
owner racing for the name. Every path that removes what instaclone made
(a job's rollback live and after a crash, ``destroy``, TTL expiry, a pool's
retire) must leave that domain alone, and still forget what was its own.

Two layers: the same paths on the fake hypervisor (the engine, store and
ledger run for real), and on real libvirtd with the busybox guest running
under the freed name (marked integration; run under ``flock /tmp/instaclone-integration.lock``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from instaclone import config as cfg
from instaclone.errors import DomainNotFound, InstacloneError, LibvirtError
from instaclone.model import CloneRecord, JobSpec, PoolRecord, ResourceKind, ResourceStatus
from instaclone.requests import CloneRequest, ExecRequest, PoolRequest
from instaclone.states import State
from instaclone.store import Store
from tests.support.fakes import SOURCE_XML, FakeDomain, FakeHypervisor, fake_engine, fake_world
from tests.support.host import libvirt_ready

#: A journal written by ce8c54d has no UUID in a domain's ledger record (its
#: store.plan takes none): the test then plants the record as that code wrote it.
_PLAN_TAKES_UUID = "uuid" in inspect.signature(Store.plan).parameters


async def plan_domain(store: Store, owner_id: str, name: str, uuid: str) -> int:
    kw: dict[str, Any] = {"uuid": uuid} if _PLAN_TAKES_UUID else {}
    return await store.plan(owner_id, ResourceKind.DOMAIN, name, clone=name, **kw)


#: The states a job goes through up to Configured (the last one before its clones start).
_TO_CONFIGURED = (State.STUNNED, State.SOURCE_DELTA_CREATED, State.CLONE_DELTA_CREATED, State.MEMORY_LINKED,
                  State.CONFIGURED)


async def dead_job(store: Store, source: str, name: str, *, upto: tuple[State, ...] = _TO_CONFIGURED) -> str:
    """A job a killed daemon left at the last state of ``upto``; its id."""
    job = await store.create_job(uuidlib.uuid4().hex[:16], source,
                                 JobSpec(names=(name,), storage_backend="qcow2", memory_backend="saverestore"))
    for state in upto:
        await store.record_state(job, state)
    return job.id


async def until(pred: Any, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


# -- on the fake hypervisor ---------------------------------------------------------------


def take_name(virt: FakeHypervisor, name: str) -> FakeDomain:
    """Another domain takes ``name``: instaclone's domain of that name is gone, a running one has it now."""
    virt.domains.pop(name, None)
    ident = str(uuidlib.uuid4())
    dom = FakeDomain(name, ident, SOURCE_XML.format(name=name, uuid=ident, disk="/nonexistent/foreign.qcow2"),
                     "running")
    virt.domains[name] = dom
    return dom


def untouched(virt: FakeHypervisor, foreign: FakeDomain) -> bool:
    now = virt.domains.get(foreign.name)
    return now is not None and now.uuid == foreign.uuid and now.state == "running"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[Any, Any, FakeHypervisor]]:
    c, store, virt = await fake_world(tmp_path, pools={"check_interval_s": 0.2},
                                        clone={"stun_deadline_ms": 5000, "step_timeout_s": 30})
    yield c, store, virt
    await store.close()


async def services(engine: Any) -> asyncio.Task[None]:
    await engine.recover()
    return asyncio.get_running_loop().create_task(engine.run_background())


async def stop(engine: Any, task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.shutdown(10)


async def test_fake_hv_tells_gone_from_replaced(world: Any) -> None:
    _, _, virt = world
    mine = virt.domains["src"]
    assert (await virt.lookup_id("src", mine.uuid)).uuid == mine.uuid
    assert (await virt.undefine_id("nothing", str(uuidlib.uuid4()))).value == "gone"
    foreign = take_name(virt, "src")
    assert (await virt.destroy_id("src", mine.uuid)).value == "replaced"
    assert (await virt.undefine_id("src", mine.uuid)).value == "replaced"
    with pytest.raises(DomainNotFound):
        await virt.lookup_id("src", mine.uuid)
    assert untouched(virt, foreign)


async def test_fake_live_rollback_leaves_a_domain_that_took_the_name(world: Any) -> None:
    c, store, virt = world
    foreign: list[FakeDomain] = []
    start = virt.start

    async def start_then_lose_the_name(name: str, *, paused: bool = False) -> None:
        if name == "rb" and not foreign:
            # Our clone's domain is undefined behind our back, another one takes its name,
            # and the start fails: the job rolls back its DOMAIN record.
            foreign.append(take_name(virt, name))
            raise LibvirtError("start failed")
        await start(name, paused=paused)

    virt.start = start_then_lose_the_name  # type: ignore[method-assign]
    engine = fake_engine(c, store, virt)
    task = await services(engine)
    try:
        job = await engine.submit(CloneRequest(source="src", name="rb"))
        await engine.wait(job.id, 20)
    finally:
        await stop(engine, task)
    done = await store.get_job(job.id)
    assert done is not None and done.state is State.FAILED, done
    assert untouched(virt, foreign[0]), "the rollback undefined a domain instaclone did not make"
    assert await store.resources(job.id) == [], "the domain record stays active"


async def test_fake_crash_recovery_leaves_a_domain_that_took_the_name(world: Any) -> None:
    c, store, virt = world
    job_id = await dead_job(store, "src", "cr")
    await plan_domain(store, job_id, "cr", str(uuidlib.uuid4()))
    foreign = take_name(virt, "cr")
    engine = fake_engine(c, store, virt)
    await engine.recover()
    await engine.shutdown(5)
    after = await store.get_job(job_id)
    assert after is not None and after.state is State.FAILED, after
    assert untouched(virt, foreign), "recovery undefined a domain instaclone did not make"
    assert await store.resources(job_id) == []


async def _fake_clone(engine: Any, store: Any, name: str, **kw: Any) -> CloneRecord:
    job = await engine.submit(CloneRequest(source="src", name=name, **kw))
    await engine.wait(job.id, 20)
    rec = await store.get_clone(name)
    assert rec is not None, await store.get_job(job.id)
    return rec


async def test_fake_destroy_forgets_the_clone_and_refuses_the_other_domain(world: Any) -> None:
    c, store, virt = world
    engine = fake_engine(c, store, virt)
    task = await services(engine)
    try:
        await _fake_clone(engine, store, "ds")
        foreign = take_name(virt, "ds")
        with pytest.raises(InstacloneError) as info:
            await engine.destroy_clone("ds")
        assert info.value.code == "domain_replaced" and info.value.http_status == 409, info.value.to_dict()
    finally:
        await stop(engine, task)
    assert untouched(virt, foreign), "destroy removed a domain instaclone did not make"
    assert await store.get_clone("ds") is None


async def test_fake_ttl_expiry_leaves_a_domain_that_took_the_name(world: Any) -> None:
    c, store, virt = world
    engine = fake_engine(c, store, virt)
    task = await services(engine)
    try:
        await _fake_clone(engine, store, "tt", ttl_s=3600)
        foreign = take_name(virt, "tt")
        await store.set_expiry("tt", time.time() - 1)
        engine.pools.wake()

        async def forgotten() -> bool:
            return await store.get_clone("tt") is None
        await until(forgotten, 10)
    finally:
        await stop(engine, task)
    assert untouched(virt, foreign), "TTL expiry removed a domain instaclone did not make"


async def test_fake_pool_retire_leaves_a_domain_that_took_the_name(world: Any) -> None:
    c, store, virt = world
    engine = fake_engine(c, store, virt)
    task = await services(engine)
    try:
        await engine.pools.create(PoolRequest(name="pl", source="src", size=1))

        async def one_idle() -> bool:
            p = await engine.pools.show("pl")
            return len(p["idle"]) == 1 and p["pending"] == 0
        await until(one_idle, 20)
        member = (await engine.pools.show("pl"))["idle"][0]
        foreign = take_name(virt, member)

        async def retired() -> bool:
            return await store.get_clone(member) is None
        await until(retired, 10)
        await until(one_idle, 20)  # and replaced by a new member
    finally:
        await stop(engine, task)
    assert untouched(virt, foreign), "the pool retired a domain instaclone did not make"


async def test_fake_exec_does_not_reach_a_domain_that_took_the_name(world: Any) -> None:
    c, store, virt = world
    engine = fake_engine(c, store, virt)
    task = await services(engine)
    try:
        await _fake_clone(engine, store, "ex")
        take_name(virt, "ex")
        virt.agent_log.clear()
        with pytest.raises(InstacloneError) as info:
            await engine.guest_exec(ExecRequest("ex", argv=["id"]))
        assert info.value.code == "domain_replaced", info.value.to_dict()
        assert virt.agent_log == [], "a guest agent command reached the other domain"
    finally:
        await stop(engine, task)
    assert await store.get_clone("ex") is not None  # exec forgets nothing


# -- on real libvirtd ---------------------------------------------------------------------

real = pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))


@dataclass
class Foreign:
    """The busybox guest, running under a name a test frees: (name, UUID)."""

    name: str
    uuid: str


@pytest.fixture(scope="module")
def foreign_vm() -> Iterator[Foreign]:
    """One busybox guest for the module's real tests (TCG boots are slow); its own scratch dir."""
    if libvirt_ready() is not None:
        pytest.skip(str(libvirt_ready()))
    from instaclone.hv import LibvirtHypervisor
    from tests.support.vmlib import Scratch, assert_no_qemu_left, boot_source

    scratch = Scratch()
    name = f"ic-id-{uuidlib.uuid4().hex[:6]}"

    async def boot() -> str:
        virt = LibvirtHypervisor()
        try:
            await boot_source(virt, scratch, name)
            return (await virt.lookup(name)).uuid
        finally:
            await virt.close()

    async def remove() -> None:
        virt = LibvirtHypervisor()
        try:
            await virt.undefine(name)
        finally:
            await virt.close()

    try:
        yield Foreign(name, asyncio.run(boot()))
    finally:
        asyncio.run(remove())
        scratch.cleanup()
        assert_no_qemu_left(scratch)


@dataclass
class RealWorld:
    config: cfg.Config
    virt: Any  # LibvirtHypervisor


@pytest.fixture
async def real_world(foreign_vm: Foreign) -> AsyncIterator[RealWorld]:
    from instaclone.hv import LibvirtHypervisor
    from tests.support.vmlib import Scratch, make_config

    scratch = Scratch()
    virt = LibvirtHypervisor()
    await virt.connect()
    try:
        config = make_config(scratch)
        config.clones_dir.mkdir(parents=True, exist_ok=True)
        yield RealWorld(config, virt)
    finally:
        await virt.close()
        scratch.cleanup()


async def assert_untouched(virt: Any, foreign: Foreign, what: str) -> None:
    try:
        info = await virt.lookup(foreign.name)
    except DomainNotFound:
        raise AssertionError(f"{what} undefined {foreign.name!r}, a domain instaclone did not make") from None
    assert info.uuid == foreign.uuid, f"{foreign.name!r} is another domain now"
    assert info.state == "running", f"{what} stopped {foreign.name!r} (now {info.state}), a domain it did not make"


async def plant_clone(config: cfg.Config, name: str, **kw: Any) -> CloneRecord:
    """A registered clone whose domain (another UUID) was undefined and its name taken since."""
    store = Store(config.store_path)
    await store.open()
    try:
        job_id = await dead_job(store, "ic-id-gone-source", name, upto=(*_TO_CONFIGURED, State.UNSTUNNED))
        if "pool" in kw:
            await store.create_pool(PoolRecord(kw["pool"], "ic-id-gone-source", 1))
        rec = CloneRecord(name, str(uuidlib.uuid4()), "ic-id-gone-source", job_id,
                          str(config.clones_dir / name), time.time(), **kw)
        await store.add_clones(job_id, [rec], [])
        return rec
    finally:
        await store.close()


@real
@pytest.mark.integration
async def test_real_hv_acts_by_uuid_only(real_world: RealWorld, foreign_vm: Foreign) -> None:
    virt, other = real_world.virt, str(uuidlib.uuid4())
    assert (await virt.lookup_id(foreign_vm.name, foreign_vm.uuid)).uuid == foreign_vm.uuid
    with pytest.raises(DomainNotFound) as info:  # DomainReplaced, a kind of DomainNotFound
        await virt.lookup_id(foreign_vm.name, other)
    assert info.value.code == "domain_replaced"
    assert (await virt.destroy_id(foreign_vm.name, other)).value == "replaced"
    assert (await virt.undefine_id(foreign_vm.name, other)).value == "replaced"
    assert (await virt.undefine_id(f"{foreign_vm.name}-none", other)).value == "gone"
    await assert_untouched(virt, foreign_vm, "an operation by another UUID")


@real
@pytest.mark.integration
async def test_real_live_rollback_leaves_the_domain_that_took_the_name(real_world: RealWorld,
                                                                       foreign_vm: Foreign) -> None:
    from instaclone.jobs.ledger import CoreUndoer, Ledger

    store = Store(real_world.config.store_path)
    await store.open()
    try:
        rid = await plan_domain(store, "rb-job", foreign_vm.name, str(uuidlib.uuid4()))
        ledger = Ledger(store, {"core": CoreUndoer(real_world.virt, storage=_NoStorage())})
        left = await ledger.rollback("rb-job", source="ic-id-gone-source")
        assert left == []
        assert [r.status for r in await store.resources("rb-job", active_only=False) if r.id == rid] == [
            ResourceStatus.RELEASED]
    finally:
        await store.close()
    await assert_untouched(real_world.virt, foreign_vm, "a live rollback")


class _NoStorage:
    async def undo(self, **_: Any) -> None:
        raise AssertionError("no storage record here")


@real
@pytest.mark.integration
async def test_real_crash_recovery_leaves_the_domain_that_took_the_name(real_world: RealWorld,
                                                                        foreign_vm: Foreign) -> None:
    from tests.support.vmlib import running_daemon

    # A daemon killed at Configured: the job's domain record is in the journal,
    # its domain is gone, and another domain has the name when it starts again.
    store = Store(real_world.config.store_path)
    await store.open()
    try:
        job_id = await dead_job(store, "ic-id-gone-source", foreign_vm.name)
        await plan_domain(store, job_id, foreign_vm.name, str(uuidlib.uuid4()))
    finally:
        await store.close()
    daemon = await running_daemon(real_world.config)
    try:
        after = await daemon.store.get_job(job_id)
        assert after is not None and after.state is State.FAILED, after
        assert await daemon.store.resources(job_id) == []
    finally:
        await daemon.stop()
    await assert_untouched(real_world.virt, foreign_vm, "crash recovery")


@real
@pytest.mark.integration
async def test_real_destroy_forgets_the_clone_and_leaves_the_domain(real_world: RealWorld,
                                                                   foreign_vm: Foreign) -> None:
    from tests.support.vmlib import Api, running_daemon

    await plant_clone(real_world.config, foreign_vm.name)
    daemon = await running_daemon(real_world.config)
    try:
        async with Api(real_world.config.daemon.socket) as api:
            status, body = await api.call("DELETE", f"/v1/clones/{foreign_vm.name}")
            err = body.get("error") or {}
            assert (status, err.get("code")) == (409, "domain_replaced"), (status, body)
            assert foreign_vm.name in err["message"]
            status, _ = await api.call("DELETE", f"/v1/clones/{foreign_vm.name}")
            assert status == 404  # forgotten
    finally:
        await daemon.stop()
    await assert_untouched(real_world.virt, foreign_vm, "destroy")


@real
@pytest.mark.integration
async def test_real_ttl_expiry_leaves_the_domain_that_took_the_name(real_world: RealWorld,
                                                                    foreign_vm: Foreign) -> None:
    from tests.support.vmlib import running_daemon

    await plant_clone(real_world.config, foreign_vm.name, expires_at=time.time() - 1)
    daemon = await running_daemon(real_world.config)
    try:
        async def forgotten() -> bool:
            return await daemon.store.get_clone(foreign_vm.name) is None
        await until(forgotten, 30)
    finally:
        await daemon.stop()
    await assert_untouched(real_world.virt, foreign_vm, "TTL expiry")


@real
@pytest.mark.integration
async def test_real_pool_retire_leaves_the_domain_that_took_the_name(real_world: RealWorld,
                                                                     foreign_vm: Foreign) -> None:
    from tests.support.vmlib import running_daemon

    await plant_clone(real_world.config, foreign_vm.name, pool="ic-id-pool")
    daemon = await running_daemon(real_world.config)
    try:
        async def retired() -> bool:
            return await daemon.store.get_clone(foreign_vm.name) is None
        await until(retired, 30)
    finally:
        await daemon.stop()
    await assert_untouched(real_world.virt, foreign_vm, "a pool's retire")


async def test_fake_a_source_redefined_before_its_stun_is_refused(world: Any) -> None:
    c, store, virt = world
    engine = fake_engine(c, store, virt)
    task = await services(engine)
    try:
        async with engine.svc.lock("src"):  # the job waits for its stun here
            job = await engine.submit(CloneRequest(source="src", name="rs"))
            old = virt.domains["src"]
            # Another VM is defined under the source's name meanwhile (running, as a source must be).
            other = take_name(virt, "src")
            other.xml = other.xml.replace("/nonexistent/foreign.qcow2", str(file_disk(old.xml)))
        await engine.wait(job.id, 20)
    finally:
        await stop(engine, task)
    done = await store.get_job(job.id)
    assert done is not None and done.state is State.FAILED, done
    assert done.error is not None and done.error["code"] == "source_not_cloneable", done.error
    assert "redefined" in done.error["message"]
    assert [m for m, _ in virt.calls if m == "suspend"] == [], "the other VM was stunned"
    assert "rs" not in virt.domains


def file_disk(xml: str) -> Path:
    from instaclone.hv import file_disks

    return file_disks(xml)[0].path
