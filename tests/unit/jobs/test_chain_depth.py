"""Chain depth: ``clone.max_chain_depth`` is enforced by live consolidation (block pull).

Unit tests (fakes, no libvirt) check when the engine consolidates and how
``Hypervisor.block_pull`` detects the end, a timeout and a failure of a
block job. On real guests (40 clones of one running guest with
``max_chain_depth = 10``): tests/integration/test_chain_depth.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from instaclone.errors import LibvirtError, LibvirtTimeout
from instaclone.hv import LibvirtHypervisor as Hypervisor
from instaclone.jobs.engine import Engine
from instaclone.plugin_api import CloneTarget, Recorder, StunContext
from instaclone.requests import CloneRequest
from instaclone.states import State
from instaclone.store import Store
from instaclone_plugins.saverestore import SaveRestoreMemory
from tests.support.fakes import FakeHypervisor, FakeStorage, fake_world

# -- unit: the engine consolidates only past the limit -----------------------------------------------


class ChainStorage(FakeStorage):
    """FakeStorage that counts chain depth like qcow2 does and can consolidate."""

    supports_consolidation = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.depth: dict[Path, int] = {}
        self.consolidated: list[tuple[str, str, int]] = []  # (domain, target, depth before)
        self.fail_next = False

    def _depth(self, path: Path) -> int:
        return self.depth.get(path, 2)  # a source starts as disk -> base

    async def create_source_delta(self, *, ctx: StunContext, record: Recorder) -> dict[str, Path]:
        tops = await super().create_source_delta(ctx=ctx, record=record)
        new = (await self.virt.lookup(ctx.source.name)).disks
        for d in new:
            self.depth[d.path] = self._depth(tops[d.target]) + 1
        return tops

    async def create_clone_delta(self, *, ctx: StunContext, clone: CloneTarget, record: Recorder) -> dict[str, Path]:
        out = await super().create_clone_delta(ctx=ctx, clone=clone, record=record)
        for tgt, p in out.items():
            self.depth[p] = self._depth(ctx.tops[tgt]) + 1
        return out

    async def chain_depth(self, *, path: Path, fmt: str) -> int:
        return self._depth(path)

    async def consolidate(self, *, domain: str, target: str) -> None:
        top = next(d.path for d in (await self.virt.lookup(domain)).disks if d.target == target)
        self.consolidated.append((domain, target, self._depth(top)))
        if self.fail_next:
            self.fail_next = False
            raise LibvirtError("injected block pull failure")
        self.depth[top] = 2


@pytest.fixture
async def chain_env(tmp_path: Path):
    c, store, virt = await fake_world(tmp_path, clone={"stun_deadline_ms": 500, "step_timeout_s": 5,
                                                         "max_chain_depth": 4})
    storage = ChainStorage(config=c, virt=virt)  # type: ignore[arg-type]
    engine = Engine(config=c, store=store, virt=virt,  # type: ignore[arg-type]
                    storage=storage, memory=SaveRestoreMemory(config=c, virt=virt))  # type: ignore[arg-type]
    yield engine, virt, storage, store
    await engine.shutdown(5)
    await store.close()


async def _job(engine: Engine, store: Store, source: str, name: str):
    job = await engine.submit(CloneRequest(source=source, name=name, keep_network=True, customize=False))
    await engine.wait(job.id, 10)
    return await store.get_job(job.id)


async def _top_depth(virt: FakeHypervisor, storage: ChainStorage, name: str) -> int:
    return storage._depth((await virt.lookup(name)).disks[0].path)


async def test_engine_consolidates_only_past_the_limit(chain_env):
    engine, virt, storage, store = chain_env
    seen = []
    for i in range(1, 8):
        job = await _job(engine, store, "src", f"c{i}")
        assert job.state is State.UNSTUNNED
        seen.append(await _top_depth(virt, storage, "src"))
        assert seen[-1] <= 4
        assert await _top_depth(virt, storage, f"c{i}") <= 4
    # 2 -> 3 -> 4 -> 5 (> 4: consolidated to 2) -> 3 -> 4 -> 5 (-> 2) -> 3
    assert seen == [3, 4, 2, 3, 4, 2, 3]
    # Source and the new clone (its chain is the source's at stun + 1), each only at depth 5.
    assert storage.consolidated == [("src", "vda", 5), ("c3", "vda", 5), ("src", "vda", 5), ("c6", "vda", 5)]

    # Clone of a clone: its chain grows from its source's; same rule.
    storage.consolidated.clear()
    for i in range(1, 4):
        job = await _job(engine, store, "c7", f"cc{i}")
        assert job.state is State.UNSTUNNED
    assert list(storage.consolidated) == [("c7", "vda", 5), ("cc2", "vda", 5)]


async def test_consolidation_failure_does_not_fail_the_job(chain_env):
    engine, virt, storage, store = chain_env
    for i in range(1, 3):
        await _job(engine, store, "src", f"c{i}")
    storage.fail_next = True
    job = await _job(engine, store, "src", "c3")
    assert job.state is State.UNSTUNNED
    assert virt.domains["src"].state == "running"
    assert await _top_depth(virt, storage, "src") == 5  # left long; the next job tries again
    job = await _job(engine, store, "src", "c4")
    assert job.state is State.UNSTUNNED
    assert await _top_depth(virt, storage, "src") == 2


# -- unit: Hypervisor.block_pull against a scripted libvirt domain -----------------------------------


CHAIN_XML = """<domain><devices>
  <disk type='file' device='disk'><source file='{top}'/>{backing}<target dev='vda'/></disk>
  <disk type='file' device='cdrom'><source file='/iso'/><target dev='sdb'/></disk>
