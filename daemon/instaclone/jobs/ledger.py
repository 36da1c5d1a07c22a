"""The undo ledger: one record per resource, written before the resource exists.

Every step of a job (and a freeze) records what it is about to create, with
its kind and its owner: the backend that removes it, or ``core`` for what the
pipeline makes itself (job and clone directories, NVRAM copies, domains, the
stun). Undo is one function, :meth:`Ledger.rollback`, used by a live rollback
and by crash recovery alike, so both remove the same things in the same
order: the stunned source is resumed first, then everything else newest
first. A record is marked released only after its undo succeeded; a failed
undo keeps the record and is reported (the job ends NeedsAttention).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from .. import safefs
from ..errors import DomainNotFound
from ..hv import Hypervisor
from ..log import get as get_logger
from ..model import CORE, Resource, ResourceKind, ResourceStatus
from ..plugin_api import Recorder, remove_path

log = get_logger(component="ledger")


class Undoer(Protocol):
    """Whoever removes a kind of resource: the core, or a backend (``Backend.undo``)."""

    async def undo(self, *, resource: Resource, source: str) -> None: ...


class LedgerStore(Protocol):
    """The part of the store the ledger writes (see ``instaclone.store``)."""

    async def plan(self, owner_id: str, kind: ResourceKind, ref: str, *, clone: str | None = None,
                   owner: str = CORE, uuid: str | None = None) -> int: ...

    async def set_resource(self, resource_id: int, status: ResourceStatus) -> None: ...

    async def resources(self, owner_id: str, *, active_only: bool = True) -> list[Resource]: ...

    async def set_made(self, resource_id: int, dev: int, ino: int, ftype: int) -> None: ...

    async def set_removed(self, resource_ids: Iterable[int]) -> None: ...


class CoreUndoer:
    """Undo of what the pipeline itself creates.

    Rows written before the ledger knew owners (journal schema < 3) all say
    ``core``: their source deltas go to the storage backend, as they always did.
    """

    def __init__(self, virt: Hypervisor, storage: Undoer) -> None:
        self.virt = virt
        self.storage = storage

    async def undo(self, *, resource: Resource, source: str) -> None:
        if resource.kind is ResourceKind.STUN:
            try:
                if resource.uuid is not None:
                    # Only the source that was stunned: DomainReplaced (a
                    # DomainNotFound) if another domain has its name now.
                    await self.virt.lookup_id(resource.ref, resource.uuid)
                # A pre-copy may still run, or hold the source at switchover:
                # cancelled, QEMU lets the source run again by itself.
                await self.virt.cancel_migration(resource.ref)
                await self.virt.resume(resource.ref)
            except DomainNotFound:
                log.warning("ledger.stunned_source_gone", source=resource.ref)
        elif resource.kind is ResourceKind.DOMAIN:
            await undefine_recorded(self.virt, resource)
        elif resource.kind is ResourceKind.FILE:
            await remove_path(Path(resource.ref))
        else:
            await self.storage.undo(resource=resource, source=source)


#: Kinds whose ref is a path instaclone makes.
FILE_KINDS = (ResourceKind.FILE, ResourceKind.SOURCE_DELTA)


async def undefine_recorded(virt: Hypervisor, resource: Resource) -> None:
    """Undefine the domain a DOMAIN record names, if it is still the one recorded (its UUID).

    Gone, or its name taken by another domain since: done, nothing touched
    (the hypervisor layer logs the second). A record of journal schema < 6
    has no UUID: undone by name, as it was written to be.
    """
    if resource.uuid is None:
        log.warning("ledger.domain_without_uuid", ref=resource.ref, resource_id=resource.id)
        await virt.undefine(resource.ref)
        return
    await virt.undefine_id(resource.ref, resource.uuid)


#: How a failed undo is reported in a job's ``left_behind``.
_UNDO_VERB = {
    ResourceKind.STUN: "resume",
    ResourceKind.DOMAIN: "undefine",
    ResourceKind.SOURCE_DELTA: "remove unused source delta",
    ResourceKind.FILE: "remove",
}


def describe(resource: Resource) -> str:
    """What undoing ``resource`` does, e.g. ``undefine c1``."""
    return f"{_UNDO_VERB[resource.kind]} {resource.ref}"


def undo_order(resources: list[Resource]) -> list[Resource]:
    """Stuns first (a paused source runs again before anything else), then newest first."""
    return sorted(resources, key=lambda r: (r.kind is not ResourceKind.STUN, -r.id))


class Ledger:
    """Records resources before creation and undoes them, live or after a crash."""

    def __init__(self, store: LedgerStore, undoers: Mapping[str, Undoer], *,
                 anchors: Iterable[Path | str] = ()) -> None:
        self.store = store
        self.undoers = dict(undoers)
        # instaclone's own directories: the files made below them get an identity.
        self.anchors = tuple(str(a) for a in anchors)

    def recorder(self, owner_id: str, *, owner: str = CORE) -> Recorder:
        """A ``record(kind, ref, clone=)`` callable for ``owner`` within ``owner_id``'s ledger."""

        async def record(kind: ResourceKind, ref: str, *, clone: str | None = None, uuid: str | None = None) -> int:
            return await self.store.plan(owner_id, kind, ref, clone=clone, owner=owner, uuid=uuid)

        return record

    async def stamp(self, owner_id: str) -> int:
        """Record the identity of each file ``owner_id``'s active records name that exists now; returns how many.

        Called right after the step that made them (a record is written
        before its file exists, so it cannot carry the identity itself). Only
        files below instaclone's own directories get one: garbage collection
        and destroy delete nothing else. A name reached through a symlinked
        directory gets none.
        """
        n = 0
        for res in await self.store.resources(owner_id):
            if res.kind not in FILE_KINDS or res.dev is not None or safefs.anchor_of(res.ref, self.anchors) is None:
                continue
            try:
                made = await asyncio.to_thread(safefs.identity, res.ref, self.anchors)
            except (safefs.UnsafePath, OSError) as exc:
                log.warning("ledger.identity_unknown", owner_id=owner_id, ref=res.ref, error=str(exc))
                continue
            if made is not None:
                await self.store.set_made(res.id, *made)
                n += 1
        return n

    async def release(self, owner_id: str, kind: ResourceKind, ref: str) -> None:
        """Mark active records of ``ref`` released: it was undone by the success path (e.g. unstun)."""
        for res in await self.store.resources(owner_id):
            if res.kind is kind and res.ref == ref:
                await self.store.set_resource(res.id, ResourceStatus.RELEASED)

    async def release_all(self, owner_id: str) -> None:
        """Mark every active record of ``owner_id`` released: what they name is kept (handed over)."""
        for res in await self.store.resources(owner_id):
            await self.store.set_resource(res.id, ResourceStatus.RELEASED)

    async def rollback(self, owner_id: str, *, source: str, only: ResourceKind | None = None,
                       clone: str | None = None) -> list[str]:
        """Undo every active record of ``owner_id`` (or those of kind ``only``, or of ``clone``).

        Returns what could not be undone. Each record is released right after
        its own undo succeeded, so a crash in the middle leaves exactly the
        rest for recovery.
        """
        leftovers: list[str] = []
        active = [r for r in await self.store.resources(owner_id)
                  if (only is None or r.kind is only) and (clone is None or r.clone == clone)]
        for res in undo_order(active):
            undoer = self.undoers.get(res.owner)
            if undoer is None:
                leftovers.append(f"{describe(res)}: no backend {res.owner!r} is loaded to remove it")
                continue
            try:
                await undoer.undo(resource=res, source=source)
            except Exception as exc:  # noqa: BLE001 - reported: the job ends NeedsAttention, the record stays
                log.warning("ledger.undo_failed", owner_id=owner_id, kind=res.kind.value, ref=res.ref,
                            owner=res.owner, error=str(exc) or repr(exc))
                leftovers.append(f"{describe(res)}: {exc}")
                continue
            await self.store.set_resource(res.id, ResourceStatus.RELEASED)
            if res.kind in FILE_KINDS and not await asyncio.to_thread(os.path.lexists, res.ref):
                await self.store.set_removed([res.id])
        return leftovers
