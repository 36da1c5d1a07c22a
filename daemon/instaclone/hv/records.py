"""What the hypervisor layer hands out about a domain. Pure: no libvirt, no I/O."""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Outcome(enum.StrEnum):
    """What an operation on a domain given by identity (name and UUID) did."""

    DONE = "done"  # the domain with that UUID had that name: the operation ran
    GONE = "gone"  # no domain has that UUID or that name: nothing to do
    #: The UUID's domain is gone and another domain holds the name, or the UUID
    #: now goes by another name: nothing was touched.
    REPLACED = "replaced"


@dataclass(frozen=True)
class Disk:
    """A file-backed writable disk of a domain."""

    target: str  # e.g. "vda"
    path: Path  # the active (top) image
    format: str  # e.g. "qcow2"
    readonly: bool = False


@dataclass(frozen=True)
class MigrationInfo:
    """Where an outgoing (or incoming) migration stands, as QEMU's ``query-migrate`` says."""

    status: str  # none | setup | active | pre-switchover | device | completed | failed | cancelled | ...
    stats: dict[str, Any] = field(default_factory=dict)  # query-migrate's answer as it is
    #: time.monotonic() of the last look that found the source's vCPUs still
    #: running: the stun began after it (a bound, never an underestimate).
    last_running: float = 0.0


@dataclass(frozen=True)
class QemuFacts:
    """What a running domain's QEMU says of itself (QMP ``query-version`` and ``query-kvm``)."""

    version: tuple[int, int, int]  # (major, minor, micro)
    accel: str  # "kvm" or "tcg"

    def at_least(self, major: int, minor: int = 0) -> bool:
        return self.version[:2] >= (major, minor)

    @property
    def text(self) -> str:
        return ".".join(str(n) for n in self.version)

    @property
    def loses_tcg_writes(self) -> bool:
        """TCG on QEMU before 9.0: a migration can miss pages the guest writes while it runs.

        The 64-page fast path of the dirty-bitmap sync clears dirty bits
        without re-arming the vCPUs' TLB entries, so a later store through an
        entry already marked dirty no longer marks its page. QEMU 9.0 fixed it
        (commit 03bfc2188f); KVM tracks dirty pages in the kernel and never
        had it.
        """
        return self.accel == "tcg" and not self.at_least(9, 0)

    @property
    def file_migration(self) -> bool:
        """``add-fd`` + ``file:/dev/fdset/N`` migration URIs (QEMU 8.2 and later)."""
        return self.at_least(8, 2)

    @property
    def mapped_ram(self) -> bool:
        """The ``mapped-ram`` migration capability: RAM at fixed offsets of a seekable file (QEMU 9.0+)."""
        return self.at_least(9, 0)


@dataclass(frozen=True)
class DomainInfo:
    """One look at a domain: identity, state and definition."""

    name: str
    uuid: str
    state: str  # running | paused | shutoff | shutdown | crashed | pmsuspended | other
    reason: int
    xml: str  # migratable live XML (inactive XML if not running)
    disks: tuple[Disk, ...] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")


def file_disks(xml: str) -> tuple[Disk, ...]:
    """The file-backed writable disks of a domain XML (CD-ROMs and the like excluded)."""
    root = ET.fromstring(xml)
    out = []
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.get("type") != "file":
            continue
        src = disk.find("source")
        tgt = disk.find("target")
        drv = disk.find("driver")
        if src is None or tgt is None or not src.get("file"):
            continue
        out.append(
            Disk(
                target=tgt.get("dev", ""),
                path=Path(src.get("file", "")),
                format=(drv.get("type", "raw") if drv is not None else "raw"),
                readonly=disk.find("readonly") is not None,
            )
        )
    return tuple(out)
