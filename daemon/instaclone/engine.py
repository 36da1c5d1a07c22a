"""The clone engine: runs one state machine per clone job.

Jobs come from the persistent queue (the journal). Each job runs in its own
supervised task; jobs for the same source are serialized by a per-source
lock, jobs for different sources run concurrently up to
``daemon.max_concurrent_jobs``. Every step records what it is about to create
before creating it, and pushes an undo; on failure the undos run in reverse
order and the source is always resumed (shielded from cancellation).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import customize, domxml, identity, journal as jr, vmstate
from .backends import CloneTarget, MemoryBackend, StorageBackend, StunContext
from .config import Config
from .customize import validate_script
from .errors import (
    Conflict,
    DomainNotFound,
    InstacloneError,
    Interrupted,
    InvalidRequest,
    NameInUse,
    NotFound,
    SourceNotCloneable,
    ShuttingDown,
    SourceNotFound,
    StepFailed,
    StunDeadlineExceeded,
)
from .journal import CloneRecord, Journal, JobRecord
from .model import FreezeStatus, JobSpec, MemoryImage, ResourceKind
from .log import get as get_logger
from .states import State, StateEntry
from .virt import DomainInfo, Hypervisor

Undo = Callable[[], Awaitable[None]]

#: How long a finished job's completion event is kept for waiters that race with it.
DONE_KEEP_S = 60.0

#: A stun longer than this sets the source's clock from the host's afterwards.
SOURCE_CLOCK_AFTER_STUN_MS = 1000.0

#: Clones of one job started at once.
CLONE_START_PARALLEL = 4

#: Fault-injection hook for tests: called with (job_id, step) before each step.
StepHook = Callable[[str, str], Awaitable[None]]


@dataclass
class _Run:
    """Mutable bookkeeping of one running job."""

    job: JobRecord
    memory: MemoryBackend
    undo: list[tuple[str, Undo]] = field(default_factory=list)
    resources: list[int] = field(default_factory=list)
    stunned: bool = False
    step: str = State.REQUESTED.value


class Engine:
    def __init__(
        self,
        *,
        config: Config,
        journal: Journal,
        virt: Hypervisor,
        storage: StorageBackend,
        memory: MemoryBackend | list[MemoryBackend],
    ) -> None:
        self.config = config
        self.journal = journal
        self.virt = virt
        self.storage = storage
        #: Memory backends in order of preference: each job takes the first
        #: that can serve its source.
        self.memories = memory if isinstance(memory, list) else [memory]
        self.memory = self.memories[0]
        self.log = get_logger(storage=storage.name)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._source_locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(config.daemon.max_concurrent_jobs)
        self._submit_lock = asyncio.Lock()
        self._running = 0
        self._done: dict[str, asyncio.Event] = {}
        #: Set while no source is stunned by a job: webhooks are sent only then.
        self.no_stun = asyncio.Event()
        self.no_stun.set()
        self._stunned: set[str] = set()
        self.step_hook: StepHook | None = None
        self.accepting = True

    # -- public API -------------------------------------------------------------------

    async def outside_stun(self) -> None:
        """Return once no job holds a source stunned."""
        await self.no_stun.wait()

    def _stun_window(self, job_id: str, open_: bool) -> None:
        if open_:
            self._stunned.add(job_id)
        else:
            self._stunned.discard(job_id)
        if self._stunned:
            self.no_stun.clear()
        else:
            self.no_stun.set()

    @property
    def active_jobs(self) -> int:
        """Jobs accepted and not finished (running or queued)."""
        return len(self._tasks)

    @property
    def queued_jobs(self) -> int:
        """Jobs waiting for their source's lock or a free slot."""
        return len(self._tasks) - self._running

    async def submit(self, *, source: object, name: object, count: object = 1,
                     keep_network: object = False, customize: object = True,
                     config: object = None, keep_ssh_host_keys: object = None,
                     script: object = None) -> JobRecord:
        """Validate a clone request, persist it as Requested and queue it."""
        if not self.accepting:
            raise ShuttingDown("the daemon is shutting down and accepts no new jobs; retry after it restarts")
        src = identity.validate_name(source, what="source name")
        if not isinstance(keep_network, bool):
            raise InvalidRequest("keep_network must be true or false")
        if not isinstance(customize, bool):
            raise InvalidRequest("customize must be true or false")
        config = _validate_guest_config(config)
        if keep_ssh_host_keys is None:
            keep_ssh_host_keys = self.config.clone.keep_ssh_host_keys
        if not isinstance(keep_ssh_host_keys, bool):
            raise InvalidRequest("keep_ssh_host_keys must be true or false")
        script = validate_script(script)
        if isinstance(count, bool) or not isinstance(count, int):
            raise InvalidRequest("count must be an integer")
        if not 1 <= count <= self.config.clone.max_count:
            raise InvalidRequest(f"count must be between 1 and {self.config.clone.max_count}, got {count}")
        names = identity.clone_names(identity.validate_name(name), count)
        if src in names:
            raise NameInUse(f"clone name {src!r} is the source's own name")
        info = await self._active_source(src)
        memory = self._pick_memory(info)
        async with self._submit_lock:  # no two jobs may claim the same name
            taken = (await self.journal.names_in_use()) | set(await self.virt.list_names())
            clash = sorted(set(names) & taken)
            if clash:
                raise NameInUse(f"name already in use: {', '.join(clash)}")
            spec = JobSpec(names=tuple(names), storage_backend=self.storage.name, memory_backend=memory.name,
                           keep_network=keep_network, customize=customize, config=config,
                           keep_ssh_host_keys=keep_ssh_host_keys, script=script)
            job = await self.journal.create_job(identity.new_job_id(), src, spec)
        self._log_transition(job, job.history.entries[-1])
        self._dispatch(job)
        return job

    async def _active_source(self, src: str) -> DomainInfo:
        """The source's current description; it must exist and be running or paused."""
        try:
            info = await self.virt.lookup(src)
        except DomainNotFound:
            raise SourceNotFound(f"source domain {src!r} does not exist") from None
        if not info.active:
            raise SourceNotCloneable(f"source {src!r} is {info.state}; it must be running or paused")
        refused = vmstate.refusals(info.xml)
        if refused:
            raise SourceNotCloneable(vmstate.refusal_message(src, refused))
        return info

    def _pick_memory(self, info: DomainInfo) -> MemoryBackend:
        reasons = []
        for mem in self.memories:
            why = mem.can_serve(info)
            if why is None:
                return mem
            reasons.append(f"{mem.name}: {why}")
        raise SourceNotCloneable(f"no memory backend can clone {info.name!r} ({'; '.join(reasons)})")

    def _memory_named(self, name: str | None) -> MemoryBackend:
        for mem in self.memories:
            if mem.name == name:
                return mem
        return self.memory

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Wait until the job is terminal (or ``timeout_s`` passes)."""
        ev = self._done.get(job_id)
        if ev is not None:
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancel on 3.11
                    await ev.wait()

    async def destroy_clone(self, name: str) -> CloneRecord:
        """Power off and remove a clone made by instaclone, with its files."""
        rec = await self.journal.get_clone(name)
        if rec is None:
            raise NotFound(f"{name!r} is not a clone made by instaclone")
        if name in await self.journal.frozen():
            # Its frozen image would outlive it, and clones of it may need it.
            raise Conflict(f"{name!r} is frozen as a template; unfreeze it before destroying it")
        children = sorted(c.name for c in await self.journal.list_clones() if c.source == name)
        if children:
            # Their disks are backed by images in this clone's directory.
            raise Conflict(f"{name!r} has clones of its own ({', '.join(children)}); destroy them first")
        await self.virt.undefine(name)
        clone_dir = Path(rec.dir)
        if clone_dir.parent == self.config.clones_dir:  # never outside our directory
            await asyncio.to_thread(shutil.rmtree, clone_dir, True)
        await self.journal.remove_clone(rec)
        self.log.info("clone.destroyed", clone=name, source=rec.source)
        return rec

    async def recover(self) -> list[str]:
        """Reconcile unfinished jobs after a restart; returns the ids handled.

        Jobs still in Requested with nothing created are run again (roll
        forward); any job past Requested is rolled back from its journal:
        a source it stunned is resumed first, then recorded domains and files
        are removed, and the job is marked Failed (or NeedsAttention).
        """
        handled = []
        unfinished = await self.journal.list_jobs(unfinished=True)
        # Invariant 1 first: every source a dead job paused runs again before
        # anything else is looked at or removed.
        for job in unfinished:
            for res in await self.journal.resources(job.id):
                if res.kind == jr.STUN:
                    with suppress(DomainNotFound):
                        await self.virt.resume(res.ref)
                        self.log.warning("source.resumed_after_crash", source=res.ref, job_id=job.id)
        # A freeze cut short: resume the source it paused, drop its image.
        for entry in (await self.journal.frozen()).values():
            if entry.status is FreezeStatus.FREEZING:
                self.log.warning("freeze.rolled_back", source=entry.name)
                await self._undo_freeze(entry.name, entry.paused_by_us, self._memory_named(entry.backend), None)
        for job in unfinished:
            handled.append(job.id)
            resources = await self.journal.resources(job.id)
            if job.state is State.REQUESTED and not resources:
                self.log.info("job.requeued", job_id=job.id, source=job.source)
                self._dispatch(job)
                continue
            registered = [c for c in await self.journal.list_clones() if c.job_id == job.id]
            if registered:
                # The clones were handed over before the crash: only the final
                # state record is missing.
                await self._finish(job, State.UNSTUNNED, result=job.result or {"recovered": True})
                continue
            leftovers = await self._rollback_from_journal(job, resources)
            err = Interrupted(f"the daemon stopped while the job was in {job.state.value}; rolled back",
                              step=job.state.value)
            await self._fail(job, err, leftovers)
        return handled

    async def freeze(self, name: object) -> dict[str, Any]:
        """Pause ``name`` once as a template (like VMware's instantclone.freeze).

        Its memory image is made now, so clones from it need no stun and share
        one image. It stays paused until :meth:`unfreeze`.
        """
        src = identity.validate_name(name, what="source name")
        async with self._source_locks.setdefault(src, asyncio.Lock()):
            if src in await self.journal.frozen():
                raise Conflict(f"{src!r} is already frozen")
            info = await self._active_source(src)
            memory = self._pick_memory(info)
            paused_by_us = info.state == "running"
            # Which interfaces have IPv4 (clones wait for it there): asked
            # now, while the guest still runs and its agent answers.
            ipv4 = (await customize.ipv4_interfaces(self.virt, src)
                    if paused_by_us and customize.has_agent(info.xml) else None)
            await self.journal.add_frozen(src, paused_by_us=paused_by_us, backend=memory.name)
            ctx = StunContext(f"frozen-{src}", info, self._frozen_dir(src), frozen=True)
            t0 = time.monotonic()
            try:
                if paused_by_us:
                    await self.virt.suspend(src)
                await asyncio.to_thread(ctx.job_dir.mkdir, parents=True, exist_ok=True)
                # Per-VM state the clones copy is taken now, while the source
                # cannot change it; it lives (and dies) with the frozen dir.
                await asyncio.to_thread(_write_json, ctx.job_dir / "interfaces.json", ipv4)
                nvram = vmstate.nvram_path(info.xml)
                if nvram is not None:
                    await asyncio.to_thread(_copy_private, nvram, ctx.job_dir / "nvram.fd")
                ctx.memory = await memory.capture(ctx=ctx, record=_no_record)
                ms = round((time.monotonic() - t0) * 1000.0, 3)
                await self.journal.set_frozen_image(src, MemoryImage(memory.name, ctx.memory), freeze_ms=ms)
            except BaseException:
                await asyncio.shield(self._undo_freeze(src, paused_by_us, memory, ctx))
                raise
        self.log.info("source.frozen", source=src, memory=memory.name, ms=ms)
        return {**(await self.journal.frozen())[src].to_dict(), "freeze_ms": ms}

    async def unfreeze(self, name: object) -> dict[str, Any]:
        """Let a frozen source run again; its clones are not affected."""
        src = identity.validate_name(name, what="source name")
        async with self._source_locks.setdefault(src, asyncio.Lock()):
            entry = (await self.journal.frozen()).get(src)
            if entry is None:
                raise NotFound(f"{src!r} is not frozen")
            try:
                info = await self.virt.lookup(src)
            except DomainNotFound:
                # Removed behind our back: nothing to resume, only our records to drop.
                await _rmtree(self._frozen_dir(src))
                await self.journal.remove_frozen(src, clones=entry.clones)
                self.log.warning("source.unfrozen_gone", source=src)
                return entry.to_dict()
            if entry.clones and info.active:
                # Clones are backed by the source's current top image: the
                # source must write to a new delta from now on.
                ctx = StunContext(f"unfreeze-{identity.new_job_id()[:8]}", info, self._frozen_dir(src))
                await self.storage.create_source_delta(ctx=ctx, record=_no_record)
            clock: dict[str, Any] | None = None
            if entry.paused_by_us:
                await self.virt.resume(src)
                # Its clock stood still while it was frozen.
                if customize.has_agent(info.xml):
                    clock = await customize.set_clock(self.virt, src)
            memory = self._memory_named(entry.backend)
            if entry.image:
                await memory.release(ctx=StunContext(f"frozen-{src}", info, self._frozen_dir(src),
                                                     memory=entry.image.to_dict()))
            await _rmtree(self._frozen_dir(src))
            await self.journal.remove_frozen(src, clones=entry.clones)
        self.log.info("source.unfrozen", source=src, clones=entry.clones, clock=clock)
        return {**entry.to_dict(), "clock": clock}

    def _frozen_dir(self, src: str) -> Path:
        return self.config.daemon.state_dir / "frozen" / src

    async def _undo_freeze(self, src: str, paused_by_us: bool, memory: MemoryBackend,
                           ctx: StunContext | None) -> None:
        if paused_by_us:
            with suppress(DomainNotFound):
                await self.virt.resume(src)
        if ctx is not None and isinstance(ctx.memory, dict):
            with suppress(Exception):
                await memory.release(ctx=ctx)
        else:
            # After a crash the image handle is lost, but its place is known:
            # <RAM dir of the source>/instaclone/frozen-<source>.
            with suppress(Exception):
                found = await self.virt.ram_file(src)
                if found is not None:
                    await _rmtree(found[0].parent.parent / "instaclone" / f"frozen-{src}")
        await _rmtree(self._frozen_dir(src))
        await self.journal.remove_frozen(src)

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting jobs; let running jobs finish for ``grace_s``, then roll them back."""
        self.accepting = False
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)

    # -- dispatching --------------------------------------------------------------------

    def _dispatch(self, job: JobRecord) -> None:
        self._done.setdefault(job.id, asyncio.Event())
        task = asyncio.get_running_loop().create_task(self._supervise(job), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t, jid=job.id: self._tasks.pop(jid, None))

    async def _supervise(self, job: JobRecord) -> None:
        lock = self._source_locks.setdefault(job.source, asyncio.Lock())
        try:
            async with lock, self._slots:
                self._running += 1
                try:
                    await self._run(job)
                    # Still under the source's lock: no stun may snapshot a
                    # disk while a block job runs on it.
                    await self._consolidate(job)
                finally:
                    self._running -= 1
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: never let it take the daemon down
            self.log.exception("job.crashed", job_id=job.id)
        finally:
            self._done[job.id].set()
            # Waiters already woken; later ones read the finished job from the journal.
            asyncio.get_running_loop().call_later(DONE_KEEP_S, self._done.pop, job.id, None)

    async def _consolidate(self, job: JobRecord) -> None:
        """Shorten backing chains longer than ``clone.max_chain_depth`` after a successful job.

        Only a domain's own top image is written (block pull), so images that
        other clones are backed by never change; a frozen source's top is
        itself a backing image and is never touched. Failures are logged:
        the job has succeeded already.
        """
        if job.state is not State.UNSTUNNED or not self.storage.supports_consolidation:
            return
        limit = self.config.clone.max_chain_depth
        frozen = await self.journal.frozen()
        for name in [job.source, *job.spec.names]:
            if name in frozen:
                continue
            try:
                # A new clone may already be another job's source: hold its lock too
                # (the job's own source lock is held by the caller).
                lock = self._source_locks.setdefault(name, asyncio.Lock()) if name != job.source else None
                if lock is not None:
                    await lock.acquire()
                try:
                    await self._consolidate_one(name, limit)
                finally:
                    if lock is not None:
                        lock.release()
            except Exception as exc:  # noqa: BLE001 - reported, never fatal to a finished job
                self.log.warning("chain.consolidation_failed", domain=name, error=str(exc) or repr(exc),
                                 job_id=job.id)

    async def _consolidate_one(self, name: str, limit: int) -> None:
        info = await self.virt.lookup(name)
        if info.state != "running":
            return
        for disk in info.disks:
            if disk.readonly:
                continue
            depth = await self.storage.chain_depth(path=disk.path)
            if depth <= limit:
                continue
            t0 = time.monotonic()
            async with asyncio.timeout(self.config.clone.step_timeout_s):
                await self.storage.consolidate(domain=name, target=disk.target)
            now_top = next(d.path for d in (await self.virt.lookup(name)).disks if d.target == disk.target)
            after = await self.storage.chain_depth(path=now_top)
            self.log.info("chain.consolidated", domain=name, disk=disk.target, depth_before=depth,
                          depth_after=after, ms=round((time.monotonic() - t0) * 1000.0, 1))

    def _log_transition(self, job: JobRecord, entry: StateEntry) -> None:
        """One log line per transition (the event itself is written by the journal)."""
        log = self.log.bind(job_id=job.id, source=job.source, clone=",".join(job.spec.names))
        duration_ms = job.history.durations_ms().get(entry.state.value)
        if entry.state is State.FAILED or entry.state is State.NEEDS_ATTENTION:
            log.warning("job.transition", state=entry.state.value, duration_ms=duration_ms, error=job.error)
        else:
            log.info("job.transition", state=entry.state.value, duration_ms=duration_ms)

    async def _finish(self, job: JobRecord, state: State, **kw: Any) -> None:
        """Persist a transition (and its event), then log it."""
        entry = await self.journal.record_state(job, state, **kw)
        self._log_transition(job, entry)

    async def _fail(self, job: JobRecord, err: InstacloneError, leftovers: list[str]) -> None:
        error = err.to_dict()
        if leftovers:
            error["left_behind"] = leftovers
            await self._finish(job, State.NEEDS_ATTENTION, error=error)
        else:
            await self._finish(job, State.FAILED, error=error)

    # -- one job ------------------------------------------------------------------------

    def _recorder(self, run: _Run) -> Callable[..., Awaitable[int]]:
        async def record(kind: str, ref: str, *, clone: str | None = None) -> int:
            rid = await self.journal.plan(run.job.id, ResourceKind(kind), ref, clone=clone)
            run.resources.append(rid)
            return rid

        return record

    async def _step(self, run: _Run, step: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        run.step = step
        if self.step_hook is not None:
            await self.step_hook(run.job.id, step)
        try:
            async with asyncio.timeout(self.config.clone.step_timeout_s):
                return await fn()
        except TimeoutError:
            raise StepFailed(f"step {step} did not finish within {self.config.clone.step_timeout_s:g} s",
                             step=step) from None

    async def _run(self, job: JobRecord) -> None:
        if self.step_hook is not None:
            await self.step_hook(job.id, State.REQUESTED.value)
        run = _Run(job, self._memory_named(job.spec.memory_backend))
        record = self._recorder(run)
        names: list[str] = list(job.spec.names)
        log = self.log.bind(job_id=job.id, source=job.source)
        ctx: StunContext | None = None
        try:
            info = await self._active_source(job.source)
            job_dir = self.config.jobs_dir / job.id
            await record(jr.FILE, str(job_dir))
            await asyncio.to_thread(job_dir.mkdir, parents=True, exist_ok=True)
            run.undo.append(("remove job directory", lambda: _rmtree(job_dir)))
            # A frozen source (registered by "freeze") stays paused and is
            # never snapshotted per job: its top at freeze is the clones'
            # backing image. A source paused by its owner is not ours to
            # pause or resume, but is otherwise handled like a running one.
            entry = (await self.journal.frozen()).get(job.source)
            if entry is not None and entry.status is not FreezeStatus.FROZEN:
                raise SourceNotCloneable(f"source {job.source!r} is being frozen; try again")
            frozen = entry is not None
            if frozen and info.state != "paused":
                raise SourceNotCloneable(f"source {job.source!r} is registered frozen but is {info.state}; "
                                         "unfreeze and freeze it again")
            ctx = StunContext(job.id, info, job_dir, frozen=frozen)
            if info.state == "paused" and not frozen:
                ctx.paused_by_owner = True
            ctx.nvram = vmstate.nvram_path(info.xml)
            if frozen:
                # Taken at freeze (see freeze()); a freeze from before that
                # existed has none, and the paused source's own file is as good.
                at_freeze = self._frozen_dir(job.source)
                ctx.source_ipv4 = await asyncio.to_thread(_read_json, at_freeze / "interfaces.json")
                if ctx.nvram is not None and await asyncio.to_thread((at_freeze / "nvram.fd").is_file):
                    ctx.nvram = at_freeze / "nvram.fd"
            elif info.state == "running" and customize.has_agent(info.xml):
                # Outside the stun: which interfaces the clones must get IPv4 on.
                ctx.source_ipv4 = await customize.ipv4_interfaces(self.virt, job.source)

            deadline_s = self.config.clone.stun_deadline_ms / 1000.0
            stun_started = time.monotonic()
            if info.state == "running":
                await record(jr.STUN, job.source)
                run.stunned = True  # set before the call: a failed pause is still resumed
                self._stun_window(job.id, True)
                await self._step(run, State.STUNNED.value, lambda: self.virt.suspend(job.source))
                stun_started = time.monotonic()
                await self._finish(run.job, State.STUNNED)
            try:
                async with asyncio.timeout(deadline_s if run.stunned else None) as stun_window:
                    clones = await self._stunned_steps(run, ctx, names, record)
            except TimeoutError:
                if stun_window.expired():
                    raise StunDeadlineExceeded(
                        f"the source was stunned longer than the {self.config.clone.stun_deadline_ms} ms "
                        f"deadline (during {run.step}); the job was aborted and the source resumed",
                        step=run.step,
                    ) from None
                raise
            stun_ms = None
            was_stunned = run.stunned
            await self._detach_source(run, ctx)
            self._stun_window(job.id, False)
            if was_stunned:
                stun_ms = round((time.monotonic() - stun_started) * 1000.0, 3)
            await self._step(run, State.UNSTUNNED.value, lambda: self._start_clones(run, ctx, clones))
            source_clock: dict[str, Any] | None = None
            if stun_ms is not None and stun_ms > SOURCE_CLOCK_AFTER_STUN_MS and customize.has_agent(info.xml):
                # A long pause leaves the source's clock behind by as much.
                source_clock = await customize.set_clock(self.virt, job.source)
            if ctx.frozen:
                await self.journal.count_frozen_clones(job.source, len(clones))
            if not ctx.memory_cached:
                await run.memory.release(ctx=ctx)
            await _rmtree(job_dir)
            result = await self._result(run, ctx, clones, stun_ms)
            result["source_clock"] = source_clock
            records = [
                CloneRecord(c.name, c.uuid, job.source, job.id, str(c.dir), time.time()) for c in clones
            ]
            await self.journal.add_clones(job.id, records, run.resources)
            await self._finish(run.job, State.UNSTUNNED, result=result)
            log.info("job.done", clones=names, stun_ms=stun_ms)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            err = _as_error(exc, run.step)
            rollback = asyncio.ensure_future(self._rollback(run, ctx))
            try:
                leftovers = await asyncio.shield(rollback)
            except asyncio.CancelledError:
                leftovers = await rollback
            finally:
                self._stun_window(job.id, False)
            await asyncio.shield(self._fail(job, err, leftovers))
            if cancelled or not isinstance(exc, Exception):
                raise

    async def _stunned_steps(
        self, run: _Run, ctx: StunContext, names: list[str], record: Callable[..., Awaitable[int]]
    ) -> list[CloneTarget]:
        job = run.job
        # SourceDeltaCreated: the source's writes go to a new delta from now on.
        run.undo.append(("remove unused source deltas", lambda: self._drop_unused_source_deltas(job)))
        if ctx.frozen:
            # Frozen at freeze time: its current top is read-only until unfreeze,
            # which gives the source a new delta before it runs again.
            ctx.tops = {d.target: d.path for d in ctx.source.disks if not d.readonly}
        else:
            ctx.tops = await self._step(
                run, State.SOURCE_DELTA_CREATED.value,
                lambda: self.storage.create_source_delta(ctx=ctx, record=record),
            )
        await self._finish(run.job, State.SOURCE_DELTA_CREATED)

        # CloneDeltaCreated: an empty delta per clone, backed by the top at stun.
        clones = [
            CloneTarget(name=n, uuid=identity.new_uuid(), dir=self.config.clones_dir / n) for n in names
        ]

        # The clone's QEMU creates sockets and logs in the clone's directory, so
        # the directory belongs to the user libvirt runs QEMU as: the owner
        # that libvirt gave the source's top image.
        owner = await asyncio.to_thread(_owner, next(iter(ctx.tops.values()), None))

        # The clones' NVRAM files are named after the source's own.
        src_nvram = vmstate.nvram_path(ctx.source.xml)

        async def make_deltas() -> None:
            for clone in clones:
                await record(jr.FILE, str(clone.dir), clone=clone.name)
                await asyncio.to_thread(_make_dir, clone.dir, owner)
                run.undo.append((f"remove {clone.dir}", lambda d=clone.dir: _rmtree(d)))
                clone.disks = await self.storage.create_clone_delta(ctx=ctx, clone=clone, record=record)
                if ctx.nvram is not None:
                    # The UEFI variables as they are at stun (the source is
                    # paused: its QEMU does not write them now).
                    clone.nvram = clone.dir / vmstate.clone_nvram_name(src_nvram or ctx.nvram, job.source,
                                                                       clone.name)
                    await record(jr.FILE, str(clone.nvram), clone=clone.name)
                    await asyncio.to_thread(_copy_private, ctx.nvram, clone.nvram)

        await self._step(run, State.CLONE_DELTA_CREATED.value, make_deltas)
        await self._finish(run.job, State.CLONE_DELTA_CREATED)

        # MemoryLinked: the source's memory and device state at stun. A frozen
        # source's image was made once, at freeze, and is shared by its jobs.
        frozen_entry = (await self.journal.frozen()).get(job.source) if ctx.frozen else None
        if frozen_entry and frozen_entry.image and frozen_entry.backend == run.memory.name:
            ctx.memory = frozen_entry.image.to_dict()
            ctx.memory_cached = True
        else:
            ctx.memory = await self._step(
                run, State.MEMORY_LINKED.value, lambda: run.memory.capture(ctx=ctx, record=record)
            )
            run.undo.append(("release memory image", lambda: run.memory.release(ctx=ctx)))
        await self._finish(run.job, State.MEMORY_LINKED)

        # Configured: each clone's own domain definition.
        nics = domxml.count_interfaces(ctx.source.xml)

        async def define_all() -> None:
            for clone in clones:
                clone.macs = [identity.new_mac() for _ in range(nics)]
                ident = domxml.CloneIdentity(
                    name=clone.name, uuid=clone.uuid, macs=clone.macs,
                    dir=clone.dir, disks=clone.disks, source=job.source, job_id=job.id,
                    extra_qemu_args=run.memory.qemu_args(ctx=ctx, clone=clone), nvram=clone.nvram,
                )
                xml = run.memory.adjust_xml(ctx=ctx, clone=clone, xml=domxml.clone_xml(ctx.source.xml, ident))
                await record(jr.DOMAIN, clone.name, clone=clone.name)
                run.undo.append((f"undefine {clone.name}", lambda n=clone.name: self.virt.undefine(n)))
                await self.virt.define(xml)

        await self._step(run, State.CONFIGURED.value, define_all)
        await self._finish(run.job, State.CONFIGURED)
        return clones

    async def _detach_source(self, run: _Run, ctx: StunContext) -> None:
        """Success path of the unstun: the memory backend lets the source go on."""
        resume = run.stunned
        if ctx.frozen:
            return
        await asyncio.shield(run.memory.detach_source(ctx=ctx, resume=resume))
        run.stunned = False

    async def _unstun_source(self, run: _Run) -> None:
        """Resume the source: shielded, idempotent, and done at most once per job."""
        if run.stunned:
            await asyncio.shield(self.virt.resume(run.job.source))
            run.stunned = False

    async def _start_clones(self, run: _Run, ctx: StunContext, clones: list[CloneTarget]) -> None:
        """Start the clones, a few at a time (QEMU start-up dominates a clone's latency)."""
        slots = asyncio.Semaphore(CLONE_START_PARALLEL)

        keep_network = run.job.spec.keep_network
        customizing = run.job.spec.customize and customize.has_agent(ctx.source.xml)
        why_not = ("not requested" if not run.job.spec.customize
                   else f"the source has no guest agent channel ({customize.AGENT_CHANNEL})")
        script = run.job.spec.script or await asyncio.to_thread(self._config_script)
        keep_ssh = run.job.spec.keep_ssh_host_keys

        async def start(clone: CloneTarget) -> None:
            async with slots:
                phases: dict[str, float] = {}
                t = time.monotonic()

                def lap(phase: str) -> None:
                    nonlocal t
                    now = time.monotonic()
                    phases[phase] = round((now - t) * 1000.0, 1)
                    t = now

                async def boot() -> None:
                    await run.memory.start_clone(ctx=ctx, clone=clone)
                    # The guest still has the source's MAC (it is in the
                    # migrated device state): no packet may leave before the
                    # NIC is replaced, unless the network is isolated.
                    if not keep_network:
                        for mac in clone.macs:
                            await self.virt.set_link(clone.name, mac, up=False)
                    await self.virt.resume(clone.name)
                    lap("start")
                    for mac in clone.macs:
                        await self.virt.replug_interface(clone.name, mac, link_up=not customizing)
                    lap("nic_replug")

                async def host_keys() -> dict[str, tuple[bytes, bytes]] | None:
                    if not customizing or keep_ssh:
                        return None
                    return await customize.make_host_keys(f"root@{clone.name}")

                # The clone's SSH host keys are made on the host while it starts.
                keys = (await _all_or_first_error(host_keys(), boot()))[0]
                if customizing:
                    timeout = self.config.clone.customize_timeout_s
                    try:
                        clone.identity = await customize.customize(
                            self.virt, clone.name, hostname=clone.name,
                            config=dict(run.job.spec.config), timeout_s=timeout,
                            keep_ssh_host_keys=keep_ssh, host_keys=keys,
                            macs=[] if keep_network else clone.macs)
                        lap("identity")
                        for mac in clone.macs:
                            await self.virt.set_link(clone.name, mac, up=True)
                        clone.identity["interfaces"] = await customize.renew_network(
                            self.virt, clone.name, timeout_s=timeout, want_ipv4=ctx.source_ipv4)
                        clone.identity["ipv4_waited_for"] = ctx.source_ipv4
                        lap("network")
                        if script:
                            clone.identity["script"] = await customize.run_script(
                                self.virt, clone.name, script, source=run.job.source, job_id=run.job.id,
                                timeout_s=timeout)
                            lap("script")
                    except InstacloneError as exc:
                        raise customize.CustomizationFailed(
                            f"customization of clone {clone.name!r} failed; the clone was removed: "
                            f"{exc.message}") from exc
                else:
                    clone.identity = {"customized": False, "reason": why_not}
                # The persistent definition must not keep the one-shot
                # "-incoming defer" or the image link: a later plain start
                # must cold-boot.
                await self.virt.define(domxml.forget_frozen_ram(await self.virt.inactive_xml(clone.name)))
                lap("define")
                clone.identity["phases_ms"] = phases

        results = await asyncio.gather(*(start(c) for c in clones), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    def _config_script(self) -> str | None:
        """The configured ``clone.customize_script``, read now (it may change between jobs)."""
        path = self.config.clone.customize_script
        if not path:
            return None
        try:
            return validate_script(Path(path).read_text())
        except (OSError, UnicodeDecodeError, InstacloneError) as exc:
            raise customize.CustomizationFailed(f"clone.customize_script {path}: {exc}") from None

    async def _result(self, run: _Run, ctx: StunContext, clones: list[CloneTarget], stun_ms: float | None) -> dict[str, Any]:
        out = []
        for c in clones:
            info = await self.virt.lookup(c.name)
            depth = {}
            for tgt, path in c.disks.items():
                with suppress(InstacloneError):
                    depth[tgt] = await self.storage.chain_depth(path=path)
            out.append({
                "identity": c.identity,
                "name": c.name,
                "uuid": c.uuid,
                "state": info.state,
                "macs": domxml.macs(info.xml),
                "disks": {k: str(v) for k, v in c.disks.items()},
                "nvram": str(c.nvram) if c.nvram else None,
                "chain_depth": depth,
                "dir": str(c.dir),
            })
        return {
            "clones": out,
            "frozen_source": ctx.frozen,
            "memory_backend": run.memory.name,
            "stun_ms": stun_ms,
            "source_tops_at_stun": {k: str(v) for k, v in ctx.tops.items()},
            "memory": ctx.memory if isinstance(ctx.memory, dict) else None,
        }

    async def _rollback(self, run: _Run, ctx: StunContext | None) -> list[str]:
        """Undo in reverse order; the source is resumed first, whatever else fails."""
        leftovers: list[str] = []
        try:
            await self._unstun_source(run)
        except Exception as exc:
            leftovers.append(f"source {run.job.source} may still be paused: {exc}")
        for what, undo in reversed(run.undo):
            try:
                await undo()
            except DomainNotFound:
                pass
            except Exception as exc:
                leftovers.append(f"{what}: {exc}")
        if not leftovers:
            for rid in run.resources:
                with suppress(Exception):
                    await self.journal.set_resource(rid, jr.RELEASED)
        return leftovers

    async def _rollback_from_journal(self, job: JobRecord, resources: list[jr.Resource]) -> list[str]:
        """Crash recovery: undo what the journal says a dead run created."""
        leftovers: list[str] = []
        order = {jr.STUN: 0, jr.DOMAIN: 1, jr.SOURCE_DELTA: 2, jr.FILE: 3}
        for res in sorted(resources, key=lambda r: (order.get(r.kind, 9), -r.id)):
            try:
                if res.kind == jr.STUN:
                    with suppress(DomainNotFound):
                        await self.virt.resume(res.ref)
                elif res.kind == jr.DOMAIN:
                    await self.virt.undefine(res.ref)
                elif res.kind == jr.SOURCE_DELTA:
                    await self._drop_unused_source_deltas(job)
                elif res.kind == jr.FILE:
                    await _rmtree(Path(res.ref))
                await self.journal.set_resource(res.id, jr.RELEASED)
            except Exception as exc:
                leftovers.append(f"{res.kind} {res.ref}: {exc}")
        return leftovers


    async def _drop_unused_source_deltas(self, job: JobRecord) -> None:
        """Delete this job's source deltas that the source does not use.

        A delta the source writes to is the source's disk now and stays; one
        that a failed snapshot left behind (or that was never created) goes.
        """
        in_use: set[str] = set()
        with suppress(DomainNotFound):
            in_use = {str(d.path) for d in (await self.virt.lookup(job.source)).disks}
        for res in await self.journal.resources(job.id):
            if res.kind == jr.SOURCE_DELTA and res.ref not in in_use:
                await asyncio.to_thread(Path(res.ref).unlink, missing_ok=True)

    def source_lock(self, name: str) -> asyncio.Lock:
        """The lock that jobs, freeze and unfreeze of ``name`` hold; hold it to change its definition.

        A job's disk snapshot rewrites the source's persistent definition (its
        disk paths): a definition read outside the lock and written back
        later could point the source at an image that clones are backed by.
        """
        return self._source_locks.setdefault(name, asyncio.Lock())


def _owner(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_uid, st.st_gid


def _make_dir(path: Path, owner: tuple[int, int] | None) -> None:
    path.mkdir(parents=True, exist_ok=False)
    if owner is not None and owner != (0, 0):
        os.chown(path, *owner)


MAX_GUEST_CONFIG_BYTES = 16 * 1024


def _validate_guest_config(config: object) -> dict[str, str]:
    """Key/value data for the guest (like VMware's InstantCloneSpec config)."""
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in config.items()):
        raise InvalidRequest("config must be an object of string keys and string values")
    if len(json.dumps(config)) > MAX_GUEST_CONFIG_BYTES:
        raise InvalidRequest(f"config is larger than {MAX_GUEST_CONFIG_BYTES} bytes")
    return dict(config)


async def _no_record(kind: str, ref: str, *, clone: str | None = None) -> int:
    """Recorder for freeze/unfreeze: their files live at fixed paths recovery knows."""
    return 0


async def _all_or_first_error(*aws: Awaitable[Any]) -> list[Any]:
    """Await all of ``aws`` concurrently; on the first error cancel the rest and raise it."""
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(aw) for aw in aws]  # type: ignore[arg-type]
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]


def _copy_private(src: Path, dst: Path) -> None:
    """Copy ``src`` (opened read-only: it is never written) to a new file ``dst``.

    ``dst`` gets ``src``'s owner (the user libvirt runs QEMU as) and mode 0600.
    """
    st = src.stat()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fout, open(src, "rb") as fin:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fchown(fout.fileno(), st.st_uid, st.st_gid)
        os.fsync(fout.fileno())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


async def _rmtree(path: Path) -> None:
    def do() -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    await asyncio.to_thread(do)


def _as_error(exc: BaseException, step: str) -> InstacloneError:
    if isinstance(exc, InstacloneError):
        if exc.step is None:
            exc.step = step
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return Interrupted(f"the job was interrupted during {step} (daemon shutdown); rolled back", step=step)
    err = StepFailed(f"{step} failed: {type(exc).__name__}: {exc}", step=step)
    err.__cause__ = exc
    return err
