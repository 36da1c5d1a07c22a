"""Moved to :mod:`instaclone.hv.domxml`; this name stays until every import uses the new one."""

from .hv.domxml import (
    IC_NS,
    QEMU_NS,
    CloneIdentity,
    clone_xml,
    count_interfaces,
    file_ram,
    forget_frozen_ram,
    has_numa,
    macs,
    map_frozen_ram,
    set_file_ram,
    strip_incoming,
)

__all__ = ["IC_NS", "QEMU_NS", "CloneIdentity", "clone_xml", "count_interfaces", "file_ram", "forget_frozen_ram",
           "has_numa", "macs", "map_frozen_ram", "set_file_ram", "strip_incoming"]
