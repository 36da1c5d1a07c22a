"""Everything a storage or memory backend may import from instaclone (docs/development/backends.md).

A storage backend makes delta disks; a memory backend links a clone's memory
to its source's. Both are ABCs with async, keyword-only methods and class-level
capability flags; both are found by name through the entry-point groups
``instaclone.storage`` and ``instaclone.memory`` (see ``instaclone.backends``).
A backend owns its parts: its config section (``settings_class``, read from
``[storage.<name>]`` / ``[memory.<name>]``), its preflight findings
(:meth:`Backend.preflight`) and its changes to domain XML
(:meth:`Backend.prepare_xml` for a source's definition,
:meth:`MemoryBackend.adjust_xml` for a clone's).

The undo contract (docs/design/ledger.md): a backend records each
resource with ``record(kind, ref)`` *before* it creates it, and removes what it
recorded in :meth:`Backend.undo`, which both a live rollback and crash
recovery call, in the same order. A backend never removes on its own what a
failed call of its own created: the ledger does, through ``undo``.
"""

from __future__ import annotations

import abc
import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from . import safefs
from .config import Config
from .errors import (
    ConfigError,
    DomainNotFound,
    InstacloneError,
    LibvirtError,
    MemoryBackendError,
    NotSupported,
    StorageError,
    UnsafeImage,
)
from .hv import Disk, DomainInfo, Hypervisor, MigrationInfo, Outcome, QemuFacts, domxml
from .identity import new_mac, new_uuid
from .log import get as get_logger
from .model import CORE, ERROR, OK, WARN, Finding, MemoryImage, Resource, ResourceKind
from .settings import setting

__all__ = [
    "CORE",
    "ERROR",
    "OK",
    "WARN",
    "Backend",
    "CloneTarget",
    "Config",
    "ConfigError",
    "Disk",
    "DomainInfo",
    "DomainNotFound",
    "Finding",
    "Hypervisor",
    "InstacloneError",
    "LibvirtError",
    "MemoryBackend",
    "MemoryBackendError",
    "MemoryImage",
    "MigrationInfo",
    "NotSupported",
    "Outcome",
    "QemuFacts",
    "Recorder",
    "Resource",
    "ResourceKind",
    "StorageBackend",
    "StorageError",
    "StunContext",
    "UnsafeImage",
    "domxml",
    "get_logger",
    "new_mac",
    "new_uuid",
    "remove_path",
    "safefs",
    "setting",
]

_S = TypeVar("_S")


class Recorder(Protocol):
    """Records a resource in the ledger *before* it is created; returns its id.

    A domain is recorded with the UUID it is about to be defined with: its
    undo then removes that domain only, never one defined under its name since.
    """

    async def __call__(self, kind: ResourceKind, ref: str, *, clone: str | None = None,
                       uuid: str | None = None) -> int: ...


@dataclass
class StunContext:
    """What the steps of one job share: the source as it was at stun."""

    job_id: str
    source: DomainInfo
    job_dir: Path  # scratch space for this job, removed when the job ends
    frozen: bool = False  # a registered template: never stunned, never resumed
    paused_by_owner: bool = False  # paused, not by us: not resumed by us either
    tops: dict[str, Path] = field(default_factory=dict)  # disk target -> top image at stun
    memory: MemoryImage | None = None  # the memory backend's image of the source at stun
    memory_cached: bool = False  # the image belongs to a frozen source: not released by the job
    source_ipv4: list[str] | None = None  # guest interfaces with IPv4 at stun; None: unknown
    source_rsa_host_key: bool | None = None  # whether the source has an RSA SSH host key; None: unknown
    nvram: Path | None = None  # the UEFI variable store clones copy (the source's, or its copy at freeze)
    scratch: dict[str, Any] = field(default_factory=dict)  # a memory backend's notes between its calls
    #: time.monotonic() when the storage backend was asked for the source's new deltas (0: not yet)
    source_delta_started: float = 0.0

    @property
    def image(self) -> MemoryImage:
        """The captured image; raises if MemoryLinked has not run."""
        if self.memory is None:
            raise MemoryBackendError(f"job {self.job_id}: no memory image captured yet")
        return self.memory


@dataclass
class CloneTarget:
    """One clone being made."""

    name: str
    uuid: str
    dir: Path
    disks: dict[str, Path] = field(default_factory=dict)  # disk target -> clone delta
    macs: list[str] = field(default_factory=list)  # one per interface, in device order
    identity: dict[str, Any] = field(default_factory=dict)  # what the guest-side reset did
    nvram: Path | None = None  # the clone's own copy of the source's UEFI variable store
    #: Milliseconds per phase of its start; a memory backend may add its own (e.g. qemu_start, state_load).
    phases_ms: dict[str, float] = field(default_factory=dict)


