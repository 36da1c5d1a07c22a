"""Prepare a persistent definition for instant clones, and show what changed. Pure: no I/O.

:func:`prepare_definition` adds what instaclone may add itself (ACPI, a
guest-agent channel, a VM generation ID, and what each loaded backend adds
through ``Backend.prepare_xml``, e.g. filecow's shared file-backed RAM) and
lists what still stands in the way (from the preflight findings);
:func:`diff` and :func:`pending` tell the caller what changed and what waits
for the next boot.
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
    Facts,
    Part,
    has_acpi,
    has_genid,
    parse,
    prepared,
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



def prepare_definition(xml: str, backends: Sequence[Part] = ()) -> Preparation:
    """Add to the persistent definition ``xml`` what instant clones need and instaclone may add.

    What each of ``backends`` (the loaded ones) adds first (filecow: shared
    file-backed RAM, unless the guest has NUMA cells), then ``<acpi/>``, a
    guest-agent channel and ``<genid/>``. Nothing else is touched; what
    still stands in the way (TPM, disks, firmware, NUMA) is listed in
    ``not_changed``. Idempotent: on a prepared definition nothing changes.
    """
    changed: list[str] = []
    new = xml
    for part in backends:
        new, lines = part.prepare_xml(xml=new)
        changed += lines
    root = parse(new)
    if not has_acpi(root):
        features = root.find("features")
        if features is None:
            features = ET.Element("features")
            domxml.insert_after(root, features, ("os", "idmap", "bootloader", "bootloader_args", "sysinfo", "cpu",
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
        domxml.insert_after(devices, ch, ("disk", "controller", "interface", "serial", "console", "channel"))
        changed.append(f"guest_customization: guest agent channel {FIX_AGENT}")
    if not has_genid(root):
        domxml.insert_after(root, ET.Element("genid"), ("name", "uuid"))
        changed.append(f"vm_generation_id: {FIX_GENID}")
    out = ET.tostring(root, encoding="unicode") if changed else xml
    return Preparation(out, tuple(changed), _not_changed(out, backends))


def _not_changed(xml: str, backends: Sequence[Part]) -> tuple[str, ...]:
    """What still stands in the way of ``xml``: errors, and what prepare can give but left out (NUMA)."""
    root = parse(xml)
    missing = {cap for cap, has in prepared(root, backends).items() if not has}
    found = xml_findings(root, Facts()) + [f for p in backends for f in p.preflight(xml=xml)]
    return tuple(f"{f.capability}{' ' + f.device if f.device else ''}: {f.detail}" for f in found
                 if not f.ok and (f.level == ERROR or f.capability in missing))


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


def pending(live_xml: str, inactive_xml: str, backends: Sequence[Part] = ()) -> list[str]:
    """Capabilities the persistent definition has and the running domain does not yet."""
    live, persistent = prepared(parse(live_xml), backends), prepared(parse(inactive_xml), backends)
    return [cap for cap, has in persistent.items() if has and not live[cap]]
