"""What ``filecow`` says about a source's definition and changes in it: its preflight findings and prepare.

Pure: no I/O. filecow needs the source's RAM in a shared file, in one RAM
backend (no guest NUMA cells), and no balloon that punches holes into the
RAM image clones share. The findings are judged as if filecow were the only
memory backend; the core says which backend clones use instead.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from instaclone.plugin_api import ERROR, OK, WARN, Finding, domxml

FIX_MEMORY = "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
CAPABILITY = "cow_memory"
#: Where libvirt's schema puts <memoryBacking> among the domain's children: after these.
_BEFORE_MEMORY_BACKING = ("name", "uuid", "genid", "title", "description", "metadata", "maxMemory", "memory",
                          "currentMemory", "blkiotune", "memtune")


def has_shared_file_ram(root: ET.Element) -> bool:
    src = root.find("./memoryBacking/source")
    access = root.find("./memoryBacking/access")
    return (src is not None and src.get("type") == "file"
            and access is not None and access.get("mode") == "shared")


def has_numa(root: ET.Element) -> bool:
    return root.find("./cpu/numa") is not None


def memory_finding(root: ET.Element) -> Finding:
    """``cow_memory``: is the RAM a shared file in one backend? error if not (filecow cannot serve it)."""
    numa = has_numa(root)
    if has_shared_file_ram(root) and not numa:
        return Finding(CAPABILITY, True, OK, "RAM is a shared file: filecow clones map it copy-on-write")
    if numa:
        why = ("guest NUMA cells (<cpu><numa>): filecow supports a single RAM backend only; prepare does not "
               "change the guest's topology")
        fix = "remove <numa>...</numa> (every <cell>) from <cpu>" + (
            "" if has_shared_file_ram(root) else f", and add {FIX_MEMORY}")
    else:
        src = root.find("./memoryBacking/source")
        access = root.find("./memoryBacking/access")
        now = ("anonymous RAM" if src is None or src.get("type") in (None, "anonymous")
               else f"RAM source type {src.get('type')!r}")
        now += "" if access is None else f", access mode {access.get('mode')!r}"
        why = f"{now}: filecow needs RAM in a shared file"
        fix = FIX_MEMORY
        if root.find("./memoryBacking/hugepages") is not None:
            fix = f"{FIX_MEMORY} (on a hugetlbfs memory_backing_dir in qemu.conf, keeping <hugepages/>)"
    return Finding(CAPABILITY, False, ERROR, why, fix)


def balloon_findings(xml: str) -> list[Finding]:
    """A virtio balloon in a filecow clone discards pages of the RAM image its siblings share (QEMU 7.2)."""
    virtio, reporting = domxml.balloon(xml)
    if not virtio:
        return []
    fix = "<memballoon model='none'/> (or no free page reporting, and never inflate a clone's balloon)"
    if reporting:
        return [Finding("balloon", False, ERROR, "virtio balloon with free page reporting: a filecow clone's "
                        "reported free pages would be punched out of the RAM image its siblings share (QEMU "
                        "7.2 discards file-backed RAM with fallocate, even when mapped privately), so filecow "
                        "refuses this source; on the source alone it keeps freed pages out of every copy", fix)]
    return [Finding("balloon", True, WARN, "virtio balloon: do not inflate a filecow clone's balloon (virsh setmem "
                    "--live): QEMU 7.2 discards the pages it gets back by punching holes in the RAM image the "
                    "clone's siblings share, and they read zeros there", fix)]


def findings(xml: str) -> list[Finding]:
    """filecow's preflight findings of the domain described by ``xml``."""
    return [memory_finding(domxml.parse(xml)), *balloon_findings(xml)]


def prepared(xml: str) -> dict[str, bool]:
    """Does ``xml`` have what :func:`prepare` gives (shared file-backed RAM in one backend)?"""
    root = domxml.parse(xml)
    return {CAPABILITY: has_shared_file_ram(root) and not has_numa(root)}


def prepare(xml: str) -> tuple[str, list[str]]:
    """Back the RAM of the definition ``xml`` with a shared file, unless it has guest NUMA cells or has it."""
    root = domxml.parse(xml)
    if has_numa(root) or has_shared_file_ram(root):
        return xml, []
    mb = root.find("memoryBacking")
    if mb is None:
        mb = ET.Element("memoryBacking")
        domxml.insert_after(root, mb, _BEFORE_MEMORY_BACKING)
    domxml.set_file_ram(mb, "shared")
    return ET.tostring(root, encoding="unicode"), [f"{CAPABILITY}: shared file-backed RAM {FIX_MEMORY}"]

