"""Templates: freeze a source once (like VMware's instantclone.freeze), unfreeze it later.

A small state machine of its own, persisted in the frozen registry:
``freezing`` (a row exists from the start, so a crash is found) -> ``frozen``
(its memory image is made; clones need no stun and share it) -> gone
(unfreeze). What a freeze creates goes into the ledger under the source's
``frozen-<name>`` id, so a failed or crashed freeze is undone by the same
``Ledger.rollback`` a job uses, through the memory backend's ``undo``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .. import identity
from ..errors import Conflict, DomainNotFound, NotFound, StepFailed
from ..hv import vmstate
from ..model import CORE, FrozenSource, ResourceKind
from ..plugin_api import StunContext
from ..requests import FreezeRequest
from . import customize
from .admission import active_source, pick_memory
from .context import JobContext
from .files import copy_private, make_dir, remove_path, write_json


def ledger_id(source: str) -> str:
    """The ledger id of what the freeze of ``source`` created."""
    return f"frozen-{source}"


async def freeze(svc: JobContext, req: FreezeRequest) -> dict[str, Any]:
    """Pause the source as a template and capture its memory image once; it stays paused until unfreeze."""
    src = req.source
    async with svc.lock(src):
        if src in await svc.store.frozen():
            raise Conflict(f"{src!r} is already frozen")
        info = await active_source(svc, src)
        memory = pick_memory(svc.memories, info)
        paused_by_us = info.state == "running"
        # Which interfaces have IPv4 (clones wait for it there): asked now,
        # while the guest still runs and its agent answers.
        ipv4 = (await customize.ipv4_interfaces(svc.virt, src)
                if paused_by_us and customize.has_agent(info.xml) else None)
        await svc.store.add_frozen(src, paused_by_us=paused_by_us, backend=memory.name)
        record = svc.ledger.recorder(ledger_id(src), owner=CORE)
        ctx = StunContext(ledger_id(src), info, svc.frozen_dir(src), frozen=True)
        t0 = time.monotonic()
        try:
            if paused_by_us:
                await record(ResourceKind.STUN, src, uuid=info.uuid)
                await svc.virt.suspend(src)
            await record(ResourceKind.FILE, str(ctx.job_dir))
            await asyncio.to_thread(make_dir, ctx.job_dir, exist_ok=True)
            # Per-VM state the clones copy is taken now, while the source
            # cannot change it; it lives (and dies) with the frozen dir.
            await asyncio.to_thread(write_json, ctx.job_dir / "interfaces.json", ipv4)
            nvram = vmstate.nvram_path(info.xml)
            if nvram is not None:
                await asyncio.to_thread(copy_private, nvram, ctx.job_dir / "nvram.fd")
            image = await memory.capture(ctx=ctx, record=svc.ledger.recorder(ledger_id(src), owner=memory.name))
            await svc.ledger.stamp(ledger_id(src))
            ms = round((time.monotonic() - t0) * 1000.0, 3)
            await svc.store.set_frozen_image(src, image, freeze_ms=ms)
        except BaseException:
            await asyncio.shield(roll_back_freeze(svc, src))
            raise
    svc.log.info("source.frozen", source=src, memory=memory.name, ms=ms)
    entry = (await svc.store.frozen())[src]
    return {**entry.to_dict(), "freeze_ms": ms}


async def roll_back_freeze(svc: JobContext, src: str) -> None:
    """Undo a freeze that did not complete (live, or found by recovery): resume, remove, forget."""
    leftovers = await svc.ledger.rollback(ledger_id(src), source=src)
    for left in leftovers:
        svc.log.warning("freeze.rollback_left_behind", source=src, detail=left)
    entry = (await svc.store.frozen()).get(src)
    if entry is not None and entry.paused_by_us:
        # A freeze begun by a daemon older than the ledger recorded no stun.
        try:
            await svc.virt.resume(src)
        except DomainNotFound:
            svc.log.warning("freeze.source_gone", source=src)
    await remove_path(svc.frozen_dir(src))
    await svc.store.remove_frozen(src)


async def unfreeze(svc: JobContext, req: FreezeRequest) -> dict[str, Any]:
    """Let a frozen source run again; its clones are not affected."""
    src = req.source
    async with svc.lock(src):
        entry = (await svc.store.frozen()).get(src)
        if entry is None:
            raise NotFound(f"{src!r} is not frozen")
        try:
            info = await svc.virt.lookup(src)
        except DomainNotFound:
            # Removed behind our back: nothing to resume, only our records to drop.
            await _drop(svc, entry)
            svc.log.warning("source.unfrozen_gone", source=src)
            return entry.to_dict()
        if entry.clones and info.active:
            # Clones are backed by the source's current top image: the source
            # must write to a new delta from now on.
            ctx = StunContext(f"unfreeze-{identity.new_job_id()[:8]}", info, svc.frozen_dir(src))
            await svc.storage.create_source_delta(
                ctx=ctx, record=svc.ledger.recorder(ledger_id(src), owner=svc.storage.name))
            await svc.ledger.stamp(ledger_id(src))
        clock: dict[str, Any] | None = None
        if entry.paused_by_us:
            await svc.virt.resume(src)
            # Its clock stood still while it was frozen.
            if customize.has_agent(info.xml):
                clock = await customize.set_clock(svc.virt, src)
        await _drop(svc, entry)
    svc.log.info("source.unfrozen", source=src, clones=entry.clones, clock=clock)
    return {**entry.to_dict(), "clock": clock}


async def _drop(svc: JobContext, entry: FrozenSource) -> None:
    """The frozen image and directory go (through the memory backend); the registry row last."""
    if entry.image is not None:
        await svc.memory_named(entry.backend).release(image=entry.image)
    await remove_path(svc.frozen_dir(entry.name))
    # What is left in the freeze's ledger (the stun: resumed above or by the
    # owner; the unfreeze's source delta: kept, the source writes to it).
    leftovers = await svc.ledger.rollback(ledger_id(entry.name), source=entry.name)
    if leftovers:
        # The registry row stays: a second unfreeze finishes what is left.
        raise StepFailed(f"unfreeze of {entry.name!r} could not remove {'; '.join(leftovers)}; "
                         "run unfreeze again", step="Unfreezing")
    await svc.store.remove_frozen(entry.name, clones=entry.clones)
