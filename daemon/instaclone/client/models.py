"""Typed results: frozen dataclasses built from the API's JSON.

Each keeps the object it was built from as ``raw`` (so a field a newer
daemon adds is never lost) and tolerates missing optional fields. Building
one from an answer that lacks a required field raises ProtocolError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError, ProtocolError, from_error_dict

#: Job states in which a job does not change any more.
TERMINAL_STATES = frozenset({"Unstunned", "Partial", "Failed", "NeedsAttention"})
#: Terminal states of a job that made no clone (or left something for an operator).
FAILED_STATES = frozenset({"Failed", "NeedsAttention"})

_Raw = Mapping[str, Any]


def _req(d: _Raw, key: str, what: str) -> Any:
    try:
        return d[key]
    except (KeyError, TypeError):
        raise ProtocolError(f"the daemon's {what} has no {key!r}: {d!r:.200}") from None


def _obj(d: object, what: str) -> _Raw:
    if not isinstance(d, Mapping):
        raise ProtocolError(f"the daemon's {what} is not a JSON object: {d!r:.200}")
    return d


def _opt_float(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _opt_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _names(v: object) -> tuple[str, ...]:
    return tuple(str(x) for x in v) if isinstance(v, list | tuple) else ()


@dataclass(frozen=True)
class StateChange:
    """One entry of a job's history: the state it entered and when (wall-clock seconds)."""

    state: str
    at: float


@dataclass(frozen=True)
class Job:
    """A clone job (``POST /v1/jobs``, ``GET /v1/jobs/{id}``)."""

    id: str
    source: str
    state: str
    history: tuple[StateChange, ...] = ()
    result: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None  # {"code", "message", "step"?} when the job failed
    spec: Mapping[str, Any] = field(default_factory=dict)
    created_at: float | None = None
    updated_at: float | None = None
    durations_ms: Mapping[str, float] = field(default_factory=dict)
    owner: int | None = None  # uid of the user who asked (None: from before owners were recorded)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: object) -> Job:
        d = _obj(d, "job")
        hist = tuple(StateChange(str(e["state"]), float(e["at"])) for e in d.get("history") or ()
                     if isinstance(e, Mapping) and "state" in e and "at" in e)
        result, error, spec = d.get("result"), d.get("error"), d.get("spec")
        return cls(id=str(_req(d, "id", "job")), source=str(d.get("source", "")), state=str(_req(d, "state", "job")),
                   history=hist, result=result if isinstance(result, Mapping) else None,
                   error=error if isinstance(error, Mapping) else None,
                   spec=spec if isinstance(spec, Mapping) else {}, created_at=_opt_float(d.get("created_at")),
                   updated_at=_opt_float(d.get("updated_at")),
                   durations_ms=dict(d.get("durations_ms") or {}), owner=_opt_int(d.get("owner")), raw=d)

    @property
    def terminal(self) -> bool:
        """The job ended (ready, partial, failed, or needs an operator)."""
        return self.state in TERMINAL_STATES

    @property
    def ok(self) -> bool:
        """Every clone of the job is ready."""
        return self.state == "Unstunned"

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES

    @property
    def clones(self) -> tuple[str, ...]:
        """Names of the clones the job made (when it ended), else the names it was asked for."""
        made = (self.result or {}).get("clones")
        if isinstance(made, list) and made:
            return tuple(str(c.get("name")) for c in made if isinstance(c, Mapping))
        return _names(self.spec.get("names"))

    @property
    def stun_ms(self) -> float | None:
        return _opt_float((self.result or {}).get("stun_ms"))

    def exception(self) -> ApiError | None:
        """The job's error as its typed exception (None if it has none)."""
        return from_error_dict(self.error) if self.error else None

    def raise_for_state(self) -> Job:
        """Raise the job's typed error if it failed (or ApiError for a failure without one); the job otherwise."""
        if self.failed:
            raise self.exception() or ApiError(f"job {self.id} ended {self.state}", code="step_failed")
        return self


@dataclass(frozen=True)
class Clone:
    """A clone instaclone made (``GET /v1/clones``; a claim's clone)."""

    name: str
    source: str = ""
    uuid: str = ""
    job_id: str = ""
    dir: str = ""
    created_at: float | None = None
    expires_at: float | None = None
    pool: str | None = None
    claimed_at: float | None = None
    state: str | None = None  # the domain's state (running, paused, missing...) where the answer has it
    owner: int | None = None  # uid: its job's, or the claimer's (None: from before owners were recorded)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: object) -> Clone:
        d = _obj(d, "clone")
        pool, state = d.get("pool"), d.get("state")
        return cls(name=str(_req(d, "name", "clone")), source=str(d.get("source", "")), uuid=str(d.get("uuid", "")),
                   job_id=str(d.get("job_id", "")), dir=str(d.get("dir", "")),
                   created_at=_opt_float(d.get("created_at")), expires_at=_opt_float(d.get("expires_at")),
                   pool=str(pool) if pool is not None else None, claimed_at=_opt_float(d.get("claimed_at")),
                   state=str(state) if state is not None else None, owner=_opt_int(d.get("owner")), raw=d)


