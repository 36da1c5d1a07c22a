"""Backend contracts (DESIGN.md §3) and the registry that finds them.

A storage backend makes delta disks; a memory backend links a clone's memory
to its source's. Both are ABCs with async, keyword-only methods and class-level
capability flags. Built-ins and third-party backends alike are found through
the entry-point groups ``instaclone.storage`` and ``instaclone.memory``;
an unknown name fails at daemon start.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from .config import Config
from .errors import ConfigError, NotSupportedError
from .virt import DomainInfo, Hypervisor


class Recorder(Protocol):
    """Journals a resource *before* it is created (DESIGN.md invariant 2)."""

    async def __call__(self, kind: str, ref: str, *, clone: str | None = None) -> int: ...


@dataclass
class StunContext:
    """What the steps of one job share: the source as it was at stun."""

    job_id: str
    source: DomainInfo
    job_dir: Path  # scratch space for this job, removed when the job ends
    frozen: bool = False  # a registered template: never stunned, never resumed
    paused_by_owner: bool = False  # paused, not by us: not resumed by us either
    tops: dict[str, Path] = field(default_factory=dict)  # disk target -> top image at stun
    memory: Any = None  # the memory backend's image of the source at stun
    memory_cached: bool = False  # the image belongs to a frozen source: not released by the job
    source_ipv4: list[str] | None = None  # guest interfaces with IPv4 at stun; None: unknown
    nvram: Path | None = None  # the UEFI variable store clones copy (the source's, or its copy at freeze)


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


class StorageBackend(abc.ABC):
    """Makes the delta disks of a clone operation."""

    name: ClassVar[str]
    supports_running_source: ClassVar[bool] = True
    supports_consolidation: ClassVar[bool] = False

    def __init__(self, *, config: Config, virt: Hypervisor) -> None:
        self.config = config
        self.virt = virt

    async def check(self) -> None:
        """Verify at daemon start that the backend can work here; raise ConfigError if not."""

    @abc.abstractmethod
    async def create_source_delta(self, *, ctx: StunContext, record: Recorder) -> dict[str, Path]:
        """Give the stunned source new, empty deltas; return each disk's top image at stun.

        The returned images are read-only from now on: the source writes to the
        new deltas.
        """

    @abc.abstractmethod
    async def create_clone_delta(
        self, *, ctx: StunContext, clone: CloneTarget, record: Recorder
    ) -> dict[str, Path]:
        """Create the clone's empty deltas, backed by ``ctx.tops``; return target -> path."""

    @abc.abstractmethod
    async def remove(self, *, paths: list[Path]) -> None:
        """Delete deltas this backend created. Missing files are not an error."""

    async def chain_depth(self, *, path: Path) -> int:
        """Number of images in the chain whose top is ``path``."""
        raise NotSupportedError(f"storage backend {self.name!r} cannot inspect chains")

    async def consolidate(self, *, domain: str, target: str) -> None:
        raise NotSupportedError(f"storage backend {self.name!r} cannot consolidate chains")


class MemoryBackend(abc.ABC):
    """Gives a clone the memory (and device state) of its source at stun."""

    name: ClassVar[str]
    supports_running_source: ClassVar[bool] = True
    supports_frozen_source: ClassVar[bool] = True
    shares_memory: ClassVar[bool] = False  # True: clone RAM is copy-on-write of the source's

    def __init__(self, *, config: Config, virt: Hypervisor) -> None:
        self.config = config
        self.virt = virt

    async def check(self) -> None:
        """Verify at daemon start that the backend can work here; raise ConfigError if not."""

    def can_serve(self, source: DomainInfo) -> str | None:
        """None if this backend can clone ``source``, else the reason it cannot."""
        return None

    @abc.abstractmethod
    async def capture(self, *, ctx: StunContext, record: Recorder) -> Any:
        """Capture the stunned source's memory/device state once; returns an image handle."""

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
    async def release(self, *, ctx: StunContext) -> None:
        """Drop what ``capture`` made once no clone needs it any more."""


B = TypeVar("B", StorageBackend, MemoryBackend)


def _load(group: str, name: str, base: type[B]) -> type[B]:
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ConfigError(f"unknown {group.split('.')[-1]} backend {name!r} (installed: {known})")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"entry point {group}:{name} is not a {base.__name__}")
    return cls


def storage_backend(name: str) -> type[StorageBackend]:
    return _load("instaclone.storage", name, StorageBackend)


def memory_backend(name: str) -> type[MemoryBackend]:
    return _load("instaclone.memory", name, MemoryBackend)
