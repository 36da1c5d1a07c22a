"""Garbage collection: delete the files instaclone made that nothing uses any more, and nothing else.

``garbage = candidates - reachable - protected`` (:func:`garbage`, pure):

* **candidates**: the files and directories the ledger recorded as made by
  instaclone, below its own directories (``Config.own_dirs``), each with the
  (st_dev, st_ino) it had once made (``Ledger.stamp``). A file nobody
  recorded (a stray, another program's, a source's own top image in a
  shared ``delta_dir``) is never one. A source delta is one only once its
  source, a clone of ours, was destroyed (``maintenance.destroy_clone``
  adopts it under the clone's ``retained:`` id): a source's own deltas are
  its disk, whoever made them, even while it is briefly undefined.
* **reachable**: every image of every disk's backing chain of every libvirt
  domain, running or only defined (as the image files say, through the
  storage backend, each top read as the format its definition records,
  once per top and kept while no image of the chain changes, and as QEMU
  says for a running domain), and every other path a definition names.
* **protected**: whatever an active ledger record of a job or freeze in
  flight names, the directory of each registered clone, and each frozen
  source's directory and memory image.

Deletion is symlink-safe (``instaclone.safefs``): each name is reached from
its own directory down without following links, and goes only if it still
holds the inode recorded when it was made; directories go only when empty
(whatever else is in one keeps it). A name now holding another inode, or
reached through a link, is kept and logged.

A full collection (:func:`collect`) looks at every record; it runs every
``gc.interval_s`` and on request (``POST /v1/gc``). Destroy
(``maintenance.destroy_clone``) collects only what the destroyed clone
released (:func:`collect` with a ``scope``): its own files, and the
recorded images of its chain no other chain still uses. A destroyed
clone's directory is kept under a ``retained:`` ledger id while its
children's chains use a file in it; once it is gone, the id is released (the
name is free again). If any chain cannot be read, nothing is deleted
(:class:`~instaclone.errors.GcAborted`).

Records are read first, then the registries, then the domains: a file that
is recorded as made and not active was handed over (registered clone,
defined domain) before it was read.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import safefs
from ..errors import DomainNotFound, GcAborted, InstacloneError
from ..hv import file_disks
from ..model import Resource, ResourceKind, ResourceStatus
from ..store.gc import RETAINED, retained_source
from .context import JobContext

#: The key of the lock one collection at a time holds (no domain name has a ':').
GC_LOCK = ":gc"


# -- the decision (pure) ------------------------------------------------------------

def under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or lies below it (both normalized)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def garbage(candidates: Mapping[str, int], reachable: AbstractSet[str], protected: Iterable[str]) -> dict[str, int]:
    """The candidates (path -> bytes) that no chain uses, hold nothing used, and no protected path covers."""
    shield = tuple(protected)
    holding = {d for p in reachable for d in _parents(p)}
    return {p: n for p, n in candidates.items()
            if p not in reachable and p not in holding and not any(under(p, s) for s in shield)}


def _parents(path: str) -> list[str]:
    out = []
    while (up := os.path.dirname(path)) != path:
        out.append(up)
        path = up
    return out


def releasable(retained_dir: str, reachable: AbstractSet[str], kept: Iterable[str]) -> bool:
    """A destroyed clone's kept directory may go once nothing under it is reachable or kept."""
    return not any(under(p, retained_dir) for p in (*reachable, *kept))


def candidate(res: Resource, anchors: Iterable[str]) -> bool:
    """Whether a made file's record makes it a candidate at all (see the module doc)."""
    if res.kind is ResourceKind.SOURCE_DELTA and not res.job_id.startswith(RETAINED):
        return False
    return safefs.anchor_of(res.ref, anchors) is not None


def depth_first(paths: Iterable[str]) -> list[str]:
    """Deepest first: a directory comes after everything below it."""
    return sorted(paths, key=lambda p: (-p.count("/"), p))


