"""The one place the contract suite touches the daemon's Python surface.

Everything else in ``tests/contract`` works through these functions: the
engine's constructor and its public calls (submit, wait, recover, freeze,
unfreeze, destroy_clone), the journal's job and resource records, the backend
ABCs (to know which methods a backend call is) and the backends, found by
name through their entry points (``instaclone.backends``) like the daemon
finds them: an installed third-party backend runs through the suite too.
It imports the new module names (``jobs.engine``, ``store``,
``plugin_api``, ``hv``, ``tests/support/guests``); when names or signatures change
again, re-point the imports and bodies here: nothing else in the suite
imports the daemon's modules (except ``instaclone.errors`` and
``instaclone.config``, the core).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from instaclone import backends as _backends
from instaclone.config import Config
from instaclone.hv import domxml as domxml, vmstate as vmstate  # re-exported: pure XML readers
from instaclone.hv.hypervisor import LibvirtHypervisor
from instaclone.jobs.engine import Engine
from instaclone.model import ResourceStatus
from instaclone.plugin_api import MemoryBackend, StorageBackend
from instaclone.requests import CloneRequest, FreezeRequest
from instaclone.store import Store

from ..fakes import FakeHypervisor as FakeHypervisor, FakeStorage
from ..guests import devguest as devguest  # the busybox test guest's driver

#: The real hypervisor (libvirt).
Hypervisor = LibvirtHypervisor

#: Job states after which a job's task does no more work for the job itself.
TERMINAL = frozenset({"Unstunned", "Partial", "Failed", "NeedsAttention"})

#: The fake world's own storage double (tests/fakes.py), not a backend anyone installs.
FAKE_STORAGE = "fake"


def storage_names() -> list[str]:
    """The storage backends registered in the entry-point group ``instaclone.storage``."""
    return _backends.names("instaclone.storage")


def memory_names() -> list[str]:
    """The memory backends registered in the entry-point group ``instaclone.memory``."""
    return _backends.names("instaclone.memory")


def memory_class(name: str) -> type[MemoryBackend]:
    """The memory backend registered as ``name`` (a mode suffix, ``filecow-precopy``, is ignored)."""
    return _backends.memory_backend(name.partition("-")[0])


def storage_class(name: str) -> type[StorageBackend]:
    return FakeStorage if name == FAKE_STORAGE else _backends.storage_backend(name)


def backend_methods(layer: str) -> list[str]:
    """The public methods of the storage or memory backend contract (what counts as a backend call)."""
    abc_ = StorageBackend if layer == "storage" else MemoryBackend
    return sorted(n for n in dir(abc_) if not n.startswith("_") and callable(getattr(abc_, n)))


def make_backends(config: Config, virt: Any, storage: str, memory: str) -> tuple[StorageBackend, MemoryBackend]:
    """Instances of the named backends, sharing ``virt`` (the hypervisor, or its proxy).

    ``memory`` may name a mode too: ``filecow-copy`` is filecow with ``source_mode = "copy"`` in its section.
    """
    _, _, mode = memory.partition("-")
    mem = memory_class(memory)
    if mode and mem.settings_class is not None:
        own = config.section(mem.section(), mem.settings_class)
        config = config.with_section(mem.section(), replace(own, source_mode=mode))
    return storage_class(storage)(config=config, virt=virt), mem(config=config, virt=virt)


def make_engine(config: Config, store: Store, virt: Any, storage: StorageBackend,
                memory: MemoryBackend) -> Engine:
    return Engine(config=config, store=store, virt=virt, storage=storage, memory=[memory])


async def open_store(path: Path) -> Store:
    store = Store(path)
    await store.open()
    return store


async def close_store(store: Store) -> None:
    await store.close()


async def shutdown(engine: Engine) -> None:
    await engine.shutdown(30)


async def submit(engine: Engine, *, source: str, name: str, count: int, customize: bool) -> str:
    """Queue one clone job; returns its id.

    The guest's SSH host keys are kept: making new ones runs ssh-keygen on the
    host (seconds per clone, no backend call in it).
    """
    job = await engine.submit(CloneRequest(source=source, name=name, count=count, customize=customize,
                              keep_ssh_host_keys=True))
    return job.id


async def wait(engine: Engine, job_id: str, timeout_s: float = 300.0) -> None:
    await engine.wait(job_id, timeout_s)


async def recover(engine: Engine) -> list[str]:
    """Recovery after a restart; returns the ids of the jobs it handled."""
    return list(await engine.recover())


async def freeze(engine: Engine, source: str) -> None:
    await engine.freeze(FreezeRequest(source))


async def unfreeze(engine: Engine, source: str) -> None:
    await engine.unfreeze(FreezeRequest(source))


async def destroy_clone(engine: Engine, name: str) -> None:
    await engine.destroy_clone(name)


async def job_state(store: Store, job_id: str) -> str:
    job = await store.get_job(job_id)
    return job.state.value if job is not None else "absent"


@dataclass
class Outcome:
    """A job's end as its record says."""

    state: str
    error: dict[str, Any] | None
    clones: list[str] = field(default_factory=list)  # registered as finished clones
    result: dict[str, Any] | None = None


async def job_outcome(store: Store, job_id: str) -> Outcome:
    job = await store.get_job(job_id)
    if job is None:
        return Outcome("absent", None)
    clones = [c.name for c in await store.list_clones() if c.job_id == job_id]
    return Outcome(job.state.value, job.error, clones, job.result)


def _v(x: Any) -> Any:
    """An enum member's value (the records' kinds and statuses are enums after the move), else ``x``."""
    return getattr(x, "value", x)


def freeze_owner(source: str) -> str:
    """The ledger owner of what freezing ``source`` creates."""
    return f"frozen-{source}"


async def unreleased(store: Store, owner: str) -> list[str]:
    """The resource records of a job (or other owner) not marked released, as ``kind ref (status)``."""
    return [f"{_v(r.kind)} {r.ref} ({_v(r.status)})" for r in await store.resources(owner, active_only=False)
            if _v(r.status) != ResourceStatus.RELEASED.value]


async def unfinished_jobs(store: Store) -> list[str]:
    return [j.id for j in await store.list_jobs(unfinished=True)]


async def frozen_entry(store: Store, source: str) -> dict[str, Any] | None:
    """The freeze registry's entry of ``source`` (status, image, ...), or None."""
    entry: Any = (await store.frozen()).get(source)
    if entry is None:
        return None
    return dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)


async def clones_of(store: Store, source: str) -> list[str]:
    return [c.name for c in await store.list_clones() if c.source == source]


async def store_facts(store: Store, job_id: str | None, source: str) -> tuple[Any, ...]:
    """What a crash would leave of the operation in the journal (compared, never interpreted)."""
    state = await job_state(store, job_id) if job_id else None
    records = [(_v(r.kind), r.ref, _v(r.status)) for r in await store.resources(job_id, active_only=False)] \
        if job_id else []
    clones = sorted(c.name for c in await store.list_clones())
    return (state, tuple(records), repr(await frozen_entry(store, source)), tuple(clones))
