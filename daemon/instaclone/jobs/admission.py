"""Admission: a clone request (a valid record) is checked against the world, given its names and backends,
and persisted as Requested."""

from __future__ import annotations

import asyncio

from .. import identity
from ..errors import (
    DomainNotFound,
    InvalidRequest,
    NameInUse,
    SourceNotCloneable,
    SourceNotFound,
)
from ..hv import DomainInfo, domxml, vmstate
from ..model import JobRecord, JobSpec
from ..plugin_api import MemoryBackend
from ..requests import CloneRequest
from .context import JobContext


class Admission:
    """Turns requests into Requested jobs; no two unfinished jobs may claim one name."""

    def __init__(self, svc: JobContext) -> None:
        self.svc = svc
        self._names = asyncio.Lock()

    async def admit(self, req: CloneRequest, *, owner: int) -> JobRecord:
        """Check what ``req`` needs of the world (the source, free names, capacity, clone.max_count) and
        persist it as Requested; raises SourceNotFound, SourceNotCloneable, NameInUse, InsufficientCapacity."""
        svc = self.svc
        src = req.source
        limit = svc.config.clone.max_count
        if req.count > limit:
            raise InvalidRequest(f"count must be between 1 and {limit}, got {req.count}")
        keep_ssh_host_keys = (svc.config.clone.keep_ssh_host_keys if req.keep_ssh_host_keys is None
                              else req.keep_ssh_host_keys)
        names = req.names
        if src in names:
            raise NameInUse(f"clone name {src!r} is the source's own name")
        info = await active_source(svc, src)
        memory = pick_memory(svc.memories, info)
        async with self._names:
            taken = (await svc.store.names_in_use()) | set(await svc.virt.list_names())
            clash = sorted(set(names) & taken)
            if clash:
                raise NameInUse(f"name already in use: {', '.join(clash)}")
            # Under the lock: the check and the job's reservation are one step for concurrent requests.
            demand = svc.capacity.demand(svc.config, source=src, ram_mib=domxml.memory_mib(info.xml),
                                         backend=memory, count=len(names),
                                         frozen=src in await svc.store.frozen())
            svc.capacity.check(svc.config, demand)
            spec = JobSpec(names=tuple(names), storage_backend=svc.storage.name, memory_backend=memory.name,
                           config=dict(req.config or {}), script=req.script, keep_network=req.keep_network,
                           customize=req.customize, keep_ssh_host_keys=keep_ssh_host_keys,
                           ttl_s=req.ttl_s, pool=req.pool, pool_generation=req.pool_generation,
                           source_uuid=info.uuid)
            job = await svc.store.create_job(identity.new_job_id(), src, spec, owner=owner)
            svc.capacity.hold(job.id, demand)
        svc.log_transition(job, job.history.entries[-1])
        return job


async def active_source(svc: JobContext, src: str) -> DomainInfo:
    """The source's current description; it must exist, run or be paused, and hold no unclonable state."""
    try:
        info = await svc.virt.lookup(src)
    except DomainNotFound:
        raise SourceNotFound(f"source domain {src!r} does not exist") from None
    if not info.active:
        raise SourceNotCloneable(f"source {src!r} is {info.state}; it must be running or paused")
    refused = vmstate.refusals(info.xml)
    if refused:
        raise SourceNotCloneable(vmstate.refusal_message(src, refused))
    return info


def pick_memory(memories: list[MemoryBackend], info: DomainInfo) -> MemoryBackend:
    """The first memory backend (in order of preference) that can serve ``info``."""
    reasons = []
    for mem in memories:
        why = mem.can_serve(info)
        if why is None:
            return mem
        reasons.append(f"{mem.name}: {why}")
    raise SourceNotCloneable(f"no memory backend can clone {info.name!r} ({'; '.join(reasons)})")
