"""The records that cross layers: typed, and frozen where nothing may change them.

Pure: no I/O. The store persists these, the jobs layer makes them, the API
shows them (``to_dict``). See docs/development/layers.md.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .states import State, StateHistory

#: A JSON scalar: what a memory image's fields may hold.
Scalar = str | int | float | bool | None


class ResourceKind(enum.StrEnum):
    """What a job (or a freeze) creates, recorded in the ledger before it is created."""

    STUN = "stun"  # the source was paused by this job: resumed first on rollback
    DOMAIN = "domain"  # a libvirt domain (its name and UUID): undefined on rollback, if it is still that one
    SOURCE_DELTA = "source_delta"  # the source's new top: removed only if the source does not use it
    FILE = "file"  # a file or directory: removed on rollback


class ResourceStatus(enum.StrEnum):
    PLANNED = "planned"  # recorded; creation may or may not have happened
    DONE = "done"  # created / in effect
    RELEASED = "released"  # undone, or handed over to a clone


#: The owner of resources the pipeline itself creates (job dir, clone dirs,
#: NVRAM copies, domains, the stun); a backend's resources carry its name.
CORE = "core"


@dataclass(frozen=True)
class Resource:
    """One ledger row: what was (or is about to be) created, and who removes it."""

    id: int
    job_id: str
    kind: ResourceKind
    ref: str
    clone: str | None
    status: ResourceStatus
    owner: str = CORE
    uuid: str | None = None  # a domain's UUID (None in records of journal schema < 6)
    # (st_dev, st_ino) and S_IFMT bits of the file once made (None: not made yet, or not a file).
    dev: int | None = None
    ino: int | None = None
    ftype: int | None = None


@dataclass(frozen=True)
class JobSpec:
    """What a clone request asked for, validated at admission."""

    names: tuple[str, ...]
    storage_backend: str
    memory_backend: str
    keep_network: bool = False
    customize: bool = True
    config: Mapping[str, str] = field(default_factory=dict)
    keep_ssh_host_keys: bool = False
    script: str | None = None
    ttl_s: float | None = None  # each clone is destroyed this long after it is ready
    pool: str | None = None  # the pool this job replenishes
    pool_generation: int = 0  # the pool's source generation the clones are made from
    #: The source's UUID at admission: a source redefined under its name before
    #: the stun is refused (None in jobs admitted before it was recorded).
    source_uuid: str | None = None

    @property
    def count(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """The spec as the API and the journal show it (unchanged since 0.1)."""
        return {
            "names": list(self.names),
            "count": self.count,
            "storage_backend": self.storage_backend,
            "memory_backend": self.memory_backend,
            "keep_network": self.keep_network,
            "customize": self.customize,
            "config": dict(self.config),
            "keep_ssh_host_keys": self.keep_ssh_host_keys,
            "script": self.script,
            "ttl_s": self.ttl_s,
            "pool": self.pool,
            "pool_generation": self.pool_generation,
            "source_uuid": self.source_uuid,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        """Read a stored spec; keys added after 0.1 default as a 0.1 job behaved."""
        return cls(
            names=tuple(d.get("names", ())),
            storage_backend=str(d.get("storage_backend", "")),
            memory_backend=str(d.get("memory_backend", "")),
            keep_network=bool(d.get("keep_network", False)),
            customize=bool(d.get("customize", True)),
            config=dict(d.get("config") or {}),
            keep_ssh_host_keys=bool(d.get("keep_ssh_host_keys", False)),
            script=d.get("script"),
            ttl_s=float(d["ttl_s"]) if d.get("ttl_s") is not None else None,
            pool=d.get("pool"),
            pool_generation=int(d.get("pool_generation") or 0),
            source_uuid=d.get("source_uuid"),
        )


@dataclass
class JobRecord:
    """A job as persisted: its spec, its states so far, and how it ended."""

    id: str
    seq: int
    source: str
    spec: JobSpec
    history: StateHistory
    error: dict[str, Any] | None = None
    result: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    owner: int | None = None  # uid of the caller (the daemon's for its own jobs); None: from before owners

    @property
    def state(self) -> State:
        return self.history.current

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "source": self.source,
            "state": self.state.value,
            "spec": self.spec.to_dict(),
            "error": self.error,
            "result": self.result,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "history": [{"state": e.state.value, "at": e.at} for e in self.history.entries],
            "durations_ms": self.history.durations_ms(),
        }


@dataclass(frozen=True)
class CloneRecord:
    """A finished clone, registered with the job that made it (and its pool, expiry, claim)."""

    name: str
    uuid: str
    source: str
    job_id: str
    dir: str
    created_at: float
    expires_at: float | None = None  # wall-clock time the daemon destroys it (TTL)
    pool: str | None = None  # a pool member: idle until claimed
    claimed_at: float | None = None
    generation: int = 0  # the pool's source generation it was made from
    owner: int | None = None  # uid: its job's, or the claimer's once claimed; None: from before owners

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "source": self.source, "job_id": self.job_id,
                "dir": self.dir, "created_at": self.created_at, "expires_at": self.expires_at,
                "pool": self.pool, "claimed_at": self.claimed_at, "owner": self.owner}


@dataclass(frozen=True)
class MemoryImage:
    """A memory backend's handle on one captured source state (persisted as JSON).

    ``fields`` are the backend's own (paths, sizes, mode); the job result
    shows them as they are.
    """

    backend: str
    fields: Mapping[str, Scalar]

    def path(self, key: str) -> Path:
        return Path(str(self.fields[key]))

    def text(self, key: str, default: str = "") -> str:
        value = self.fields.get(key, default)
        return default if value is None else str(value)

    def number(self, key: str) -> int | None:
        value = self.fields.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def to_dict(self) -> dict[str, Scalar]:
        return dict(self.fields)

    def to_json(self) -> str:
        return json.dumps({"backend": self.backend, **self.fields})

    @classmethod
    def from_json(cls, text: str, backend: str) -> MemoryImage:
        data = json.loads(text)
        return cls(str(data.pop("backend", backend)), data)


class FreezeStatus(enum.StrEnum):
    FREEZING = "freezing"  # a freeze started; undone by recovery if the daemon dies now
    FROZEN = "frozen"  # its memory image is made: clones may be taken


@dataclass(frozen=True)
class FrozenSource:
    """A source paused once as a template (``instaclone freeze``)."""

    name: str
    since: float
    status: FreezeStatus
    paused_by_us: bool
    backend: str
    image: MemoryImage | None = None
    clones: int = 0

    @property
    def ledger_id(self) -> str:
        """The ledger's owner id for what the freeze created."""
        return f"frozen-{self.name}"

    def with_clones(self, clones: int) -> FrozenSource:
        return replace(self, clones=clones)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "since": self.since, "status": self.status.value,
                "paused_by_us": self.paused_by_us, "backend": self.backend,
                "image": self.image.to_dict() if self.image else None, "clones": self.clones}