# -- what one collection found and did ----------------------------------------------

@dataclass(frozen=True)
class Facts:
    """What a collection decides on, gathered in this order."""

    candidates: dict[str, int]  # path -> bytes allocated on disk
    made: dict[str, list[Resource]]  # path -> its records with an identity
    unsafe: tuple[str, ...]  # recorded paths reached only through a symlinked directory
    protected: frozenset[str]
    retained: tuple[Resource, ...]  # destroyed clones' kept directories
    reachable: frozenset[str]


@dataclass
class Report:
    dry_run: bool
    deleted: dict[str, int] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)  # destroyed clones whose directory went
    retained: list[dict[str, Any]] = field(default_factory=list)  # ... whose images are still used
    failed: list[str] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)  # recorded, unused, not deleted: why

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "bytes": sum(self.deleted.values()),
                "deleted": [{"path": p, "bytes": n} for p, n in sorted(self.deleted.items())],
                "released": sorted(self.released), "retained": self.retained, "failed": self.failed,
                "kept": self.kept}


# -- gathering ------------------------------------------------------------------------

def roots(svc: JobContext) -> dict[str, Path]:
    """instaclone's own directories by what they hold."""
    c = svc.config
    return {"deltas": c.delta_dir, "clones": c.clones_dir, "frozen": c.daemon.state_dir / "frozen",
            "jobs": c.jobs_dir}


def anchors(svc: JobContext) -> tuple[str, ...]:
    return tuple(str(p) for p in svc.config.own_dirs)


def norm(path: str) -> str:
    """``path`` normalized (no filesystem access)."""
    return os.path.normpath(path)


def _real(path: Path | str) -> str:
    return os.path.realpath(path)


def _variants(path: str) -> set[str]:
    """A path as named, normalized, and with its directory or itself resolved (symlinks)."""
    norm = os.path.normpath(path)
    return {norm, _real(norm), os.path.join(_real(os.path.dirname(norm)), os.path.basename(norm))}


def scan(dirs: Iterable[Path]) -> dict[str, int]:
    """Every regular file (or symlink) below ``dirs``: resolved path -> bytes allocated. Blocking."""
    out: dict[str, int] = {}
    for top in dirs:
        for dirpath, _dirs, files in os.walk(_real(top)):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    out[path] = st.st_blocks * 512
    return out


def xml_paths(xml: str) -> set[str]:
    """Every absolute path a domain definition names (disk sources, NVRAM, loader, kernel, logs, ...)."""
    out: set[str] = set()
    for el in ET.fromstring(xml).iter():
        for value in (*el.attrib.values(), (el.text or "").strip()):
            if value.startswith("/"):
                out.add(value)
    return out


def _stat_key(path: str, *, whole: bool) -> tuple[int, ...] | None:
    """What tells that an image (and so the backing file it names) did not change; None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # A running domain's top changes all the time, but its backing file only
    # through a block job or a snapshot, which gives it a new top or shortens
    # its chain (a kept chain then names more, never fewer, images).
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) if whole else (st.st_dev, st.st_ino)


async def file_chain(svc: JobContext, top: Path, fmt: str, *, running: bool = False) -> list[Path]:
    """The chain whose top is ``top`` (of format ``fmt``, as its definition records) as the image files say,
    read again only if an image of it changed."""
    key = str(top)
    cached = svc.chain_cache.get(key)
    if cached is not None:
        chain, stamps = cached
        now = await asyncio.to_thread(lambda: [_stat_key(p, whole=i > 0 or not running)
                                               for i, p in enumerate(map(str, chain))])
        if now == [s if i > 0 or not running else s[:2] if s else s for i, s in enumerate(stamps)]:
            return list(chain)
    if not await asyncio.to_thread(os.path.lexists, top):
        return [top]  # a file that is not there names no backing file
    # Read as the format the definition records (never probed: a raw disk's
    # guest could make a probe open any host file or socket, or abort GC).
    chain = await svc.storage.chain(path=top, fmt=fmt)
    stamps = await asyncio.to_thread(lambda: [_stat_key(str(p), whole=True) for p in chain])
    svc.chain_cache[key] = (tuple(chain), stamps)
    return chain


async def domain_paths(svc: JobContext, name: str) -> set[str]:
    """Every path domain ``name`` uses: its images' chains and what its definitions name; DomainNotFound."""
    out: set[str] = set()
    info = await svc.virt.lookup(name)
    xmls = [info.xml, await svc.virt.inactive_xml(name)] if info.active else [info.xml]
    tops = {(d.path, d.format) for xml in xmls for d in file_disks(xml)}
    for xml in xmls:
        out.update(xml_paths(xml))
    for top, fmt in sorted(tops):
        out.update(str(p) for p in await file_chain(svc, top, fmt, running=info.active))
    if info.active:
        for disk in info.disks:
            out.update(str(p) for p in await svc.virt.backing_chain(name, disk.target))
    return out


