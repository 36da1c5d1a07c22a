"""What the parts of the jobs layer share, one JobContext per engine: collaborators, source locks, stun gate."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import InstacloneError
from ..hv import Hypervisor
from ..log import get as get_logger
from ..model import JobRecord
from ..plugin_api import MemoryBackend, StorageBackend
from ..states import State, StateEntry
from ..store import Store
from .capacity import Capacity
from .ledger import Ledger

#: Fault-injection hook for tests: called with (job_id, step) before each step.
StepHook = Callable[[str, str], Awaitable[None]]


class StunGate:
    """Set while no source is stunned by a job: webhooks are sent only then."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self._holders: set[str] = set()

    def hold(self, job_id: str) -> None:
        self._holders.add(job_id)
        self.open.clear()

    def let_go(self, job_id: str) -> None:
        self._holders.discard(job_id)
        if not self._holders:
            self.open.set()


@dataclass
class JobContext:
    """The daemon's collaborators as the jobs layer sees them (one per engine)."""

    config: Config
    store: Store
    virt: Hypervisor
    storage: StorageBackend
    memories: list[MemoryBackend]
    ledger: Ledger
    gate: StunGate = field(default_factory=StunGate)
    step_hook: StepHook | None = None
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    log: Any = field(default_factory=lambda: get_logger(component="jobs"))
    capacity: Capacity = field(default_factory=Capacity)
    # Backing chains read from image files, by top image, with the stat of each image (``jobs.gc``).
    chain_cache: dict[str, Any] = field(default_factory=dict)
    # What destroys released and wait to have collected (``jobs.gc.collect_released``).
    gc_scopes: list[Any] = field(default_factory=list)
    _start_slots: asyncio.Semaphore | None = None

    @property
    def start_slots(self) -> asyncio.Semaphore:
        """Clones being started at once host-wide, across jobs and pools (``clone.max_starting``, read once)."""
        if self._start_slots is None:
            self._start_slots = asyncio.Semaphore(self.config.clone.starting_slots)
        return self._start_slots

    def lock(self, source: str) -> asyncio.Lock:
        """The lock that jobs, freeze and unfreeze of ``source`` hold."""
        return self.locks.setdefault(source, asyncio.Lock())

    def memory_named(self, name: str | None) -> MemoryBackend:
        """The loaded memory backend called ``name`` (the first one if none is)."""
        return next((m for m in self.memories if m.name == name), self.memories[0])

    def frozen_dir(self, source: str) -> Path:
        return self.config.daemon.state_dir / "frozen" / source

    async def hook(self, job_id: str, step: str) -> None:
        if self.step_hook is not None:
            await self.step_hook(job_id, step)

    async def finish(self, job: JobRecord, state: State, **kw: Any) -> StateEntry:
        """Persist a transition (and its event), then log it: one line per transition."""
        entry = await self.store.record_state(job, state, **kw)
        self.log_transition(job, entry)
        return entry

    async def finish_all(self, jobs: list[JobRecord], state: State) -> None:
        """Persist the same transition of each of ``jobs`` (the jobs of one stun) in one transaction."""
        entries = await self.store.record_states(jobs, state)
        for job, entry in zip(jobs, entries, strict=True):
            self.log_transition(job, entry)

    def log_transition(self, job: JobRecord, entry: StateEntry) -> None:
        log = self.log.bind(job_id=job.id, source=job.source, clone=",".join(job.spec.names))
        duration_ms = job.history.durations_ms().get(entry.state.value)
        if entry.state.failed:
            log.warning("job.transition", state=entry.state.value, duration_ms=duration_ms, error=job.error)
        else:
            log.info("job.transition", state=entry.state.value, duration_ms=duration_ms)

    async def fail(self, job: JobRecord, err: InstacloneError, leftovers: list[str],
                   extra: dict[str, Any] | None = None) -> None:
        """End ``job`` Failed, or NeedsAttention if its rollback left something behind."""
        error = {**err.to_dict(), **(extra or {})}
        if leftovers:
            error["left_behind"] = leftovers
            await self.finish(job, State.NEEDS_ATTENTION, error=error)
        else:
            await self.finish(job, State.FAILED, error=error)
