"""Maintenance of finished clones: destroy (then collection of what it released), and chain consolidation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ..errors import Conflict, DomainNotFound, DomainReplaced, InstacloneError, NotFound, StepFailed
from ..hv import Outcome
from ..model import CloneRecord, JobRecord, Resource, ResourceKind
from ..states import State
from ..store.gc import retained_id
from . import gc, templates
from .context import JobContext
from .pipeline import STUN_LEDGER_PREFIX


async def _retain(svc: JobContext, rec: CloneRecord, clone_dir: Path) -> None:
    """Record a destroyed clone's directory and source deltas under its ``retained:`` ledger id.

    Recorded before the clone is forgotten: its directory is removed once no
    chain uses a file in it (then the id is released); its deltas as a source
    are its own now, collected like its files.
    """
    kept_id = retained_id(rec.source, rec.name)
    made = await svc.store.made_identity(str(clone_dir))
    rid = await svc.ledger.recorder(kept_id)(ResourceKind.FILE, str(clone_dir), clone=rec.name)
    if made is not None:
        await svc.store.set_made(rid, *made)
    await svc.store.adopt_source_deltas((STUN_LEDGER_PREFIX, templates.ledger_id(rec.name)), rec.name,
                                        into=kept_id, clone=rec.name)


async def destroy_clone(svc: JobContext, name: str, *, reason: str = "destroyed") -> CloneRecord:
    """Power off and remove a clone made by instaclone; then collect what it released (nothing else).

    What it released: the files instaclone made for it (its directory), its
    deltas as a source, and the recorded images of its disks' chains, each
    unless another chain still uses it (``jobs.gc``, scoped). Its clones (if
    it has any) keep running: the images of its directory their chains use
    stay, kept under a ``retained:`` ledger id that also keeps its name taken,
    until a later destroy or collection finds them unused. Never touches a
    file of its source, nor one instaclone did not make. ``reason``
    (destroyed, expired, released, pool) is in its ``clone.destroyed`` event.

    The domain is undefined by the UUID recorded for the clone: if its name
    belongs to another domain now, that domain is left alone, the clone is
    forgotten all the same (what was made for it is gone), and DomainReplaced
    is raised afterwards, so that whoever named the clone learns it.
    """
    rec = await svc.store.get_clone(name)
    if rec is None:
        raise NotFound(f"{name!r} is not a clone made by instaclone")
    if name in await svc.store.frozen():
        # Its frozen image would outlive it, and clones of it may need it.
        raise Conflict(f"{name!r} is frozen as a template; unfreeze it before destroying it")
    children = sorted(c.name for c in await svc.store.list_clones() if c.source == name)
    clone_dir = Path(rec.dir)
    # Under its lock: no job of it is in its stun (snapshotting its disk) meanwhile.
    async with svc.lock(name):
        released = await _released_chain(svc, name, rec.uuid)
        if clone_dir.parent == svc.config.clones_dir:  # never outside our directory
            await _retain(svc, rec, clone_dir)
        t0 = time.monotonic()
        outcome = await svc.virt.undefine_id(name, rec.uuid)
        undefine_ms = round((time.monotonic() - t0) * 1000.0, 1)
        await svc.store.remove_clone(rec, reason=reason)
    svc.log.info("clone.destroyed", clone=name, source=rec.source, children=children, reason=reason,
                 domain=outcome.value, undefine_ms=undefine_ms)
    scope_dirs = {gc.norm(str(clone_dir)), *(p.rsplit("/", 1)[0] for p in released)}
    kept_id = retained_id(rec.source, name)

    def in_scope(res: Resource) -> bool:
        ref = gc.norm(res.ref)
        return res.job_id == kept_id or ref in released or any(gc.under(ref, d) for d in scope_dirs)

    try:
        await gc.collect_released(svc, in_scope)
    except InstacloneError as exc:
        # The clone is gone; its files stay until a later collection can tell they are unused.
        svc.log.warning("gc.failed", after="destroy", clone=name, error=exc.message)
    if outcome is Outcome.REPLACED:
        raise DomainReplaced(f"clone {name!r} (UUID {rec.uuid}) was gone: the domain named {name!r} now is "
                             "another one, or that UUID has another name; it was left alone, and instaclone "
                             "forgot the clone")
    return rec


async def _released_chain(svc: JobContext, name: str, uuid: str) -> set[str]:
    """Every path the clone's chains and definition name, read before it is undefined.

    None if it is gone, or if its name now belongs to another domain (whose
    files are not the clone's to release).
    """
    try:
        await svc.virt.lookup_id(name, uuid)
        paths = await gc.domain_paths(svc, name)
    except DomainNotFound:
        return set()
    except (InstacloneError, OSError) as exc:
        svc.log.warning("gc.chain_unknown", clone=name, error=str(exc))
        return set()
    return {gc.norm(p) for p in paths}


async def consolidate(svc: JobContext, jobs: list[JobRecord]) -> None:
    """Shorten backing chains longer than ``clone.max_chain_depth`` after the jobs of one stun.

    The source (once for the jobs of one stun, whatever came of them) and the
    clones of each successful job. Only a domain's own top image is written
    (block pull), so images that other clones are backed by never change; a
    frozen source's top is itself a backing image and is never touched. The
    caller holds the source's lock. Failures are logged: the jobs are over.
    """
    if not jobs or not svc.storage.supports_consolidation:
        return
    done = [j for j in jobs if j.state is State.UNSTUNNED]
    frozen = await svc.store.frozen()
    source = jobs[0].source
    # The source whatever came of its jobs: one that failed after the source's
    # new delta was attached (a stun deadline, a clone that would not start)
    # still added an image to its chain, and a chain that only grows ends in a
    # source libvirt 11 cannot start or snapshot any more (max_chain_depth).
    targets = [(source, jobs[0].id), *((n, j.id) for j in done for n in j.spec.names)]
    for name, job_id in targets:
        if name in frozen:
            continue
        try:
            if name == source:
                await _consolidate_one(svc, name)
            else:
                # A new clone may already be another job's source: hold its lock too.
                async with svc.lock(name):
                    await _consolidate_one(svc, name)
        except InstacloneError as exc:
            svc.log.warning("chain.consolidation_failed", domain=name, error=str(exc) or repr(exc),
                            job_id=job_id)


async def _consolidate_one(svc: JobContext, name: str) -> None:
    limit = svc.config.clone.max_chain_depth
    info = await svc.virt.lookup(name)
    if info.state != "running":
        return
    for disk in info.disks:
        if disk.readonly:
            continue
        depth = await svc.storage.chain_depth(path=disk.path, fmt=disk.format)
        if depth <= limit:
            continue
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(svc.config.clone.step_timeout_s):
                await svc.storage.consolidate(domain=name, target=disk.target)
        except TimeoutError:
            raise StepFailed(f"consolidation of {name} {disk.target} took longer than "
                                  f"{svc.config.clone.step_timeout_s:g} s") from None
        svc.chain_cache.pop(str(disk.path), None)  # its chain is shorter now
        now = next(d for d in (await svc.virt.lookup(name)).disks if d.target == disk.target)
        after = await svc.storage.chain_depth(path=now.path, fmt=now.format)
        svc.log.info("chain.consolidated", domain=name, disk=disk.target, depth_before=depth,
                     depth_after=after, ms=round((time.monotonic() - t0) * 1000.0, 1))
