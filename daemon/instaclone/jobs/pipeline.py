"""The clone pipeline: a table of steps, one per state, run under the stun deadline.

Each step is a state of the job (``states.State``) with its action and what
its undo removes. An action records every resource in the ledger before it
creates it; on any failure the runner calls ``Ledger.rollback`` (the same code
crash recovery uses), which resumes the source first and removes the rest
newest first. The states between Stunned and Configured run under the hard
stun deadline (``clone.stun_deadline_ms``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .. import identity
from ..errors import InstacloneError, Interrupted, SourceNotCloneable, StepFailed, StunDeadlineExceeded
from ..hv import domxml, vmstate
from ..model import CORE, JobRecord, ResourceKind
from ..plugin_api import CloneTarget, MemoryBackend, Recorder, StunContext
from ..states import State
from . import customize, start
from .admission import active_source
from .files import copy_private, make_dir, owner_of, read_json, remove_path
from .services import Services


@dataclass
class Run:
    """Mutable bookkeeping of one running job."""

    job: JobRecord
    memory: MemoryBackend
    record: Recorder  # the core's recorder in this job's ledger
    ctx: StunContext | None = None
    clones: list[CloneTarget] = field(default_factory=list)
    stunned: bool = False
    stun_started: float = 0.0
    stun_ms: float | None = None
    step: str = State.REQUESTED.value
    result: dict[str, object] | None = None

    @property
    def context(self) -> StunContext:
        assert self.ctx is not None, "prepare() runs first"
        return self.ctx


Action = Callable[[Services, Run], Awaitable[None]]


@dataclass(frozen=True)
class Step:
    """One state of the pipeline: its action, and what the ledger undoes if the job fails."""

    state: State
    action: Action
    undoes: tuple[ResourceKind, ...]  # kinds this step records (removed by the ledger on failure)
    deadline: bool = False  # runs under the stun deadline
    applies: Callable[[Run], bool] = lambda run: True  # False: the state is skipped (a frozen source)


# -- the steps ----------------------------------------------------------------------------

async def stun(svc: Services, run: Run) -> None:
    """Stunned: the memory backend stops the source (recorded first: a failed stop is resumed too).

    A pre-copying backend copies RAM while the source runs and stops it at
    switchover: the stun starts then, not when this step starts.
    """
    await run.record(ResourceKind.STUN, run.job.source)
    run.stunned = True
    record = svc.ledger.recorder(run.job.id, owner=run.memory.name)
    run.stun_started = await run.memory.stun(ctx=run.context, record=record)
    svc.gate.hold(run.job.id)


async def end_stun(svc: Services, run: Run) -> None:
    """The source runs again: the stun's length is known and its ledger record done."""
    if not run.stunned:
        return
    run.stun_ms = round((time.monotonic() - run.stun_started) * 1000.0, 3)
    run.stunned = False
    await svc.ledger.release(run.job.id, ResourceKind.STUN, run.job.source)
    svc.gate.let_go(run.job.id)


async def source_delta(svc: Services, run: Run) -> None:
    """SourceDeltaCreated: the source's writes go to new deltas from now on."""
    ctx = run.context
    if ctx.frozen:
        # Its top at freeze is read-only until unfreeze, which gives the
        # source a new delta before it runs again.
        ctx.tops = {d.target: d.path for d in ctx.source.disks if not d.readonly}
        return
    record = svc.ledger.recorder(run.job.id, owner=svc.storage.name)
    ctx.tops = await svc.storage.create_source_delta(ctx=ctx, record=record)
    if run.stunned and await run.memory.switchover(ctx=ctx):
        await end_stun(svc, run)


async def clone_deltas(svc: Services, run: Run) -> None:
    """CloneDeltaCreated: each clone's directory, empty deltas over the tops, its own NVRAM copy."""
    ctx, job = run.context, run.job
    # The clone's QEMU makes sockets and logs in its directory, so the
    # directory belongs to the user libvirt runs QEMU as: the owner libvirt
    # gave the source's top image.
    owner = await asyncio.to_thread(owner_of, next(iter(ctx.tops.values()), None))
    src_nvram = vmstate.nvram_path(ctx.source.xml)
    storage_record = svc.ledger.recorder(job.id, owner=svc.storage.name)
    run.clones = [CloneTarget(name=n, uuid=identity.new_uuid(), dir=svc.config.clones_dir / n)
                  for n in job.spec.names]
    for clone in run.clones:
        await run.record(ResourceKind.FILE, str(clone.dir), clone=clone.name)
        await asyncio.to_thread(make_dir, clone.dir, owner)
        clone.disks = await svc.storage.create_clone_delta(ctx=ctx, clone=clone, record=storage_record)
        if ctx.nvram is not None:
            # The UEFI variables as they are at stun (the paused source's
            # QEMU does not write them now); the source's file is only read.
            name = vmstate.clone_nvram_name(src_nvram or ctx.nvram, job.source, clone.name)
            clone.nvram = clone.dir / name
            await run.record(ResourceKind.FILE, str(clone.nvram), clone=clone.name)
            await asyncio.to_thread(copy_private, ctx.nvram, clone.nvram)


