"""Garbage collection: delete the files under instaclone's directories that nothing uses any more.

``garbage = candidates - reachable - protected`` (:func:`garbage`, pure):

* **candidates**: every file under instaclone's own directories (the delta
  dir, the clones dir, the frozen dir, the jobs dir); nothing else is ever
  looked at, so a source's disk, NVRAM or TPM state can never be one.
* **reachable**: every image of every disk's backing chain of every libvirt
  domain, running or only defined (as the image files say, through the
  storage backend, each top read as the format its definition records, and
  as QEMU says for a running domain, current and next-boot definition
  alike), and every other path a definition names.
* **protected**: whatever an active ledger record names (an in-flight job's
  or freeze's files: a record is written before its file exists), the
  directory of each registered clone, and each frozen source's directory and
  memory image.

Destroying a clone (``maintenance.destroy_clone``) keeps its directory as a
``retained:`` ledger record (``store.gc``): its files are candidates like
any other, so those its children's chains use stay and the rest go; once
none of them is used, the record is rolled back (the directory goes and the
name is free again). If any chain cannot be read, nothing is deleted
(:class:`~instaclone.errors.GcAborted`).

Candidates are listed first, then the ledger, then the registries, then the
domains: a file that exists when listed was recorded before it was made, so
the ledger read after it sees its record or, once the job handed over, the
registered clone and the defined domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DomainNotFound, GcAborted, InstacloneError
from ..hv import file_disks
from ..model import Resource
from ..store.gc import RETAINED, retained_source
from .services import Services

#: The key of the lock one collection at a time holds (no domain name has a ':').
GC_LOCK = ":gc"


# -- the decision (pure) ------------------------------------------------------------

def under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or lies below it (both normalized)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def garbage(candidates: Mapping[str, int], reachable: AbstractSet[str], protected: Iterable[str]) -> dict[str, int]:
    """The candidates (path -> bytes) that no chain uses and no protected path covers."""
    shield = tuple(protected)
    return {p: n for p, n in candidates.items()
            if p not in reachable and not any(under(p, s) for s in shield)}


def releasable(retained_dir: str, reachable: AbstractSet[str], kept: Iterable[str]) -> bool:
    """A destroyed clone's kept directory may go once nothing under it is reachable or kept."""
    return not any(under(p, retained_dir) for p in (*reachable, *kept))


# -- what one collection found and did ----------------------------------------------

@dataclass(frozen=True)
class Facts:
    """What a collection decides on, gathered in this order."""

    candidates: dict[str, int]  # path -> bytes allocated on disk
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

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "bytes": sum(self.deleted.values()),
                "deleted": [{"path": p, "bytes": n} for p, n in sorted(self.deleted.items())],
                "released": sorted(self.released), "retained": self.retained, "failed": self.failed}


# -- gathering ------------------------------------------------------------------------

def roots(svc: Services) -> dict[str, Path]:
    """instaclone's own directories by what they hold."""
    c = svc.config
    return {"deltas": c.delta_dir, "clones": c.clones_dir, "frozen": c.daemon.state_dir / "frozen",
            "jobs": c.jobs_dir}


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


async def _file_chain(svc: Services, top: Path, fmt: str) -> list[Path]:
    if not await asyncio.to_thread(os.path.lexists, top):
        return [top]  # a file that is not there names no backing file
    # Read as the format the definition records (never probed: a raw disk's
    # guest could make a probe open any host file or socket, or abort GC).
    return await svc.storage.chain(path=top, fmt=fmt)


async def reachable(svc: Services) -> set[str]:
    """Every path any domain's disk chains or definitions name; GcAborted if one cannot be read."""
    out: set[str] = set()
    for name in await svc.virt.list_names():
        try:
            info = await svc.virt.lookup(name)
            xmls = [info.xml, await svc.virt.inactive_xml(name)] if info.active else [info.xml]
            tops = {(d.path, d.format) for xml in xmls for d in file_disks(xml)}
            for xml in xmls:
                out.update(xml_paths(xml))
            for top, fmt in sorted(tops):
                out.update(str(p) for p in await _file_chain(svc, top, fmt))
            if info.active:
                for disk in info.disks:
                    out.update(str(p) for p in await svc.virt.backing_chain(name, disk.target))
        except DomainNotFound:
            continue  # gone since the listing: it uses nothing now
        except (InstacloneError, OSError, ET.ParseError) as exc:
            raise GcAborted(f"garbage collection deleted nothing: cannot read the disk chains of {name!r}: "
                            f"{getattr(exc, 'message', None) or exc}") from None
    return {v for p in out for v in _variants(p)}


