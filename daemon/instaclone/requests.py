"""The request contract: what a caller may ask of the engine, as typed records, and the limits they obey.

A record is a frozen value that is valid by construction: its
``__post_init__`` applies the rules below (names, ranges, sizes; pure, no
I/O) and raises :class:`~instaclone.errors.InvalidRequest` (or
``InvalidName``) with the engine's wording. The API's pydantic models
(``api/models.py``) state the same limits in the OpenAPI document, answer a
bad request field by field, and then build the record once
(``model.to_request(...)``); the pool keeper, recovery, the tests and
``bench/`` build records directly. The engine takes records and checks only
what needs the world: that the source exists and can be cloned, that names
are free, that there is room, what the daemon's configuration allows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import identity
from .errors import InvalidRequest

#: The longest TTL a clone may be given (a year).
MAX_TTL_S = 365 * 24 * 3600.0
#: The largest guest config (key/value strings), as JSON.
MAX_GUEST_CONFIG_BYTES = 16 * 1024
#: Largest user customization script accepted.
MAX_SCRIPT_BYTES = 64 * 1024
#: The largest pool.
MAX_POOL_SIZE = 1000
#: The longest a claim may wait for a member.
MAX_CLAIM_WAIT_S = 3600.0


# -- rules ------------------------------------------------------------------------------------


def validate_bool(name: str, value: object) -> bool:
    """A request's flag: true or false, nothing else; raises InvalidRequest."""
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false")
    return value


def validate_ttl(ttl_s: object) -> float | None:
    """A clone's time to live in seconds (None: no expiry); raises InvalidRequest."""
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 1 <= ttl_s <= MAX_TTL_S:
        raise InvalidRequest(f"ttl_s must be a number of seconds between 1 and {MAX_TTL_S:g}")
    return float(ttl_s)


def validate_guest_config(config: object) -> dict[str, str]:
    """Key/value data for the guest (like VMware's InstantCloneSpec config); None is {}; raises InvalidRequest."""
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in config.items()):
        raise InvalidRequest("config must be an object of string keys and string values")
    if len(json.dumps(config)) > MAX_GUEST_CONFIG_BYTES:
        raise InvalidRequest(f"config is larger than {MAX_GUEST_CONFIG_BYTES} bytes")
    return dict(config)


def validate_script(script: object) -> str | None:
    """A user customization script: a non-empty string of at most MAX_SCRIPT_BYTES, no NUL; raises
    InvalidRequest."""
    if script is None:
        return None
    if not isinstance(script, str) or not script.strip():
        raise InvalidRequest("script must be a non-empty string (a shell script run in each clone)")
    if len(script.encode()) > MAX_SCRIPT_BYTES:
        raise InvalidRequest(f"script is larger than {MAX_SCRIPT_BYTES} bytes")
    if "\x00" in script:
        raise InvalidRequest("script must not contain NUL bytes")
    return script


