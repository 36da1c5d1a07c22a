"""Per-VM state in a domain definition: what a clone would share with its source. Pure: no I/O.

A clone is defined from its source's XML, so every host path in it names the
source's file unless it is rewritten. :func:`walk` looks at each device that
holds per-VM state and decides, for each, one of:

* ``copy``: the clone gets its own copy, made while the source is stunned
  (UEFI variable store ``<nvram>``);
* ``relocate``: the clone gets its own path in its directory (serial and
  console logs, channel and console sockets; done by :mod:`.domxml`);
* ``delta``: a writable disk the storage backend gives a delta;
* ``shared-readonly``: the clone may read the same file (firmware code,
  kernel, initrd, read-only disks and CD-ROMs);
* ``refuse``: the clone would share writable state that instaclone cannot
  copy; the source is refused with an error naming the device.

The rule behind it: a clone never shares a writable file with its source.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Decision = Literal["copy", "relocate", "delta", "shared-readonly", "refuse"]


@dataclass(frozen=True)
class StateItem:
    """One piece of per-VM state in a definition and what a clone gets of it."""

    device: str  # e.g. "nvram", "tpm", "disk vdb", "serial 0"
    path: str | None  # the source's host path, if any
    decision: Decision
    why: str


def _disk_label(disk: ET.Element) -> str:
    tgt = disk.find("target")
    return f"{disk.get('device', 'disk')} {tgt.get('dev', '?') if tgt is not None else '?'}"


def disk_source(disk: ET.Element) -> str | None:
    """The host path or name a ``<disk>`` element's ``<source>`` names (file, device, network name, volume)."""
    src = disk.find("source")
    if src is None:
        return None
    return src.get("file") or src.get("dev") or src.get("name") or src.get("volume")


def walk(xml: str) -> list[StateItem]:
    """Every piece of per-VM host state in ``xml`` with what a clone gets of it."""
    root = ET.fromstring(xml)
    items: list[StateItem] = []
    os_ = root.find("os")
    if os_ is not None:
        items += _os_items(os_)
    devices = root.find("devices")
    if devices is None:
        return items
    items += [_disk_item(disk) for disk in devices.findall("disk")]
    items += [_tpm_item(tpm) for tpm in devices.findall("tpm")]
    items += _passthrough_items(devices)
    items += _char_device_items(devices)
    return items


def _os_items(os_: ET.Element) -> list[StateItem]:
    """Firmware code, the UEFI variable store, kernel, initrd and device tree."""
    items: list[StateItem] = []
    loader = os_.find("loader")
    if loader is not None and loader.text:
        if loader.get("readonly", "no" if loader.get("type") == "pflash" else "yes") == "yes" \
                or loader.get("type") == "rom":
            items.append(StateItem("firmware code", loader.text.strip(), "shared-readonly",
                                   "read-only firmware image"))
        else:
            items.append(StateItem("firmware code", loader.text.strip(), "refuse",
                                   "the firmware image is writable (<loader readonly='no'>); "
                                   "make it readonly='yes' with a separate <nvram> store"))
    nvram = os_.find("nvram")
    if nvram is not None:
        items.append(_nvram_item(nvram))
    for tag in ("kernel", "initrd", "dtb"):
        el = os_.find(tag)
        if el is not None and el.text:
            items.append(StateItem(tag, el.text.strip(), "shared-readonly", "read at boot only"))
    return items


def _nvram_item(nvram: ET.Element) -> StateItem:
    path = (nvram.text or "").strip() or None
    if path is None:
        src = nvram.find("source")
        if src is not None:
            path = src.get("file")
    if nvram.get("type") not in (None, "file") or (path is None and nvram.find("source") is not None):
        return StateItem("nvram", path, "refuse",
                         f"the UEFI variable store is a {nvram.get('type')} source, not a "
                         "local file instaclone can copy")
    return StateItem("nvram", path, "copy", "UEFI variable store: each clone gets a copy taken at stun")


