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

Every resource is recorded before it exists: the shadow's directory (with its
placeholder disks and NVRAM copy) and the shadow domain, owned by filecow,
so that a failure or a SIGKILL at any point leaves nothing behind. The stun
itself is the pipeline's record: its undo cancels a migration still in flight
(QEMU then lets a source it stopped run again) before it resumes the source.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instaclone.plugin_api import (
    Config,
    Hypervisor,
    MemoryError_,
    MigrationInfo,
    Recorder,
    ResourceKind,
    StunContext,
    domxml,
    new_mac,
    new_uuid,
)

from ._proc import run

#: Where a job's shadow notes live in ``StunContext.scratch``.
KEY = "filecow.shadow"


@dataclass
class Shadow:
    """One job's shadow: its domain, and the pre-copy as it went."""

    name: str
    dir: Path
    precopy: MigrationInfo | None = None  # at pre-switchover
    final: MigrationInfo | None = None  # at completion
    seconds: float = 0.0  # from the migration's start to the switchover

    def report(self) -> dict[str, Any]:
        """What the job result shows of the pre-copy."""
        ram = (self.final.stats.get("ram") if self.final else None) or {}
        return {
            "precopy_s": round(self.seconds, 3),
            "transferred_bytes": ram.get("transferred"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "throttle_pct": (self.precopy.stats.get("cpu-throttle-percentage") if self.precopy else None) or 0,
            "qemu_downtime_ms": self.final.stats.get("downtime") if self.final else None,
        }


def shadow_name(job_id: str) -> str:
    return f"instaclone-shadow-{job_id}"


def shadow_of(ctx: StunContext) -> Shadow | None:
    found = ctx.scratch.get(KEY)
    return found if isinstance(found, Shadow) else None


async def start(*, ctx: StunContext, record: Recorder, virt: Hypervisor, config: Config) -> Shadow:
    """Define and start the job's paused shadow (everything recorded first)."""
    # A short directory, and file names kept as the source's: the shadow's
    # sockets must fit a UNIX socket path (108 bytes).
    shadow = Shadow(shadow_name(ctx.job_id), ctx.job_dir / "sh")
    await record(ResourceKind.FILE, str(shadow.dir))
    owner = await asyncio.to_thread(_owner, ctx.source.disks[0].path if ctx.source.disks else ctx.job_dir)
    await asyncio.to_thread(_make_dir, shadow.dir, owner)
    disks: dict[str, Path] = {}
    for disk in ctx.source.disks:
        if disk.readonly:
            continue
        disks[disk.target] = shadow.dir / f"{disk.target}.qcow2"
        out = await run(config.qcow2.qemu_img, "info", "--force-share", "--output=json", str(disk.path))
        await run(config.qcow2.qemu_img, "create", "-q", "-f", "qcow2", str(disks[disk.target]),
                  str(int(json.loads(out)["virtual-size"])))
        await asyncio.to_thread(os.chown, disks[disk.target], *owner)
    nvram = None
    if ctx.nvram is not None:
        # The shadow never runs its firmware; its flash only has to fit.
        nvram = shadow.dir / "shadow_VARS.fd"
        await asyncio.to_thread(shutil.copyfile, ctx.nvram, nvram)
        await asyncio.to_thread(os.chown, nvram, *owner)
    ident = domxml.CloneIdentity(
        name=shadow.name, uuid=new_uuid(), macs=[new_mac() for _ in range(domxml.count_interfaces(ctx.source.xml))],
        dir=shadow.dir, disks=disks, job_id=ctx.job_id, extra_qemu_args=["-incoming", "defer"], nvram=nvram,
    )
    xml = domxml.shadow_xml(domxml.clone_xml(ctx.source.xml, ident), source=ctx.source.name)
    await record(ResourceKind.DOMAIN, shadow.name)
    await virt.define(xml)
    await virt.start(shadow.name, paused=True)
    ctx.scratch[KEY] = shadow
    return shadow


async def link_ram(*, shadow: Shadow, ram: tuple[Path, bool], image_dir: Path, alias: str) -> Path:
    """Hard-link the shadow's RAM file ``ram`` (path, shared) into ``image_dir``: it outlives the shadow there."""
    if not ram[1]:
        raise MemoryError_(f"shadow {shadow.name!r} has no shared RAM file (got {ram})")
    frozen = image_dir / alias
    try:
        await asyncio.to_thread(os.link, ram[0], frozen)
    except OSError as exc:
        raise MemoryError_(f"cannot link the shadow's RAM file {ram[0]} to {frozen}: {exc}") from None
    return frozen


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def _make_dir(path: Path, owner: tuple[int, int]) -> None:
    # The shadow's QEMU makes its sockets and logs here, as the user libvirt
    # runs QEMU as (the owner of the source's disk).
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, *owner)
