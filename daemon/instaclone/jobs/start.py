"""Starting the N clones of a job, giving each its identity, and handing them over.

This is the one place that decides how a job's clones are started (how many
at once, in which order the NIC, the identity reset, the network and the
user's script happen) and what the job's result says about each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from ..errors import InstacloneError
from ..hv import domxml
from ..model import CloneRecord, JobRecord
from ..plugin_api import CloneTarget, MemoryBackend, StunContext
from ..requests import validate_script
from . import customize
from .context import JobContext
from .timings import Timings

T = TypeVar("T")

#: A stun longer than this sets the source's clock from the host's afterwards.
SOURCE_CLOCK_AFTER_STUN_MS = 1000.0


class _Starter:
    """What every clone of one job is started with."""

    def __init__(self, svc: JobContext, job: JobRecord, ctx: StunContext, memory: MemoryBackend,
                 script: str | None) -> None:
        self.svc, self.job, self.ctx, self.memory, self.script = svc, job, ctx, memory, script
        self.keep_network = job.spec.keep_network
        self.customizing = job.spec.customize and customize.has_agent(ctx.source.xml)
        self.keep_ssh = job.spec.keep_ssh_host_keys
        self.why_not = ("not requested" if not job.spec.customize
                        else f"the source has no guest agent channel ({customize.AGENT_CHANNEL})")

    async def start(self, clone: CloneTarget, slots: asyncio.Semaphore) -> None:
        """Start ``clone``; when this returns it is ready: running, its identity reset, its network up.

        After the resume the NIC replug runs while the persistent
        definition is cleaned up (host work only); then the identity reset
        (links still down), then the links come up and the network is
        re-read. The SSH host keys are made on the host from the start.

        The replug and the reset are not run at once: both are work of the
        guest's vCPU (ACPI hot-unplug, udev and the network daemon reacting to
        the new NIC; the reset script's programs), and under TCG with one vCPU
        running them side by side took longer than one after the other
        (docs/design/benchmarks.md, "Clone ready time, per phase").
        """
        t = Timings(clone.phases_ms)
        with t.phase("slot_wait"):
            await slots.acquire()
        try:
            keys: asyncio.Future[dict[str, tuple[bytes, bytes]] | None] = asyncio.get_running_loop().create_future()
            await all_or_first_error(self._host_keys(clone, keys, t), self._start(clone, keys, t))
        finally:
            slots.release()
        clone.identity["phases_ms"] = t.phases
        clone.identity["ready_ms"] = t.since_start_ms()
        clone.identity["agent_calls"] = t.agent_calls

    async def _start(self, clone: CloneTarget, keys: Awaitable[dict[str, tuple[bytes, bytes]] | None],
                     t: Timings) -> None:
        virt = self.svc.virt
        with t.phase("memory_start"):
            await self.memory.start_clone(ctx=self.ctx, clone=clone)
        # The guest still has the source's MAC (it is in the migrated device
        # state): no packet may leave before the NIC is replaced, unless the
        # network is isolated.
        if not self.keep_network:
            with t.phase("link_down"):
                for mac in clone.macs:
                    await virt.set_link(clone.name, mac, up=False)
        with t.phase("resume"):
            await virt.resume(clone.name)
        await all_or_first_error(self._replug(clone, t), self._define(clone, t))
        if not self.customizing:
            clone.identity = {"customized": False, "reason": self.why_not}
            return
        clone.identity = await self._reset_identity(clone, keys, t)
        await _customizing(clone, self._network(clone, t))

    async def _replug(self, clone: CloneTarget, t: Timings) -> None:
        # Links stay down until the identity reset when there is one.
        with t.phase("nic_replug"):
            for mac in clone.macs:
                await self.svc.virt.replace_nic(clone.name, mac, link_up=not self.customizing,
                                                timeout_s=self.svc.config.clone.nic_release_timeout_s)

    async def _define(self, clone: CloneTarget, t: Timings) -> None:
        # The persistent definition must not keep the one-shot "-incoming
        # defer" or the image link: a later plain start must cold-boot. (The
        # running domain is not touched by it.)
        virt = self.svc.virt
        with t.phase("define"):
            await virt.define(domxml.forget_frozen_ram(await virt.inactive_xml(clone.name)))

    async def _host_keys(self, clone: CloneTarget, keys: asyncio.Future[dict[str, tuple[bytes, bytes]] | None],
                         t: Timings) -> None:
        if not self.customizing or self.keep_ssh:
            keys.set_result(None)
            return
        # An RSA key takes a core for about a second here (while the clone's
        # QEMU starts): made only when the source may have one to replace.
        types = tuple(k for k in customize.SSH_KEY_TYPES
                      if k != "rsa" or self.ctx.source_rsa_host_key is not False)
        with t.phase("host_keys"):
            keys.set_result(await customize.make_host_keys(f"root@{clone.name}", types))

    async def _reset_identity(self, clone: CloneTarget, keys: Awaitable[dict[str, tuple[bytes, bytes]] | None],
                              t: Timings) -> dict[str, Any]:
        return await _customizing(clone, customize.customize(
            self.svc.virt, clone.name, hostname=clone.name, config=dict(self.job.spec.config),
            timeout_s=self.svc.config.clone.customize_timeout_s, keep_ssh_host_keys=self.keep_ssh,
            host_keys=keys, macs=[] if self.keep_network else clone.macs, timings=t))

    async def _network(self, clone: CloneTarget, t: Timings) -> None:
        """The links come up (the guest has its new NICs and its new identity), then the network is re-read."""
        virt, timeout = self.svc.virt, self.svc.config.clone.customize_timeout_s
        with t.phase("link_up"):
            for mac in clone.macs:
                await virt.set_link(clone.name, mac, up=True)
        clone.identity["interfaces"] = await customize.renew_network(
            virt, clone.name, timeout_s=timeout, want_ipv4=self.ctx.source_ipv4, timings=t)
        clone.identity["ipv4_waited_for"] = self.ctx.source_ipv4
        if self.script:
            with t.phase("script"):
                clone.identity["script"] = await customize.run_script(
                    virt, clone.name, self.script, source=self.job.source, job_id=self.job.id, timeout_s=timeout)


async def _customizing(clone: CloneTarget, aw: Awaitable[T]) -> T:
    """``aw``, a part of the clone's customization: its failure says so."""
    try:
        return await aw
    except InstacloneError as exc:
        raise customize.CustomizationFailed(
            f"customization of clone {clone.name!r} failed; the clone was removed: {exc.message}") from exc