async def remove_path(path: Path) -> None:
    """Remove a file or a directory tree; absent is fine. Runs in a thread."""

    def do() -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    await asyncio.to_thread(do)


class Backend(abc.ABC):
    """What storage and memory backends share: a name, a config section, a start-up check, preflight and undo."""

    name: ClassVar[str]
    #: "storage" or "memory": the first part of the backend's config section's name.
    kind: ClassVar[str]
    #: The backend's config section ``[<kind>.<name>]``: a frozen dataclass whose fields are made with
    #: :func:`setting` (default, bounds, help). None: the backend has no settings.
    settings_class: ClassVar[type[Any] | None] = None

    def __init__(self, *, config: Config, virt: Hypervisor) -> None:
        self.config = config
        self.virt = virt

    @classmethod
    def section(cls) -> str:
        """The name of the backend's config section, e.g. ``memory.filecow``."""
        return f"{cls.kind}.{cls.name}"

    def settings(self, cls: type[_S]) -> _S:
        """The backend's section as the config file has it (validated at load), or ``cls()``'s defaults."""
        return self.config.section(self.section(), cls)

    def preflight(self, *, xml: str) -> list[Finding]:
        """What this backend says about cloning the domain ``xml`` describes (its live XML when it runs).

        Pure: no I/O. A memory backend judges as if it were the only one: a
        finding of level ``error`` says it cannot serve the source (the core
        lowers it to ``warn`` when a later backend of ``clone.memory_backends``
        serves it, and says which). Default: nothing to say.
        """
        return []

    def prepared(self, *, xml: str) -> dict[str, bool]:
        """Per capability :meth:`prepare_xml` gives a definition: does ``xml`` have it? Default: none.

        Tells a change that waits for the next boot (the persistent definition
        has it, the running domain not yet).
        """
        return {}

    def prepare_xml(self, *, xml: str) -> tuple[str, list[str]]:
        """Change a source's persistent definition ``xml`` so that this backend can serve it.

        Returns the new XML and one line per change (``capability: what``);
        only what is safe to change in a definition, nothing when it is there
        already (idempotent). Default: unchanged. Pure: no I/O.
        """
        return xml, []

    async def check(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Verify at daemon start that the backend can work here; raise ConfigError if not."""

    async def undo(self, *, resource: Resource, source: str) -> None:
        """Remove ``resource``, which this backend recorded (for a job of ``source``).

        Called by a live rollback and by crash recovery alike; the resource
        may or may not have been created. Absent is not an error; anything
        else raises (the ledger then keeps the record and reports it).
        """
        if resource.kind is ResourceKind.FILE:
            await remove_path(Path(resource.ref))
            return
        raise NotSupported(f"backend {self.name!r} cannot undo a {resource.kind.value} resource")


class StorageBackend(Backend):
    """Makes the delta disks of a clone operation."""

    kind = "storage"
    supports_running_source: ClassVar[bool] = True
    supports_consolidation: ClassVar[bool] = False

    async def prepare_source_delta(self, *, ctx: StunContext, record: Recorder) -> None:
        """Before the stun, while the source runs: make its new deltas, ready to attach (optional).

        Whatever can be made outside the stun shortens it. The source's
        chain does not change until the stun (the source's lock is held), so
        the deltas may name its current tops as their backing files. Each is
        recorded as ``SOURCE_DELTA`` first; one that is never attached is
        removed by :meth:`undo`. A no-op by default.
        """

    @abc.abstractmethod
    async def create_source_delta(self, *, ctx: StunContext, record: Recorder) -> dict[str, Path]:
        """Give the stunned source new, empty deltas; return each disk's top image at stun.

        The returned images are read-only from now on: the source writes to the
        new deltas. Each new delta is recorded as ``SOURCE_DELTA`` first (by
        :meth:`prepare_source_delta`, if it made them).
        """

    @abc.abstractmethod
    async def create_clone_delta(
        self, *, ctx: StunContext, clone: CloneTarget, record: Recorder
    ) -> dict[str, Path]:
        """Create the clone's empty deltas, backed by ``ctx.tops``; return target -> path."""

    @abc.abstractmethod
    async def remove(self, *, paths: list[Path]) -> None:
        """Delete deltas this backend created. Missing files are not an error."""

    async def undo(self, *, resource: Resource, source: str) -> None:
        """A source delta goes only if no image of the source's chains is it.

        Once a snapshot took effect the delta is the source's disk, or, after
        a later snapshot (an unfreeze tried twice), a backing image of it.
        """
        if resource.kind is not ResourceKind.SOURCE_DELTA:
            await super().undo(resource=resource, source=source)
            return
        if resource.ref not in await self._images_in_use(source):
            await self.remove(paths=[Path(resource.ref)])

    async def _images_in_use(self, source: str) -> set[str]:
        """Every image of every disk chain of ``source`` (none if it is gone); LibvirtError if unknown."""
        try:
            info = await self.virt.lookup(source)
        except DomainNotFound:
            return set()
        in_use = {str(d.path) for d in info.disks}
        if info.active:
            for disk in info.disks:
                in_use.update(str(p) for p in await self.virt.backing_chain(source, disk.target))
        return in_use

    async def chain_depth(self, *, path: Path, fmt: str) -> int:
        """Number of images in the chain whose top is ``path``, read as ``fmt``.

        ``fmt`` is the format libvirt recorded for the disk (``Disk.format``) or
        the one the backend created: an image is never probed (a raw disk's
        guest can write any header into it).
        """
        raise NotSupported(f"storage backend {self.name!r} cannot inspect chains")

    async def chain(self, *, path: Path, fmt: str) -> list[Path]:
        """The images of the chain whose top is ``path`` (read as ``fmt``), top first, as the files say.

        The domain may be off. Lower layers are read with the backing format
        each layer's header names; a raw layer has none. An image whose chain
        cannot be read safely raises UnsafeImage.

        Garbage collection deletes an image only if no chain read here (or
        QEMU's, for a running domain) names it; a backend that cannot tell
        raises NotSupported, and then nothing is collected.
        """
        raise NotSupported(f"storage backend {self.name!r} cannot inspect chains")

    async def consolidate(self, *, domain: str, target: str) -> None:
        raise NotSupported(f"storage backend {self.name!r} cannot consolidate chains")


class MemoryBackend(Backend):
    """Gives a clone the memory (and device state) of its source at stun."""

    kind = "memory"
    supports_running_source: ClassVar[bool] = True
    supports_frozen_source: ClassVar[bool] = True
    shares_memory: ClassVar[bool] = False  # True: clone RAM is copy-on-write of the source's
    #: True: a stun's memory image goes in libvirt's memory_backing_dir (else the job's directory):
    #: admission counts it against that filesystem (as memory, when it is a tmpfs).
    image_in_memory_backing_dir: ClassVar[bool] = False

    def can_serve(self, source: DomainInfo) -> str | None:
        """None if this backend can clone ``source``, else the reason it cannot."""
        return None

    async def stun(self, *, ctx: StunContext, record: Recorder) -> float:
        """Stop the running source's vCPUs; returns ``time.monotonic()`` at (or before) the stop.

        The pipeline has recorded the stun already: if this raises, the
        source is resumed. The default pauses it; a backend may first copy
        memory while the source runs (pre-copy) and stop it only at the end.
        """
        t0 = time.monotonic()
        await self.virt.suspend(ctx.source.name)
        return t0

    async def switchover(self, *, ctx: StunContext) -> bool:
        """Inside the stun, once the source's new deltas exist: end the stun early if this backend can.

        True if the source runs again (its memory at stun is kept elsewhere);
        the default keeps it stopped until :meth:`detach_source`.
        """
        return False

    @abc.abstractmethod
    async def capture(self, *, ctx: StunContext, record: Recorder) -> MemoryImage:
        """Capture the stunned source's memory/device state once; returns the image.

        Every file it makes is recorded first; on failure the ledger removes them.
        """

    @abc.abstractmethod
    def qemu_args(self, *, ctx: StunContext, clone: CloneTarget) -> list[str]:
        """Extra QEMU arguments the clone's domain needs to receive the state."""

    def adjust_xml(self, *, ctx: StunContext, clone: CloneTarget, xml: str) -> str:
        """Change the clone's domain XML (e.g. memory backing); default: unchanged."""
        return xml

    @abc.abstractmethod
    async def start_clone(self, *, ctx: StunContext, clone: CloneTarget) -> None:
        """Start the defined clone domain paused and load the captured state into it."""

    async def detach_source(self, *, ctx: StunContext, resume: bool) -> None:
        """End the stun: let the source go on (``resume``) without touching the captured image.

        The default resumes it in place; a backend whose clones share the
        source's live memory must first move the source off it.
        """
        if resume:
            await self.virt.resume(ctx.source.name)

    @abc.abstractmethod
    async def release(self, *, image: MemoryImage) -> None:
        """Drop what ``capture`` made once no clone needs it any more."""
