"""The hypervisor layer (docs/development/layers.md): the only code that talks to libvirt.

``Hypervisor`` is the Protocol the rest of instaclone programs against;
``LibvirtHypervisor`` implements it. ``DomainInfo``, ``Disk``,
``file_disks`` and the pure XML modules (:mod:`.domxml`, :mod:`.vmstate`)
import no libvirt; ``LibvirtHypervisor`` is loaded on first use, so
``from instaclone.hv import Hypervisor, DomainInfo`` keeps libvirt out.
Layering: this package imports only instaclone's core modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .protocol import Hypervisor
from .records import Disk, DomainInfo, MigrationInfo, Outcome, QemuFacts, file_disks

if TYPE_CHECKING:
    from .hypervisor import LibvirtHypervisor

__all__ = [
    "Disk",
    "DomainInfo",
    "Hypervisor",
    "LibvirtHypervisor",
    "MigrationInfo",
    "Outcome",
    "QemuFacts",
    "file_disks",
]


def __getattr__(name: str) -> Any:
    if name == "LibvirtHypervisor":
        from .hypervisor import LibvirtHypervisor

        return LibvirtHypervisor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
