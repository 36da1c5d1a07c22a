"""Crash recovery: resume first, then roll back from the ledger what a dead run left.

The same ``Ledger.rollback`` a live failure uses removes a dead job's
resources, so a SIGKILL at any state ends exactly as a failure there would.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import Interrupted
from ..model import FreezeStatus, JobRecord, ResourceKind
from ..states import State
from . import templates
from .context import JobContext
from .pipeline import STUN_LEDGER_PREFIX


async def recover(svc: JobContext, dispatch: Callable[[JobRecord], None]) -> list[str]:
    """Reconcile unfinished jobs after a restart; returns the ids handled.

    Jobs still in Requested with nothing created run again (roll forward);
    jobs whose clones were registered get their final state; any other job
    is rolled back from the ledger and ends Failed (or NeedsAttention).
    """
    unfinished = await svc.store.list_jobs(unfinished=True)
    # What the jobs of one stun shared (the stun, source delta, memory image)
    # is under the stun's own ledger id; its source is the first job's.
    stuns = {sid: await _stun_source(svc, sid) for sid in await svc.store.owner_ids(prefix=STUN_LEDGER_PREFIX)}
    # Invariant 1 first: every source a dead run paused runs again before
    # anything else is looked at or removed.
    for owner_id, source in [*((j.id, j.source) for j in unfinished), *stuns.items()]:
        if source is None:
            continue
        for left in await svc.ledger.rollback(owner_id, source=source, only=ResourceKind.STUN):
            svc.log.warning("source.resume_after_crash_failed", job_id=owner_id, detail=left)
    for entry in (await svc.store.frozen()).values():
        if entry.status is FreezeStatus.FREEZING:  # a freeze cut short
            svc.log.warning("freeze.rolled_back", source=entry.name)
            await templates.roll_back_freeze(svc, entry.name)
    # Then what the dead stuns' jobs shared (source deltas stay where a chain
    # uses them), before any of their jobs runs again under the same stun id.
    for stun_id, source in stuns.items():
        stun_left = await svc.ledger.rollback(stun_id, source=source or "")
        if stun_left:
            svc.log.warning("stun.left_behind", stun_id=stun_id, left_behind=stun_left)
    registered = {c.job_id for c in await svc.store.list_clones()}
    handled = []
    for job in unfinished:
        handled.append(job.id)
        if job.state is State.REQUESTED and not await svc.store.resources(job.id):
            svc.log.info("job.requeued", job_id=job.id, source=job.source)
            dispatch(job)
        elif job.id in registered:
            # The clones were handed over before the crash: only the final state is missing.
            await svc.finish(job, State.UNSTUNNED, result=job.result or {"recovered": True})
        else:
            leftovers = await svc.ledger.rollback(job.id, source=job.source)
            err = Interrupted(f"the daemon stopped while the job was in {job.state.value}; rolled back",
                              step=job.state.value)
            await svc.fail(job, err, leftovers)
    return handled


async def _stun_source(svc: JobContext, stun_id: str) -> str | None:
    """The source of a stun's ledger: its first job's (the stun's id names that job)."""
    job = await svc.store.get_job(stun_id.removeprefix(STUN_LEDGER_PREFIX))
    return job.source if job is not None else None