async def start_clones(svc: JobContext, job: JobRecord, ctx: StunContext, memory: MemoryBackend,
                       clones: list[CloneTarget]) -> dict[str, Exception]:
    """Start ``clones`` a few at a time; returns the error of each clone that failed (by name).

    A clone that fails does not stop the others: the caller removes it alone.
    A cancel (daemon shutdown) is raised once every start has ended.
    """
    script = job.spec.script or await asyncio.to_thread(configured_script, svc)
    starter = _Starter(svc, job, ctx, memory, script)
    # Shared by every job (clone.max_starting): coalesced jobs start their
    # clones at the same moment, and QEMU start-up is CPU-bound.
    results = await asyncio.gather(*(starter.start(c, svc.start_slots) for c in clones), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
    return {c.name: r for c, r in zip(clones, results, strict=True) if isinstance(r, Exception)}


def configured_script(svc: JobContext) -> str | None:
    """The configured ``clone.customize_script``, read now (it may change between jobs)."""
    path = svc.config.clone.customize_script
    if not path:
        return None
    try:
        return validate_script(Path(path).read_text())
    except (OSError, UnicodeDecodeError, InstacloneError) as exc:
        raise customize.CustomizationFailed(f"clone.customize_script {path}: {exc}") from None


async def source_clock_after_stun(svc: JobContext, source: str, ctx: StunContext,
                                  stun_ms: float | None) -> dict[str, Any] | None:
    """After a long stun the source's clock is behind by as much: set it from the host's."""
    if stun_ms is None or stun_ms <= SOURCE_CLOCK_AFTER_STUN_MS or not customize.has_agent(ctx.source.xml):
        return None
    return await customize.set_clock(svc.virt, source)


async def result(svc: JobContext, memory: MemoryBackend, ctx: StunContext, clones: list[CloneTarget],
                 stun_ms: float | None) -> dict[str, Any]:
    """The job's result: each clone as it runs now, and how the source was cloned."""
    out = []
    for c in clones:
        info = await svc.virt.lookup_id(c.name, c.uuid)
        depth = {}
        recorded = {d.target: d.format for d in info.disks}  # the format the clone's definition names
        for tgt, path in c.disks.items():
            if tgt not in recorded:
                continue
            with suppress(InstacloneError):  # a backend that cannot inspect chains: no depth shown
                depth[tgt] = await svc.storage.chain_depth(path=path, fmt=recorded[tgt])
        out.append({
            "identity": c.identity, "name": c.name, "uuid": c.uuid, "state": info.state,
            "macs": domxml.macs(info.xml), "disks": {k: str(v) for k, v in c.disks.items()},
            "nvram": str(c.nvram) if c.nvram else None, "chain_depth": depth, "dir": str(c.dir),
        })
    return {
        "clones": out,
        "frozen_source": ctx.frozen,
        "memory_backend": memory.name,
        "stun_ms": stun_ms,
        "source_tops_at_stun": {k: str(v) for k, v in ctx.tops.items()},
        "memory": ctx.memory.to_dict() if ctx.memory is not None else None,
    }


async def hand_over(svc: JobContext, job: JobRecord, clones: list[CloneTarget]) -> None:
    """Register the clones; the job's ledger records become theirs in the same transaction."""
    now = time.time()
    expires = now + job.spec.ttl_s if job.spec.ttl_s is not None else None
    records = [CloneRecord(c.name, c.uuid, job.source, job.id, str(c.dir), now, expires_at=expires,
                           pool=job.spec.pool, generation=job.spec.pool_generation, owner=job.owner)
               for c in clones]
    active = [r.id for r in await svc.store.resources(job.id)]
    await svc.store.add_clones(job.id, records, active)


async def all_or_first_error(*aws: Awaitable[Any]) -> list[Any]:
    """Await all of ``aws`` concurrently; on the first error cancel the rest and raise it."""
    tasks: list[asyncio.Task[Any]] = []

    async def wrap(aw: Awaitable[Any]) -> Any:
        return await aw

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(wrap(aw)) for aw in aws]
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]