async def link_memory(svc: Services, run: Run) -> None:
    """MemoryLinked: the source's memory and device state at stun (a frozen source's, made at freeze)."""
    ctx = run.context
    if ctx.frozen:
        entry = (await svc.store.frozen()).get(run.job.source)
        if entry is not None and entry.image is not None and entry.backend == run.memory.name:
            ctx.memory, ctx.memory_cached = entry.image, True
            return
    record = svc.ledger.recorder(run.job.id, owner=run.memory.name)
    ctx.memory = await run.memory.capture(ctx=ctx, record=record)


async def define_clones(svc: Services, run: Run) -> None:
    """Configured: each clone's own domain definition (new name, UUID, MACs, paths)."""
    ctx, job = run.context, run.job
    nics = domxml.count_interfaces(ctx.source.xml)
    for clone in run.clones:
        clone.macs = [identity.new_mac() for _ in range(nics)]
        ident = domxml.CloneIdentity(
            name=clone.name, uuid=clone.uuid, macs=clone.macs, dir=clone.dir, disks=clone.disks,
            source=job.source, job_id=job.id, extra_qemu_args=run.memory.qemu_args(ctx=ctx, clone=clone),
            nvram=clone.nvram,
        )
        xml = run.memory.adjust_xml(ctx=ctx, clone=clone, xml=domxml.clone_xml(ctx.source.xml, ident))
        await run.record(ResourceKind.DOMAIN, clone.name, clone=clone.name)
        await svc.virt.define(xml)


async def unstun(svc: Services, run: Run) -> None:
    """Unstunned: the source goes on, the clones start, and are handed over."""
    ctx, job = run.context, run.job
    if not ctx.frozen:
        await asyncio.shield(run.memory.detach_source(ctx=ctx, resume=run.stunned))
    await end_stun(svc, run)
    svc.gate.let_go(job.id)
    await start.start_clones(svc, job, ctx, run.memory, run.clones)
    source_clock = await start.source_clock_after_stun(svc, job.source, ctx, run.stun_ms)
    if ctx.frozen:
        await svc.store.count_frozen_clones(job.source, len(run.clones))
    if not ctx.memory_cached:
        await run.memory.release(image=ctx.image)
    await remove_path(ctx.job_dir)
    run.result = {**await start.result(svc, run.memory, ctx, run.clones, run.stun_ms),
                  "source_clock": source_clock}
    await start.hand_over(svc, job, run.clones)


#: The pipeline, in order (Requested is the admitted job; see ``prepare``).
PIPELINE: tuple[Step, ...] = (
    Step(State.STUNNED, stun, (ResourceKind.STUN,), applies=lambda run: run.context.source.state == "running"),
    Step(State.SOURCE_DELTA_CREATED, source_delta, (ResourceKind.SOURCE_DELTA,), deadline=True),
    Step(State.CLONE_DELTA_CREATED, clone_deltas, (ResourceKind.FILE,), deadline=True),
    Step(State.MEMORY_LINKED, link_memory, (ResourceKind.FILE,), deadline=True),
    Step(State.CONFIGURED, define_clones, (ResourceKind.DOMAIN,), deadline=True),
    Step(State.UNSTUNNED, unstun, ()),
)


# -- the runner ---------------------------------------------------------------------------

