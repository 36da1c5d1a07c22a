"""The engine: a small facade over admission, the pipeline, recovery, templates and maintenance.

Jobs come from the persistent queue (the store). Each job has its own
supervised task. The source's lock covers a stun only: the jobs of a source
that wait for its lock when it comes free are coalesced into one stun (the
first of them leads; the others' tasks wait for their own job to end), and
once the source runs again the lock is let go while the clones start, so
the next stun may begin. Stuns of different sources run concurrently, up to
``daemon.max_concurrent_jobs`` at once. See docs/design/states.md.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from ..config import Config
from ..errors import DomainReplaced, InstacloneError, ShuttingDown
from ..hv import Hypervisor
from ..model import CORE, CloneRecord, JobRecord
from ..plugin_api import MemoryBackend, StorageBackend
from ..requests import (
    CheckRequest,
    CloneRequest,
    ExecRequest,
    FreezeRequest,
    GetFileRequest,
    PrepareRequest,
    PutFileRequest,
)
from ..store import Store
from . import gc, maintenance, pipeline, recovery, sources, templates
from .admission import Admission
from .context import JobContext, StepHook
from .guestexec import GuestFileReader, GuestOps, GuestProcess
from .ledger import CoreUndoer, Ledger, Undoer
from .pools import PoolKeeper

#: How long a finished job's completion event is kept for waiters that race with it.
DONE_KEEP_S = 60.0
#: How often finished jobs past ``journal.retention_days`` are pruned.
PRUNE_EVERY_S = 3600.0


class Engine:
    """Runs clone jobs; the API, the CLI's daemon and the tests drive it through these methods."""

    def __init__(self, *, config: Config, store: Store, virt: Hypervisor, storage: StorageBackend,
                 memory: MemoryBackend | list[MemoryBackend]) -> None:
        memories = memory if isinstance(memory, list) else [memory]
        undoers: dict[str, Undoer] = {CORE: CoreUndoer(virt, storage), storage.name: storage}
        undoers.update({m.name: m for m in memories})
        self.svc = JobContext(config=config, store=store, virt=virt, storage=storage, memories=memories,
                            ledger=Ledger(store, undoers, anchors=config.own_dirs))
        self._admission = Admission(self.svc)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        # Jobs dispatched and not yet taken into a stun, per source, in order.
        self._waiting: dict[str, list[JobRecord]] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._stuns = 0
        self.guest = GuestOps(self.svc)
        self.pools = PoolKeeper(self.svc, submit=self.submit, destroy=self.destroy_clone, freeze=self.freeze)
        self._slots = asyncio.Semaphore(config.daemon.max_concurrent_jobs)
        self._running = 0
        self.accepting = True

    # -- what the daemon and the API read ---------------------------------------------

    @property
    def config(self) -> Config:
        return self.svc.config

    @config.setter
    def config(self, config: Config) -> None:
        """A reloaded configuration (SIGHUP): jobs admitted from now on use it."""
        self.svc.config = config

    @property
    def store(self) -> Store:
        return self.svc.store

    @property
    def virt(self) -> Hypervisor:
        return self.svc.virt

    @property
    def storage(self) -> StorageBackend:
        return self.svc.storage

    @property
    def memories(self) -> list[MemoryBackend]:
        """Memory backends in order of preference: each job takes the first that can serve its source."""
        return self.svc.memories

    @property
    def memory(self) -> MemoryBackend:
        return self.svc.memories[0]

    @property
    def storage_backend(self) -> str:
        """The storage backend's name."""
        return self.svc.storage.name

    @property
    def memory_backend(self) -> str:
        """The preferred memory backend's name."""
        return self.svc.memories[0].name

    @property
    def step_hook(self) -> StepHook | None:
        return self.svc.step_hook

    @step_hook.setter
    def step_hook(self, hook: StepHook | None) -> None:
        self.svc.step_hook = hook

    @property
    def active_jobs(self) -> int:
        """Jobs accepted and not finished (running or queued)."""
        return len(self._tasks)

    @property
    def stuns(self) -> int:
        """Stuns (runs of coalesced jobs) started since the engine started."""
        return self._stuns

    @property
    def queued_jobs(self) -> int:
        """Jobs waiting for their source's lock or a free slot."""
        return len(self._tasks) - self._running

    async def outside_stun(self) -> None:
        """Return once no job holds a source stunned."""
        await self.svc.gate.open.wait()

    def source_lock(self, name: str) -> asyncio.Lock:
        """The lock that jobs, freeze and unfreeze of ``name`` hold; hold it to change its definition.

        A job's disk snapshot rewrites the source's persistent definition (its
        disk paths): a definition read outside the lock and written back
        later could point the source at an image that clones are backed by.
        """
        return self.svc.lock(name)

    # -- commands -----------------------------------------------------------------------

    async def submit(self, req: CloneRequest) -> JobRecord:
        """Check a clone request against the world, persist it as Requested and queue it.

        ``req.owner``: the uid the job and its clones belong to (None: the daemon's own, as for the pool
        keeper's jobs). Who may ask is the API's to decide. Raises ShuttingDown, SourceNotFound,
        SourceNotCloneable, NameInUse, InsufficientCapacity, InvalidRequest (count past clone.max_count).
        """
        if not self.accepting:
            raise ShuttingDown("the daemon is shutting down and accepts no new jobs; retry after it restarts")
        job = await self._admission.admit(req, owner=os.getuid() if req.owner is None else req.owner)
        self._dispatch(job)
        return job

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Wait until the job is terminal (or ``timeout_s`` passes)."""
        ev = self._done.get(job_id)
        if ev is not None:
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancel on 3.11
                    await ev.wait()

    async def destroy_clone(self, name: str, *, reason: str = "destroyed") -> CloneRecord:
        try:
            rec = await maintenance.destroy_clone(self.svc, name, reason=reason)
        except DomainReplaced:
            self.pools.wake()  # forgotten: if it was a pool member, the pool makes another
            raise
        if rec.pool is not None:
            self.pools.wake()  # a member gone: the pool makes another
        return rec

    async def guest_exec(self, req: ExecRequest) -> GuestProcess:
        """Start a command in a clone (see ``jobs.guestexec``); raises NotFound, AgentUnavailable, ..."""
        return await self.guest.run(req)

    async def put_guest_file(self, req: PutFileRequest, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Write ``chunks`` to a file in a clone, verified and renamed into place; raises ChecksumMismatch, ..."""
        return await self.guest.put(req, chunks)

    async def open_guest_file(self, req: GetFileRequest) -> GuestFileReader:
        """A file of a clone to read (size and sha256 known); raises GuestFileNotFound, ..."""
        return await self.guest.get(req)

    async def check_source(self, req: CheckRequest) -> dict[str, Any]:
        """The preflight report of a domain (see ``jobs.sources``); raises SourceNotFound."""
        return await sources.check(self.svc, req)

    async def prepare_source(self, req: PrepareRequest) -> dict[str, Any]:
        """Write what instant clones need into a domain's definition, under its lock (see ``jobs.sources``);
        raises SourceNotFound."""
        return await sources.prepare(self.svc, req)

    async def libvirt_connected(self) -> bool:
        """Whether libvirt answers (reconnecting if it was lost)."""
        return await self.svc.virt.ensure_connected()

    async def clone_state(self, name: str) -> str:
        """The state of domain ``name`` ("missing" if it is not there or libvirt fails)."""
        try:
            return await self.svc.virt.state(name)
        except InstacloneError:
            return "missing"

    async def run_background(self) -> None:
        """The engine's background work: the pool keeper, the TTL reaper, journal pruning, the
        periodic collection (cancel to stop)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.pools.run(), name="pools")
            tg.create_task(self.pools.reap(), name="ttl")
            tg.create_task(self._prune_loop(), name="journal-prune")
            tg.create_task(self._collect_garbage(), name="gc")

    async def prune_finished(self) -> dict[str, int]:
        """Prune what finished more than ``journal.retention_days`` ago (see ``store.retention``); {} if 0."""
        days = self.svc.config.journal.retention_days
        if days <= 0:
            return {}
        pruned = await self.svc.store.prune(time.time() - days * 86400.0)
        if any(pruned.values()):
            self.svc.log.info("journal.pruned", retention_days=days, **pruned)
        return pruned

    async def _prune_loop(self) -> None:
        """Prune at start, then every PRUNE_EVERY_S; never raises."""
        while True:
            try:
                await self.prune_finished()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.svc.log.exception("journal.prune_failed")
            await asyncio.sleep(PRUNE_EVERY_S)

    async def _collect_garbage(self) -> None:
        """A full collection every ``gc.interval_s`` (read each round: a reload moves it; 0: none)."""
        while True:
            interval_s = self.svc.config.gc.interval_s
            await asyncio.sleep(interval_s or 60.0)
            if not interval_s or not self.svc.config.gc.interval_s:
                continue
            try:
                await gc.collect(self.svc)
            except InstacloneError as exc:
                self.svc.log.warning("gc.failed", after="interval", error=exc.message)

    async def freeze(self, req: FreezeRequest) -> dict[str, Any]:
        """Freeze a source as a template (see ``jobs.templates``); raises Conflict, SourceNotFound, ..."""
        return await templates.freeze(self.svc, req)

    async def unfreeze(self, req: FreezeRequest) -> dict[str, Any]:
        """Unfreeze a source (see ``jobs.templates``); raises NotFound, ..."""
        return await templates.unfreeze(self.svc, req)

    async def recover(self) -> list[str]:
        """Reconcile unfinished jobs after a restart (see ``jobs.recovery``); returns the ids handled."""
        return await recovery.recover(self.svc, self._dispatch)

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

    # -- scheduling ---------------------------------------------------------------------

    def _dispatch(self, job: JobRecord) -> None:
        self._done.setdefault(job.id, asyncio.Event())
        self._jobs[job.id] = job
        self._waiting.setdefault(job.source, []).append(job)
        task = asyncio.get_running_loop().create_task(self._supervise(job), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(functools.partial(self._forget, job.id))

    def _forget(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)

    def _take_batch(self, job: JobRecord) -> list[JobRecord]:
        """The jobs ``job``'s stun takes: it and those waiting for the same source and backends.

        Empty if another job's stun took ``job`` already. At most
        ``clone.max_count`` clones share a stun (each adds to its length).
        """
        waiting = self._waiting.get(job.source, [])
        if job not in waiting:
            return []
        batch: list[JobRecord] = []
        keep: list[JobRecord] = []
        total = 0
        limit = self.svc.config.clone.max_count
        for other in [job, *[j for j in waiting if j is not job]]:
            same = (other.spec.memory_backend, other.spec.storage_backend) == \
                (job.spec.memory_backend, job.spec.storage_backend)
            if same and (not batch or total + other.spec.count <= limit):
                batch.append(other)
                total += other.spec.count
            else:
                keep.append(other)
        self._waiting[job.source] = keep
        return batch

    async def _supervise(self, job: JobRecord) -> None:
        batch: list[JobRecord] = []
        slot = False
        try:
            async with self.svc.lock(job.source):
                batch = self._take_batch(job)
                if batch:
                    await self._slots.acquire()
                    slot = True
                    self._running += len(batch)
                    self._stuns += 1
                    run = pipeline.new_run(self.svc, batch, on_done=self._finished)
                    started = await pipeline.stun_phase(self.svc, run)
            if not batch:
                # Led by another job's stun: this task ends with its job.
                await self._done[job.id].wait()
                return
            if started:
                await pipeline.start_phase(self.svc, run)
            # The slot goes before the lock is taken again: a stun holding
            # the lock may be waiting for a slot.
            self._running -= len(batch)
            self._slots.release()
            slot = False
            # No stun may snapshot a disk while a block job runs on it.
            async with self.svc.lock(job.source):
                await maintenance.consolidate(self.svc, batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: logged with its traceback, never takes the daemon down
            self.svc.log.exception("job.crashed", job_id=job.id)
        finally:
            if slot:
                self._running -= len(batch)
                self._slots.release()
            for member in batch:
                self._finished(member.id)

    def _finished(self, job_id: str) -> None:
        ev = self._done.get(job_id)
        if ev is None or ev.is_set():
            return
        ev.set()
        self.svc.capacity.release(job_id)
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self.pools.job_finished(job)
        # Waiters already woken; later ones read the finished job from the store.
        asyncio.get_running_loop().call_later(DONE_KEEP_S, self._done.pop, job_id, None)
