"""Memory backend ``saverestore``: the baseline that copies RAM.

At stun the paused source's whole migration stream (RAM and device state) is
written to a file in the job's directory; each clone's QEMU starts paused with
``-incoming defer`` and loads that file. Works for any source, costs a full
copy of guest RAM per clone and a stun that grows with RAM size.

The image's format follows the source's QEMU (``image_format``): from QEMU
9.0 on, the mapped-ram format, in which every RAM page has its own offset in
the file and zero pages are never written (the file is sparse: its allocated
size is the RAM in use, not the RAM size), written and read by several
channels at once; before 9.0, QEMU's sequential stream. The image records
which, and every clone loads it with the same capabilities.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instaclone.plugin_api import (
    CloneTarget,
    MemoryBackend,
    MemoryImage,
    Recorder,
    ResourceKind,
    StunContext,
    remove_path,
    setting,
)


@dataclass(frozen=True)
class SaveRestoreSettings:
    """The saverestore memory backend (in clone.memory_backends)."""

    image_format: str = setting("auto", choices=("auto", "stream"), help=(
        "The format of the memory image each job writes.\n"
        "\"auto\" (default): QEMU's mapped-ram format where the source's QEMU has it (9.0 and later): RAM pages "
        "at fixed offsets, zero pages left as holes (the image takes the RAM in use on disk, not the RAM size), "
        "written and read by `channels` threads at once; QEMU's sequential stream on older QEMUs.\n"
        "\"stream\": the sequential stream on every QEMU (one thread; each page in use written once, zero pages "
        "as markers)."))
    channels: int = setting(4, min=1, max=16, help=(
        "Parallel channels (QEMU multifd threads) that write and read a mapped-ram image, on the source at the "
        "stun and on each clone at its start."))


class SaveRestoreMemory(MemoryBackend):
    name = "saverestore"
    settings_class = SaveRestoreSettings
    supports_running_source = True
    supports_frozen_source = True
    shares_memory = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.own = self.settings(SaveRestoreSettings)

    def _state_path(self, ctx: StunContext) -> Path:
        return ctx.job_dir / "memory.state"

    async def capture(self, *, ctx: StunContext, record: Recorder) -> MemoryImage:
        path = self._state_path(ctx)
        channels = 0
        if self.own.image_format == "auto" and (await self.virt.qemu_facts(ctx.source.name)).mapped_ram:
            channels = self.own.channels
        await record(ResourceKind.FILE, str(path))
        stats = await self.virt.save_state(
            ctx.source.name, path, ignore_shared=False, mapped_ram_channels=channels,
            timeout_s=self.config.clone.step_timeout_s,
        )
        st = await asyncio.to_thread(path.stat)
        return MemoryImage(self.name, {
            "path": str(path), "format": "mapped-ram" if channels else "stream", "channels": channels,
            "bytes": st.st_size, "allocated_bytes": st.st_blocks * 512,
            "ram_transferred": (stats.get("ram") or {}).get("transferred"),
        })

    def qemu_args(self, *, ctx: StunContext, clone: CloneTarget) -> list[str]:
        return ["-incoming", "defer"]

    async def start_clone(self, *, ctx: StunContext, clone: CloneTarget) -> None:
        # The image may be a frozen source's, made by an earlier job: its
        # path and format are the image's, not today's settings. An image
        # recorded before the format was (no "channels") is a stream.
        await self.virt.start(clone.name, paused=True)
        await self.virt.load_state(
            clone.name, ctx.image.path("path"), ignore_shared=False,
            mapped_ram_channels=ctx.image.number("channels") or 0,
            timeout_s=self.config.clone.step_timeout_s,
        )

    async def release(self, *, image: MemoryImage) -> None:
        await remove_path(image.path("path"))
