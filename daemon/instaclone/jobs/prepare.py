"""Prepare a persistent definition for instant clones, and show what changed. Pure: no I/O.

:func:`prepare_definition` adds what instaclone may add itself (shared file-backed RAM,
ACPI, a guest-agent channel, a VM generation ID) and lists what still stands
in the way (from :func:`.preflight.check`'s findings); :func:`diff` and
:func:`pending` tell the caller what changed and what waits for the next boot.
"""

from __future__ import annotations

import difflib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..hv import domxml
from .customize import AGENT_CHANNEL, has_agent_channel
from .preflight import (
    ERROR,
    FIX_AGENT,
    FIX_GENID,
    FIX_MEMORY,
    PREPARABLE,
    Facts,
    has_acpi,
    has_genid,
    has_numa,
    has_shared_file_ram,
    parse,
    xml_findings,
)


@dataclass(frozen=True)
class Preparation:
    """What :func:`prepare_definition` did to a definition."""

    xml: str  # the new definition; the input itself when nothing changed
    changed: tuple[str, ...]  # one line per change made
    not_changed: tuple[str, ...]  # what still stands in the way and prepare does not change, and why

    def to_dict(self) -> dict[str, Any]:
        return {"changed": list(self.changed), "not_changed": list(self.not_changed)}


def _insert_after(parent: ET.Element, el: ET.Element, after: Sequence[str]) -> None:
    """Insert ``el`` into ``parent`` after the last child named in ``after`` (else at the end)."""
    idx = None
    for i, child in enumerate(parent):
        if child.tag in after:
            idx = i
    if idx is None:
        parent.append(el)
    else:
        parent.insert(idx + 1, el)


def prepare_definition(xml: str) -> Preparation:
    """Add to the persistent definition ``xml`` what instant clones need and instaclone may add.

    Shared file-backed RAM (unless the guest has NUMA cells), ``<acpi/>``, a
    guest-agent channel and ``<genid/>``. Nothing else is touched; what
    still stands in the way (TPM, disks, firmware, NUMA) is listed in
    ``not_changed``. Idempotent: on a prepared definition nothing changes.
    """
    root = parse(xml)
    changed: list[str] = []
    if not has_numa(root) and not has_shared_file_ram(root):
        mb = root.find("memoryBacking")
        if mb is None:
            mb = ET.Element("memoryBacking")
            _insert_after(root, mb, ("name", "uuid", "genid", "title", "description", "metadata", "maxMemory",
                                     "memory", "currentMemory", "blkiotune", "memtune"))
        domxml.set_file_ram(mb, "shared")
        changed.append(f"cow_memory: shared file-backed RAM {FIX_MEMORY}")
    if not has_acpi(root):
        features = root.find("features")
        if features is None:
            features = ET.Element("features")
            _insert_after(root, features, ("os", "idmap", "bootloader", "bootloader_args", "sysinfo", "cpu",
                                           "vcpus", "vcpu", "iothreads", "cputune", "memoryBacking",
                                           "currentMemory", "memory"))
        features.insert(0, ET.Element("acpi"))
        changed.append("mac_reset: ACPI <features><acpi/></features>")
    if not has_agent_channel(root):
        devices = root.find("devices")
        if devices is None:
            devices = ET.SubElement(root, "devices")
        ch = ET.Element("channel", {"type": "unix"})
        ET.SubElement(ch, "target", {"type": "virtio", "name": AGENT_CHANNEL})
        _insert_after(devices, ch, ("disk", "controller", "interface", "serial", "console", "channel"))
        changed.append(f"guest_customization: guest agent channel {FIX_AGENT}")
    if not has_genid(root):
        _insert_after(root, ET.Element("genid"), ("name", "uuid"))
        changed.append(f"vm_generation_id: {FIX_GENID}")
    # Errors, and copy-on-write memory left out (NUMA): the rest is what prepare adds.
    remaining = [f for f in xml_findings(root, Facts())
                 if not f.ok and (f.level == ERROR or f.capability == "cow_memory")]
    not_changed = tuple(f"{f.capability}{' ' + f.device if f.device else ''}: {f.detail}" for f in remaining)
    new = ET.tostring(root, encoding="unicode") if changed else xml
    return Preparation(new, tuple(changed), not_changed)


def pretty(xml: str) -> str:
    """``xml`` in one canonical layout, so that a diff shows changes only, not formatting."""
    root = parse(xml)
    for node in root.iter():
        if node.text is not None and not node.text.strip():
            node.text = None
        node.tail = None
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def diff(old: str, new: str, name: str) -> str:
    """Unified diff of two definitions of ``name`` (canonical layout); "" if they are the same."""
    return "".join(difflib.unified_diff(pretty(old).splitlines(keepends=True), pretty(new).splitlines(keepends=True),
                                        fromfile=f"{name} (before)", tofile=f"{name} (after)"))


def pending(live_xml: str, inactive_xml: str) -> list[str]:
    """Capabilities the persistent definition has and the running domain does not yet."""
    live, persistent = parse(live_xml), parse(inactive_xml)
    return [cap for cap, has in PREPARABLE.items() if has(persistent) and not has(live)]
