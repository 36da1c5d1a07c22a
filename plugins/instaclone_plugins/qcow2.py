"""Storage backend ``qcow2``: delta disks as qcow2 external overlays.

* Source delta: a libvirt disk-only external snapshot. The source's top image
  at stun, T, becomes the read-only backing file of a new, empty overlay that
  the source writes to from then on.
* Clone delta: ``qemu-img create -b T -F <fmt>``, an empty overlay per clone.

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
import json
import os
from pathlib import Path

from instaclone.plugin_api import (
    CloneTarget,
    Config,
    ConfigError,
    DomainNotFound,
    Hypervisor,
    Recorder,
    ResourceKind,
    StorageBackend,
    StorageError,
    StunContext,
    safefs,
)

from ._proc import run


def _new_file(path: Path) -> None:
    os.close(safefs.create_file(path))


class Qcow2Storage(StorageBackend):
    name = "qcow2"
    supports_running_source = True
    supports_consolidation = True

    def __init__(self, *, config: Config, virt: Hypervisor) -> None:
        super().__init__(config=config, virt=virt)
        self.qemu_img = config.qcow2.qemu_img
        self.delta_dir = config.delta_dir

    async def check(self) -> None:
        try:
            await run(self.qemu_img, "--version")
        except StorageError as exc:
            raise ConfigError(f"storage.qcow2.qemu_img: {exc}") from None

    async def _virtual_size(self, image: Path) -> int:
        # --force-share: the image is open in the (paused) source's QEMU.
        out = await run(self.qemu_img, "info", "--force-share", "--output=json", str(image))
        return int(json.loads(out)["virtual-size"])

    async def create_source_delta(self, *, ctx: StunContext, record: Recorder) -> dict[str, Path]:
        disks = [d for d in ctx.source.disks if not d.readonly]
        if not disks:
            raise StorageError(f"source {ctx.source.name!r} has no writable file-backed disk to clone")
        source_dir = self.delta_dir / ctx.source.name
        # libvirt makes the overlays here; QEMU only passes through (0710, its group).
        mode, gid = self.config.daemon.qemu_reach()
        await asyncio.to_thread(safefs.make_dir, source_dir, mode=mode, owner=(-1, gid), exist_ok=True)
        overlays: dict[str, Path] = {}
        for disk in disks:
            path = source_dir / f"{ctx.source.name}.{disk.target}.{ctx.job_id}.qcow2"
            await record(ResourceKind.SOURCE_DELTA, str(path))
            overlays[disk.target] = path
        await self.virt.snapshot_disks(ctx.source.name, overlays)
        return {d.target: d.path for d in disks}

    async def create_clone_delta(
        self, *, ctx: StunContext, clone: CloneTarget, record: Recorder
    ) -> dict[str, Path]:
        fmt = {d.target: d.format for d in ctx.source.disks}
        out: dict[str, Path] = {}
        for target, top in ctx.tops.items():
            size = await self._virtual_size(top)
            path = clone.dir / f"{target}.qcow2"
            await record(ResourceKind.FILE, str(path), clone=clone.name)
            # Made here first (O_EXCL, no link followed); qemu-img then writes
            # into that very file of the daemon's own directory.
            try:
                await asyncio.to_thread(_new_file, path)
            except OSError as exc:
                raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None
            # -u: do not open the backing chain (it is in use by the source);
            # the size comes from the top image instead.
            await run(
                self.qemu_img, "create", "-q", "-f", "qcow2", "-u",
                "-b", str(top), "-F", fmt.get(target, "qcow2"), str(path), str(size),
            )
            out[target] = path
        return out

    async def remove(self, *, paths: list[Path]) -> None:
        for path in paths:
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _chain(self, top: Path) -> list[Path]:
        """The images of the chain whose top is ``top``, top first."""
        # --force-share: the images are open in running QEMUs.
        out = await run(self.qemu_img, "info", "--force-share", "--backing-chain", "--output=json", str(top))
        return [Path(img["filename"]) for img in json.loads(out)]

    async def _images_in_use(self, source: str) -> set[str]:
        """Every image of the source's disk chains as qemu-img reads them (the domain may be shut off)."""
        try:
            info = await self.virt.lookup(source)
        except DomainNotFound:
            return set()
        return {str(p) for disk in info.disks for p in await self._chain(disk.path)}

    async def chain_depth(self, *, path: Path) -> int:
        return len(await self._chain(path))

    async def chain(self, *, path: Path) -> list[Path]:
        return await self._chain(path)

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
        chain = await self._chain(disk.path)
        if len(chain) <= 2:
            return
        base = chain[-1]
        # A little under the engine's own bound, so that ours (which names the
        # domain and aborts the block job) is the one that fires.
        await self.virt.block_pull(domain, target, base=base, timeout_s=self.config.clone.step_timeout_s * 0.95)
        after = await self._chain(disk.path)
        if after != [disk.path, base]:
            raise StorageError(f"block pull of {domain!r} {target} left the chain "
                               f"{' <- '.join(map(str, reversed(after)))}; expected {base} <- {disk.path}")
