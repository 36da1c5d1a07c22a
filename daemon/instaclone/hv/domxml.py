"""Build a clone's domain definition from its source's XML. Pure: no I/O."""

from __future__ import annotations

import io
import itertools
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
IC_NS = "https://instaclone.dev/xmlns/clone/1"

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("instaclone", IC_NS)


@dataclass
class CloneIdentity:
    name: str
    uuid: str
    macs: list[str]
    dir: Path  # the clone's own directory: logs, sockets, per-clone files
    disks: dict[str, Path]  # disk target -> the clone's delta
    source: str = ""
    job_id: str = ""
    extra_qemu_args: list[str] = field(default_factory=list)
    #: The clone's own copy of the source's UEFI variable store, if it has one.
    nvram: Path | None = None


def count_interfaces(xml: str) -> int:
    """How many <interface> devices the domain has."""
    return len(ET.fromstring(xml).findall("./devices/interface"))


def clone_xml(source_xml: str, ident: CloneIdentity) -> str:
    """Return the clone's domain XML.

    Everything host-visible that would collide with the source is replaced:
    name, UUID, MAC addresses, disk paths, and any file or socket path of
    serial ports, consoles and channels (moved into the clone's directory).
    Devices and their addresses are kept exactly, so that the source's
    migrated device state fits the clone. ValueError if the XML and
    ``ident`` do not fit (no <devices>, MAC count, <nvram> without a copy).
    """
    root = ET.fromstring(source_xml)
    _set_identity(root, ident)
    _set_nvram(root, ident)
    devices = root.find("devices")
    if devices is None:
        raise ValueError("domain XML has no <devices>")
    _set_disks(devices, ident)
    _set_macs(devices, ident)
    _relocate_paths(devices, ident)
    _mark(root, ident)
    # A clone of a clone inherits its source's one-shot arguments; drop them.
    _remove_incoming(root)
    _add_qemu_args(root, ident.extra_qemu_args)
    return ET.tostring(root, encoding="unicode")


def _set_identity(root: ET.Element, ident: CloneIdentity) -> None:
    root.attrib.pop("id", None)
    for tag in ("name", "uuid"):
        el = root.find(tag)
        if el is None:
            el = ET.SubElement(root, tag)
        el.text = ident.name if tag == "name" else ident.uuid

    # A VM generation ID must change on every clone; libvirt makes a fresh one
    # for an empty <genid/>.
    genid = root.find("genid")
    if genid is not None:
        genid.text = None

    # Drop dynamic security labels: they belong to the source's process.
    for seclabel in root.findall("seclabel"):
        if seclabel.get("type") == "dynamic":
            root.remove(seclabel)


def _set_nvram(root: ET.Element, ident: CloneIdentity) -> None:
    # The UEFI variable store is per VM: the clone's is its own copy. Never
    # keep the source's path, even by omission.
    nvram = root.find("./os/nvram")
    if nvram is None:
        return
    if ident.nvram is None:
        raise ValueError("the source has an <nvram> store but the clone has no copy of it")
    nsrc = nvram.find("source")
    if nsrc is not None:
        nsrc.set("file", str(ident.nvram))
    else:
        nvram.text = str(ident.nvram)


def _set_disks(devices: ET.Element, ident: CloneIdentity) -> None:
    for disk in devices.findall("disk"):
        tgt = disk.find("target")
        src = disk.find("source")
        if tgt is None or src is None:
            continue
        new = ident.disks.get(tgt.get("dev", ""))
        if new is None:
            continue
        src.set("file", str(new))
        for child in list(src):
            if child.tag == "seclabel":
                src.remove(child)
        drv = disk.find("driver")
        if drv is not None:
            drv.set("type", "qcow2")
        # libvirt re-reads the chain from the image headers.
        for bs in disk.findall("backingStore"):
            disk.remove(bs)


