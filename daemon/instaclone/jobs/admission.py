"""Admission: a clone request is validated, given its names and backends, and persisted as Requested."""

from __future__ import annotations

import asyncio
import json

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
from .context import JobContext
from .customize import validate_script

MAX_GUEST_CONFIG_BYTES = 16 * 1024


class Admission:
    """Turns requests into Requested jobs; no two unfinished jobs may claim one name."""

    def __init__(self, svc: JobContext) -> None:
        self.svc = svc
        self._names = asyncio.Lock()

    async def admit(self, *, source: object, name: object, count: object, keep_network: object,
                    customize: object, config: object, keep_ssh_host_keys: object,
                    script: object, ttl_s: object = None, pool: str | None = None,
                    pool_generation: int = 0, owner: int | None = None) -> JobRecord:
        """Validate a clone request and persist it as Requested; raises InvalidRequest & co."""
        svc = self.svc
        src = identity.validate_name(source, what="source name")
        if keep_ssh_host_keys is None:
            keep_ssh_host_keys = svc.config.clone.keep_ssh_host_keys
        flags = {k: validate_bool(k, v) for k, v in (("keep_network", keep_network), ("customize", customize),
                                             ("keep_ssh_host_keys", keep_ssh_host_keys))}
        guest_config = validate_guest_config(config)
        ttl = validate_ttl(ttl_s)
        checked_script = validate_script(script)
        names = identity.clone_names(identity.validate_name(name), self._count(count))
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
                           config=guest_config, script=checked_script, keep_network=flags["keep_network"],
                           customize=flags["customize"], keep_ssh_host_keys=flags["keep_ssh_host_keys"],
                           ttl_s=ttl, pool=pool, pool_generation=pool_generation, source_uuid=info.uuid)
            job = await svc.store.create_job(identity.new_job_id(), src, spec, owner=owner)
            svc.capacity.hold(job.id, demand)
        svc.log_transition(job, job.history.entries[-1])
        return job

    def _count(self, count: object) -> int:
        if isinstance(count, bool) or not isinstance(count, int):
            raise InvalidRequest("count must be an integer")
        limit = self.svc.config.clone.max_count
        if not 1 <= count <= limit:
            raise InvalidRequest(f"count must be between 1 and {limit}, got {count}")
        return count


def validate_bool(name: str, value: object) -> bool:
    """A request's flag: true or false, nothing else."""
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false")
    return value


#: The longest TTL a clone may be given (a year).
MAX_TTL_S = 365 * 24 * 3600.0


def validate_ttl(ttl_s: object) -> float | None:
    """A clone's time to live in seconds (None: no expiry)."""
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 1 <= ttl_s <= MAX_TTL_S:
        raise InvalidRequest(f"ttl_s must be a number of seconds between 1 and {MAX_TTL_S:g}")
    return float(ttl_s)


def validate_guest_config(config: object) -> dict[str, str]:
    """Key/value data for the guest (like VMware's InstantCloneSpec config)."""
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in config.items()):
        raise InvalidRequest("config must be an object of string keys and string values")
    if len(json.dumps(config)) > MAX_GUEST_CONFIG_BYTES:
        raise InvalidRequest(f"config is larger than {MAX_GUEST_CONFIG_BYTES} bytes")
    return dict(config)


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
