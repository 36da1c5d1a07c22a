"""The clone pipeline: a table of steps, one per state, run for one stun shared by coalesced jobs.

Requests for one source that wait while its lock is held are coalesced
(``jobs/engine.py``): they share one stun, one source delta and one memory
image (recorded under the stun's own ledger id, ``stun-<first job id>``),
while each job keeps its own clones, names, config, states and result, and
its own ledger for what only it creates. A step is either shared (run once,
every job records the state) or per job (one job's failure rolls back that
job alone). On a shared failure the runner calls ``Ledger.rollback`` (the
same code crash recovery uses): the source is resumed first, then the rest
is removed newest first. The states between Stunned and Configured run under
the hard stun deadline (``clone.stun_deadline_ms``).

The stun phase (``stun_phase``) runs under the source's lock; the start
phase (``start_phase``: the clones start, get their identity and are handed
over) runs after it, while the next stun of the same source may already run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .. import identity
from ..errors import Conflict, InstacloneError, Interrupted, SourceNotCloneable, StepFailed, StunDeadlineExceeded
from ..hv import domxml, vmstate
from ..model import CORE, JobRecord, ResourceKind
from ..plugin_api import CloneTarget, MemoryBackend, Recorder, StunContext
from ..states import State
from . import customize, gc, start
from .admission import active_source
from .context import JobContext
from .files import copy_private, give, make_dir, owner_of, read_json, remove_path

#: Ledger ids of what the jobs of one stun share start with this.
STUN_LEDGER_PREFIX = "stun-"
#: Clone deltas / definitions made at once inside a stun.
STUN_IO_PARALLEL = 8


@dataclass
class Member:
    """One job of a stun: its own clones and ledger."""

    job: JobRecord
    record: Recorder  # the core's recorder in this job's ledger
    clones: list[CloneTarget] = field(default_factory=list)
    failed_clones: list[dict[str, object]] = field(default_factory=list)
    done: bool = False  # failed (and rolled back) or finished


@dataclass
class Run:
    """Mutable bookkeeping of one stun and the jobs coalesced into it."""

    id: str  # the ledger id of what the members share; also the backends' job id (ctx.job_id)
    source: str
    memory: MemoryBackend
    record: Recorder  # the core's recorder in the stun's ledger
    members: list[Member]
    ctx: StunContext | None = None
    stunned: bool = False
    stun_started: float = 0.0
    stun_ms: float | None = None
    step: str = State.REQUESTED.value
    source_clock: dict[str, object] | None = None
    on_done: Callable[[str], None] = lambda job_id: None  # a job of the stun reached its terminal state
    # Clone deltas and definitions made at once inside the stun (qemu-img, libvirt calls).
    io_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(STUN_IO_PARALLEL))
    #: Milliseconds of what the jobs share outside the pipeline's states (the result's ``phases_ms``).
    phases_ms: dict[str, float] = field(default_factory=dict)
    began_at: float = 0.0  # wall clock when the stun's set-up began

    @property
    def context(self) -> StunContext:
        assert self.ctx is not None, "set_up_run() runs first"
        return self.ctx

    @property
    def alive(self) -> list[Member]:
        return [m for m in self.members if not m.done]

    @property
    def job_ids(self) -> list[str]:
        return [m.job.id for m in self.members]


SharedAction = Callable[[JobContext, Run], Awaitable[None]]
MemberAction = Callable[[JobContext, Run, Member], Awaitable[None]]


@dataclass(frozen=True)
class Step:
    """One state of the pipeline: its action (shared, or per job), and what the ledger undoes."""

    state: State
    undoes: tuple[ResourceKind, ...]  # kinds this step records (removed by the ledger on failure)
    shared: SharedAction | None = None  # run once for the stun
    each: MemberAction | None = None  # run for each job; a failure fails that job alone
    deadline: bool = False  # runs under the stun deadline
    applies: Callable[[Run], bool] = lambda run: True  # False: the state is skipped (a frozen source)


def new_run(svc: JobContext, jobs: list[JobRecord], *,
            on_done: Callable[[str], None] | None = None) -> Run:
    """The run of ``jobs`` (one source, one memory backend), led by the first."""
    run_id = STUN_LEDGER_PREFIX + jobs[0].id
    members = [Member(j, svc.ledger.recorder(j.id, owner=CORE)) for j in jobs]
    run = Run(run_id, jobs[0].source, svc.memory_named(jobs[0].spec.memory_backend),
              svc.ledger.recorder(run_id, owner=CORE), members)
    if on_done is not None:
        run.on_done = on_done
    return run


# -- the steps ----------------------------------------------------------------------------

async def stun(svc: JobContext, run: Run) -> None:
    """Stunned: the memory backend stops the source (recorded first: a failed stop is resumed too).

    A pre-copying backend copies RAM while the source runs and stops it at
    switchover: the stun starts then, not when this step starts.
    """
    # Outside the stun: the source's new deltas, made while it runs.
    await svc.storage.prepare_source_delta(ctx=run.context, record=svc.ledger.recorder(run.id, owner=svc.storage.name))
    await run.record(ResourceKind.STUN, run.source, uuid=run.context.source.uuid)
    run.stunned = True
    record = svc.ledger.recorder(run.id, owner=run.memory.name)
    run.stun_started = await run.memory.stun(ctx=run.context, record=record)
    svc.gate.hold(run.id)


async def end_stun(svc: JobContext, run: Run) -> None:
    """The source runs again: the stun's length is known and its ledger record done."""
    if not run.stunned:
        return
    run.stun_ms = round((time.monotonic() - run.stun_started) * 1000.0, 3)
    run.stunned = False
    await svc.ledger.release(run.id, ResourceKind.STUN, run.source)
    svc.gate.let_go(run.id)