def _set_macs(devices: ET.Element, ident: CloneIdentity) -> None:
    ifaces = devices.findall("interface")
    if len(ifaces) != len(ident.macs):
        raise ValueError(f"{len(ifaces)} interfaces but {len(ident.macs)} MAC addresses")
    for iface, mac in zip(ifaces, ident.macs, strict=True):
        mac_el = iface.find("mac")
        if mac_el is None:
            mac_el = ET.SubElement(iface, "mac")
        mac_el.set("address", mac)
        target = iface.find("target")
        if target is not None and target.get("managed") != "no":
            iface.remove(target)


def _relocate_paths(devices: ET.Element, ident: CloneIdentity) -> None:
    """Serial, console, channel and graphics paths: into the clone's directory."""
    # One new path per old path, so the <console> that mirrors serial0 keeps
    # pointing at the same file.
    moved: dict[str, str] = {}

    def relocate(path: str) -> str:
        if path not in moved:
            base = Path(path).name
            if ident.source and ident.source in base:
                base = base.replace(ident.source, ident.name)
            moved[path] = str(ident.dir / base)
        return moved[path]

    for dev in list(devices.findall("serial")) + devices.findall("console") + devices.findall("channel"):
        for src in dev.findall("source"):
            if src.get("path"):
                src.set("path", relocate(src.get("path", "")))
        log = dev.find("log")
        if log is not None and log.get("file"):
            log.set("file", relocate(log.get("file", "")))
    for gfx in devices.findall("graphics"):
        if gfx.get("socket"):
            gfx.set("socket", relocate(gfx.get("socket", "")))
        for lis in gfx.findall("listen"):
            if lis.get("socket"):
                lis.set("socket", relocate(lis.get("socket", "")))
        if gfx.get("autoport") == "no" or gfx.get("port") not in (None, "-1"):
            gfx.set("autoport", "yes")
            gfx.attrib.pop("port", None)
        gfx.attrib.pop("websocket", None)


def _mark(root: ET.Element, ident: CloneIdentity) -> None:
    """Mark the domain as ours, with where it came from."""
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for old in metadata.findall(f"{{{IC_NS}}}clone"):
        metadata.remove(old)
    ET.SubElement(metadata, f"{{{IC_NS}}}clone", {"source": ident.source, "job": ident.job_id})


def _remove_incoming(root: ET.Element) -> None:
    """Drop a ``-incoming <uri>`` pair from the domain's QEMU command line."""
    cmdline = root.find(f"{{{QEMU_NS}}}commandline")
    if cmdline is None:
        return
    args = cmdline.findall(f"{{{QEMU_NS}}}arg")
    for a, b in itertools.pairwise(args):
        if a.get("value") == "-incoming":
            cmdline.remove(a)
            cmdline.remove(b)
    if not list(cmdline):
        root.remove(cmdline)


def _add_qemu_args(root: ET.Element, args: list[str]) -> None:
    if not args:
        return
    cmdline = root.find(f"{{{QEMU_NS}}}commandline")
    if cmdline is None:
        cmdline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", {"value": arg})


def strip_incoming(xml: str) -> str:
    """``xml`` without a ``-incoming <uri>`` pair in its QEMU command line."""
    root = ET.fromstring(xml)
    _remove_incoming(root)
    return ET.tostring(root, encoding="unicode")


def macs(xml: str) -> list[str]:
    """The MAC addresses of the domain's interfaces, in device order."""
    root = ET.fromstring(xml)
    return [m.get("address", "") for m in root.iterfind("./devices/interface/mac")]


def parse(xml: str) -> ET.Element:
    """Parse ``xml``, keeping its namespace prefixes (qemu:, metadata) when written back."""
    for _ev, (prefix, uri) in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
        # ElementTree refuses its own ns0-style prefixes; anything else is kept as written.
        if prefix and not re.fullmatch(r"ns\d+", prefix):
            ET.register_namespace(prefix, uri)
    return ET.fromstring(xml)


def file_ram(xml: str) -> tuple[bool, str | None]:
    """(file-backed, access mode) of a domain's memory backing."""
    root = ET.fromstring(xml)
    src = root.find("./memoryBacking/source")
    access = root.find("./memoryBacking/access")
    return (src is not None and src.get("type") == "file",
            access.get("mode") if access is not None else None)


