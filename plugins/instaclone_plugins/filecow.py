"""Memory backend ``filecow``: clones map the source's RAM file copy-on-write.

The source's RAM must be a shared file (libvirt ``<memoryBacking><source
type='file'/><access mode='shared'/>``). At stun:

1. QEMU's migration stream is written with ``x-ignore-shared``: RAM in shared
   files is skipped, only device state goes out (well under a megabyte).
2. The frozen memory image is made in ``<memory_backing_dir>/instaclone/<job>/``:
   by default a sparse copy of the RAM file (data ranges only: the time is
   proportional to RAM in use, ~2.5 GB/s here), or, in ``respawn`` mode and
   for frozen templates, a hard link to the RAM file itself.
3. Each clone starts with ``<access mode='private'/>`` (share=off, so its
   writes are copy-on-write and never reach the file) on that very file -
   libvirt's hook links it into the clone's RAM path (see ``libvirt_hook``) -
   and loads the device state. Pages nobody writes stay shared in the page
   cache between the source's image and every clone.

The source must never again write into the frozen file (a clone mapping it
would see its memory change underneath and crash):

* ``precopy``: before the stun, the running source is live-migrated into a
  paused *shadow* QEMU whose RAM is a fresh shared file (``_shadow``); the
  source stops only for the switchover, runs on in place, and the clones map
  the shadow's file. Where the source's QEMU can lose guest writes while it
  migrates (TCG before QEMU 9.0) the copy is verified against the stopped
  source inside the stun (``precopy_verify``).
* ``copy``: the clones map the copy; the source resumes in place on
  its own file and can be cloned again at once.
* ``auto`` (default): ``precopy`` where it needs no verification, ``copy``
  where it would (decided per job from the source's own QEMU).
* ``respawn``: the source is restarted at unstun as one more private child of
  the linked file: its QEMU is restarted on the same definition, mapping the
  file privately, and loads the same device state. No copy, but the stun
  includes a QEMU shutdown and start, and the source's RAM is private
  afterwards, so a later clone of it falls back to ``saverestore``.
* a frozen template is paused and registered: it never writes while frozen,
  and ``unfreeze`` (see the engine) makes sure it never writes to a file
  that clones map.

Lifecycle: our hard link lives only while the job needs it. Every clone (and
a respawned source) keeps the inode alive by mapping it, through the link
libvirt holds in its per-domain RAM directory; the kernel frees the data when
the last of them exits. A frozen source keeps its own file, and the
``freeze`` registry keeps it from being resumed in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instaclone.plugin_api import (
    CloneTarget,
    ConfigError,
    DomainInfo,
    Finding,
    InstacloneError,
    MemoryBackend,
    MemoryBackendError,
    MemoryImage,
    Outcome,
    QemuFacts,
    Recorder,
    Resource,
    ResourceKind,
    StunContext,
    domxml,
    get_logger,
    remove_path,
    safefs,
    setting,
)

from . import _filecow_xml, _shadow
from .libvirt_hook import GRANTS_DIR

RAM_ALIAS = "pc.ram"
#: Where the stun notes why "auto" chose what it chose, in ``StunContext.scratch``.
MODE_REASON = "filecow.mode_reason"

# Measured here (issue 13): QEMU 7.2 discards a reported page of a file-backed
# RAM block with fallocate(PUNCH_HOLE) on the file, MAP_PRIVATE or not. A
# clone inherits the source's balloon (the migrated device state needs it),
# so its reports punched 270-280 MiB out of the image two siblings mapped,
# and the sibling read zeros in place of its tmpfs data, silently.
FREE_PAGE_REPORTING = (
    "its virtio balloon has free page reporting on (freePageReporting='on'): on QEMU 7.2 a clone's reported "
    "free pages are punched out of the RAM image its sibling clones share, corrupting their memory; turn it "
    "off in the source's definition and restart the source, or clone it with saverestore")

log = get_logger(component="filecow")


@dataclass(frozen=True)
class FileCowSettings:
    """The filecow memory backend (in clone.memory_backends)."""

    source_mode: str = setting("auto", choices=("auto", "precopy", "copy", "respawn"), help=(
        "How a running source is kept from writing into the RAM its clones map:\n"
        "\"auto\" (default): \"precopy\" where the source's QEMU copies RAM exactly while the guest runs (KVM, "
        "or QEMU 9.0 and later), \"copy\" where the copy would have to be verified inside the stun (TCG before "
        "QEMU 9.0; see precopy_verify), decided per job from what the source's own QEMU answers; the job "
        "result's memory.mode and memory.mode_reason say which ran and why.\n"
        "\"precopy\": before the stun, the running source is live-migrated (QEMU's pre-copy) into a paused "
        "shadow QEMU whose RAM is a fresh shared file; the source stops only for the switchover (the last dirty "
        "pages, device state, the disk snapshot) and runs on in place; clones map the shadow's file. The stun "
        "does not grow with the RAM in use; the time to clone ready does. If the pre-copy does not reach the "
        "switchover within precopy_timeout_s (a guest dirtying RAM faster than it can be copied, even "
        "throttled by auto-converge), the job falls back to \"copy\"; the job result's memory.mode says which "
        "ran.\n"
        "\"copy\": clones map a sparse copy of the source's RAM file, made while the source is "
        "stunned (costs time ~ the guest's used RAM); the source runs on in place and can be cloned again and "
        "again.\n"
        "\"respawn\": the source's QEMU is restarted as a private child of the frozen file (no copy, but a QEMU "
        "restart inside the stun, and later clones of that source use the next backend of "
        "clone.memory_backends)."))
    precopy_downtime_ms: int = setting(10, min=1, max=10_000, help=(
        "QEMU's downtime-limit for the pre-copy: the longest final copy (RAM still dirty plus device state) it "
        "plans for at switchover. 10 ms gave the shortest stuns here (a 1 GiB guest with 750 MiB in use beside "
        "three busy guests, TCG: p50 112 ms against 131 ms at 30 and 140 ms at 100), converging in 3-5 passes "
        "without throttling."))
    precopy_verify: str = setting("auto", choices=("auto", "always", "never"), help=(
        "Whether a pre-copy is compared page by page with the stopped source before the source runs again (a "
        "step inside the stun whose time grows with the RAM in use):\n"
        "\"auto\" (default): where the source's QEMU can lose guest writes while it migrates (TCG before QEMU "
        "9.0), and only there.\n"
        "\"always\": every pre-copy.\n"
        "\"never\": no pre-copy; on TCG before QEMU 9.0 clones may then run on memory that misses the source's "
        "last writes (for measurements and tests only)."))
    precopy_timeout_s: float = setting(90.0, min=1, max=3600, help=(
        "Must stay below clone.step_timeout_s: the pre-copy runs inside the Stunned step, which that timeout "
        "ends."))


class FileCowMemory(MemoryBackend):
    name = "filecow"
    settings_class = FileCowSettings
    supports_running_source = True
    supports_frozen_source = True
    shares_memory = True
    image_in_memory_backing_dir = True

    #: Where the libvirt hook finds the grants (an instance may be given another: tests).
    grants_dir: Path = GRANTS_DIR

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: shadow name -> its and its source's RAM, mapped to verify the pre-copy
        self._rams: dict[str, _shadow.RamPair] = {}
        self.own = self.settings(FileCowSettings)

    async def check(self) -> None:
        await asyncio.to_thread(sweep_grants, self.grants_dir, self.config.clone.step_timeout_s)
        fc, clone = self.own, self.config.clone
        if fc.source_mode in ("auto", "precopy") and fc.precopy_timeout_s >= clone.step_timeout_s:
            raise ConfigError(f"memory.filecow.precopy_timeout_s ({fc.precopy_timeout_s:g}) must be below "
                              f"clone.step_timeout_s ({clone.step_timeout_s:g}): the pre-copy runs inside the "
                              "Stunned step, which that timeout ends")

    def can_serve(self, source: DomainInfo) -> str | None:
        file_backed, access = domxml.file_ram(source.xml)
        if not file_backed or access != "shared":
            return ("its RAM is not a shared file (needs <memoryBacking><source type='file'/>"
                    "<access mode='shared'/></memoryBacking>)")
        if domxml.has_numa(source.xml):
            return "guest NUMA cells (several RAM backends) are not supported yet"
        if domxml.balloon(source.xml)[1]:
            return FREE_PAGE_REPORTING
        return None

    def preflight(self, *, xml: str) -> list[Finding]:
        """``cow_memory`` (RAM in one shared file) and ``balloon`` (none that punches holes into shared RAM)."""
        return _filecow_xml.findings(xml)

    def prepared(self, *, xml: str) -> dict[str, bool]:
        return _filecow_xml.prepared(xml)

    def prepare_xml(self, *, xml: str) -> tuple[str, list[str]]:
        """Shared file-backed RAM, unless the guest has NUMA cells (prepare never changes its topology)."""
        return _filecow_xml.prepare(xml)

    # -- the stun: pre-copy into a shadow, or a plain pause ------------------------------

    def verify_decision(self, facts: QemuFacts) -> tuple[bool, str]:
        """Whether a pre-copy by this QEMU must be verified against the stopped source, and why."""
        qemu = f"QEMU {facts.text} with {facts.accel.upper()}"
        setting_ = self.own.precopy_verify
        if setting_ == "always":
            return True, f"{qemu}; memory.filecow.precopy_verify is \"always\""
        if facts.loses_tcg_writes:
            if setting_ == "never":
                return False, (f"{qemu} can lose guest writes while it migrates, but memory.filecow.precopy_verify "
                               "is \"never\": the copy was not checked")
            return True, f"{qemu} can lose guest writes while it migrates (fixed in QEMU 9.0)"
        return False, f"{qemu} tracks the pages the guest writes exactly while it migrates"

    async def stun(self, *, ctx: StunContext, record: Recorder) -> float:
        """``precopy``: copy RAM into the job's shadow while the source runs; QEMU stops it at switchover."""
        mode = self.own.source_mode
        if mode not in ("auto", "precopy"):
            return await super().stun(ctx=ctx, record=record)
        facts = await self.virt.qemu_facts(ctx.source.name)
        verify, why = self.verify_decision(facts)
        if mode == "auto" and verify:
            ctx.scratch[MODE_REASON] = (f"copy: {why}; a pre-copy would have to be verified inside the stun "
                                        "(memory.filecow.source_mode \"auto\")")
            return await super().stun(ctx=ctx, record=record)
        t0 = time.monotonic()
        try:
            shadow = await _shadow.start(ctx=ctx, record=record, virt=self.virt, config=self.config)
            shadow.qemu, shadow.verify_reason = facts, why
            if verify:
                await self._map_rams(ctx.source.name, shadow)
            await self.virt.migrate_live(ctx.source.name, shadow.name,
                                         downtime_ms=self.own.precopy_downtime_ms)
            shadow.precopy = await self.virt.wait_migration(
                ctx.source.name, until=("pre-switchover",), timeout_s=self.own.precopy_timeout_s)
        except InstacloneError as exc:
            # Not converged in time (or the shadow would not take the
            # stream): the source still runs, or runs again once cancelled.
            await self._unmap_rams(_shadow.shadow_name(ctx.job_id))
            await self.virt.cancel_migration(ctx.source.name)
            made = _shadow.shadow_of(ctx)
            if made is not None:  # by its UUID: never a domain that took the name
                await self.virt.undefine_id(made.name, made.uuid)
            ctx.scratch.pop(_shadow.KEY, None)
            ctx.scratch["fallback"] = f"pre-copy gave up after {time.monotonic() - t0:.1f} s: {exc}"
            log.warning("filecow.precopy_fallback", source=ctx.source.name, job_id=ctx.job_id, error=str(exc))
            return await super().stun(ctx=ctx, record=record)
        shadow.seconds = time.monotonic() - t0
        shadow.marks["seen"] = time.monotonic()
        return shadow.precopy.last_running

    async def switchover(self, *, ctx: StunContext) -> bool:
        """The source's deltas exist: let the migration complete and the source run on."""
        shadow = _shadow.shadow_of(ctx)
        if shadow is None:
            return False
        marks = shadow.marks
        marks["snapshot"] = ctx.source_delta_started or marks["seen"]
        marks["attached"] = time.monotonic()  # the source's deltas
        await self.virt.continue_migration(ctx.source.name)
        shadow.final = await self.virt.wait_migration(ctx.source.name, until=("completed",),
                                                      timeout_s=self.config.clone.step_timeout_s)
        marks["completed"] = time.monotonic()
        if shadow.ram is not None:
            # The source is still stopped (QEMU stopped it at switchover and
            # only our resume lets it run): its RAM file is the truth.
            try:
                shadow.verified = await asyncio.to_thread(shadow.ram.verify)
            except OSError as exc:
                raise MemoryBackendError(f"cannot verify the shadow's RAM against the source's: {exc}") from None
            finally:
                await self._unmap_rams(shadow.name)
            if shadow.verified.repaired_pages:
                # One page each time is the shadow's own VM generation ID
                # (its vmgenid device writes its GUID at incoming post-load;
                # each clone writes its own again when it loads the state).
                log.info("filecow.precopy_repaired", source=ctx.source.name, job_id=ctx.job_id,
                            pages=shadow.verified.repaired_pages, ms=round(shadow.verified.seconds * 1000, 1),
                            at=[hex(off) for off in sorted(shadow.verified.repaired_at)])
        marks["verified"] = time.monotonic()
        await self.virt.resume(ctx.source.name)
        marks["resumed"] = time.monotonic()
        return True

    async def _map_rams(self, source: str, shadow: _shadow.Shadow) -> None:
        """Map the shared RAM files of the source and of its shadow, to verify the copy at switchover."""
        found = await self.virt.ram_file(source, RAM_ALIAS), await self.virt.ram_file(shadow.name, RAM_ALIAS)
        if found[0] is None or not found[0][1] or found[1] is None or not found[1][1]:
            raise MemoryBackendError(f"no shared RAM file to verify the pre-copy with (source {found[0]}, "
                               f"shadow {found[1]})")
        try:
            shadow.ram = await asyncio.to_thread(_shadow.RamPair.open, found[0][0], found[1][0])
        except OSError as exc:
            raise MemoryBackendError(f"cannot map the RAM files to verify the pre-copy with: {exc}") from None
        self._rams[shadow.name] = shadow.ram

    async def _unmap_rams(self, shadow: str) -> None:
        pair = self._rams.pop(shadow, None)
        if pair is not None:
            await asyncio.to_thread(pair.close)

    async def capture(self, *, ctx: StunContext, record: Recorder) -> MemoryImage:
        shadow = _shadow.shadow_of(ctx)
        if shadow is None:
            return await self._capture_source(ctx=ctx, record=record)
        # The incoming side is done when the source's side completed; asked
        # anyway, so that a stream the shadow refused shows up here.
        await self.virt.wait_migration(shadow.name, until=("completed",), timeout_s=self.config.clone.step_timeout_s)
        found = await self.virt.ram_file(shadow.name, RAM_ALIAS)
        if found is None:
            raise MemoryBackendError(f"shadow {shadow.name!r} has no RAM file")
        ramdir = found[0].parent.parent
        image_dir, state = ramdir / "instaclone" / ctx.job_id, ctx.job_dir / "device.state"
        await record(ResourceKind.FILE, str(image_dir))
        await record(ResourceKind.FILE, str(state))
        await asyncio.to_thread(make_image_dir, image_dir)
        frozen = await _shadow.link_ram(shadow=shadow, ram=found, image_dir=image_dir, alias=RAM_ALIAS)
        stats = await self.virt.save_state(shadow.name, state, ignore_shared=True,
                                           timeout_s=self.config.clone.step_timeout_s)
        await self.virt.undefine_id(shadow.name, shadow.uuid)
        # Nobody maps the image now. QEMU 7.2 reads every page the stream
        # says is zero before it skips it, and on tmpfs a read of a hole
        # allocates: the shadow's file came out fully allocated (1 GiB for a
        # 1 GiB guest with 370 MiB in use). Its zero pages go back as holes.
        if shadow.verified is not None:
            # The source's holes at stun are zero pages: punched, not read.
            await asyncio.to_thread(punch_ranges, frozen, shadow.verified.holes)
        freed = await asyncio.to_thread(punch_zero_pages, frozen)
        return await self._image(frozen, ramdir, state, "precopy", stats,
                                 {**shadow.report(), "zero_bytes_freed": freed})

    async def _capture_source(self, *, ctx: StunContext, record: Recorder) -> MemoryImage:
        found = await self.virt.ram_file(ctx.source.name, RAM_ALIAS)
        if found is None or not found[1]:
            raise MemoryBackendError(f"source {ctx.source.name!r} has no shared RAM file")
        ram, _ = found
        ramdir = ram.parent.parent
        image_dir = ramdir / "instaclone" / ctx.job_id
        state = ctx.job_dir / "device.state"
        # Recorded before they exist: if anything below fails, the ledger
        # removes them through undo() (a RAM copy can be gigabytes).
        await record(ResourceKind.FILE, str(image_dir))
        await record(ResourceKind.FILE, str(state))
        await asyncio.to_thread(make_image_dir, image_dir)
        stats = await self.virt.save_state(ctx.source.name, state, ignore_shared=True,
                                           timeout_s=self.config.clone.step_timeout_s)
        frozen = image_dir / RAM_ALIAS
        respawn = self.own.source_mode == "respawn" and not ctx.frozen
        try:
            # The source's RAM file is in libvirt's per-domain directory,
            # which QEMU's user may write: never followed if it is a link.
            if respawn:
                await asyncio.to_thread(safefs.link_file, ram, frozen)
            else:
                await asyncio.to_thread(safefs.sparse_copy, ram, frozen)
        except OSError as exc:
            raise MemoryBackendError(f"cannot {'link' if respawn else 'copy'} the source's RAM file {ram} "
                               f"to {frozen}: {exc}") from None
        mode = "respawn" if respawn else ("frozen" if ctx.frozen else "copy")
        extra = {k: ctx.scratch[key] for k, key in (("fallback", "fallback"), ("mode_reason", MODE_REASON))
                 if key in ctx.scratch}
        return await self._image(frozen, ramdir, state, mode, stats, extra)

    async def _image(self, frozen: Path, ramdir: Path, state: Path, mode: str, stats: dict[str, Any],
                     extra: dict[str, Any]) -> MemoryImage:
        st = await asyncio.to_thread(frozen.stat)
        state_bytes = (await asyncio.to_thread(state.stat)).st_size
        return MemoryImage(self.name, {
            "ram": str(frozen), "ramdir": str(ramdir), "state": str(state), "inode": st.st_ino,
            "ram_bytes": st.st_size, "ram_allocated_bytes": st.st_blocks * 512,
            "mode": mode, "state_bytes": state_bytes,
            "ram_transferred": (stats.get("ram") or {}).get("transferred"), **extra,
        })

    async def undo(self, *, resource: Resource, source: str) -> None:
        if resource.kind is ResourceKind.DOMAIN:  # a shadow
            await self._unmap_rams(resource.ref)
            if resource.uuid is None:  # recorded before journal schema 6
                await self.virt.undefine(resource.ref)
            else:
                await self.virt.undefine_id(resource.ref, resource.uuid)
            return
        await super().undo(resource=resource, source=source)

    def qemu_args(self, *, ctx: StunContext, clone: CloneTarget) -> list[str]:
        return ["-incoming", "defer"]

    def adjust_xml(self, *, ctx: StunContext, clone: CloneTarget, xml: str) -> str:
        img = ctx.image
        return domxml.map_frozen_ram(xml, ram=img.path("ram"), ramdir=img.path("ramdir"), incoming=False)

    async def _start_on_image(self, name: str, uuid: str, img: MemoryImage,
                              phases_ms: dict[str, float] | None = None) -> None:
        t0 = time.monotonic()
        # The hook links the frozen file for this domain's UUID only, and only
        # while it starts (see libvirt_hook).
        try:
            await asyncio.to_thread(sweep_grants, self.grants_dir, self.config.clone.step_timeout_s)
            grant = await asyncio.to_thread(write_grant, uuid, img, self.grants_dir)
        except OSError as exc:
            raise MemoryBackendError(
                f"cannot write the libvirt hook's grant for {name!r}: {exc.strerror or exc}") from None
        try:
            await self.virt.start(name, paused=True)
        finally:
            await asyncio.to_thread(grant.unlink, missing_ok=True)
        t1 = time.monotonic()
        found = await self.virt.ram_file(name, RAM_ALIAS)
        ino = None
        if found is not None:
            try:
                ino = (await asyncio.to_thread(os.stat, found[0], follow_symlinks=False)).st_ino
            except OSError:
                ino = None
        if found is None or found[1] or ino != img.number("inode"):
            await self.virt.destroy_id(name, uuid)
            raise MemoryBackendError(
                f"{name!r} does not map the frozen RAM file privately (got {found}); is the libvirt hook "
                "/etc/libvirt/hooks/qemu.d/instaclone installed and libvirtd restarted? (scripts/setup.sh)"
            )
        t2 = time.monotonic()
        await self.virt.load_state(name, img.path("state"), ignore_shared=True,
                                   timeout_s=self.config.clone.step_timeout_s)
        ms = {"qemu_start": round((t1 - t0) * 1000, 1), "ram_check": round((t2 - t1) * 1000, 1),
              "state_load": round((time.monotonic() - t2) * 1000, 1)}
        if phases_ms is not None:
            phases_ms.update(ms)
        log.debug("filecow.started", domain=name, **ms)

    async def start_clone(self, *, ctx: StunContext, clone: CloneTarget) -> None:
        await self._start_on_image(clone.name, clone.uuid, ctx.image, clone.phases_ms)

    async def detach_source(self, *, ctx: StunContext, resume: bool) -> None:
        """Respawn the source as a private child of the frozen file (see the module doc)."""
        img = ctx.image
        if img.text("mode") != "respawn":
            # The clones map a copy: the source goes on in place.
            await super().detach_source(ctx=ctx, resume=resume)
            return
        name = ctx.source.name
        t = [time.monotonic()]
        original = await self.virt.inactive_xml(name)
        await self.virt.define(domxml.map_frozen_ram(
            original, ram=img.path("ram"), ramdir=img.path("ramdir"), incoming=True))
        t.append(time.monotonic())
        try:
            # By its UUID: a domain defined under the source's name since the
            # stun is not stopped (and not started on the frozen image).
            if await self.virt.destroy_id(name, ctx.source.uuid) is not Outcome.DONE:
                raise MemoryBackendError(f"source {name!r} is no longer the domain stunned (UUID {ctx.source.uuid}); "
                                   "it was not respawned")
            t.append(time.monotonic())
            await self._start_on_image(name, ctx.source.uuid, img)
            t.append(time.monotonic())
            if resume:
                await self.virt.resume(name)
            t.append(time.monotonic())
            log.info("filecow.source_respawned", source=name, job_id=ctx.job_id,
                     ms=dict(zip(("define", "destroy", "start_and_load", "resume"),
                                 (round((b - a) * 1000, 1) for a, b in itertools.pairwise(t)), strict=False)))
        finally:
            # Next boot: the owner's own definition, fresh shared RAM.
            await self.virt.define(original)

    async def release(self, *, image: MemoryImage) -> None:
        await remove_path(image.path("ram").parent)
        await remove_path(image.path("state"))


