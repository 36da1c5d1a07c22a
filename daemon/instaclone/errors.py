"""The project's error tree.

Every error the daemon raises on purpose is an :class:`InstacloneError`. Each
class carries a stable ``code`` (part of the API), the HTTP status it maps to,
and whether retrying the same request later may succeed. The step that failed,
when there is one, travels with the error so that a job's record can say
which transition broke and why.
"""

from __future__ import annotations

from typing import Any, ClassVar


class InstacloneError(Exception):
    """Base of every error the daemon raises deliberately."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.step = step

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.step:
            out["step"] = self.step
        return out


# -- request errors: the caller can fix them ---------------------------------


class InvalidRequest(InstacloneError):
    code = "invalid_request"
    http_status = 400


class BodyTooLarge(InvalidRequest):
    code = "body_too_large"
    http_status = 413


class InvalidName(InvalidRequest):
    code = "invalid_name"


class NotFound(InstacloneError):
    code = "not_found"
    http_status = 404


class SourceNotFound(NotFound):
    code = "source_not_found"


class Conflict(InstacloneError):
    code = "conflict"
    http_status = 409


class NameInUse(Conflict):
    code = "name_in_use"


class SourceNotCloneable(Conflict):
    """The source exists but is in a state we cannot clone from (e.g. shut off)."""

    code = "source_not_cloneable"


class Forbidden(InstacloneError):
    """The caller (identified by SO_PEERCRED) may not do this; ``rule`` names the rule that refused it
    (e.g. ``access.write_groups``, ``access.sources``, ``pool owner``)."""

    code = "forbidden"
    http_status = 403

    def __init__(self, message: str, *, rule: str, step: str | None = None) -> None:
        super().__init__(message, step=step)
        self.rule = rule

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "rule": self.rule}


class ShuttingDown(InstacloneError):
    code = "shutting_down"
    http_status = 503
    retryable = True


class InsufficientCapacity(InstacloneError):
    """The host cannot take the job now: not enough memory or disk (507), or too busy (503).

    ``resource`` names what is short (``memory``, ``disk``, ``queue``), ``need`` and
    ``free`` say how much the job needs and how much there is, in ``unit``;
    ``path`` the filesystem's directory for ``disk``. Nothing of the job was made.
    """

    code = "insufficient_capacity"
    http_status = 507
    retryable = True

    def __init__(self, message: str, *, resource: str, need: float, free: float, unit: str,
                 path: str | None = None) -> None:
        super().__init__(message)
        self.resource, self.need, self.free, self.unit, self.path = resource, need, free, unit, path

    def to_dict(self) -> dict[str, Any]:
        out = {**super().to_dict(), "resource": self.resource, "need": self.need, "free": self.free,
               "unit": self.unit}
        if self.path is not None:
            out["path"] = self.path
        return out


class HostBusy(InsufficientCapacity):
    """As :class:`InsufficientCapacity`, for a count (queued jobs) rather than a quantity: 503."""

    http_status = 503


class NotSupported(InstacloneError):
    """A backend was asked for an optional operation it does not offer."""

    code = "not_supported"
    http_status = 400


class ConfigError(InstacloneError):
    code = "config_error"


class StateError(InstacloneError):
    """A transition was attempted from a state that does not allow it."""

    code = "state_error"

    def __init__(self, state: object, required: object) -> None:
        super().__init__(f"job is in state {state}, which does not allow {required}")
        self.state = state
        self.required = required


# -- errors while running a job ------------------------------------------------


class StepFailed(InstacloneError):
    """A clone step failed; ``__cause__`` holds the original error."""

    code = "step_failed"


class GcAborted(InstacloneError):
    """Garbage collection could not tell which images are in use; it deleted nothing."""

    code = "gc_aborted"
    http_status = 503
    retryable = True


class StunDeadlineExceeded(InstacloneError):
    code = "stun_deadline_exceeded"
    retryable = True


class CustomizationFailed(InstacloneError):
    """The guest-side identity reset, network renewal or the user's script failed in a clone."""

    code = "customization_failed"


class StorageError(InstacloneError):
    code = "storage_error"


class UnsafeImage(StorageError):
    """A disk image instaclone will not open: its format or a backing file it names is not a plain local file.

    A json: or protocol backing name, a missing backing format, a format other
    than raw or qcow2, a loop, or a chain past its bound (never probed).
    """

    code = "unsafe_image"
    http_status = 409


class MemoryBackendError(InstacloneError):
    code = "memory_backend_error"


class Interrupted(InstacloneError):
    """The daemon stopped (or crashed) while the job ran; it was rolled back."""

    code = "interrupted"
    retryable = True


# -- hypervisor errors (translated from libvirtError in instaclone.hv) ----------


class LibvirtError(InstacloneError):
    code = "libvirt_error"

    def __init__(self, message: str, *, libvirt_code: int | None = None, step: str | None = None) -> None:
        super().__init__(message, step=step)
        self.libvirt_code = libvirt_code

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.libvirt_code is not None:
            out["libvirt_code"] = self.libvirt_code
        return out


class LibvirtUnavailable(LibvirtError):
    code = "libvirt_unavailable"
    http_status = 503
    retryable = True


class DomainNotFound(LibvirtError):
    code = "domain_not_found"
    http_status = 404


class DomainReplaced(DomainNotFound):
    """The domain instaclone made (its recorded UUID) is gone, and its name now belongs to another domain.

    A kind of DomainNotFound, so that whatever treats "gone" as "nothing to
    do" leaves the other domain alone; a user's request naming it is refused.
    """

    code = "domain_replaced"
    http_status = 409


class DomainExists(LibvirtError):
    code = "domain_exists"
    http_status = 409


class DomainStateInvalid(LibvirtError):
    """libvirt refused because the domain is in the wrong state."""

    code = "domain_state_invalid"
    http_status = 409


class LibvirtTimeout(LibvirtError):
    code = "libvirt_timeout"
    retryable = True


# -- commands and files inside a clone (through its guest agent) ----------------


class AgentUnavailable(Conflict):
    """The clone has no guest agent channel, or its agent does not answer."""

    code = "agent_unavailable"


class GuestFileNotFound(NotFound):
    """The file (or, when writing, its directory) does not exist in the guest."""

    code = "guest_file_not_found"


class GuestFileError(Conflict):
    """The guest refused a file operation (permission denied, is a directory, disk full, ...)."""

    code = "guest_file_error"


class ChecksumMismatch(InstacloneError):
    """A file's bytes are not those announced or sent (its sha256 or size differ)."""

    code = "checksum_mismatch"
    http_status = 422


class ExecTimeout(InstacloneError):
    """A command in a guest ran past its timeout and was killed (the exec stream's last line)."""

    code = "exec_timeout"
    http_status = 504