async def source_delta(svc: JobContext, run: Run) -> None:
    """SourceDeltaCreated: the source's writes go to new deltas from now on."""
    ctx = run.context
    if ctx.frozen:
        # Its top at freeze is read-only until unfreeze, which gives the
        # source a new delta before it runs again.
        ctx.tops = {d.target: d.path for d in ctx.source.disks if not d.readonly}
        return
    record = svc.ledger.recorder(run.id, owner=svc.storage.name)
    ctx.source_delta_started = time.monotonic()
    ctx.tops = await svc.storage.create_source_delta(ctx=ctx, record=record)
    if run.stunned and await run.memory.switchover(ctx=ctx):
        await end_stun(svc, run)


async def clone_deltas(svc: JobContext, run: Run, member: Member) -> None:
    """CloneDeltaCreated: each clone's directory, empty deltas over the tops, its own NVRAM copy."""
    ctx, job = run.context, member.job
    # The directory stays root's: QEMU only passes through it (0710, its
    # group) to the disks and NVRAM libvirt gives it, and libvirt makes the
    # sockets and logs a definition names here itself; so nothing can be
    # planted in it (issue 21). Its files go to the user libvirt runs QEMU
    # as: the owner libvirt gave the source's top image.
    mode, gid = svc.config.daemon.qemu_reach()
    owner = await asyncio.to_thread(owner_of, next(iter(ctx.tops.values()), None))
    src_nvram = vmstate.nvram_path(ctx.source.xml)
    storage_record = svc.ledger.recorder(job.id, owner=svc.storage.name)
    member.clones = [CloneTarget(name=n, uuid=identity.new_uuid(), dir=svc.config.clones_dir / n)
                     for n in job.spec.names]

    async def one(clone: CloneTarget) -> None:
        if await asyncio.to_thread(clone.dir.exists):
            # Not ours to remove if this job fails: refused before it is recorded.
            raise Conflict(f"{clone.dir} exists already (a directory no clone of that name owns); "
                           "remove it or pick another name")
        await member.record(ResourceKind.FILE, str(clone.dir), clone=clone.name)
        await asyncio.to_thread(make_dir, clone.dir, mode=mode, gid=gid)
        clone.disks = await svc.storage.create_clone_delta(ctx=ctx, clone=clone, record=storage_record)
        if owner is not None:
            for disk in clone.disks.values():
                await asyncio.to_thread(give, disk, owner)
        if ctx.nvram is not None:
            # The UEFI variables as they are at stun (the paused source's
            # QEMU does not write them now); the source's file is only read.
            name = vmstate.clone_nvram_name(src_nvram or ctx.nvram, job.source, clone.name)
            clone.nvram = clone.dir / name
            await member.record(ResourceKind.FILE, str(clone.nvram), clone=clone.name)
            await asyncio.to_thread(copy_private, ctx.nvram, clone.nvram)

    await _per_clone(run, member.clones, one)


