"""Network interfaces of a running domain: link state and hot re-plug."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

from ..errors import LibvirtError, LibvirtTimeout
from . import _libvirt as lv
from .connection import Connection


def _iface_by_mac(dom: lv.Domain, mac: str) -> ET.Element | None:
    for iface in ET.fromstring(dom.XMLDesc(0)).iterfind("./devices/interface"):
        m = iface.find("mac")
        if m is not None and m.get("address", "").lower() == mac.lower():
            return iface
    return None


def _set_link_state(iface: ET.Element, up: bool) -> None:
    for old in iface.findall("link"):
        iface.remove(old)
    ET.SubElement(iface, "link", {"state": "up" if up else "down"})


class Nics(Connection):
    """NIC calls on running domains."""

    async def set_link(self, name: str, mac: str, *, up: bool) -> None:
        """Set the link state of the running domain's NIC with ``mac``."""

        def do() -> None:
            dom = self._dom(name)
            iface = _iface_by_mac(dom, mac)
            if iface is None:
                raise LibvirtError(f"{name!r} has no interface with MAC {mac}")
            _set_link_state(iface, up)
            dom.updateDeviceFlags(ET.tostring(iface, encoding="unicode"), lv.VIR_DOMAIN_AFFECT_LIVE)

        await self._call(f"set link of {name!r} {mac}", do)

    async def replug_interface(self, name: str, mac: str, *, link_up: bool, timeout_s: float = 10.0) -> None:
        """Hot-unplug the NIC with ``mac`` and plug an identical one back.

        A VM restored from another's state keeps that VM's MAC inside its
        virtio-net device state; a freshly plugged device makes the guest
        read the MAC of the definition. Needs guest ACPI hotplug: LibvirtTimeout
        if the guest does not release the NIC within ``timeout_s``.
        """

        def do() -> None:
            dom = self._dom(name)
            iface = _iface_by_mac(dom, mac)
            if iface is None:
                raise LibvirtError(f"{name!r} has no interface with MAC {mac}")
            dom.detachDeviceFlags(ET.tostring(iface, encoding="unicode"), lv.VIR_DOMAIN_AFFECT_LIVE)
            deadline = time.monotonic() + timeout_s
            while _iface_by_mac(dom, mac) is not None:
                if time.monotonic() > deadline:
                    raise LibvirtTimeout(f"the guest of {name!r} did not release its NIC {mac} within "
                                      f"{timeout_s:g} s (no ACPI hotplug in the guest?)")
                time.sleep(0.05)
            for tag in ("alias", "target"):
                for el in iface.findall(tag):
                    iface.remove(el)
            _set_link_state(iface, link_up)
            dom.attachDeviceFlags(ET.tostring(iface, encoding="unicode"), lv.VIR_DOMAIN_AFFECT_LIVE)

        await self._call(f"replug NIC {mac} of {name!r}", do)
