"""The client's errors: one class per API error code, plus the transport's own.

Every error the daemon answers is ``{"error": {"code", "message", "step"?, ...}}``;
:func:`from_answer` turns it into the :class:`ApiError` subclass registered for
its ``code`` (an unknown code gives :class:`ApiError` itself, so a newer daemon
never breaks an older client). The class tree mirrors the daemon's
(``instaclone.errors``): ``except NotFound`` also catches ``SourceNotFound``.

Transport problems are not API errors: :class:`DaemonUnreachable` (no socket,
refused, the daemon went away mid-answer), :class:`PermissionDenied` (the
socket exists but this user may not connect) and :class:`ProtocolError` (an
answer that is not the API's JSON).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class ClientError(Exception):
    """Base of everything ``instaclone.client`` raises on purpose."""


class DaemonUnreachable(ClientError):
    """The daemon cannot be reached: no socket, connection refused, or it went away mid-answer."""

    def __init__(self, message: str, *, socket: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.socket = socket


class PermissionDenied(DaemonUnreachable):
    """The control socket exists but this user may not connect to it (EACCES); the message says how to fix it."""


class ProtocolError(ClientError):
    """The daemon's answer is not what the API promises (not JSON, a missing field, a broken stream)."""


class ApiError(ClientError):
    """An error the daemon answered: stable ``code``, the job ``step`` that failed if any, ``message``.

    ``status`` is the HTTP status (None for an error seen by the client itself,
    e.g. a checksum mismatch on a download); ``details`` holds the answer's
    other fields (e.g. ``libvirt_code``).
    """

    code: str = "internal_error"
    #: The code each subclass stands for (the instance's ``code`` is the answered one).
    CODE: ClassVar[str | None] = None

    def __init__(self, message: str, *, code: str | None = None, step: str | None = None,
                 status: int | None = None, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.CODE or "internal_error"
        self.step = step
        self.status = status
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        step = f" (step {self.step})" if self.step else ""
        return f"{self.message} [{self.code}]{step}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its keyword-only fields
        return (_rebuild, (type(self), self.message, self.code, self.step, self.status, self.details))


def _rebuild(cls: type[ApiError], message: str, code: str, step: str | None, status: int | None,
             details: dict[str, Any]) -> ApiError:
    return cls(message, code=code, step=step, status=status, details=details)


#: API error code -> its class.
CODES: dict[str, type[ApiError]] = {}


def _code(code: str) -> Any:
    """Class decorator: register ``cls`` for ``code``."""
    def register(cls: type[ApiError]) -> type[ApiError]:
        cls.CODE = code
        cls.code = code
        CODES[code] = cls
        return cls
    return register


# -- request errors: the caller can fix them ---------------------------------------


@_code("invalid_request")
class InvalidRequest(ApiError):
    """The request is malformed or a value is out of range (400)."""


@_code("body_too_large")
class BodyTooLarge(InvalidRequest):
    pass


@_code("invalid_name")
class InvalidName(InvalidRequest):
    pass


@_code("not_found")
class NotFound(ApiError):
    """No such job, clone, pool, webhook or route (404)."""


@_code("source_not_found")
class SourceNotFound(NotFound):
    pass


@_code("conflict")
class Conflict(ApiError):
    """The request contradicts the current state (409)."""


@_code("name_in_use")
class NameInUse(Conflict):
    pass


@_code("source_not_cloneable")
class SourceNotCloneable(Conflict):
    pass


@_code("forbidden")
class Forbidden(ApiError):
    """The daemon identified the caller (SO_PEERCRED) and refuses this call (403); :attr:`rule` names the
    rule that refused it (``access.write_groups``, ``access.sources``, ``pool owner``, ...)."""

    @property
    def rule(self) -> str | None:
        rule = self.details.get("rule")
        return rule if isinstance(rule, str) else None


@_code("shutting_down")
class ShuttingDown(ApiError):
    """The daemon is stopping; retry later (503)."""


@_code("not_supported")
class NotSupported(ApiError):
    pass


@_code("config_error")
class ConfigError(ApiError):
    pass


@_code("state_error")
class StateError(ApiError):
    pass


@_code("method_not_allowed")
class MethodNotAllowed(ApiError):
    pass


@_code("http_error")
class HttpError(ApiError):
    pass


@_code("internal_error")
class InternalError(ApiError):
    """A bug in the daemon (500); the daemon's log has the details."""


# -- errors of a job ---------------------------------------------------------------


@_code("step_failed")
class StepFailed(ApiError):
    pass


@_code("gc_aborted")
class GcAborted(ApiError):
    pass


@_code("stun_deadline_exceeded")
class StunDeadlineExceeded(ApiError):
    pass


@_code("customization_failed")
class CustomizationFailed(ApiError):
    pass


@_code("storage_error")
class StorageError(ApiError):
    pass


@_code("unsafe_image")
class UnsafeImage(StorageError):
    pass


@_code("memory_backend_error")
class MemoryBackendError(ApiError):
    pass


@_code("interrupted")
class Interrupted(ApiError):
    pass


@_code("pool_empty")
class PoolEmpty(ApiError):
    """No idle pool member became ready within the claim's wait (503); retry or wait longer."""


@_code("insufficient_capacity")
class InsufficientCapacity(ApiError):
    """The host cannot take the job now (507: memory or disk; 503: too many queued jobs); nothing was made.

    ``details`` has ``resource`` (memory, disk, queue), ``need``, ``free``, ``unit`` and, for disk, ``path``.
    """


# -- hypervisor ---------------------------------------------------------------------


@_code("libvirt_error")
class LibvirtError(ApiError):
    pass


@_code("libvirt_unavailable")
class LibvirtUnavailable(LibvirtError):
    pass


@_code("domain_not_found")
class DomainNotFound(LibvirtError):
    pass


@_code("domain_replaced")
class DomainReplaced(DomainNotFound):
    """The clone's domain is gone and another domain (another UUID) has its name now; it was left alone (409)."""


@_code("domain_exists")
class DomainExists(LibvirtError):
    pass


@_code("domain_state_invalid")
class DomainStateInvalid(LibvirtError):
    pass


@_code("libvirt_timeout")
class LibvirtTimeout(LibvirtError):
    pass


# -- commands and files inside clones -------------------------------------------------


@_code("agent_unavailable")
class AgentUnavailable(Conflict):
    """The clone has no guest agent channel, or its agent does not answer (409)."""


@_code("guest_file_not_found")
class GuestFileNotFound(NotFound):
    """The file (GET) or its directory (PUT) does not exist in the guest (404)."""


@_code("guest_file_error")
class GuestFileError(Conflict):
    """The guest refused the file operation: permission denied, is a directory... (409)."""


@_code("checksum_mismatch")
class ChecksumMismatch(ApiError):
    """The bytes received do not match their announced size or SHA-256 (422, or seen by the client)."""


@_code("exec_timeout")
class ExecTimeout(ApiError):
    """The command ran past its ``timeout_s`` and was killed."""


def error_for(code: str, message: str, *, step: str | None = None, status: int | None = None,
              details: Mapping[str, Any] | None = None) -> ApiError:
    """The typed error for ``code`` (ApiError itself for a code this client does not know)."""
    cls = CODES.get(code, ApiError)
    return cls(message, code=code, step=step, status=status, details=details)


def from_error_dict(err: Mapping[str, Any], *, status: int | None = None) -> ApiError:
    """The typed error of an API error object ``{"code", "message", "step"?, ...}``."""
    code = str(err.get("code") or "http_error")
    message = str(err.get("message") or (f"HTTP {status}" if status else code))
    step = err.get("step")
    details = {k: v for k, v in err.items() if k not in ("code", "message", "step")}
    return error_for(code, message, step=str(step) if step else None, status=status, details=details)


def from_answer(status: int, body: object) -> ApiError:
    """The typed error of an error answer (``status`` >= 400) whose JSON is ``body``."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return error_for("http_error", f"HTTP {status} without an error object", status=status)
    return from_error_dict(err, status=status)