</devices></domain>"""


def _chain_xml(paths: list[str]) -> str:
    backing = "<backingStore/>"
    for p in reversed(paths[1:]):
        backing = f"<backingStore type='file'><format type='qcow2'/><source file='{p}'/>{backing}</backingStore>"
    return CHAIN_XML.format(top=paths[0], backing=backing)


class ScriptedDomain:
    """Answers blockJobInfo from a script; the chain is shortened when the script ends (if ``succeed``)."""

    def __init__(self, progress: list[dict[str, int]] | None, chain: list[str], *, succeed: bool = True) -> None:
        self.progress = progress  # None: the job never ends
        self.chain = chain
        self.succeed = succeed
        self.calls: list[tuple[Any, ...]] = []

    def blockRebase(self, disk: str, base: str, bandwidth: int, flags: int) -> int:  # noqa: N802
        self.calls.append(("rebase", disk, base, flags))
        self.base = base
        return 0

    def blockPull(self, disk: str, bandwidth: int, flags: int) -> int:  # noqa: N802
        self.calls.append(("pull", disk, flags))
        self.base = None
        return 0

    def blockJobInfo(self, disk: str, flags: int) -> dict[str, int]:  # noqa: N802
        self.calls.append(("info", disk))
        if self.progress is None:
            return {"type": libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL, "bandwidth": 0, "cur": 1, "end": 10}
        if self.progress:
            return self.progress.pop(0)
        if self.succeed and self.chain:
            keep = self.chain.index(self.base) if self.base else len(self.chain)
            self.chain = [self.chain[0], *self.chain[keep:]]
        return {}

    def blockJobAbort(self, disk: str, flags: int) -> int:  # noqa: N802
        self.calls.append(("abort", disk, flags))
        self.progress = []
        self.succeed = False
        return 0

    def XMLDesc(self, flags: int) -> str:  # noqa: N802
        return _chain_xml(self.chain)


@pytest.fixture
async def scripted():
    virt = Hypervisor(threads=2)
    doms: dict[str, ScriptedDomain] = {}
    virt._dom = lambda name: doms[name]  # type: ignore[method-assign]
    yield virt, doms
    virt._pool.shutdown(wait=True)


CHAIN = ["/d/top", "/d/i2", "/d/i1", "/d/base"]


async def test_block_pull_waits_for_the_job_and_checks_the_chain(scripted):
    virt, doms = scripted
    step = {"type": libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL, "bandwidth": 0, "end": 100}
    doms["vm"] = d = ScriptedDomain([{**step, "cur": 0}, {**step, "cur": 50}, {**step, "cur": 100}], list(CHAIN))
    await virt.block_pull("vm", "vda", base=Path("/d/base"), timeout_s=10)
    assert d.calls[0] == ("rebase", "vda", "/d/base", 0)
    assert [c[0] for c in d.calls].count("info") == 4  # three with progress, one empty
    assert await virt.backing_chain("vm", "vda") == [Path("/d/top"), Path("/d/base")]

    doms["vm2"] = d = ScriptedDomain([], list(CHAIN))
    await virt.block_pull("vm2", "vda", base=None, timeout_s=10)
    assert d.calls[0] == ("pull", "vda", 0)
    assert await virt.backing_chain("vm2", "vda") == [Path("/d/top")]


async def test_block_pull_that_vanishes_without_effect_is_an_error(scripted):
    virt, doms = scripted
    doms["vm"] = ScriptedDomain([{"type": 1, "bandwidth": 0, "cur": 3, "end": 100}], list(CHAIN), succeed=False)
    with pytest.raises(LibvirtError, match=r"without shortening the chain \(3/100\)"):
        await virt.block_pull("vm", "vda", base=Path("/d/base"), timeout_s=10)


async def test_block_pull_timeout_aborts_the_job(scripted):
    virt, doms = scripted
    doms["vm"] = d = ScriptedDomain(None, list(CHAIN))
    t0 = time.monotonic()
    with pytest.raises(LibvirtTimeout, match=r"did not finish within 0\.3 s"):
        await virt.block_pull("vm", "vda", base=Path("/d/base"), timeout_s=0.3)
    assert time.monotonic() - t0 < 2
    assert d.calls[-1] == ("abort", "vda", 0)
    assert d.chain == CHAIN


async def test_cancelled_block_pull_aborts_the_job(scripted):
    virt, doms = scripted
    doms["vm"] = d = ScriptedDomain(None, list(CHAIN))
    task = asyncio.create_task(virt.block_pull("vm", "vda", base=Path("/d/base"), timeout_s=60))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert d.calls[-1] == ("abort", "vda", 0)


async def test_failed_jobs_still_consolidate_the_source(chain_env):
    """A job that fails after the source's new delta was attached still lengthens its chain: consolidated too."""
    engine, virt, storage, store = chain_env
    virt.fail["define"] = LibvirtError("injected define failure")  # Configured fails: after SourceDeltaCreated
    seen = []
    for i in range(1, 6):
        job = await _job(engine, store, "src", f"f{i}")
        assert job.state is State.FAILED, job
        seen.append(await _top_depth(virt, storage, "src"))
    assert max(seen) <= 4, seen  # without it: 3, 4, 5, 6, 7
    assert ("src", "vda", 5) in storage.consolidated