async def reachable(svc: JobContext) -> set[str]:
    """Every path any domain's disk chains or definitions name; GcAborted if one cannot be read."""
    out: set[str] = set()
    for name in await svc.virt.list_names():
        try:
            out.update(await domain_paths(svc, name))
        except DomainNotFound:
            continue  # gone since the listing: it uses nothing now
        except (InstacloneError, OSError, ET.ParseError) as exc:
            raise GcAborted(f"garbage collection deleted nothing: cannot read the disk chains of {name!r}: "
                            f"{getattr(exc, 'message', None) or exc}") from None
    live = set(svc.chain_cache)
    for top in live - {str(p) for p in out}:
        svc.chain_cache.pop(top, None)  # no domain has that top any more
    return {v for p in out for v in _variants(p)}


Scope = Callable[[Resource], bool]


async def gather(svc: JobContext, scope: Scope | None = None) -> Facts:
    """The made files (in ``scope``), then what the ledger and registries protect, then what the domains use."""
    made: dict[str, list[Resource]] = {}
    own = anchors(svc)
    for res in await svc.store.made_files():
        if candidate(res, own) and (scope is None or scope(res)):
            made.setdefault(norm(res.ref), []).append(res)
    protected: set[str] = set()
    retained: list[Resource] = []
    for res in await svc.store.active_resources():
        if res.job_id.startswith(RETAINED):
            if res.kind is ResourceKind.FILE and (scope is None or scope(res)):
                retained.append(res)
        elif res.ref.startswith("/"):
            protected.add(res.ref)
    protected.update(c.dir for c in await svc.store.list_clones())
    for entry in (await svc.store.frozen()).values():
        protected.add(str(svc.frozen_dir(entry.name)))
        if entry.image is not None:
            protected.update(v for v in entry.image.fields.values() if isinstance(v, str) and v.startswith("/"))
    used = await reachable(svc) if made else set()
    sizes = await asyncio.to_thread(_sizes, list(made), own)
    return Facts({p: n for p, n in sizes.items() if isinstance(n, int)}, made,
                 tuple(p for p, n in sizes.items() if n is safefs.Removal.UNSAFE),
                 frozenset(v for p in protected for v in _variants(p)), tuple(retained), frozenset(used))


def _sizes(paths: list[str], own: tuple[str, ...]) -> dict[str, int | safefs.Removal | None]:
    """Bytes allocated per path; None: nothing there; UNSAFE: reached only through a link. Blocking."""
    out: dict[str, int | safefs.Removal | None] = {}
    for p in paths:
        try:
            st = safefs.lstat(p, own)
        except safefs.UnsafePath:
            out[p] = safefs.Removal.UNSAFE
            continue
        except OSError:
            st = None
        out[p] = None if st is None else st.st_blocks * 512
    return out


# -- collecting ------------------------------------------------------------------------

