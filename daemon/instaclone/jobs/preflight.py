"""Preflight: can this domain be instant-cloned, and what must change? Pure: no I/O.

:func:`check` reads a domain XML (plus the few live facts the caller
gathered: state, agent ping, chain depths, the loaded backends, the filesystem
of libvirt's memory backing directory) and says, per
capability, whether the source has it and exactly what to change. Each
loaded backend adds its own findings (``Backend.preflight``); the memory
backends' are merged here: a backend that cannot serve the source is an
error only if no later backend of ``clone.memory_backends`` can. Per-VM
state (firmware, NVRAM, disks, host devices) is judged by
:mod:`instaclone.hv.vmstate`, the code the clone itself refuses sources by.
:func:`.prepare.prepare_definition` makes the changes instaclone can make itself in a
persistent definition and lists those it will not make.

Levels: ``error`` means a clone of the source with the default options is
refused or fails (the report's ``cloneable`` is false); ``warn`` means
clones work but without that capability (or only with an option such as
``--keep-network``); ``ok`` means nothing to do.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..hv import domxml, hostfs, vmstate
from ..model import ERROR, OK, WARN, Finding
from .customize import AGENT_CHANNEL, has_agent_channel

__all__ = ["ERROR", "OK", "WARN", "Facts", "Finding", "Part", "Report", "check", "parse"]

#: Disk image formats the file-based storage backends stack deltas on.
DISK_FORMATS = ("qcow2", "raw")

FIX_ACPI = "<features><acpi/></features>"
FIX_AGENT = f"<channel type='unix'><target type='virtio' name='{AGENT_CHANNEL}'/></channel>"
FIX_GENID = "<genid/>"

NEXT_BOOT = ("pending: the persistent definition has it, applies at next boot "
             "(a full shutdown and start of the domain; a reboot inside the guest is not enough)")

_ACTIVE = ("running", "paused")


class Part(Protocol):
    """A loaded backend as preflight and prepare ask it (``instaclone.plugin_api.Backend``)."""

    @property
    def name(self) -> str: ...

    def preflight(self, *, xml: str) -> list[Finding]: ...

    def prepared(self, *, xml: str) -> dict[str, bool]: ...

    def prepare_xml(self, *, xml: str) -> tuple[str, list[str]]: ...


@dataclass(frozen=True)
class Facts:
    """What the XML alone cannot say; gathered by the caller (API handler)."""

    state: str = "shutoff"  # running | paused | shutoff | ...
    frozen: bool = False  # registered by ``instaclone freeze``
    clone_of: str | None = None  # the source, when the domain is a clone made by instaclone
    #: Did the guest agent answer ``guest-ping``? None: not asked (not running, or no channel).
    agent_ping: bool | None = None
    agent_error: str | None = None
    #: Disk target -> images in its backing chain, or why the depth is unknown.
    chain_depths: Mapping[str, int | str] = field(default_factory=dict)
    max_chain_depth: int = 16
    #: The configured memory backends in order: (name, None if it can serve the source, else why not).
    memory_backends: Sequence[tuple[str, str | None]] = ()
    storage_backend: str = "qcow2"
    #: The loaded backends (storage and memory), each asked for its findings; the memory backends'
    #: are merged in the order of ``memory_backends``.
    backends: Sequence[Part] = ()
    #: The persistent definition of a running domain (to tell changes pending until next boot).
    inactive_xml: str | None = None
    #: libvirt's memory backing directory and its filesystem; None: not checked (libvirt not on this host).
    ram_dir: hostfs.RamDir | None = None


@dataclass(frozen=True)
class Report:
    source: str
    state: str
    frozen: bool
    clone_of: str | None
    checks: tuple[Finding, ...]

    @property
    def cloneable(self) -> bool:
        return not any(f.level == ERROR for f in self.checks)

    @property
    def pending(self) -> list[str]:
        return [f.capability for f in self.checks if f.pending]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "state": self.state, "frozen": self.frozen, "clone_of": self.clone_of,
                "cloneable": self.cloneable, "pending": self.pending,
                "checks": [f.to_dict() for f in self.checks]}


# -- XML helpers ------------------------------------------------------------------------


#: Parse a domain XML keeping its namespace prefixes.
parse = domxml.parse


def _short(el: ET.Element) -> str:
    """``el`` as one line of XML with its children (for messages)."""
    el = _copy(el)
    for node in el.iter():
        node.tail = None
        if node.text is not None and not node.text.strip():
            node.text = None
    return ET.tostring(el, encoding="unicode").replace('"', "'").replace(" />", "/>")


def _copy(el: ET.Element) -> ET.Element:
    return ET.fromstring(ET.tostring(el, encoding="unicode"))


def has_acpi(root: ET.Element) -> bool:
    return root.find("./features/acpi") is not None


def has_genid(root: ET.Element) -> bool:
    return root.find("genid") is not None


# -- the capabilities -------------------------------------------------------------------


def _state(root: ET.Element, facts: Facts) -> Finding:
    if facts.frozen:
        return Finding("state", True, OK, f"{facts.state}, frozen by instaclone: clones need no stun and share "
                       "one memory image")
    if facts.state == "running":
        return Finding("state", True, OK, "running: each clone stuns (pauses) it briefly")
    if facts.state == "paused":
        return Finding("state", True, OK, "paused (not by instaclone): cloned without a stun and left paused; "
                       "to clone it repeatedly, freeze it (instaclone freeze)")
    return Finding("state", False, ERROR, f"{facts.state}: a clone continues a running guest; start the domain "
                   "first (virsh start)")


def _mac_reset(root: ET.Element, facts: Facts) -> Finding:
    cap = "mac_reset"
    nics = root.findall("./devices/interface")
    if not nics:
        return Finding(cap, True, OK, "no network interfaces: no MAC to reset")
    if has_acpi(root):
        return Finding(cap, True, OK, f"ACPI present: each clone's {len(nics)} NIC(s) are hot-unplugged and "
                       "plugged back with a new MAC")
    return Finding(cap, False, ERROR, "no <acpi/> in <features>: the guest cannot release a hot-unplugged NIC, "
                   "so a clone fails at NIC replacement (clone with --keep-network to skip it, keeping the "
                   "source's MAC inside the guest)", FIX_ACPI)


def _customization(root: ET.Element, facts: Facts) -> Finding:
    cap = "guest_customization"
    if not has_agent_channel(root):
        return Finding(cap, False, WARN, f"no guest agent channel {AGENT_CHANNEL}: clones get the MAC replug only "
                       "(customized: false): no clock, hostname, machine-id or DHCP reset", FIX_AGENT)
    if facts.agent_ping is True:
        return Finding(cap, True, OK, "guest agent channel present and the agent answers guest-ping")
    if facts.agent_ping is False:
        return Finding(cap, False, ERROR, "guest agent channel present but no agent answers guest-ping"
                       + (f" ({facts.agent_error})" if facts.agent_error else "")
                       + ": install and start qemu-guest-agent in the guest; until then a clone fails with "
                       "customization_failed (clone with --no-customize to skip it)")
    why = "not running" if facts.state != "running" else "not asked"
    return Finding(cap, True, OK, f"guest agent channel present (agent not pinged: {why}); customization also "
                   "needs an agent that answers in the guest")


def _genid(root: ET.Element, facts: Facts) -> Finding:
    cap = "vm_generation_id"
    note = ("the guest kernel needs a VMGENID driver to notice (and reseed its random state); Debian's cloud "
            "kernel has none")
    if has_genid(root):
        return Finding(cap, True, OK, f"<genid/> present: each clone gets a new generation ID; {note}")
    return Finding(cap, False, WARN, f"no <genid/>: the guest cannot tell it was cloned; {note}", FIX_GENID)


def _firmware(root: ET.Element, items: Sequence[vmstate.StateItem]) -> Finding:
    """The firmware and UEFI variable store, as :mod:`.vmstate` decides (so that check and clone agree)."""
    cap = "firmware"
    decided = {i.device: i for i in items}
    code, nvram = decided.get("firmware code"), decided.get("nvram")
    if code is not None and code.decision == "refuse":
        return Finding(cap, False, ERROR, f"the UEFI firmware image {code.path} is writable "
                       "(<loader readonly='no'>): source and clones would write the same file",
                       "<loader readonly='yes' type='pflash'>CODE.fd</loader><nvram template='VARS.fd'/>")
    if nvram is not None and nvram.decision == "refuse":
        nvram_el = root.find("./os/nvram")
        kind = nvram_el.get("type") if nvram_el is not None else None
        return Finding(cap, False, ERROR, f"the UEFI variable store is a {kind} source, not a "
                       "local file a clone can get a copy of", "<nvram>/var/lib/libvirt/qemu/nvram/NAME_VARS.fd"
                       "</nvram>")
    if nvram is not None:
        return Finding(cap, True, OK, f"UEFI with NVRAM {nvram.path or '(path chosen by libvirt)'}: each clone gets "
                       "its own copy")
    loader = root.find("./os/loader")
    efi = root.find("./os[@firmware='efi']") is not None or (loader is not None and loader.get("type") == "pflash")
    return Finding(cap, True, OK, ("UEFI without NVRAM" if efi else "BIOS firmware") + ": no firmware state to copy")


def _tpm(root: ET.Element, facts: Facts) -> list[Finding]:
    out = []
    for tpm in root.iterfind("./devices/tpm"):
        backend = tpm.find("backend")
        kind = backend.get("type") if backend is not None else None
        dev = tpm.get("model", "default")
        fix = f"remove from <devices>: {_short(tpm)}"
        if kind == "emulator":
            why = ("emulated TPM (swtpm): clone refused - a clone would need its own copy of the TPM state, "
                   "which cannot be taken from a running swtpm consistently, and sharing it would give source "
                   "and clones one TPM identity (keys, PCRs)")
        elif kind == "passthrough":
            why = "host TPM passthrough: clone refused - one host TPM cannot belong to several VMs"
        else:
            why = f"TPM backend {kind!r}: clone refused - its state cannot be given to a clone"
        out.append(Finding("tpm", False, ERROR, f"{_short(tpm)}: {why}", fix, device=dev))
    return out or [Finding("tpm", True, OK, "no TPM")]


def _disks(root: ET.Element, items: Sequence[vmstate.StateItem], facts: Facts) -> list[Finding]:
    """Each disk, as :mod:`.vmstate` decides (refused, shared read-only or a delta), plus its format and chain."""
    decided = {i.device: i for i in items}
    out: list[Finding] = []
    deltas = 0
    for disk in root.iterfind("./devices/disk"):
        tgt_el = disk.find("target")
        target = tgt_el.get("dev", "?") if tgt_el is not None else "?"
        item = decided[f"{disk.get('device', 'disk')} {target}"]
        deltas += item.decision == "delta"
        out += _disk(disk, target, item, facts)
    if not deltas and not any(f.level == ERROR for f in out):
        out.append(Finding("disk", False, ERROR, "no writable file-backed disk: there is nothing to give a clone "
                           "a copy-on-write delta of", None))
    return out


def _disk(disk: ET.Element, target: str, item: vmstate.StateItem, facts: Facts) -> list[Finding]:
    device = disk.get("device", "disk")
    backend = facts.storage_backend
    label = f"{device} {target}" + (f" ({item.path})" if item.path else "")
    if item.decision == "shared-readonly":
        return [Finding("disk", True, OK, f"read-only {label}: clones use it as it is", device=target)]
    if item.decision == "refuse":
        if disk.find("shareable") is not None and disk.find("readonly") is not None:
            return [Finding("disk", False, ERROR, f"read-only shareable {label}: refused - {item.why}",
                            f"remove <shareable/> from disk {target}", device=target)]
        if disk.find("shareable") is not None:
            return [Finding("disk", False, ERROR, f"writable shareable {label}: refused - clones would write "
                            "into the same image as the source", f"remove <shareable/> from disk {target} "
                            "(or add <readonly/> if the guest only reads it)", device=target)]
        if disk.get("type") != "file":
            return [Finding("disk", False, ERROR, f"writable type='{disk.get('type')}' {label}: refused - the "
                            f"{backend} storage backend gives clones copy-on-write deltas of file images only",
                            f"<disk type='file' device='{device}'><driver name='qemu' type='qcow2'/>"
                            f"<source file='/path/to/image.qcow2'/><target dev='{target}'/></disk>",
                            device=target)]
        return [Finding("disk", False, ERROR, f"writable {label} has no image", None, device=target)]
    drv = disk.find("driver")
    fmt = drv.get("type", "raw") if drv is not None else "raw"
    if fmt not in DISK_FORMATS:
        return [Finding("disk", False, ERROR, f"{label} is {fmt}: the {backend} storage backend stacks "
                        f"deltas on {' or '.join(DISK_FORMATS)} only",
                        "<driver name='qemu' type='qcow2'/> (after qemu-img convert -O qcow2)", device=target)]
    return [Finding("disk", True, OK, f"{label}: {fmt} image, each clone gets a copy-on-write delta",
                    device=target), *_chain(target, facts)]


#: vmstate devices that the findings above judge themselves.
_JUDGED_ABOVE = ("firmware code", "nvram", "tpm", "disk ", "cdrom ", "floppy ", "lun ")


def _host_state(items: Sequence[vmstate.StateItem]) -> list[Finding]:
    """Other per-VM host state a clone would share (the engine refuses these: vmstate.refusals)."""
    out = [Finding("host_state", False, ERROR, f"{i.device}{f' ({i.path})' if i.path else ''}: {i.why}",
                   f"remove the {i.device.split()[0]} device", device=i.device)
           for i in items if i.decision == "refuse" and not i.device.startswith(_JUDGED_ABOVE)]
    return out or [Finding("host_state", True, OK, "no host devices, passthrough directories or bound ports "
                           "a clone would share")]


def _chain(target: str, facts: Facts) -> list[Finding]:
    if target not in facts.chain_depths:
        return []
    depth = facts.chain_depths[target]
    limit = facts.max_chain_depth
    if isinstance(depth, str):
        return [Finding("chain_depth", False, WARN, f"{target}: backing chain not readable: {depth}",
                        device=target)]
    if depth <= limit:
        return [Finding("chain_depth", True, OK, f"{target}: {depth} image(s) in the backing chain "
                        f"(clone.max_chain_depth {limit}; each clone adds one to the source's chain)",
                        device=target)]
    when = ("consolidated (live block pull) after the next clone job" if facts.state == "running"
            else "consolidated only while the domain runs")
    return [Finding("chain_depth", False, WARN, f"{target}: {depth} images in the backing chain, more than "
                    f"clone.max_chain_depth {limit}: {when}", device=target)]


def ram_fix(path: str) -> str:
    """The commands that put ``path`` (libvirt's memory_backing_dir) on a tmpfs."""
    return (f"with no domain running (virsh list --name is empty): mount -t tmpfs -o size=100%,mode=0755,"
            f"uid=$(id -u libvirt-qemu),gid=$(id -g libvirt-qemu) tmpfs {path} - scripts/setup.sh does this; "
            "docs/operations/guest-ram.md makes it permanent (or set memory_backing_dir in "
            "/etc/libvirt/qemu.conf to a tmpfs or hugetlbfs mount and restart libvirtd)")


def ram_filesystem(ram: hostfs.RamDir) -> Finding:
    """Is libvirt's memory backing directory on a memory filesystem? Decided by its statfs f_type alone."""
    cap = "ram_filesystem"
    where = f"memory_backing_dir {ram.path}" + ("" if ram.configured else " (libvirt's default)")
    if ram.checked is not None and ram.checked != ram.path:
        where += f", not made yet: judged by {ram.checked}"
    if ram.fs_type is None:
        return Finding(cap, False, WARN, f"{where}: filesystem unknown ({ram.error}); guest RAM files belong on "
                       "tmpfs or hugetlbfs", ram_fix(ram.path))
    if ram.fs_type == hostfs.TMPFS_MAGIC:
        return Finding(cap, True, OK, f"{where} is on tmpfs: guest RAM files and frozen images stay in memory")
    if ram.fs_type == hostfs.HUGETLBFS_MAGIC:
        return Finding(cap, True, OK, f"{where} is on hugetlbfs: guest RAM is in huge pages (reserved in "
                       "/proc/sys/vm/nr_hugepages); filecow's copy mode cannot write there (hugetlbfs files "
                       "are mmap-only), and each clone's private mapping reserves huge pages for the guest's "
                       "whole RAM (HugePages_Rsvd) although it shares the source's: tmpfs suits clones better")
    if ram.fs_type == hostfs.RAMFS_MAGIC:
        return Finding(cap, False, WARN, f"{where} is on ramfs: in memory but without a size limit (a full host "
                       "hangs instead of failing a write); use tmpfs", ram_fix(ram.path))
    return Finding(cap, False, WARN, f"{where} is on {ram.fs_name}, a disk filesystem: every page a guest "
                   "writes to its shared RAM file is also written back to the disk, and the sparse copy of the "
                   "RAM that filecow makes during a stun competes with that writeback (a stun that grows with "
                   "the guest's RAM in use and with the host's disk load)", ram_fix(ram.path))


#: Capabilities :func:`.prepare.prepare_definition` can give a definition: name -> test on a parsed domain.
#: (What backends can give is theirs: ``Backend.prepared``.)
PREPARABLE: dict[str, Callable[[ET.Element], bool]] = {
    "mac_reset": has_acpi,
    "guest_customization": has_agent_channel,
    "vm_generation_id": has_genid,
}


def xml_findings(root: ET.Element, facts: Facts) -> list[Finding]:
    """Every finding of the core that depends on the XML (all but the state)."""
    items = vmstate.walk(ET.tostring(root, encoding="unicode"))
    return [_mac_reset(root, facts), _customization(root, facts), _genid(root, facts), _firmware(root, items),
            *_tpm(root, facts), *_disks(root, items, facts), *_host_state(items)]


def _instead(f: Finding, server: str, shares: bool) -> Finding:
    detail = f"{f.detail}; clones use {server} instead" + ("" if shares else ": one full RAM copy per clone")
    return replace(f, level=WARN, detail=detail)


def memory_findings(xml: str, facts: Facts) -> list[Finding]:
    """The memory backends' findings, in ``clone.memory_backends`` order, up to the first that serves.

    Each backend judges the source as if it were the only one (an error: it
    cannot serve it; a backend that says nothing while ``can_serve`` refuses
    gets a ``memory_backend`` error with that reason). Before the backend that
    serves, errors become warnings naming it; with none serving, they stay
    errors and name every backend's reason.
    """
    parts = {p.name: p for p in facts.backends}
    server = next((n for n, why in facts.memory_backends if why is None), None)
    reasons = "; ".join(f"{n}: {why}" for n, why in facts.memory_backends if why)
    out: list[Finding] = []
    for name, why in facts.memory_backends:
        part = parts.get(name)
        found = part.preflight(xml=xml) if part is not None else []
        if why is not None and not any(f.level == ERROR for f in found):
            found.append(Finding("memory_backend", False, ERROR, f"{name} cannot clone it: {why}", device=name))
        if name == server:
            return out + found
        if server is None:
            out += [replace(f, detail=f"{f.detail}; no configured memory backend can clone it ({reasons})")
                    if f.level == ERROR else f for f in found]
        else:
            shares = bool(getattr(parts.get(server), "shares_memory", False))
            out += [_instead(f, server, shares) if f.level == ERROR else f for f in found]
    return out


def _storage_findings(xml: str, facts: Facts) -> list[Finding]:
    memory = {n for n, _ in facts.memory_backends}
    return [f for p in facts.backends if p.name not in memory for f in p.preflight(xml=xml)]


def prepared(root: ET.Element, parts: Sequence[Part]) -> dict[str, bool]:
    """Capability -> does the definition ``root`` have it, for what prepare can give (the core's and backends')."""
    out: dict[str, bool] = {}
    xml = ET.tostring(root, encoding="unicode")
    for p in parts:  # first, as prepare makes their changes first
        out.update(p.prepared(xml=xml))
    return out | {cap: has(root) for cap, has in PREPARABLE.items()}


def check(xml: str, facts: Facts | None = None) -> Report:
    """The preflight report of the domain described by ``xml`` (its live XML when it runs).

    With ``facts.inactive_xml`` (the persistent definition of a running
    domain), a capability the running domain lacks but its definition has is
    marked ``pending``: it applies at the next boot.
    """
    facts = facts or Facts()
    root = parse(xml)
    findings = [_state(root, facts), *memory_findings(xml, facts), *xml_findings(root, facts),
                *_storage_findings(xml, facts)]
    if facts.ram_dir is not None:
        findings.append(ram_filesystem(facts.ram_dir))
    if facts.inactive_xml is not None and facts.state in _ACTIVE:
        live, persistent = prepared(root, facts.backends), prepared(parse(facts.inactive_xml), facts.backends)
        for i, f in enumerate(findings):
            if f.capability not in live:
                continue
            if not live[f.capability] and persistent[f.capability]:
                findings[i] = Finding(f.capability, False, f.level, f"{f.detail}; {NEXT_BOOT}", None,
                                      f.device, pending=True)
            elif live[f.capability] and not persistent[f.capability]:
                findings[i] = Finding(f.capability, f.ok, WARN, f"{f.detail}; but the persistent definition no "
                                      "longer has it: lost at next boot", None, f.device)
    name = root.findtext("name") or ""
    return Report(name, facts.state, facts.frozen, facts.clone_of, tuple(findings))
