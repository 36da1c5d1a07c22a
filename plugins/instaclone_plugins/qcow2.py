"""Storage backend ``qcow2``: delta disks as qcow2 external overlays.

* Source delta: a libvirt disk-only external snapshot. The source's top image
  at stun, T, becomes the read-only backing file of a new, empty overlay that
  the source writes to from then on. The overlay is made before the stun
  (``qemu-img create -u -b T``, while the source still runs and holds the
  source's lock, so T cannot change) and the snapshot only attaches it
  (``reuse``): libvirt would otherwise create it inside the stun, through
  QEMU's own image creation job.
* Clone delta: ``qemu-img create -f qcow2 -u -b T -F <fmt> <size>``, an empty
  overlay per clone, where ``<fmt>`` is the format libvirt recorded for the
  source's disk and ``<size>`` T's virtual size read as that format.

Images are never probed (``_images``): every qemu-img call names the format,
and chains are walked one image at a time, so a qcow2 header a guest wrote
into its raw disk is data, not a chain.

Chain rule: when the source already runs on deltas (it was cloned before, or
is itself a clone), the new source delta goes on top of its current top, and
clones are backed by that top: every clone operation adds one image to the
source's chain, and each clone's chain is the source's chain at stun plus its
own delta.

Consolidation (``clone.max_chain_depth``): a live block pull into the
domain's own top image, down to the bottom-most image of its chain, leaves
the chain at two images, top -> base. Only the top is written; the
intermediate images are left as they are, because older clones (and clones
of clones) may be backed by them.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from instaclone.plugin_api import (
    CloneTarget,
    Config,
    ConfigError,
    Disk,
    DomainNotFound,
    Hypervisor,
    Recorder,
    ResourceKind,
    StorageBackend,
    StorageError,
    StunContext,
    safefs,
    setting,
)

from . import _images
from ._images import Layer
from ._proc import run

#: Where ``prepare_source_delta`` leaves the overlays it made, in ``StunContext.scratch``.
PREPARED = "qcow2.source_deltas"


def _new_file(path: Path, owner: tuple[int, int] | None = None) -> None:
    os.close(safefs.create_file(path, owner=owner))


def _overlay(source_dir: Path, ctx: StunContext, disk: Disk) -> Path:
    """The source's new overlay of ``disk`` for this job."""
    return source_dir / f"{ctx.source.name}.{disk.target}.{ctx.job_id}.qcow2"


