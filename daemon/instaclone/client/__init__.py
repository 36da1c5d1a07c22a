"""``instaclone.client``: the Python client library of instacloned's control API.

Needs only the standard library and aiohttp (installable without the daemon's
libvirt, structlog...)::

    from instaclone.client import Client

    async with Client() as c:  # $INSTACLONE_SOCKET or /run/instaclone/control.sock
        job = await c.clone("tmpl", name="ci", wait=True)

:class:`SyncClient` is the same, blocking. Results are frozen dataclasses
(:mod:`.models`); each API error code is an :class:`ApiError` subclass
(:mod:`.errors`).
"""

from __future__ import annotations

from ._async import ClaimHandle, Client
from ._sync import SyncClaim, SyncClient
from ._transport import DEFAULT_SOCKET, resolve_socket
from .errors import (
    CODES,
    AgentUnavailable,
    ApiError,
    BodyTooLarge,
    ChecksumMismatch,
    ClientError,
    ConfigError,
    Conflict,
    CustomizationFailed,
    DaemonUnreachable,
    DomainExists,
    DomainNotFound,
    DomainReplaced,
    DomainStateInvalid,
    ExecTimeout,
    Forbidden,
    GcAborted,
    GuestFileError,
    GuestFileNotFound,
    HttpError,
    InsufficientCapacity,
    InternalError,
    Interrupted,
    InvalidName,
    InvalidRequest,
    LibvirtError,
    LibvirtTimeout,
    LibvirtUnavailable,
    MemoryBackendError,
    MethodNotAllowed,
    NameInUse,
    NotFound,
    NotSupported,
    PermissionDenied,
    PoolEmpty,
    ProtocolError,
    ShuttingDown,
    SourceNotCloneable,
    SourceNotFound,
    StateError,
    StepFailed,
    StorageError,
    StunDeadlineExceeded,
    UnsafeImage,
)
from .models import (
    Claim,
    Clone,
    Event,
    ExecExit,
    ExecOutput,
    ExecResult,
    FileInfo,
    Health,
    Job,
    Pool,
    StateChange,
)

__all__ = [
    "CODES", "DEFAULT_SOCKET", "AgentUnavailable", "ApiError", "BodyTooLarge", "ChecksumMismatch", "Claim",
    "ClaimHandle", "Client", "ClientError", "Clone", "ConfigError", "Conflict", "CustomizationFailed",
    "DaemonUnreachable", "DomainExists", "DomainNotFound", "DomainReplaced", "DomainStateInvalid", "Event",
    "ExecExit", "ExecOutput", "ExecResult", "ExecTimeout", "FileInfo", "Forbidden", "GcAborted", "GuestFileError",
    "GuestFileNotFound", "Health", "HttpError", "InsufficientCapacity", "InternalError", "Interrupted",
    "InvalidName", "InvalidRequest", "Job", "LibvirtError", "LibvirtTimeout", "LibvirtUnavailable",
    "MemoryBackendError", "MethodNotAllowed", "NameInUse", "NotFound", "NotSupported", "PermissionDenied", "Pool",
    "PoolEmpty", "ProtocolError", "ShuttingDown", "SourceNotCloneable", "SourceNotFound", "StateChange",
    "StateError", "StepFailed", "StorageError", "StunDeadlineExceeded", "SyncClaim", "SyncClient", "UnsafeImage",
    "resolve_socket",
]
