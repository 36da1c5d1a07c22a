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
from .services import Services


async def recover(svc: Services, dispatch: Callable[[JobRecord], None]) -> list[str]:
    """Reconcile unfinished jobs after a restart; returns the ids handled.

    Jobs still in Requested with nothing created run again (roll forward);
    jobs whose clones were registered get their final state; any other job
    is rolled back from the ledger and ends Failed (or NeedsAttention).
    """
    unfinished = await svc.store.list_jobs(unfinished=True)
    # Invariant 1 first: every source a dead job paused runs again before
    # anything else is looked at or removed.
    for job in unfinished:
        for left in await svc.ledger.rollback(job.id, source=job.source, only=ResourceKind.STUN):
            svc.log.warning("source.resume_after_crash_failed", job_id=job.id, detail=left)
    for entry in (await svc.store.frozen()).values():
        if entry.status is FreezeStatus.FREEZING:  # a freeze cut short
            svc.log.warning("freeze.rolled_back", source=entry.name)
            await templates.roll_back_freeze(svc, entry.name)
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