def _owner(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


@dataclass(frozen=True)
class Qcow2Settings:
    """The qcow2 storage backend (clone.storage_backend = "qcow2")."""

    delta_dir: Path | None = setting(None, example='delta_dir = "/var/lib/instaclone/deltas"',
                                     default_text="<state_dir>/deltas", help="Where new source deltas go.")
    qemu_img: str = setting("qemu-img", help="The qemu-img program (a name looked up in PATH, or a path).")
    max_chain_images: int = setting(1024, min=2, max=65536, help=(
        "Images a backing chain may have when instaclone walks it, one image at a time with the format libvirt "
        "recorded (never probed); a longer chain, a loop, or a json:/protocol/relative backing name is refused "
        "(unsafe_image). Keep it above clone.max_chain_depth, or chains are refused before consolidation."))


class Qcow2Storage(StorageBackend):
    name = "qcow2"
    settings_class = Qcow2Settings
    supports_running_source = True
    supports_consolidation = True

    def __init__(self, *, config: Config, virt: Hypervisor) -> None:
        super().__init__(config=config, virt=virt)
        own = self.settings(Qcow2Settings)
        self.qemu_img = own.qemu_img
        self.delta_dir = config.delta_dir
        self.max_chain_images = own.max_chain_images
        self._backings = _images.Backings()

    async def check(self) -> None:
        try:
            await run(self.qemu_img, "--version")
        except StorageError as exc:
            raise ConfigError(f"storage.qcow2.qemu_img: {exc}") from None

    def _writable(self, ctx: StunContext) -> list[Disk]:
        disks = [d for d in ctx.source.disks if not d.readonly]
        if not disks:
            raise StorageError(f"source {ctx.source.name!r} has no writable file-backed disk to clone")
        return disks

    async def _source_dir(self, ctx: StunContext) -> Path:
        source_dir = self.delta_dir / ctx.source.name
        # The overlays go here; QEMU only passes through (0710, its group).
        mode, gid = self.config.daemon.qemu_reach()
        await asyncio.to_thread(safefs.make_dir, source_dir, mode=mode, owner=(-1, gid), exist_ok=True)
        return source_dir

    async def prepare_source_delta(self, *, ctx: StunContext, record: Recorder) -> None:
        """The source's new overlays, made while it runs: the stun only attaches them."""
        disks = self._writable(ctx)
        source_dir = await self._source_dir(ctx)
        made: dict[str, Path] = {}
        for disk in disks:
            path = _overlay(source_dir, ctx, disk)
            await record(ResourceKind.SOURCE_DELTA, str(path))
            # T's size read as the format libvirt recorded (never probed).
            size = await _images.virtual_size(self.qemu_img, disk.path, disk.format)
            try:
                # Made here (O_EXCL, no link followed), QEMU's user's as T is:
                # libvirt attaches it as it is.
                await asyncio.to_thread(_new_file, path, await asyncio.to_thread(_owner, disk.path))
            except OSError as exc:
                raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None
            # -u: T is in use by the running source; nothing of it is opened.
            await run(self.qemu_img, "create", "-q", "-f", "qcow2", "-u",
                      "-b", str(disk.path), "-F", disk.format, str(path), str(size))
            made[disk.target] = path
        ctx.scratch[PREPARED] = made

    async def create_source_delta(self, *, ctx: StunContext, record: Recorder) -> dict[str, Path]:
        disks = self._writable(ctx)
        prepared = ctx.scratch.get(PREPARED)
        if isinstance(prepared, dict) and set(prepared) == {d.target for d in disks}:
            await self.virt.snapshot_disks(ctx.source.name, prepared, reuse=True)
            return {d.target: d.path for d in disks}
        source_dir = await self._source_dir(ctx)
        overlays: dict[str, Path] = {}
        for disk in disks:
            path = _overlay(source_dir, ctx, disk)
            await record(ResourceKind.SOURCE_DELTA, str(path))
            overlays[disk.target] = path
        await self.virt.snapshot_disks(ctx.source.name, overlays)
        return {d.target: d.path for d in disks}

    async def create_clone_delta(
        self, *, ctx: StunContext, clone: CloneTarget, record: Recorder
    ) -> dict[str, Path]:
        recorded = {d.target: d.format for d in ctx.source.disks}
        out: dict[str, Path] = {}
        for target, top in ctx.tops.items():
            fmt = recorded.get(target)
            if fmt is None:
                raise StorageError(f"source {ctx.source.name!r} has no disk {target!r} to name the format of {top}")
            # The size of T read as the format libvirt recorded: a raw T is
            # its file's size, whatever header its guest wrote into it.
            size = await _images.virtual_size(self.qemu_img, top, fmt)
            path = clone.dir / f"{target}.qcow2"
            await record(ResourceKind.FILE, str(path), clone=clone.name)
            # Made here first (O_EXCL, no link followed); qemu-img then writes
            # into that very file of the daemon's own directory.
            try:
                await asyncio.to_thread(_new_file, path)
            except OSError as exc:
                raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None
            # -u with an explicit size: qemu-img opens no backing file at all
            # (T is in use by the source, and is read as -F says from now on).
            await run(
                self.qemu_img, "create", "-q", "-f", "qcow2", "-u",
                "-b", str(top), "-F", fmt, str(path), str(size),
            )
            out[target] = path
        return out

    async def remove(self, *, paths: list[Path]) -> None:
        for path in paths:
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _chain(self, top: Path, fmt: str) -> list[Layer]:
        """The images of the chain whose top is ``top`` (recorded as ``fmt``), top first, never probed."""
        return await _images.chain(self.qemu_img, top, fmt, max_images=self.max_chain_images,
                                   backings=self._backings)

    async def _images_in_use(self, source: str) -> set[str]:
        """Every image of the source's disk chains as the image files say (the domain may be shut off)."""
        try:
            info = await self.virt.lookup(source)
        except DomainNotFound:
            return set()
        return {str(layer.path) for disk in info.disks for layer in await self._chain(disk.path, disk.format)}

    async def chain_depth(self, *, path: Path, fmt: str) -> int:
        return len(await self._chain(path, fmt))

    async def chain(self, *, path: Path, fmt: str) -> list[Path]:
        return [layer.path for layer in await self._chain(path, fmt)]

    async def consolidate(self, *, domain: str, target: str) -> None:
        """Shorten the chain of ``domain``'s disk ``target`` to its top over the bottom-most image.

        A live block pull: the guest keeps running, QEMU copies into the top
        what the images in between hold, then rebases the top onto the
        bottom-most image (the original base, which everyone shares
        read-only). Nothing but the domain's own top is written, so images
        other clones are backed by stay byte-identical; they are not deleted.
        """
        info = await self.virt.lookup(domain)
        disk = next((d for d in info.disks if d.target == target), None)
        if disk is None:
            raise StorageError(f"{domain!r} has no file-backed disk {target!r}")
        chain = await self._chain(disk.path, disk.format)
        if len(chain) <= 2:
            return
        base = chain[-1].path
        # A little under the engine's own bound, so that ours (which names the
        # domain and aborts the block job) is the one that fires.
        await self.virt.block_pull(domain, target, base=base, timeout_s=self.config.clone.step_timeout_s * 0.95)
        after = [layer.path for layer in await self._chain(disk.path, disk.format)]
        if after != [disk.path, base]:
            raise StorageError(f"block pull of {domain!r} {target} left the chain "
                               f"{' <- '.join(map(str, reversed(after)))}; expected {base} <- {disk.path}")