@dataclass(frozen=True)
class Event:
    """One outbox row: an event as it is stored, streamed and sent."""

    cursor: int
    id: str
    type: str
    job_id: str | None
    at: float
    body: str  # the exact JSON bytes that are signed and sent

    def to_dict(self) -> dict[str, Any]:
        """The event as the event stream shows it: the webhook body plus id and cursor."""
        out: dict[str, Any] = {"id": self.id, "cursor": self.cursor}
        out.update(json.loads(self.body))
        return out


@dataclass(frozen=True)
class NewEvent:
    """An event to be written in the same transaction as the change it describes."""

    type: str
    job_id: str | None
    at: float
    data: dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    """One (event, webhook endpoint) delivery in the outbox."""

    id: int
    event_cursor: int
    event_id: str
    event_type: str
    job_id: str | None
    webhook: str
    status: str
    attempts: int
    next_at: float
    last_status: int | None
    last_error: str | None
    updated_at: float
    body: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "event_cursor": self.event_cursor, "event_id": self.event_id,
                "event_type": self.event_type, "job_id": self.job_id, "webhook": self.webhook,
                "status": self.status, "attempts": self.attempts, "next_at": self.next_at,
                "last_status": self.last_status, "last_error": self.last_error, "updated_at": self.updated_at}


@dataclass(frozen=True)
class PoolRecord:
    """A pool: ``size`` ready clones of ``source``, made with ``config``; claimed ones leave it.

    ``generation`` grows with each ``pool update --source``: idle members of
    an older generation are replaced in the background.
    """

    name: str
    source: str
    size: int
    config: Mapping[str, str] = field(default_factory=dict)
    customize: bool = True
    keep_network: bool = False
    generation: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0
    owner: int | None = None  # uid of its creator; None: from before owners

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "size": self.size, "config": dict(self.config),
                "customize": self.customize, "keep_network": self.keep_network, "generation": self.generation,
                "created_at": self.created_at, "updated_at": self.updated_at, "owner": self.owner}


#: Finding levels: a clone with the default options is refused (error), works without the capability
#: (warn), or nothing is to do (ok).
OK, WARN, ERROR = "ok", "warn", "error"


@dataclass(frozen=True)
class Finding:
    """One capability of a source in a preflight report: whether it has it and what to change if not.

    Made by the core's checks (``instaclone.jobs.preflight``) and by backends (``Backend.preflight``).
    """

    capability: str
    ok: bool
    level: str  # ok | warn | error
    detail: str
    fix: str | None = None  # the exact XML to add or change; None: nothing (or nothing in the XML)
    device: str | None = None  # the disk target (or device) the finding is about
    pending: bool = False  # the persistent definition has it already; the running domain not yet

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"capability": self.capability, "ok": self.ok, "level": self.level,
                               "detail": self.detail, "fix": self.fix}
        if self.device is not None:
            out["device"] = self.device
        if self.pending:
            out["pending"] = True
        return out