async def _per_clone(run: Run, clones: list[CloneTarget], action: Callable[[CloneTarget], Awaitable[None]]) -> None:
    """``action`` for each clone, a few at a time (inside the stun: the deltas of many coalesced jobs).

    Every action ends before the first error is raised.
    """

    async def bounded(clone: CloneTarget) -> None:
        async with run.io_slots:
            await action(clone)

    results = await asyncio.gather(*(bounded(c) for c in clones), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise errors[0]


async def link_memory(svc: JobContext, run: Run) -> None:
    """MemoryLinked: the source's memory and device state at stun (a frozen source's, made at freeze)."""
    ctx = run.context
    if ctx.frozen:
        entry = (await svc.store.frozen()).get(run.source)
        if entry is not None and entry.image is not None and entry.backend == run.memory.name:
            ctx.memory, ctx.memory_cached = entry.image, True
            return
    record = svc.ledger.recorder(run.id, owner=run.memory.name)
    ctx.memory = await run.memory.capture(ctx=ctx, record=record)


async def define_clones(svc: JobContext, run: Run, member: Member) -> None:
    """Configured: each clone's own domain definition (new name, UUID, MACs, paths)."""
    ctx, job = run.context, member.job
    nics = domxml.count_interfaces(ctx.source.xml)

    async def one(clone: CloneTarget) -> None:
        clone.macs = [identity.new_mac() for _ in range(nics)]
        ident = domxml.CloneIdentity(
            name=clone.name, uuid=clone.uuid, macs=clone.macs, dir=clone.dir, disks=clone.disks,
            source=job.source, job_id=job.id, extra_qemu_args=run.memory.qemu_args(ctx=ctx, clone=clone),
            nvram=clone.nvram,
        )
        xml = run.memory.adjust_xml(ctx=ctx, clone=clone, xml=domxml.clone_xml(ctx.source.xml, ident))
        # The logs and sockets its QEMU will make in its directory are the
        # clone's too: recorded, so that destroy may delete them (and nothing
        # else) and the directory can go.
        made = {str(p) for p in (*clone.disks.values(), clone.nvram) if p is not None}
        for path in sorted(p for p in gc.xml_paths(xml) if gc.under(p, str(clone.dir)) and p != str(clone.dir)):
            if path not in made:
                await member.record(ResourceKind.FILE, path, clone=clone.name)
        await member.record(ResourceKind.DOMAIN, clone.name, clone=clone.name, uuid=clone.uuid)
        await svc.virt.define(xml)

    await _per_clone(run, member.clones, one)


async def unstun(svc: JobContext, run: Run) -> None:
    """The source goes on (the clones start afterwards, in ``start_phase``)."""
    ctx = run.context
    if not ctx.frozen:
        await asyncio.shield(run.memory.detach_source(ctx=ctx, resume=run.stunned))
    await end_stun(svc, run)
    svc.gate.let_go(run.id)


#: The pipeline up to Configured, in order (Requested is the admitted job; see ``prepare``).
#: Unstunned (``start_member``) follows in the start phase.
PIPELINE: tuple[Step, ...] = (
    Step(State.STUNNED, (ResourceKind.SOURCE_DELTA, ResourceKind.STUN), shared=stun,
         applies=lambda run: run.context.source.state == "running"),
    Step(State.SOURCE_DELTA_CREATED, (ResourceKind.SOURCE_DELTA,), shared=source_delta, deadline=True),
    Step(State.CLONE_DELTA_CREATED, (ResourceKind.FILE,), each=clone_deltas, deadline=True),
    Step(State.MEMORY_LINKED, (ResourceKind.FILE,), shared=link_memory, deadline=True),
    Step(State.CONFIGURED, (ResourceKind.DOMAIN,), each=define_clones, deadline=True),
)


# -- the runner ---------------------------------------------------------------------------

async def set_up_run(svc: JobContext, run: Run) -> None:
    """Requested: look at the source again (it may have changed since admission), make the stun's directory."""
    info = await active_source(svc, run.source)
    for m in run.members:
        # The VM the request named, not one defined under its name since.
        if m.job.spec.source_uuid not in (None, info.uuid):
            raise SourceNotCloneable(f"source {run.source!r} is not the domain the request named: its UUID was "
                                     f"{m.job.spec.source_uuid} at admission and is {info.uuid} now (it was "
                                     "redefined meanwhile); request the clone again")
    job_dir = svc.config.jobs_dir / run.id
    await run.record(ResourceKind.FILE, str(job_dir))
    # QEMU passes through it to a pre-copy's shadow directory (filecow).
    mode, gid = svc.config.daemon.qemu_reach()
    await asyncio.to_thread(make_dir, job_dir, mode=mode, gid=gid, exist_ok=True)
    # A frozen source (registered by "freeze") stays paused and is never
    # snapshotted per job. A source paused by its owner is not ours to pause
    # or resume, but is otherwise handled like a running one.
    entry = (await svc.store.frozen()).get(run.source)
    if entry is not None and entry.status.value != "frozen":
        raise SourceNotCloneable(f"source {run.source!r} is being frozen; try again")
    frozen = entry is not None
    if frozen and info.state != "paused":
        raise SourceNotCloneable(f"source {run.source!r} is registered frozen but is {info.state}; "
                                 "unfreeze and freeze it again")
    ctx = run.ctx = StunContext(run.id, info, job_dir, frozen=frozen,
                                paused_by_owner=info.state == "paused" and not frozen)
    ctx.nvram = vmstate.nvram_path(info.xml)
    if frozen:
        # Taken at freeze (see templates.freeze); a freeze from before that
        # existed has none, and the paused source's own file is as good.
        at_freeze = svc.frozen_dir(run.source)
        ctx.source_ipv4 = await asyncio.to_thread(read_json, at_freeze / "interfaces.json")
        if ctx.nvram is not None and await asyncio.to_thread((at_freeze / "nvram.fd").is_file):
            ctx.nvram = at_freeze / "nvram.fd"
    elif info.state == "running" and customize.has_agent(info.xml):
        # Outside the stun: which interfaces the clones must get IPv4 on.
        t = time.monotonic()
        ctx.source_ipv4 = await customize.ipv4_interfaces(svc.virt, run.source)
        run.phases_ms["source_ipv4"] = _ms_since(t)
        # Whether the clones need an RSA host key made for them (seconds of host CPU while they start).
        t = time.monotonic()
        ctx.source_rsa_host_key = await customize.has_rsa_host_key(svc.virt, run.source)
        run.phases_ms["source_rsa_key"] = _ms_since(t)


class _NoJobLeft(Exception):
    """Every job of the stun failed on its own: what they shared is rolled back."""


async def _hooks(svc: JobContext, run: Run, step: str) -> None:
    for m in run.alive:
        await svc.hook(m.job.id, step)


async def run_step(svc: JobContext, run: Run, step: Step) -> None:
    """The step's action under the per-step timeout, then its state transition (one event per job)."""
    run.step = step.state.value
    await _hooks(svc, run, run.step)
    timeout_s = svc.config.clone.step_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            if step.shared is not None:
                await step.shared(svc, run)
            else:
                each = step.each
                assert each is not None

                async def for_member(member: Member) -> None:
                    try:
                        await each(svc, run, member)
                    except Exception as exc:  # noqa: BLE001 - this job alone fails; the others go on
                        await fail_member(svc, run, member, exc)

                await asyncio.gather(*(for_member(m) for m in run.alive))
    except TimeoutError:
        raise StepFailed(f"step {run.step} did not finish within {timeout_s:g} s", step=run.step) from None
    if not run.alive:
        raise _NoJobLeft
    await svc.finish_all([m.job for m in run.alive], step.state)


@asynccontextmanager
async def stun_deadline(svc: JobContext, run: Run) -> AsyncIterator[asyncio.Timeout]:
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


async def stun_phase(svc: JobContext, run: Run) -> bool:
    """Requested to Configured, then the source runs again; the caller holds the source's lock.

    Returns False if no job is left to start (each failed and was rolled
    back, and so was what they shared).
    """
    try:
        run.began_at = time.time()
        await _hooks(svc, run, State.REQUESTED.value)
        t = time.monotonic()
        await set_up_run(svc, run)
        run.phases_ms["set_up"] = _ms_since(t)
        steps = [s for s in PIPELINE if s.applies(run)]
        for step in [s for s in steps if not s.deadline]:
            await run_step(svc, run, step)
        async with stun_deadline(svc, run) as window:
            for step in [s for s in steps if s.deadline]:
                await run_step(svc, run, step)
                if not run.stunned:
                    window.reschedule(None)  # the stun ended at switchover
        run.step = State.UNSTUNNED.value
        await _hooks(svc, run, run.step)
        await unstun(svc, run)
        # Outside the stun: what the steps made gets its identity.
        t = time.monotonic()
        for owner_id in (run.id, *(m.job.id for m in run.alive)):
            await svc.ledger.stamp(owner_id)
        run.phases_ms["stamp"] = _ms_since(t)
    except _NoJobLeft:
        await _roll_back_shared(svc, run, None)
        return False
    except BaseException as exc:
        await _roll_back_shared(svc, run, exc)
        if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
            raise
        return False
    return True


async def start_phase(svc: JobContext, run: Run) -> None:
    """Unstunned: each job's clones start and are handed over; then what the jobs shared is let go."""
    ctx = run.context
    try:
        run.source_clock = await start.source_clock_after_stun(svc, run.source, ctx, run.stun_ms)
        await asyncio.gather(*(start_member(svc, run, m) for m in run.alive))
        if not ctx.memory_cached:
            await run.memory.release(image=ctx.image)
        await remove_path(ctx.job_dir)
        await svc.ledger.release_all(run.id)
        # The jobs are done once the engine has consolidated their chains.
    except BaseException as exc:
        await _roll_back_shared(svc, run, exc)
        if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
            raise


async def start_member(svc: JobContext, run: Run, member: Member) -> None:
    """One job's clones start; a clone that fails is removed alone; the job ends Unstunned or Partial."""
    ctx, job = run.context, member.job
    phases = dict(run.phases_ms)
    phases["queue"] = round((run.began_at - job.history.entries[0].at) * 1000.0, 1)
    try:
        t = time.monotonic()
        failures = await start.start_clones(svc, job, ctx, run.memory, member.clones)
        phases["clones_start"] = _ms_since(t)
        for clone, exc in failures.items():
            err = as_error(exc, State.UNSTUNNED.value)
            left = await svc.ledger.rollback(job.id, source=job.source, clone=clone)
            member.failed_clones.append({"name": clone, "error": err.to_dict(), "left_behind": left})
            svc.log.warning("clone.failed", job_id=job.id, clone=clone, error=err.message, left_behind=left)
        started = [c for c in member.clones if c.name not in failures]
        if not started:
            raise next(iter(failures.values()))
        if ctx.frozen:
            await svc.store.count_frozen_clones(job.source, len(started))
        t = time.monotonic()
        result = {**await start.result(svc, run.memory, ctx, started, run.stun_ms),
                  "source_clock": run.source_clock, "failed_clones": member.failed_clones,
                  "stun": {"id": run.id, "jobs": run.job_ids}, "phases_ms": phases}
        phases["result"] = _ms_since(t)
        t = time.monotonic()
        await svc.ledger.stamp(job.id)  # what the clones' QEMUs made (logs, sockets)
        await start.hand_over(svc, job, started)
        phases["hand_over"] = _ms_since(t)
    except BaseException as exc:
        await fail_member(svc, run, member, exc)
        if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
            raise
        return
    member.done = True
    await svc.finish(job, State.PARTIAL if member.failed_clones else State.UNSTUNNED, result=result)
    svc.log.info("job.done", job_id=job.id, source=job.source, clones=[c.name for c in started],
                 failed=[f["name"] for f in member.failed_clones], stun_ms=run.stun_ms, stun_id=run.id)


def _ms_since(t: float) -> float:
    return round((time.monotonic() - t) * 1000.0, 1)


# -- failure ------------------------------------------------------------------------------

async def _shielded(aw: Awaitable[list[str]]) -> list[str]:
    """Await ``aw`` to its end even when cancelled meanwhile."""
    fut = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        return await fut


async def fail_member(svc: JobContext, run: Run, member: Member, exc: BaseException) -> None:
    """Roll back what only ``member`` created and end it Failed (or NeedsAttention)."""
    if member.done:
        return
    member.done = True
    job = member.job
    err = as_error(exc, run.step)
    leftovers = await _shielded(svc.ledger.rollback(job.id, source=job.source))
    extra = {"failed_clones": member.failed_clones} if member.failed_clones else None
    await asyncio.shield(svc.fail(job, err, leftovers, extra=extra))
    if run.step != State.UNSTUNNED.value and run.alive:
        # Others go on with what they share. (The last one, or one in the
        # start phase, is done once what the jobs share is let go too.)
        run.on_done(job.id)


async def _roll_back_shared(svc: JobContext, run: Run, exc: BaseException | None) -> None:
    """A failure of what the jobs share: the source runs again first, then every job still alive fails.

    ``exc`` is None when each job had failed on its own already.
    """
    try:
        stun_left = await _shielded(svc.ledger.rollback(run.id, source=run.source, only=ResourceKind.STUN))
    finally:
        svc.gate.let_go(run.id)
    alive = run.alive
    own = {m.job.id: await _shielded(svc.ledger.rollback(m.job.id, source=m.job.source)) for m in alive}
    rest = stun_left + await _shielded(svc.ledger.rollback(run.id, source=run.source))
    for member in alive:
        member.done = True
        err = as_error(exc if exc is not None else StepFailed("no job left", step=run.step), run.step)
        await asyncio.shield(svc.fail(member.job, err, rest + own[member.job.id]))
    for m in run.members:
        run.on_done(m.job.id)
    if rest and not alive:
        svc.log.warning("stun.left_behind", stun_id=run.id, source=run.source, left_behind=rest)


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
