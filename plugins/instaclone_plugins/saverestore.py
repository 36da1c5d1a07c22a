"""Memory backend ``saverestore``: the baseline that copies RAM.

At stun the paused source's whole migration stream (RAM and device state) is
written to a file in the job's directory; each clone's QEMU starts paused with
``-incoming defer`` and loads that file. Works for any source, costs a full
copy of guest RAM per clone and a stun that grows with RAM size.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from instaclone.plugin_api import (
    CloneTarget,
    MemoryBackend,
    MemoryImage,
    Recorder,
    ResourceKind,
    StunContext,
    remove_path,
)


class SaveRestoreMemory(MemoryBackend):
    name = "saverestore"
    supports_running_source = True
    supports_frozen_source = True
    shares_memory = False

    def _state_path(self, ctx: StunContext) -> Path:
        return ctx.job_dir / "memory.state"

    async def capture(self, *, ctx: StunContext, record: Recorder) -> MemoryImage:
        path = self._state_path(ctx)
        await record(ResourceKind.FILE, str(path))
        stats = await self.virt.save_state(
            ctx.source.name, path, ignore_shared=False, timeout_s=self.config.clone.step_timeout_s
        )
        size = (await asyncio.to_thread(path.stat)).st_size
        return MemoryImage(self.name, {"path": str(path), "bytes": size,
                                       "ram_transferred": (stats.get("ram") or {}).get("transferred")})

    def qemu_args(self, *, ctx: StunContext, clone: CloneTarget) -> list[str]:
        return ["-incoming", "defer"]

    async def start_clone(self, *, ctx: StunContext, clone: CloneTarget) -> None:
        # The image may be a frozen source's, made by an earlier job: use its path.
        await self.virt.start(clone.name, paused=True)
        await self.virt.load_state(
            clone.name, ctx.image.path("path"), ignore_shared=False,
            timeout_s=self.config.clone.step_timeout_s,
        )

    async def release(self, *, image: MemoryImage) -> None:
        await remove_path(image.path("path"))
