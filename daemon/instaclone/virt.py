"""Moved to :mod:`instaclone.hv`; this name stays until every import uses the new one.

``Hypervisor`` here is the libvirt class (``LibvirtHypervisor``), as before;
type annotations should use the Protocol :class:`instaclone.hv.Hypervisor`.
"""

from .hv.hypervisor import LibvirtHypervisor
from .hv.records import Disk, DomainInfo, file_disks
from .hv.translate import translate

Hypervisor = LibvirtHypervisor

__all__ = ["Disk", "DomainInfo", "Hypervisor", "LibvirtHypervisor", "file_disks", "translate"]
