"""What the API needs of the engine, as a ``typing.Protocol``.

The engine facade (``instaclone.jobs.engine.Engine``) satisfies it; the API
imports nothing of the jobs layer, and mypy checks the fit where the daemon
hands the engine to :func:`~instaclone.api.make_app`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from ..config import Config
from ..hv.records import DomainInfo
from ..model import CloneRecord, Finding, JobRecord


class HypervisorView(Protocol):
    """The hypervisor calls the API makes (health, clone states, check, prepare)."""

    async def ensure_connected(self) -> bool: ...

    async def state(self, name: str) -> str: ...

    async def lookup(self, name: str) -> DomainInfo: ...

    async def inactive_xml(self, name: str) -> str: ...

    async def define(self, xml: str) -> str: ...

    async def agent(self, name: str, command: str, arguments: dict[str, Any] | None = None,
                    *, timeout_s: int = 10) -> Any: ...


class BackendView(Protocol):
    """What preflight and prepare ask of every loaded backend (``instaclone.jobs.preflight.Part``)."""

    @property
    def name(self) -> str: ...

    def preflight(self, *, xml: str) -> list[Finding]: ...

    def prepared(self, *, xml: str) -> dict[str, bool]: ...

    def prepare_xml(self, *, xml: str) -> tuple[str, list[str]]: ...


class StorageView(BackendView, Protocol):
    async def chain_depth(self, *, path: Path, fmt: str) -> int: ...


class MemoryView(BackendView, Protocol):
    def can_serve(self, source: DomainInfo) -> str | None: ...


class PoolsView(Protocol):
    """The pool keeper as the API drives it (``instaclone.jobs.pools.PoolKeeper``)."""

    async def create(self, *, name: object, source: object, size: object, config: object = None,
                     customize: object = True, keep_network: object = False,
                     freeze: object = False, owner: int | None = None) -> dict[str, Any]: ...

    async def resize(self, name: str, size: object) -> dict[str, Any]: ...

    async def update_source(self, name: str, source: object) -> dict[str, Any]: ...

    async def delete(self, name: str) -> dict[str, Any]: ...

    async def show(self, name: str) -> dict[str, Any]: ...

    async def list_all(self) -> list[dict[str, Any]]: ...

    async def claim(self, name: str, *, ttl_s: object = None, config: object = None,
                    wait_s: object = None, claimed_by: dict[str, Any] | None = None,
                    owner: int | None = None) -> dict[str, Any]: ...

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
    """The engine as the API drives it."""

    @property
    def pools(self) -> PoolsView: ...

    @property
    def config(self) -> Config: ...

    @property
    def virt(self) -> HypervisorView: ...

    @property
    def storage(self) -> StorageView: ...

    @property
    def memory(self) -> MemoryView: ...

    @property
    def memories(self) -> Sequence[MemoryView]: ...

    @property
    def active_jobs(self) -> int: ...

    @property
    def accepting(self) -> bool: ...

    async def submit(self, *, source: object, name: object, count: object = 1, keep_network: object = False,
                     customize: object = True, config: object = None, keep_ssh_host_keys: object = None,
                     script: object = None, ttl_s: object = None, owner: int | None = None) -> JobRecord:
        """Validate and queue a clone request; raises InvalidRequest, NameInUse, SourceNotFound, ..."""

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Return when the job is terminal or after ``timeout_s``."""

    async def destroy_clone(self, name: str) -> CloneRecord: ...

    async def freeze(self, name: object) -> dict[str, Any]: ...

    async def unfreeze(self, name: object) -> dict[str, Any]: ...

    async def guest_exec(self, name: str, *, argv: list[str], env: dict[str, str] | None = None,
                         timeout_s: float = 300.0, stdin: bytes | None = None) -> GuestProcessView:
        """Start a command in a clone; raises NotFound, AgentUnavailable, DomainStateInvalid, GuestFileError."""

    async def put_guest_file(self, name: str, *, path: str, mode: str, chunks: AsyncIterator[bytes],
                             sha256: str | None = None) -> dict[str, Any]:
        """Write a file in a clone; raises GuestFileNotFound, GuestFileError, ChecksumMismatch, ..."""

    async def open_guest_file(self, name: str, *, path: str) -> GuestFileView:
        """A clone's file to read; raises GuestFileNotFound, GuestFileError, ..."""

    def source_lock(self, name: str) -> AbstractAsyncContextManager[Any]:
        """The lock jobs of ``name`` hold; held while the API rewrites its definition."""