async def prepare(svc: Services, run: Run) -> None:
    """Requested: look at the source again (it may have changed since admission), make the job's directory."""
    job = run.job
    info = await active_source(svc, job.source)
    job_dir = svc.config.jobs_dir / job.id
    await run.record(ResourceKind.FILE, str(job_dir))
    await asyncio.to_thread(job_dir.mkdir, parents=True, exist_ok=True)
    # A frozen source (registered by "freeze") stays paused and is never
    # snapshotted per job. A source paused by its owner is not ours to pause
    # or resume, but is otherwise handled like a running one.
    entry = (await svc.store.frozen()).get(job.source)
    if entry is not None and entry.status.value != "frozen":
        raise SourceNotCloneable(f"source {job.source!r} is being frozen; try again")
    frozen = entry is not None
    if frozen and info.state != "paused":
        raise SourceNotCloneable(f"source {job.source!r} is registered frozen but is {info.state}; "
                                 "unfreeze and freeze it again")
    ctx = run.ctx = StunContext(job.id, info, job_dir, frozen=frozen,
                                paused_by_owner=info.state == "paused" and not frozen)
    ctx.nvram = vmstate.nvram_path(info.xml)
    if frozen:
        # Taken at freeze (see templates.freeze); a freeze from before that
        # existed has none, and the paused source's own file is as good.
        at_freeze = svc.frozen_dir(job.source)
        ctx.source_ipv4 = await asyncio.to_thread(read_json, at_freeze / "interfaces.json")
        if ctx.nvram is not None and await asyncio.to_thread((at_freeze / "nvram.fd").is_file):
            ctx.nvram = at_freeze / "nvram.fd"
    elif info.state == "running" and customize.has_agent(info.xml):
        # Outside the stun: which interfaces the clones must get IPv4 on.
        ctx.source_ipv4 = await customize.ipv4_interfaces(svc.virt, job.source)


async def run_step(svc: Services, run: Run, step: Step) -> None:
    """The step's action under the per-step timeout, then its state transition (and event)."""
    run.step = step.state.value
    await svc.hook(run.job.id, run.step)
    timeout_s = svc.config.clone.step_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            await step.action(svc, run)
    except TimeoutError:
        raise StepFailed(f"step {run.step} did not finish within {timeout_s:g} s", step=run.step) from None
    await svc.finish(run.job, step.state, **({"result": run.result} if run.result is not None else {}))


@asynccontextmanager
async def stun_deadline(svc: Services, run: Run) -> AsyncIterator[asyncio.Timeout]:
    """Abort the steps inside if the source stays stunned past ``clone.stun_deadline_ms`` from its stop.

    The caller lifts the deadline (``reschedule(None)``) once the source runs again.
    """
    deadline_ms = svc.config.clone.stun_deadline_ms
    # The loop's clock is time.monotonic(), the stun's.
    when = run.stun_started + deadline_ms / 1000.0 if run.stunned else None
    try:
        async with asyncio.timeout_at(when) as window:
            yield window
    except TimeoutError:
        if window.expired():
            raise StunDeadlineExceeded(
                f"the source was stunned longer than the {deadline_ms} ms deadline (during {run.step}); "
                "the job was aborted and the source resumed", step=run.step) from None
        raise


async def run_job(svc: Services, job: JobRecord) -> None:
    """Run ``job`` from Requested to Unstunned, or roll it back and end it Failed."""
    await svc.hook(job.id, State.REQUESTED.value)
    run = Run(job, svc.memory_named(job.spec.memory_backend), svc.ledger.recorder(job.id, owner=CORE))
    try:
        await prepare(svc, run)
        steps = [s for s in PIPELINE if s.applies(run)]
        for step in [s for s in steps if not s.deadline and s.state is not State.UNSTUNNED]:
            await run_step(svc, run, step)
        async with stun_deadline(svc, run) as window:
            for step in [s for s in steps if s.deadline]:
                await run_step(svc, run, step)
                if not run.stunned:
                    window.reschedule(None)  # the stun ended at switchover
        await run_step(svc, run, PIPELINE[-1])
        svc.log.info("job.done", job_id=job.id, source=job.source, clones=list(job.spec.names),
                     stun_ms=run.stun_ms)
    except BaseException as exc:
        await _roll_back(svc, run, exc)
        if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
            raise


async def _roll_back(svc: Services, run: Run, exc: BaseException) -> None:
    """Live rollback through the ledger: shielded, and awaited to the end even when cancelled."""
    job = run.job
    err = as_error(exc, run.step)
    rollback = asyncio.ensure_future(svc.ledger.rollback(job.id, source=job.source))
    try:
        leftovers = await asyncio.shield(rollback)
    except asyncio.CancelledError:
        leftovers = await rollback
    finally:
        svc.gate.let_go(job.id)
    await asyncio.shield(svc.fail(job, err, leftovers))


def as_error(exc: BaseException, step: str) -> InstacloneError:
    """Our error for ``exc``: ours as it is (with its step), a cancel as Interrupted, else StepFailed."""
    if isinstance(exc, InstacloneError):
        if exc.step is None:
            exc.step = step
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return Interrupted(f"the job was interrupted during {step} (daemon shutdown); rolled back", step=step)
    err = StepFailed(f"{step} failed: {type(exc).__name__}: {exc}", step=step)
    err.__cause__ = exc
    return err