def validate_pool_size(size: object) -> int:
    """A pool's size: an integer in 0..MAX_POOL_SIZE; raises InvalidRequest."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_POOL_SIZE:
        raise InvalidRequest(f"size must be an integer between 0 and {MAX_POOL_SIZE}")
    return size


def validate_claim_wait(wait_s: object) -> float | None:
    """How long a claim waits (None: pools.claim_wait_s); raises InvalidRequest."""
    if wait_s is None:
        return None
    if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not 0 <= wait_s <= MAX_CLAIM_WAIT_S:
        raise InvalidRequest(f"wait_s must be a number of seconds between 0 and {MAX_CLAIM_WAIT_S:g}")
    return float(wait_s)


def validate_count(count: object) -> int:
    """How many clones: an integer of at least 1 (the upper bound is the daemon's clone.max_count)."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidRequest("count must be an integer")
    if count < 1:
        raise InvalidRequest(f"count must be at least 1, got {count}")
    return count


def _set(record: object, name: str, value: object) -> None:
    """Store a normalized value on a frozen record (from its __post_init__ only)."""
    object.__setattr__(record, name, value)


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CloneRequest:
    """Clone ``source`` as ``name`` (``count`` > 1: ``name-1`` .. ``name-N``): ``POST /v1/jobs``.

    ``keep_ssh_host_keys`` None: clone.keep_ssh_host_keys. ``owner``: the uid the job and its clones
    belong to (None: the daemon's own). ``pool``/``pool_generation``: set by the pool keeper only.
    """

    source: str
    name: str
    count: int = 1
    keep_network: bool = False
    customize: bool = True
    config: Mapping[str, str] | None = None
    keep_ssh_host_keys: bool | None = None
    script: str | None = None
    ttl_s: float | None = None
    owner: int | None = None
    pool: str | None = None
    pool_generation: int = 0

    def __post_init__(self) -> None:
        identity.validate_name(self.source, what="source name")
        for flag in ("keep_network", "customize"):
            validate_bool(flag, getattr(self, flag))
        if self.keep_ssh_host_keys is not None:
            validate_bool("keep_ssh_host_keys", self.keep_ssh_host_keys)
        _set(self, "config", validate_guest_config(self.config))
        _set(self, "ttl_s", validate_ttl(self.ttl_s))
        validate_script(self.script)
        identity.clone_names(identity.validate_name(self.name), validate_count(self.count))

    @property
    def names(self) -> list[str]:
        """The clones' names."""
        return identity.clone_names(self.name, self.count)


@dataclass(frozen=True, slots=True)
class PoolRequest:
    """Create pool ``name`` of ``size`` ready clones of ``source`` (``POST /v1/pools``); ``freeze``: the
    source first. ``owner``: the uid the pool belongs to (None: the daemon's)."""

    name: str
    source: str
    size: int
    config: Mapping[str, str] | None = None
    customize: bool = True
    keep_network: bool = False
    freeze: bool = False
    owner: int | None = None

    def __post_init__(self) -> None:
        identity.validate_name(self.name, what="pool name")
        identity.validate_name(self.source, what="source name")
        validate_pool_size(self.size)
        _set(self, "config", validate_guest_config(self.config))
        for flag in ("customize", "keep_network", "freeze"):
            validate_bool(flag, getattr(self, flag))


@dataclass(frozen=True, slots=True)
class PoolUpdate:
    """Change pool ``name`` (``PATCH /v1/pools/{name}``): move it to ``source`` (an image push), then
    resize it to ``size``; a field left None is left alone."""

    name: str
    size: int | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        identity.validate_name(self.name, what="pool name")
        if self.size is not None:
            validate_pool_size(self.size)
        if self.source is not None:
            identity.validate_name(self.source, what="source name")


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Hand out a ready member of ``pool`` (``POST /v1/pools/{name}/claim``).

    ``config``: written over the pool's; ``wait_s`` None: pools.claim_wait_s; ``claimed_by``: who
    asked (recorded with the member); ``owner``: the uid the member becomes (None: the daemon's).
    """

    pool: str
    ttl_s: float | None = None
    config: Mapping[str, str] | None = None
    wait_s: float | None = None
    claimed_by: Mapping[str, Any] | None = None
    owner: int | None = None

    def __post_init__(self) -> None:
        identity.validate_name(self.pool, what="pool name")
        _set(self, "ttl_s", validate_ttl(self.ttl_s))
        _set(self, "config", validate_guest_config(self.config))
        _set(self, "wait_s", validate_claim_wait(self.wait_s))


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """Run ``argv`` in clone ``clone`` (``POST /v1/clones/{name}/exec``); past ``timeout_s`` it is killed."""

    clone: str
    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    timeout_s: float = 300.0
    stdin: bytes | None = None

    def __post_init__(self) -> None:
        identity.validate_name(self.clone)
        _set(self, "argv", tuple(self.argv))
        if not self.argv or not self.argv[0]:
            raise InvalidRequest("argv must name a program (argv[0] not empty)")
        if not self.timeout_s > 0:
            raise InvalidRequest("timeout_s must be a positive number of seconds")


@dataclass(frozen=True, slots=True)
class PutFileRequest:
    """Write a file at ``path`` in clone ``clone`` with octal ``mode`` (``PUT /v1/clones/{name}/files``);
    ``sha256``: what the body must hash to (None: not checked against a header)."""

    clone: str
    path: str
    mode: str = "0644"
    sha256: str | None = None

    def __post_init__(self) -> None:
        identity.validate_name(self.clone)
        _absolute(self.path)
        if not (self.mode.isdigit() and set(self.mode) <= set("01234567") and len(self.mode) <= 4):
            raise InvalidRequest(f"mode {self.mode!r} is not an octal file mode")
        _set(self, "mode", self.mode.zfill(4))


@dataclass(frozen=True, slots=True)
class GetFileRequest:
    """Read the file at ``path`` of clone ``clone`` (``GET /v1/clones/{name}/files``)."""

    clone: str
    path: str

    def __post_init__(self) -> None:
        identity.validate_name(self.clone)
        _absolute(self.path)


def _absolute(path: str) -> None:
    if not path.startswith("/") or "\x00" in path:
        raise InvalidRequest(f"path {path!r} must be absolute, without NUL")


@dataclass(frozen=True, slots=True)
class FreezeRequest:
    """Freeze (or unfreeze) ``source`` as a template (``POST /v1/sources/{name}/freeze``, ``unfreeze``)."""

    source: str

    def __post_init__(self) -> None:
        identity.validate_name(self.source, what="source name")


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """The preflight report of ``source`` (``GET /v1/sources/{name}/check``)."""

    source: str

    def __post_init__(self) -> None:
        identity.validate_name(self.source, what="source name")


@dataclass(frozen=True, slots=True)
class PrepareRequest:
    """Write what instant clones need into ``source``'s definition (``POST /v1/sources/{name}/prepare``);
    ``dry_run``: only say what would change."""

    source: str
    dry_run: bool = False

    def __post_init__(self) -> None:
        identity.validate_name(self.source, what="source name")
        validate_bool("dry_run", self.dry_run)


__all__ = [
    "MAX_CLAIM_WAIT_S", "MAX_GUEST_CONFIG_BYTES", "MAX_POOL_SIZE", "MAX_SCRIPT_BYTES", "MAX_TTL_S",
    "CheckRequest", "ClaimRequest", "CloneRequest", "ExecRequest", "FreezeRequest", "GetFileRequest",
    "PoolRequest", "PoolUpdate", "PrepareRequest", "PutFileRequest",
    "validate_bool", "validate_claim_wait", "validate_count", "validate_guest_config", "validate_pool_size",
    "validate_script", "validate_ttl",
]