@dataclass(frozen=True)
class Pool:
    """A pool of ready clones (``GET /v1/pools/{name}``)."""

    name: str
    source: str
    size: int
    idle: tuple[str, ...] = ()
    idle_old_source: tuple[str, ...] = ()
    claimed: tuple[str, ...] = ()
    pending: int = 0
    generation: int = 1
    config: Mapping[str, str] = field(default_factory=dict)
    customize: bool = True
    keep_network: bool = False
    held: str | None = None  # why replenishment waits (e.g. the host budget)
    last_error: Mapping[str, Any] | None = None  # the last failed replenishment's {"code", "message"}
    failures: int = 0
    created_at: float | None = None
    updated_at: float | None = None
    owner: int | None = None  # uid of its creator; its config is redacted to other non-admins
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: object) -> Pool:
        d = _obj(d, "pool")
        err, held = d.get("last_error"), d.get("held")
        return cls(name=str(_req(d, "name", "pool")), source=str(d.get("source", "")), size=int(d.get("size", 0)),
                   idle=_names(d.get("idle")), idle_old_source=_names(d.get("idle_old_source")),
                   claimed=_names(d.get("claimed")), pending=int(d.get("pending") or 0),
                   generation=int(d.get("generation") or 1), config=dict(d.get("config") or {}),
                   customize=bool(d.get("customize", True)), keep_network=bool(d.get("keep_network", False)),
                   held=str(held) if held else None, last_error=err if isinstance(err, Mapping) else None,
                   failures=int(d.get("failures") or 0), created_at=_opt_float(d.get("created_at")),
                   updated_at=_opt_float(d.get("updated_at")), owner=_opt_int(d.get("owner")), raw=d)


@dataclass(frozen=True)
class Claim:
    """A pool member handed to the caller (``POST /v1/pools/{name}/claim``); it is the caller's until released."""

    pool: str
    clone: Clone
    waited_ms: float = 0.0
    config_path: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The claimed clone's name (what exec, put_file, get_file and release take)."""
        return self.clone.name

    @classmethod
    def from_dict(cls, d: object) -> Claim:
        d = _obj(d, "claim")
        path = d.get("config_path")
        return cls(pool=str(_req(d, "pool", "claim")), clone=Clone.from_dict(_req(d, "clone", "claim")),
                   waited_ms=float(d.get("waited_ms") or 0.0), config_path=str(path) if path else None, raw=d)


@dataclass(frozen=True)
class Event:
    """One event of ``GET /v1/events``; pass its ``cursor`` as ``since`` to resume after it."""

    cursor: int
    id: str
    type: str
    timestamp: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def job_id(self) -> str | None:
        job = self.data.get("job_id")
        return str(job) if job is not None else None

    @property
    def state(self) -> str | None:
        """The job state a ``clone.*`` state event reports (None for other events)."""
        state = self.data.get("state")
        return str(state) if state is not None else None

    @classmethod
    def from_dict(cls, d: object) -> Event:
        d = _obj(d, "event")
        data = d.get("data")
        return cls(cursor=int(_req(d, "cursor", "event")), id=str(d.get("id", "")), type=str(_req(d, "type", "event")),
                   timestamp=str(d.get("timestamp", "")), data=data if isinstance(data, Mapping) else {}, raw=d)


@dataclass(frozen=True)
class Health:
    """``GET /v1/health``."""

    version: str
    libvirt_connected: bool
    active_jobs: int
    accepting: bool
    storage_backend: str = ""
    memory_backend: str = ""
    disk: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: object) -> Health:
        d = _obj(d, "health")
        disk = d.get("disk")
        return cls(version=str(d.get("version", "")), libvirt_connected=bool(d.get("libvirt_connected")),
                   active_jobs=int(d.get("active_jobs") or 0), accepting=bool(d.get("accepting")),
                   storage_backend=str(d.get("storage_backend", "")), memory_backend=str(d.get("memory_backend", "")),
                   disk=disk if isinstance(disk, Mapping) else None, raw=d)


@dataclass(frozen=True)
class ExecOutput:
    """A chunk of a command's output as it came (``stream``: "stdout" or "stderr")."""

    stream: str
    data: bytes


@dataclass(frozen=True)
class ExecExit:
    """How a command ended: the last item of ``exec_stream``."""

    exit_code: int
    signal: int | None = None
    duration_ms: float = 0.0
    pid: int | None = None


@dataclass(frozen=True)
class ExecResult:
    """A finished command (``exec``): its exit status and all of its output."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_ms: float
    signal: int | None = None
    pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.signal is None


@dataclass(frozen=True)
class FileInfo:
    """A file copied into or out of a clone: its path in the guest, size, SHA-256 (hex) and mode."""

    path: str
    size: int
    sha256: str
    mode: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: object) -> FileInfo:
        d = _obj(d, "file")
        mode = d.get("mode")
        return cls(path=str(_req(d, "path", "file")), size=int(_req(d, "bytes", "file")),
                   sha256=str(_req(d, "sha256", "file")).lower(), mode=str(mode) if mode is not None else None, raw=d)
