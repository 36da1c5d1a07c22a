"""Block jobs on running domains: the live backing chain and block pull."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from contextlib import suppress
from pathlib import Path
from typing import Any

from ..errors import LibvirtError, LibvirtTimeout
from . import _libvirt as lv
from .connection import Connection


def disk_chain(xml: str, target: str) -> list[Path] | None:
    """The images of disk ``target`` in a live domain XML, active layer first; None if no such disk."""
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        tgt = disk.find("target")
        if tgt is None or tgt.get("dev") != target:
            continue
        chain: list[Path] = []
        node: ET.Element | None = disk
        while node is not None:
            src = node.find("source")
            path = (src.get("file") or src.get("dev")) if src is not None else None
            if not path:
                break
            chain.append(Path(path))
            node = node.find("backingStore")
        return chain
    return None


class BlockJobs(Connection):
    """Backing chains and block pulls."""

    async def backing_chain(self, name: str, target: str) -> list[Path]:
        """Disk ``target`` of the running domain ``name`` as QEMU uses it: active layer first.

        This is libvirt's view (the live XML's ``backingStore`` elements),
        which a block job updates when it completes. LibvirtError if there is no such disk.
        """

        def do() -> list[Path]:
            chain = disk_chain(self._dom(name).XMLDesc(0), target)
            if chain is None:
                raise LibvirtError(f"{name!r} has no disk {target!r}")
            return chain

        return await self._call(f"backing chain of {name!r} {target}", do)

    async def _abort_block_job(self, name: str, target: str) -> None:
        """Cancel the block job on ``target`` and wait until it is gone; no job is fine."""

        def do() -> None:
            dom = self._dom(name)
            try:
                # Without VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC libvirt returns once the job is gone.
                dom.blockJobAbort(target, 0)
            except lv.RawLibvirtError:
                if dom.blockJobInfo(target, 0):
                    raise

        await self._call(f"abort block job of {name!r} {target}", do)

    async def block_pull(self, name: str, target: str, *, base: Path | None, timeout_s: float) -> None:
        """Live block pull on disk ``target`` of the running ``name``; returns when it is done.

        QEMU copies into the active layer every cluster that the images
        between it and ``base`` hold, then makes ``base`` the active layer's
        backing file (``base=None``: everything, no backing file left). Only
        the active layer is written; the images dropped from the chain stay
        as they are. The guest runs on throughout.

        libvirt reports no result for a finished job (it just disappears from
        ``blockJobInfo``) unless one listens to its events, so success is
        read from the live XML afterwards: the chain must be shortened
        (LibvirtError if it is not). After ``timeout_s`` (or if the caller is
        cancelled) the job is aborted, which leaves the chain as it was, and
        LibvirtTimeout raised.
        """
        what = f"block pull of {name!r} {target}" + (f" down to {base}" if base is not None else "")

        def start() -> None:
            dom = self._dom(name)
            if base is None:
                dom.blockPull(target, 0, 0)
            else:
                # flags 0: a pull (not a copy) that keeps ``base`` as backing file.
                dom.blockRebase(target, str(base), 0, 0)

        await self._call(what, start)
        last = await self._wait_block_job(name, target, what, timeout_s)
        chain = await self.backing_chain(name, target)
        done = len(chain) == 1 if base is None else (len(chain) >= 2 and chain[1] == Path(base))
        if not done:
            progress = f"{last.get('cur')}/{last.get('end')}" if last else "no progress seen"
            raise LibvirtError(f"{what} ended without shortening the chain ({progress}); "
                            f"the chain is still {' <- '.join(map(str, reversed(chain)))}")

    async def _wait_block_job(self, name: str, target: str, what: str, timeout_s: float) -> dict[str, Any]:
        """Poll until the job on ``target`` is gone; its last progress. Aborts it on timeout or cancel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = 0.005
        last: dict[str, Any] = {}
        try:
            while True:
                info = await self._call(what, lambda: self._dom(name).blockJobInfo(target, 0))
                if not info:
                    return last
                last = dict(info)
                if loop.time() > deadline:
                    await self._abort_block_job(name, target)
                    raise LibvirtTimeout(f"{what} did not finish within {timeout_s:g} s "
                                      f"({last.get('cur')}/{last.get('end')} bytes); aborted")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        except asyncio.CancelledError:
            with suppress(LibvirtError):
                await self._abort_block_job(name, target)
            raise