async def collect(svc: JobContext, *, dry_run: bool = False, scope: Scope | None = None) -> Report:
    """Delete (or, ``dry_run``, list) every unused file instaclone made (those in ``scope``: all by default).

    Raises GcAborted (nothing deleted) if a domain's chains cannot be read.
    A file that cannot be deleted is reported in ``failed``, one that is not
    the file instaclone made (or is reached through a link) in ``kept``.
    """
    async with svc.lock(GC_LOCK):
        return await _collect(svc, dry_run=dry_run, scope=scope)


async def collect_released(svc: JobContext, scope: Scope) -> Report | None:
    """What a destroy released (``scope``), collected together with the scopes of destroys waiting meanwhile.

    Destroys of many clones at once (a pool torn down) wait for one another's
    collection: the first to get the lock collects for all that are waiting
    then, the others return None (their files were collected by it).
    """
    waiting = svc.gc_scopes
    waiting.append(scope)
    async with svc.lock(GC_LOCK):
        if scope not in waiting:
            return None
        batch = list(waiting)
        waiting.clear()
        return await _collect(svc, dry_run=False, scope=lambda res: any(s(res) for s in batch))


async def _collect(svc: JobContext, *, dry_run: bool, scope: Scope | None) -> Report:
    """:func:`collect`; the caller holds the collection lock."""
    t0 = time.monotonic()
    facts = await gather(svc, scope)
    # Recorded, but nothing is there any more (or only through a link): never a candidate again.
    gone = [r.id for p, rs in facts.made.items() if p not in facts.candidates for r in rs]
    doomed = garbage(facts.candidates, facts.reachable, facts.protected)
    report = Report(dry_run=dry_run, deleted=dict(doomed) if dry_run else {})
    if not dry_run:
        await svc.store.set_removed(gone)
        await _delete(svc, facts, doomed, report)
    for path in facts.unsafe:
        report.kept.append({"path": path, "reason": safefs.Removal.UNSAFE.value})
        svc.log.warning("gc.kept", path=path, reason=safefs.Removal.UNSAFE.value)
    await _retained(svc, facts, doomed if dry_run else report.deleted, report)
    svc.log.info("gc.collected", dry_run=dry_run, scoped=scope is not None, files=len(report.deleted),
                 bytes=sum(report.deleted.values()), released=report.released, failed=len(report.failed),
                 kept=len(report.kept), ms=round((time.monotonic() - t0) * 1000.0, 1))
    return report


async def _delete(svc: JobContext, facts: Facts, doomed: Mapping[str, int], report: Report) -> None:
    """Remove each doomed path that still holds the inode it was made with; deepest first."""
    own = anchors(svc)
    for path in depth_first(doomed):
        records = facts.made[path]
        made = {safefs.Identity(r.dev, r.ino, r.ftype or 0) for r in records if r.dev is not None and r.ino is not None}
        outcome = safefs.Removal.REPLACED
        try:
            for ident in made:
                outcome = await asyncio.to_thread(safefs.remove_made, path, ident, own)
                if outcome is not safefs.Removal.REPLACED:
                    break
        except OSError as exc:
            report.failed.append(f"{path}: {exc.strerror or exc}")
            continue
        if outcome in (safefs.Removal.REMOVED, safefs.Removal.ABSENT):
            await svc.store.set_removed(r.id for r in records)
            for r in records:
                if r.job_id.startswith(RETAINED) and r.kind is ResourceKind.SOURCE_DELTA:
                    await svc.store.set_resource(r.id, ResourceStatus.RELEASED)  # an adopted delta: gone
            if outcome is safefs.Removal.REMOVED:
                report.deleted[path] = doomed[path]
            continue
        if outcome is safefs.Removal.REPLACED:
            # Not the file instaclone made: what holds the name now is not ours.
            await svc.store.set_removed(r.id for r in records)
        report.kept.append({"path": path, "reason": outcome.value})
        svc.log.warning("gc.kept", path=path, reason=outcome.value)


