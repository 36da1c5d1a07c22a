"""The undo ledger: order, release only after a successful undo, reporting of what is left."""

from __future__ import annotations

from dataclasses import replace

from instaclone.jobs.ledger import Ledger, undo_order
from instaclone.model import CORE, Resource, ResourceKind, ResourceStatus


class MemStore:
    """The ledger calls of the store, in memory."""

    def __init__(self) -> None:
        self.rows: list[Resource] = []

    async def plan(self, owner_id: str, kind: ResourceKind, ref: str, *, clone: str | None = None,
                   owner: str = CORE, uuid: str | None = None) -> int:
        rid = len(self.rows) + 1
        self.rows.append(Resource(rid, owner_id, kind, ref, clone, ResourceStatus.PLANNED, owner, uuid))
        return rid

    async def set_resource(self, resource_id: int, status: ResourceStatus) -> None:
        self.rows = [replace(r, status=status) if r.id == resource_id else r for r in self.rows]

    async def resources(self, owner_id: str, *, active_only: bool = True) -> list[Resource]:
        return [r for r in self.rows if r.job_id == owner_id
                and (not active_only or r.status is not ResourceStatus.RELEASED)]

    async def set_made(self, resource_id: int, dev: int, ino: int, ftype: int) -> None:
        self.rows = [replace(r, dev=dev, ino=ino, ftype=ftype) if r.id == resource_id else r for r in self.rows]

    async def set_removed(self, resource_ids) -> None:
        self.removed = {*getattr(self, "removed", set()), *resource_ids}


class Undoer:
    def __init__(self, log: list[str], fail: set[str] | None = None) -> None:
        self.log, self.fail = log, fail or set()

    async def undo(self, *, resource: Resource, source: str) -> None:
        if resource.ref in self.fail:
            raise OSError(f"cannot remove {resource.ref}")
        self.log.append(f"{resource.owner}:{resource.kind.value}:{resource.ref}")


async def test_stun_first_then_newest_first_each_by_its_owner() -> None:
    store, log = MemStore(), []
    ledger = Ledger(store, {CORE: Undoer(log), "qcow2": Undoer(log), "filecow": Undoer(log)})
    core, storage, memory = (ledger.recorder("j1", owner=o) for o in (CORE, "qcow2", "filecow"))
    await core(ResourceKind.FILE, "/jobs/j1")
    await core(ResourceKind.STUN, "src")
    await storage(ResourceKind.SOURCE_DELTA, "/deltas/src.j1.qcow2")
    await core(ResourceKind.FILE, "/clones/c1", clone="c1")
    await memory(ResourceKind.FILE, "/ram/instaclone/j1")
    await core(ResourceKind.DOMAIN, "c1", clone="c1")
    assert await ledger.rollback("j1", source="src") == []
    assert log == ["core:stun:src", "core:domain:c1", "filecow:file:/ram/instaclone/j1", "core:file:/clones/c1",
                   "qcow2:source_delta:/deltas/src.j1.qcow2", "core:file:/jobs/j1"]
    assert await store.resources("j1") == []


async def test_a_failed_undo_keeps_its_record_and_is_reported() -> None:
    store, log = MemStore(), []
    ledger = Ledger(store, {CORE: Undoer(log, fail={"/clones/c1"})})
    record = ledger.recorder("j1")
    await record(ResourceKind.FILE, "/jobs/j1")
    await record(ResourceKind.FILE, "/clones/c1")
    left = await ledger.rollback("j1", source="src")
    assert left == ["remove /clones/c1: cannot remove /clones/c1"]
    assert log == ["core:file:/jobs/j1"]  # the rest is still undone
    assert [r.ref for r in await store.resources("j1")] == ["/clones/c1"]
    # Recovery later finds exactly what is left.
    ledger.undoers[CORE] = Undoer(log)
    assert await ledger.rollback("j1", source="src") == []
    assert await store.resources("j1") == []


async def test_a_resource_of_a_backend_that_is_not_loaded_is_reported_not_dropped() -> None:
    store = MemStore()
    ledger = Ledger(store, {CORE: Undoer([])})
    await ledger.recorder("j1", owner="gone")(ResourceKind.FILE, "/x")
    assert await ledger.rollback("j1", source="src") == ["remove /x: no backend 'gone' is loaded to remove it"]
    assert len(await store.resources("j1")) == 1


async def test_only_one_kind_and_release_by_ref() -> None:
    store, log = MemStore(), []
    ledger = Ledger(store, {CORE: Undoer(log)})
    record = ledger.recorder("j1")
    await record(ResourceKind.STUN, "src")
    await record(ResourceKind.FILE, "/jobs/j1")
    assert await ledger.rollback("j1", source="src", only=ResourceKind.STUN) == []
    assert log == ["core:stun:src"]
    await ledger.release("j1", ResourceKind.FILE, "/jobs/j1")
    assert await store.resources("j1") == []


def test_undo_order_is_stable_for_equal_kinds() -> None:
    rows = [Resource(i, "j", k, str(i), None, ResourceStatus.PLANNED)
            for i, k in enumerate([ResourceKind.FILE, ResourceKind.STUN, ResourceKind.DOMAIN, ResourceKind.STUN])]
    assert [r.id for r in undo_order(rows)] == [3, 1, 2, 0]


async def test_a_domain_record_is_undone_by_its_uuid_and_an_old_one_by_name() -> None:
    from instaclone.jobs.ledger import CoreUndoer
    from tests.support.fakes import FakeHypervisor

    virt = FakeHypervisor()
    store = MemStore()
    ledger = Ledger(store, {CORE: CoreUndoer(virt, storage=Undoer([]))})
    record = ledger.recorder("j1")
    await virt.define("<domain><name>c1</name><uuid>11111111-1111-4111-8111-111111111111</uuid></domain>")
    await virt.define("<domain><name>c2</name><uuid>22222222-2222-4222-8222-222222222222</uuid></domain>")
    await record(ResourceKind.DOMAIN, "c1", clone="c1", uuid="11111111-1111-4111-8111-111111111111")
    await record(ResourceKind.DOMAIN, "c2", clone="c2")  # journal schema < 6: no UUID, undone by name
    await record(ResourceKind.DOMAIN, "c3", clone="c3", uuid="33333333-3333-4333-8333-333333333333")  # never made
    assert await ledger.rollback("j1", source="src") == []
    assert virt.domains == {} and await store.resources("j1") == []