def _disk_item(disk: ET.Element) -> StateItem:
    label = _disk_label(disk)
    path = disk_source(disk)
    readonly = disk.find("readonly") is not None or disk.get("device") in ("cdrom", "floppy")
    if disk.find("shareable") is not None:
        return StateItem(label, path, "refuse",
                         "a <shareable/> disk is written by several VMs at once; a clone "
                         "must not join that set behind its owners' backs")
    if readonly:
        return StateItem(label, path, "shared-readonly", "read-only disk")
    if disk.get("type") != "file" or not path:
        return StateItem(label, path, "refuse",
                         f"writable disk of type '{disk.get('type')}': the storage backend "
                         "makes deltas of local file disks only")
    return StateItem(label, path, "delta", "the clone writes to its own delta")


def _tpm_item(tpm: ET.Element) -> StateItem:
    backend = tpm.find("backend")
    btype = backend.get("type") if backend is not None else "?"
    version = backend.get("version", "") if backend is not None else ""
    device = f"tpm model={tpm.get('model', 'default')} backend={btype}" + (f" version={version}" if version else "")
    why = ("an emulated TPM keeps its state (keys, PCRs, sealed secrets) in swtpm files that a clone "
           "would share or duplicate; instaclone refuses sources with a TPM: remove the <tpm> device "
           "to clone this VM" if btype == "emulator" else
           "a host TPM cannot be shared between VMs")
    return StateItem(device, None, "refuse", why)


def _passthrough_items(devices: ET.Element) -> list[StateItem]:
    """Host directories, host devices, shared memory, vhost-user and hostdev NICs: all refused."""
    items: list[StateItem] = []
    for fs in devices.findall("filesystem"):
        if fs.find("readonly") is None:
            src = fs.find("source")
            tgt = fs.find("target")
            items.append(StateItem(f"filesystem {tgt.get('dir', '?') if tgt is not None else '?'}",
                                   src.get("dir") if src is not None else None, "refuse",
                                   "a writable host directory passed through would be shared with the source"))
    for tag, why in (("hostdev", "a host device can belong to one VM only"),
                     ("shmem", "shared memory is shared with the source by design")):
        for _el in devices.findall(tag):
            items.append(StateItem(tag, None, "refuse", why))
    for iface in devices.findall("interface"):
        if iface.get("type") in ("vhostuser", "hostdev"):
            items.append(StateItem(f"interface type={iface.get('type')}", None, "refuse",
                                   "its backend (a vhost-user socket or a host device) cannot be given "
                                   "to a second VM"))
    return items


def _char_device_items(devices: ET.Element) -> list[StateItem]:
    """Serial ports, consoles, channels and parallel ports: paths relocated, bound ports refused."""
    items: list[StateItem] = []
    for dev in devices.findall("serial") + devices.findall("console") + devices.findall("channel") \
            + devices.findall("parallel"):
        label = f"{dev.tag} {dev.get('type')}"
        for src in dev.findall("source"):
            if src.get("path"):
                items.append(StateItem(label, src.get("path"), "relocate", "gets a path in the clone's directory"))
            if dev.get("type") in ("tcp", "udp") and src.get("mode", "connect") == "bind" and src.get("service"):
                items.append(StateItem(label, f"{src.get('host', '')}:{src.get('service')}", "refuse",
                                       "a clone cannot listen on the source's TCP/UDP port"))
        log = dev.find("log")
        if log is not None and log.get("file"):
            items.append(StateItem(f"{label} log", log.get("file"), "relocate", "gets a path in the clone's directory"))
    return items


def refusals(xml: str) -> list[StateItem]:
    """The items of :func:`walk` that make the source impossible to clone."""
    return [i for i in walk(xml) if i.decision == "refuse"]


def refusal_message(name: str, items: list[StateItem]) -> str:
    """The error message for a source with the refused ``items``."""
    parts = [f"{i.device}{f' ({i.path})' if i.path else ''}: {i.why}" for i in items]
    return f"source {name!r} cannot be cloned without sharing per-VM state: " + "; ".join(parts)


def nvram_path(xml: str) -> Path | None:
    """The local file of the domain's UEFI variable store, if it has one."""
    for item in walk(xml):
        if item.device == "nvram" and item.decision == "copy" and item.path:
            return Path(item.path)
    return None


def clone_nvram_name(source_nvram: Path, source: str, clone: str) -> str:
    """File name of a clone's copy of ``source_nvram`` (in the clone's directory)."""
    base = source_nvram.name
    return base.replace(source, clone) if source and source in base else f"{clone}_VARS.fd"
