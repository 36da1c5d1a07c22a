"""What the API needs of the engine, as ``typing.Protocol``s: the one place that says so.

The engine facade (``instaclone.jobs.engine.Engine``) satisfies it; mypy
checks the fit where the daemon hands the engine to
:func:`~instaclone.api.make_app`. Its types are the core's only (the request
records of :mod:`instaclone.requests`, :mod:`instaclone.model`'s records,
the config): the API imports neither the jobs layer nor the hypervisor layer
(the import contract ``api-thin`` in pyproject.toml says so).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

from ..config import Config
from ..model import CloneRecord, JobRecord
from ..requests import (
    CheckRequest,
    ClaimRequest,
    CloneRequest,
    ExecRequest,
    FreezeRequest,
    GetFileRequest,
    PoolRequest,
    PoolUpdate,
    PrepareRequest,
    PutFileRequest,
)


class PoolsView(Protocol):
    """The pool keeper as the API drives it (``instaclone.jobs.pools.PoolKeeper``)."""

    async def create(self, req: PoolRequest) -> dict[str, Any]:
        """Define a pool; raises Conflict (it exists), SourceNotFound, SourceNotCloneable, ..."""

    async def update(self, req: PoolUpdate) -> dict[str, Any] | None:
        """Move a pool to a new source and/or resize it; raises NotFound, SourceNotFound, ..."""

    async def delete(self, name: str) -> dict[str, Any]: ...

    async def show(self, name: str) -> dict[str, Any]: ...

    async def list_all(self) -> list[dict[str, Any]]: ...

    async def claim(self, req: ClaimRequest) -> dict[str, Any]:
        """Hand out a ready member; raises NotFound, PoolEmpty, InvalidRequest (its config not written)."""

    async def release(self, clone: str) -> dict[str, Any]: ...


class GcView(Protocol):
    """Garbage collection (``instaclone.jobs.gc.GarbageCollector``)."""

    async def collect(self, *, dry_run: bool) -> dict[str, Any]:
        """Delete (or list) the files under instaclone's directories nothing uses; raises GcAborted."""

    async def disk_usage(self) -> dict[str, Any]:
        """Bytes under instaclone's directories, per source."""


class GuestProcessView(Protocol):
    """A command running in a clone (``instaclone.jobs.guestexec.GuestProcess``)."""

    @property
    def pid(self) -> int: ...

    def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """started, stdout/stderr (``data`` bytes), then exit or error."""

    async def close(self) -> None:
        """Kill it if it still runs; release its files."""


class GuestFileView(Protocol):
    """A file being read from a clone (``instaclone.jobs.guestexec.GuestFileReader``)."""

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    def chunks(self) -> AsyncGenerator[bytes, None]: ...

    async def close(self) -> None: ...


class EngineView(Protocol):
    """The engine as the API drives it: requests in as :mod:`instaclone.requests` records, answers out as
    core records or the dicts the API renders."""

    @property
    def pools(self) -> PoolsView: ...

    @property
    def config(self) -> Config: ...

    @property
    def storage_backend(self) -> str:
        """The storage backend's name."""

    @property
    def memory_backend(self) -> str:
        """The preferred memory backend's name."""

    @property
    def active_jobs(self) -> int: ...

    @property
    def accepting(self) -> bool: ...

    async def libvirt_connected(self) -> bool:
        """Whether libvirt answers (reconnecting if it was lost)."""

    async def clone_state(self, name: str) -> str:
        """The state of a clone's domain ("missing" if there is none or libvirt fails)."""

    async def submit(self, req: CloneRequest) -> JobRecord:
        """Queue a clone request; raises NameInUse, SourceNotFound, SourceNotCloneable, InsufficientCapacity, ..."""

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Return when the job is terminal or after ``timeout_s``."""

    async def destroy_clone(self, name: str) -> CloneRecord: ...

    async def freeze(self, req: FreezeRequest) -> dict[str, Any]: ...

    async def unfreeze(self, req: FreezeRequest) -> dict[str, Any]: ...

    async def check_source(self, req: CheckRequest) -> dict[str, Any]:
        """A source's preflight report (the answer's ``check``); raises SourceNotFound."""

    async def prepare_source(self, req: PrepareRequest) -> dict[str, Any]:
        """Fix a source's definition for instant clones (the answer's ``prepare``); raises SourceNotFound."""

    async def guest_exec(self, req: ExecRequest) -> GuestProcessView:
        """Start a command in a clone; raises NotFound, AgentUnavailable, DomainStateInvalid, GuestFileError."""

    async def put_guest_file(self, req: PutFileRequest, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Write a file in a clone; raises GuestFileNotFound, GuestFileError, ChecksumMismatch, ..."""

    async def open_guest_file(self, req: GetFileRequest) -> GuestFileView:
        """A clone's file to read; raises GuestFileNotFound, GuestFileError, ..."""