async def gather(svc: Services) -> Facts:
    """Candidates, then what the ledger and registries protect, then what the domains use."""
    candidates = await asyncio.to_thread(scan, roots(svc).values())
    protected: set[str] = set()
    retained: list[Resource] = []
    for res in await svc.store.active_resources():
        if res.job_id.startswith(RETAINED):
            retained.append(res)
        elif res.ref.startswith("/"):
            protected.add(res.ref)
    protected.update(c.dir for c in await svc.store.list_clones())
    for entry in (await svc.store.frozen()).values():
        protected.add(str(svc.frozen_dir(entry.name)))
        if entry.image is not None:
            protected.update(v for v in entry.image.fields.values() if isinstance(v, str) and v.startswith("/"))
    used = await reachable(svc)
    return Facts(candidates, frozenset(v for p in protected for v in _variants(p)), tuple(retained),
                 frozenset(used))


# -- collecting ------------------------------------------------------------------------

async def collect(svc: Services, *, dry_run: bool = False) -> Report:
    """Delete (or, ``dry_run``, list) every unused file under instaclone's directories.

    Raises GcAborted (nothing deleted) if a domain's chains cannot be read.
    A file that cannot be deleted is reported in ``failed``.
    """
    async with svc.lock(GC_LOCK):
        facts = await gather(svc)
        doomed = garbage(facts.candidates, facts.reachable, facts.protected)
        report = Report(dry_run=dry_run, deleted=dict(doomed) if dry_run else {})
        if not dry_run:
            for path in sorted(doomed):
                try:
                    await asyncio.to_thread(os.unlink, path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    report.failed.append(f"{path}: {exc.strerror or exc}")
                    continue
                report.deleted[path] = doomed[path]
        gone = doomed if dry_run else report.deleted
        kept = [p for p in facts.candidates if p not in gone]
        await _retained(svc, facts, kept, report)
        if not dry_run:
            await _prune(svc, report.deleted, facts.protected)
    svc.log.info("gc.collected", dry_run=dry_run, files=len(report.deleted), bytes=sum(report.deleted.values()),
                 released=report.released, failed=len(report.failed))
    return report


async def _retained(svc: Services, facts: Facts, kept: list[str], report: Report) -> None:
    """Release the kept directories of destroyed clones that nothing uses any more."""
    seen: set[str] = set()
    for res in facts.retained:
        if res.job_id in seen:
            continue
        seen.add(res.job_id)
        clone = res.clone or res.ref.rsplit("/", 1)[-1]
        source = retained_source(res.job_id)
        if not releasable(_real(res.ref), facts.reachable, kept):
            used = [p for p in kept if under(p, _real(res.ref))]
            report.retained.append({"clone": clone, "source": source, "dir": res.ref,
                                    "bytes": sum(facts.candidates.get(p, 0) for p in used)})
            continue
        if not report.dry_run:
            left = await svc.ledger.rollback(res.job_id, source=source)
            if left:
                report.failed.extend(left)
                continue
        report.released.append(clone)


async def _prune(svc: Services, deleted: Iterable[str], protected: AbstractSet[str]) -> None:
    """Remove the directories this collection emptied (never a root, nor one an active record names)."""
    tops = {_real(p) for p in roots(svc).values()}
    deltas = _real(svc.config.delta_dir)
    dirs: set[str] = set()
    for path in deleted:
        d = os.path.dirname(path)
        while d not in tops and any(under(d, t) for t in tops):
            dirs.add(d)
            d = os.path.dirname(d)
    for d in sorted(dirs, key=len, reverse=True):
        if any(under(p, d) for p in protected):
            continue
        if os.path.dirname(d) == deltas:
            # deltas/<source>: a job of that source may be about to put a delta here.
            lock = svc.lock(os.path.basename(d))
            if lock.locked():
                continue
            async with lock:
                await _rmdir(d)
        else:
            await _rmdir(d)


async def _rmdir(path: str) -> None:
    with contextlib.suppress(OSError):  # not empty (something new), or gone
        await asyncio.to_thread(os.rmdir, path)


# -- disk use per source ------------------------------------------------------------------

async def disk_usage(svc: Services) -> dict[str, Any]:
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

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    async def collect(self, *, dry_run: bool) -> dict[str, Any]:
        return (await collect(self.svc, dry_run=dry_run)).to_dict()

    async def disk_usage(self) -> dict[str, Any]:
        return await disk_usage(self.svc)