def make_image_dir(image_dir: Path) -> None:
    """``<ramdir>/instaclone/<job>``: root's, 0700, never through a link; MemoryBackendError if it cannot be.

    libvirt's RAM directory is QEMU's user's: ``instaclone`` below it must be
    the daemon's own directory (not a link, not someone else's), or nothing
    is made in it.
    """
    try:
        safefs.make_dir(image_dir.parent, mode=0o700, exist_ok=True)
        safefs.make_dir(image_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise MemoryBackendError(f"cannot make the memory image's directory {image_dir}: "
                           f"{exc.strerror or exc} (a link or someone else's directory is never used)") from None


def write_grant(uuid: str, img: MemoryImage, grants: Path = GRANTS_DIR) -> Path:
    """Tell the libvirt hook which frozen RAM file the domain ``uuid`` may start on (its inode too)."""
    frozen = img.path("ram")
    st = os.stat(frozen, follow_symlinks=False)
    grants.parent.mkdir(parents=True, exist_ok=True)
    safefs.make_dir(grants, mode=0o700, exist_ok=True)
    grant = grants / uuid
    grant.unlink(missing_ok=True)  # a start cut short by a crash (the directory is root's alone)
    fd = safefs.create_file(grant)
    with os.fdopen(fd, "w") as f:
        json.dump({"ram": str(frozen), "ramdir": str(img.path("ramdir")), "alias": RAM_ALIAS,
                   "dev": st.st_dev, "inode": st.st_ino}, f)
    return grant


def sweep_grants(grants: Path, max_age_s: float) -> int:
    """Remove the grants older than ``max_age_s`` (no start takes longer): left by a daemon killed in a start.

    Younger ones may be another daemon's start in flight (tests run several).
    Returns how many went.
    """
    try:
        names = os.listdir(grants)
    except FileNotFoundError:
        return 0
    gone = 0
    now = time.time()
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            if now - os.stat(grants / name, follow_symlinks=False).st_mtime > max_age_s:
                os.unlink(grants / name)
                gone += 1
    return gone


def punch_ranges(path: Path, ranges: list[tuple[int, int]]) -> None:
    """Punch holes at ``ranges`` (offset, length) of ``path``, keeping its size (tmpfs, ext4, xfs)."""
    if not ranges:
        return
    fd = safefs.open_file(path, os.O_RDWR)
    try:
        for off, length in ranges:
            try:
                safefs.punch(fd, off, length)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    return  # hugetlbfs: no holes there
                raise OSError(exc.errno, f"fallocate(PUNCH_HOLE) of {path}") from None
    finally:
        os.close(fd)


def punch_zero_pages(path: Path, page: int = 4096, chunk: int = 1 << 21) -> int:
    """Turn the pages of ``path`` that hold only zeros into holes; returns the allocated bytes given back.

    Only the data ranges are read. A file system that cannot be read with
    read(2) or punched (hugetlbfs) is left as it is (0).
    """
    zero_chunk, zero_page = bytes(chunk), bytes(page)
    freed = 0
    fd = safefs.open_file(path, os.O_RDWR)

    def punch(off: int, length: int) -> None:
        safefs.punch(fd, off, length)

    try:
        st = os.fstat(fd)
        size, allocated = st.st_size, st.st_blocks * 512
        off = 0
        while off < size:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past off
                break
            off -= off % page
            buf = os.pread(fd, min(chunk, size - off), off)
            if buf == zero_chunk[:len(buf)]:
                punch(off, len(buf))
            else:
                view, run = memoryview(buf), -1
                for i in range(0, len(buf), page):
                    if view[i:i + page] == zero_page:
                        run = i if run < 0 else run
                    elif run >= 0:
                        punch(off + run, i - run)
                        run = -1
                if run >= 0:
                    punch(off + run, len(buf) - run)
            off += len(buf)
        freed = allocated - os.fstat(fd).st_blocks * 512
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)
    return freed
