"""The shadow QEMU of ``filecow``'s ``precopy`` mode: RAM copied before the stun, as live migration does.

For one job, a paused *shadow* domain is defined from the source's own
definition (same devices at the same addresses, so the source's migration
stream fits it), with RAM in a fresh shared file, ``-incoming defer``, and
placeholder disks of its own: empty qcow2 images of the same sizes in the
job's directory. Its block devices are never activated (it never runs), and
no file of the source is opened by it but read-only media the clones open too.

The running source is live-migrated into it (QEMU's pre-copy, RAM included)
while it runs. QEMU stops the source by itself once what is still dirty fits
the downtime limit, and waits there (``pause-before-switchover``): that is
the stun. The source's disk snapshot is taken then; the migration is let
complete, and the source runs on in place (``cont`` after a completed
outgoing migration re-activates its images). The shadow's RAM file now holds
the source's memory at switchover, and nothing writes to it any more: it is
hard-linked under ``<ramdir>/instaclone/<job>/`` as the job's frozen image,
the shadow's device state is saved with ``x-ignore-shared`` (a QEMU that came
in by migration and stayed paused can migrate once), and the shadow goes.

Under TCG the migration's copy is not to be trusted as it is: QEMU before
9.0 loses guest writes while it migrates a TCG guest (the 64-page fast path of
``cpu_physical_memory_sync_dirty_bitmap()`` clears dirty bits without
re-arming the vCPUs' TLB entries, so a store through an entry that was
already marked dirty no longer marks the page; upstream fix 03bfc2188f
"physmem: Fix migration dirty bitmap coherency with TCG memory access", not
in 7.2.x). Measured here on QEMU 7.2: after a completed pre-copy of a busy
1 GiB guest, with the source stopped, 10 pages of guest kernel memory in one
job of 4 differed from the source's, and that job's clone hung (its guest
never released its NIC). (One more page differs in every job, and is not a
loss: the shadow's vmgenid device writes the shadow's own GUID at the top of
RAM when the incoming migration ends; each clone writes its own there too.)
So, where the source's own QEMU says it is TCG before 9.0 (QMP
``query-version`` and ``query-kvm``, asked at every job: a source restarted
on another QEMU answers anew; ``FileCowMemory.verify_decision``), before the
source runs again, :meth:`RamPair.verify` compares the
shadow's RAM file with the source's page by page and copies every page that
differs; the source's holes (zero pages) are noted, to be punched into the
image.

Every resource is recorded before it exists: the shadow's directory (with its
placeholder disks and NVRAM copy) and the shadow domain, owned by filecow,
so that a failure or a SIGKILL at any point leaves nothing behind. The stun
itself is the pipeline's record: its undo cancels a migration still in flight
(QEMU then lets a source it stopped run again) before it resumes the source.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instaclone.plugin_api import (
    Config,
    Hypervisor,
    MemoryBackendError,
    MigrationInfo,
    QemuFacts,
    Recorder,
    ResourceKind,
    StunContext,
    domxml,
    new_mac,
    new_uuid,
    safefs,
)

from . import _images
from ._proc import run
from .qcow2 import Qcow2Settings

#: Where a job's shadow notes live in ``StunContext.scratch``.
KEY = "filecow.shadow"


@dataclass
class Shadow:
    """One job's shadow: its domain, and the pre-copy as it went."""

    name: str
    dir: Path
    uuid: str  # chosen before it is defined: recorded with its name, every removal checks it
    precopy: MigrationInfo | None = None  # at pre-switchover
    final: MigrationInfo | None = None  # at completion
    seconds: float = 0.0  # from the migration's start to the switchover
    #: the source's and the shadow's RAM, mapped, when the copy must be verified (TCG)
    ram: RamPair | None = None
    verified: Verified | None = None
    qemu: QemuFacts | None = None  # the source's QEMU, which decided the verification
    verify_reason: str = ""
    #: time.monotonic() as the switchover went: seen (the source stopped at switchover), snapshot (the
    #: storage backend asked for the source's deltas), attached, completed, verified, resumed
    marks: dict[str, float] = field(default_factory=dict)

    def stun_parts(self) -> dict[str, float]:
        """Where the stun went, in ms: from the last look that found the source running to the look that
        found it stopped at switchover (``stop``), the steps' bookkeeping (``journal``), the disk snapshot
        (``snapshot``), the migration's completion (``complete``: the last dirty pages, the device state),
        the verification, the resume."""
        if self.precopy is None or "resumed" not in self.marks:
            return {}
        points = [("stop", "seen"), ("journal", "snapshot"), ("snapshot", "attached"), ("complete", "completed"),
                  ("verify", "verified"), ("resume", "resumed")]
        out, last = {}, self.precopy.last_running
        for label, key in points:
            out[label] = round((self.marks[key] - last) * 1000, 1)
            last = self.marks[key]
        return out

    def report(self) -> dict[str, Any]:
        """What the job result shows of the pre-copy."""
        ram = (self.final.stats.get("ram") if self.final else None) or {}
        v = self.verified
        return {
            "precopy_s": round(self.seconds, 3),
            "transferred_bytes": ram.get("transferred"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "throttle_pct": (self.precopy.stats.get("cpu-throttle-percentage") if self.precopy else None) or 0,
            "qemu_downtime_ms": self.final.stats.get("downtime") if self.final else None,
            "stun_parts_ms": self.stun_parts(),
            "verified": v is not None,
            "verify_reason": self.verify_reason,
            **({"qemu": self.qemu.text, "accel": self.qemu.accel} if self.qemu is not None else {}),
            **({"verify_ms": round(v.seconds * 1000, 1), "verified_bytes": v.compared_bytes,
                "repaired_pages": v.repaired_pages} if v is not None else {}),
        }


@dataclass
class Verified:
    """What :func:`verify_ram` found: the shadow's copy against the stopped source."""

    compared_bytes: int = 0  # the source's data ranges, compared page by page
    repaired_pages: int = 0  # pages of the shadow that differed, copied from the source
    repaired_at: list[int] = field(default_factory=list)  # the first 16 of their offsets, for the log
    #: (offset, length) of the source's holes: zero at stun, to be punched into the image
    holes: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0


def shadow_name(job_id: str) -> str:
    return f"instaclone-shadow-{job_id}"


def shadow_of(ctx: StunContext) -> Shadow | None:
    found = ctx.scratch.get(KEY)
    return found if isinstance(found, Shadow) else None


async def start(*, ctx: StunContext, record: Recorder, virt: Hypervisor, config: Config) -> Shadow:
    """Define and start the job's paused shadow (everything recorded first)."""
    # A short directory, and file names kept as the source's: the shadow's
    # sockets must fit a UNIX socket path (108 bytes).
    shadow = Shadow(shadow_name(ctx.job_id), ctx.job_dir / "sh", new_uuid())
    # The shadow's disks are qcow2 overlays whatever the storage backend: qcow2's qemu-img makes them.
    qemu_img = config.section("storage.qcow2", Qcow2Settings).qemu_img
    # Known from here on: a start that fails half-way is undone by its UUID.
    ctx.scratch[KEY] = shadow
    await record(ResourceKind.FILE, str(shadow.dir))
    owner = await asyncio.to_thread(_owner, ctx.source.disks[0].path if ctx.source.disks else ctx.job_dir)
    # Root's, as a clone's directory (QEMU passes through it; libvirt makes
    # the shadow's sockets and logs): nothing can be planted in it. Its
    # files are created here (O_EXCL, no link followed) and given to QEMU's user.
    mode, gid = config.daemon.qemu_reach()
    try:
        await asyncio.to_thread(safefs.make_dir, shadow.dir, mode=mode, owner=(-1, gid), exist_ok=True)
    except OSError as exc:
        raise MemoryBackendError(f"cannot make the shadow's directory {shadow.dir}: {exc.strerror or exc}") from None
    disks: dict[str, Path] = {}
    for disk in ctx.source.disks:
        if disk.readonly:
            continue
        disks[disk.target] = shadow.dir / f"{disk.target}.qcow2"
        # The size of the disk read as the format libvirt recorded (never probed).
        size = await _images.virtual_size(qemu_img, disk.path, disk.format)
        await asyncio.to_thread(_new_file, disks[disk.target], owner)
        await run(qemu_img, "create", "-q", "-f", "qcow2", str(disks[disk.target]), str(size))
    nvram = None
    if ctx.nvram is not None:
        # The shadow never runs its firmware; its flash only has to fit.
        nvram = shadow.dir / "shadow_VARS.fd"
        try:
            await asyncio.to_thread(safefs.copy_file, ctx.nvram, nvram, owner=owner)
        except OSError as exc:
            raise MemoryBackendError(f"cannot copy {ctx.nvram} for the shadow: {exc.strerror or exc}") from None
    ident = domxml.CloneIdentity(
        name=shadow.name, uuid=shadow.uuid, macs=[new_mac() for _ in range(domxml.count_interfaces(ctx.source.xml))],
        dir=shadow.dir, disks=disks, job_id=ctx.job_id, extra_qemu_args=["-incoming", "defer"], nvram=nvram,
    )
    xml = domxml.shadow_xml(domxml.clone_xml(ctx.source.xml, ident), source=ctx.source.name)
    await record(ResourceKind.DOMAIN, shadow.name, uuid=shadow.uuid)
    await virt.define(xml)
    await virt.start(shadow.name, paused=True)
    return shadow


async def link_ram(*, shadow: Shadow, ram: tuple[Path, bool], image_dir: Path, alias: str) -> Path:
    """Hard-link the shadow's RAM file ``ram`` (path, shared) into ``image_dir``: it outlives the shadow there."""
    if not ram[1]:
        raise MemoryBackendError(f"shadow {shadow.name!r} has no shared RAM file (got {ram})")
    frozen = image_dir / alias
    try:
        # libvirt's per-domain RAM directory is QEMU's: the file is opened
        # without following a link and that very inode is linked.
        await asyncio.to_thread(safefs.link_file, ram[0], frozen)
    except OSError as exc:
        raise MemoryBackendError(f"cannot link the shadow's RAM file {ram[0]} to {frozen}: {exc}") from None
    return frozen


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_PROT_READ, _PROT_WRITE, _MAP_SHARED, _MADV_POPULATE_READ = 1, 2, 1, 22
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map(fd: int, size: int, prot: int = _PROT_READ) -> int:
    addr = _libc.mmap(None, size, prot, _MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap of a RAM file")
    return int(addr)


class RamPair:
    """The source's and the shadow's RAM files, mapped into this process to compare them at switchover.

    Mapped and faulted in before the pre-copy starts (:meth:`open`), so that
    the stun pays for the comparison alone: faulting in 2 GiB of mappings
    took as long as comparing them (~250 ms each for a 1 GiB guest here).
    :meth:`close` must follow in every case: a mapping keeps the pages of a
    removed file. It waits for a comparison still running in its thread (a
    stun deadline cancels the step, not the thread), after telling it to stop.
    """

    def __init__(self, source: Path, shadow: Path, *, page: int = 4096) -> None:
        self.source, self.shadow, self.page = source, shadow, page
        self.size = 0
        self._fds: list[int] = []
        self._maps: list[tuple[int, int]] = []
        self._lock = threading.Lock()  # held while the mappings are used
        self._stop = threading.Event()

    @classmethod
    def open(cls, source: Path, shadow: Path, *, populate: bool = True) -> RamPair:
        pair = cls(source, shadow)
        try:
            fs = safefs.open_file(source)
            pair._fds.append(fs)
            fd = safefs.open_file(shadow, os.O_RDWR)
            pair._fds.append(fd)
            pair.size = os.fstat(fs).st_size
            if os.fstat(fd).st_size != pair.size:
                raise OSError(f"RAM files of different sizes: {source} {pair.size}, {shadow} {os.fstat(fd).st_size}")
            if pair.size:
                pair._maps.append((_map(fs, pair.size), pair.size))
                # Written through the mapping, not write(2): hugetlbfs has no write(2).
                pair._maps.append((_map(fd, pair.size, _PROT_READ | _PROT_WRITE), pair.size))
            if populate:
                # The source's data ranges only: faulting a hole in would allocate it.
                for off, length in safefs.data_ranges(fs, pair.size):
                    for addr, _ in pair._maps:
                        _libc.madvise(addr + off, length, _MADV_POPULATE_READ)
        except BaseException:
            pair.close()
            raise
        return pair

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            while self._maps:
                _libc.munmap(*self._maps.pop())
            while self._fds:
                os.close(self._fds.pop())

    def verify(self, *, chunk: int = 1 << 20, threads: int = 2) -> Verified:
        """Make the shadow's RAM equal the (stopped) source's: compare page by page, copy what differs.

        Only the source's data ranges are read: a hole of the source is a
        zero page, noted in ``holes`` and punched into the image later
        (nothing to read there). The comparison is memcmp(3) in ``threads``
        threads; a page that differs is copied into the shadow's file through
        its mapping. Nothing may write the source's RAM meanwhile.
        """
        t0 = time.monotonic()
        out = Verified()
        with self._lock:
            if self._stop.is_set():
                raise OSError(f"the RAM files {self.source} and {self.shadow} were closed")
            data = safefs.data_ranges(self._fds[0], self.size)
            pos = 0
            for off, length in data:
                if off > pos:
                    out.holes.append((pos, off - pos))
                pos = off + length
            if pos < self.size:
                out.holes.append((pos, self.size - pos))
            if data:
                _compare(self._maps[0][0], self._maps[1][0], data, out, page=self.page, chunk=chunk,
                         threads=threads, stop=self._stop)
        out.seconds = time.monotonic() - t0
        return out


def verify_ram(source: Path, shadow: Path, *, chunk: int = 1 << 20, threads: int = 2) -> Verified:
    """:meth:`RamPair.verify` of two files mapped for it alone."""
    pair = RamPair.open(source, shadow, populate=False)
    try:
        return pair.verify(chunk=chunk, threads=threads)
    finally:
        pair.close()


def _compare(a: int, b: int, data: list[tuple[int, int]], out: Verified, *,
             page: int, chunk: int, threads: int, stop: threading.Event) -> None:
    pieces = [(p, min(chunk, off + length - p)) for off, length in data for p in range(off, off + length, chunk)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(mine: list[tuple[int, int]]) -> None:
        try:
            for p, n in mine:
                if stop.is_set():
                    raise OSError("the comparison was stopped")
                if _libc.memcmp(a + p, b + p, n) == 0:
                    continue
                for q in range(p - p % page, p + n, page):
                    if _libc.memcmp(a + q, b + q, page) != 0:
                        ctypes.memmove(b + q, a + q, page)
                        with lock:
                            out.repaired_pages += 1
                            if len(out.repaired_at) < 16:
                                out.repaired_at.append(q)
            with lock:
                out.compared_bytes += sum(n for _, n in mine)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    n = max(1, min(threads, len(pieces)))
    workers = [threading.Thread(target=work, args=(pieces[i::n],), name=f"verify-ram-{i}") for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def _new_file(path: Path, owner: tuple[int, int]) -> None:
    try:
        os.close(safefs.create_file(path, owner=owner))
    except OSError as exc:
        raise MemoryBackendError(f"cannot create the shadow's disk {path}: {exc.strerror or exc}") from None