async def _retained(svc: JobContext, facts: Facts, removed: Mapping[str, int], report: Report) -> None:
    """Release the retained ids of destroyed clones whose directory went; report those still used."""
    seen: set[str] = set()
    for res in facts.retained:
        if res.job_id in seen:
            continue
        seen.add(res.job_id)
        clone = res.clone or res.ref.rsplit("/", 1)[-1]
        d = norm(res.ref)
        if any(under(p, d) or under(p, _real(d)) for p in facts.reachable):
            used = [p for p in facts.candidates if under(p, d) and p != d and p not in removed]
            report.retained.append({"clone": clone, "source": retained_source(res.job_id), "dir": res.ref,
                                    "bytes": sum(facts.candidates[p] for p in used)})
            continue
        if d in removed or d not in facts.candidates:
            if not report.dry_run:
                await svc.store.release_owner(res.job_id)
            report.released.append(clone)


# -- disk use per source ------------------------------------------------------------------

async def disk_usage(svc: JobContext) -> dict[str, Any]:
    """Bytes allocated under instaclone's directories, per source: its deltas, its clones' (and frozen) files.

    A destroyed clone's kept directory counts for its source as ``retained``.
    """
    r = {k: _real(v) for k, v in roots(svc).items()}
    files = await asyncio.to_thread(scan, roots(svc).values())
    clones = await svc.store.list_clones()
    by_dir = {_real(c.dir): c.source for c in clones}
    kept = {_real(res.ref): retained_source(res.job_id) for res in await svc.store.active_resources()
            if res.job_id.startswith(RETAINED)}
    known = sorted({c.source for c in clones} | set(kept.values()) | set(await svc.store.frozen()),
                   key=len, reverse=True)
    rows: dict[str, dict[str, Any]] = {}
    other = 0

    def row(source: str) -> dict[str, Any]:
        return rows.setdefault(source, {"source": source, "bytes": 0, "deltas_bytes": 0, "clones_bytes": 0,
                                        "retained_bytes": 0, "frozen_bytes": 0,
                                        "clones": sum(1 for c in clones if c.source == source)})

    for path, n in files.items():
        kind, source = _owner(path, r, by_dir, kept, known)
        if source is None:
            other += n
            continue
        entry = row(source)
        entry[f"{kind}_bytes"] += n
        entry["bytes"] += n
    return {"sources": sorted(rows.values(), key=lambda e: str(e["source"])), "other_bytes": other,
            "total_bytes": sum(files.values())}


def _owner(path: str, r: Mapping[str, str], by_dir: Mapping[str, str], kept: Mapping[str, str],
           known: list[str]) -> tuple[str, str | None]:
    """(kind, source) a file under the roots counts for; source None if it belongs to none."""
    if under(path, r["deltas"]):
        rel = os.path.relpath(path, r["deltas"]).split("/")
        if len(rel) > 1:
            return "deltas", rel[0]
        # A backend that keeps every delta in one directory names them <source>.<disk>.<job>.
        return "deltas", next((s for s in known if rel[0].startswith(s + ".")), None)
    if under(path, r["clones"]):
        top = os.path.join(r["clones"], os.path.relpath(path, r["clones"]).split("/")[0])
        if top in by_dir:
            return "clones", by_dir[top]
        return "retained", kept.get(top)
    if under(path, r["frozen"]):
        return "frozen", os.path.relpath(path, r["frozen"]).split("/")[0]
    return "jobs", None


class GarbageCollector:
    """What the API calls (``api.protocol.GcView``): one per engine."""

    def __init__(self, svc: JobContext) -> None:
        self.svc = svc

    async def collect(self, *, dry_run: bool) -> dict[str, Any]:
        return (await collect(self.svc, dry_run=dry_run)).to_dict()

    async def disk_usage(self) -> dict[str, Any]:
        return await disk_usage(self.svc)