def balloon(xml: str) -> tuple[bool, bool]:
    """(has a virtio memory balloon, with free page reporting on)."""
    el = ET.fromstring(xml).find("./devices/memballoon")
    if el is None or el.get("model", "virtio") not in ("virtio", "virtio-transitional", "virtio-non-transitional"):
        return False, False
    return True, el.get("freePageReporting") == "on"


def has_numa(xml: str) -> bool:
    """Whether the domain defines guest NUMA cells."""
    return ET.fromstring(xml).find("./cpu/numa") is not None


def insert_after(parent: ET.Element, el: ET.Element, after: Sequence[str]) -> None:
    """Insert ``el`` into ``parent`` after the last child named in ``after`` (else at the end)."""
    idx = None
    for i, child in enumerate(parent):
        if child.tag in after:
            idx = i
    if idx is None:
        parent.append(el)
    else:
        parent.insert(idx + 1, el)


def set_file_ram(memory_backing: ET.Element, access: str) -> None:
    """Make ``<memoryBacking>`` back RAM with a file, mapped ``access`` ("shared" or "private")."""
    for tag, attrs in (("source", {"type": "file"}), ("access", {"mode": access})):
        el = memory_backing.find(tag)
        if el is None:
            el = ET.SubElement(memory_backing, tag)
        el.attrib.clear()
        el.attrib.update(attrs)


def map_frozen_ram(xml: str, *, ram: Path, ramdir: Path, incoming: bool) -> str:
    """Make ``xml`` start on a private (copy-on-write) mapping of the frozen ``ram`` file.

    The libvirt hook reads the ``ram``/``ramdir`` attributes of our metadata
    and links the file where libvirt's QEMU will open it.
    """
    root = ET.fromstring(xml)
    mb = root.find("memoryBacking")
    if mb is None:
        mb = ET.SubElement(root, "memoryBacking")
    set_file_ram(mb, "private")
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    mark = metadata.find(f"{{{IC_NS}}}clone")
    if mark is None:
        mark = ET.SubElement(metadata, f"{{{IC_NS}}}clone")
    mark.set("ram", str(ram))
    mark.set("ramdir", str(ramdir))
    if incoming:
        _remove_incoming(root)
        _add_qemu_args(root, ["-incoming", "defer"])
    return ET.tostring(root, encoding="unicode")


def shadow_xml(xml: str, *, source: str) -> str:
    """A clone definition made a pre-copy shadow of ``source``: RAM in a fresh shared file, marked as a shadow.

    The shadow's RAM file receives the source's memory by migration and is
    then mapped by clones; ``role='shadow'`` tells it from a clone.
    """
    root = ET.fromstring(xml)
    mb = root.find("memoryBacking")
    if mb is None:
        mb = ET.SubElement(root, "memoryBacking")
    set_file_ram(mb, "shared")
    mark = root.find(f"./metadata/{{{IC_NS}}}clone")
    if mark is not None:
        mark.set("role", "shadow")
        mark.set("source", source)
    return ET.tostring(root, encoding="unicode")


def forget_frozen_ram(xml: str) -> str:
    """The persistent definition after start: no hook link, no ``-incoming``.

    A later cold boot of the domain gets fresh private RAM.
    """
    root = ET.fromstring(xml)
    _remove_incoming(root)
    mark = root.find(f"./metadata/{{{IC_NS}}}clone")
    if mark is not None:
        for key in ("ram", "ramdir"):
            mark.attrib.pop(key, None)
    return ET.tostring(root, encoding="unicode")


_MIB = {"b": 1 / (1 << 20), "bytes": 1 / (1 << 20), "kb": 1000 / (1 << 20), "k": 1 / 1024, "kib": 1 / 1024,
        "mb": 1e6 / (1 << 20), "m": 1, "mib": 1, "gb": 1e9 / (1 << 20), "g": 1024, "gib": 1024}


def memory_mib(xml: str) -> int:
    """The guest RAM a domain is defined with, in MiB (0 if the XML says none)."""
    el = ET.fromstring(xml).find("memory")
    if el is None or not (el.text or "").strip():
        return 0
    unit = (el.get("unit") or "KiB").lower()
    return int(float(el.text or 0) * _MIB.get(unit, 1 / 1024))
