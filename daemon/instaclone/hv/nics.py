"""Network interfaces of a running domain: link state, and replacing a NIC.

:meth:`Nics.replace_nic` is the one place that knows how a clone's NIC is
replaced; the job layer calls it once per NIC and knows nothing of how.

A VM restored from another's state keeps that VM's MAC inside its
virtio-net device state; a freshly plugged device makes the guest read the
MAC of the definition. So the NIC is hot-unplugged and an identical one
plugged back. The guest releases the old one itself (ACPI hot-unplug), as
fast as it is busy: libvirt says when with a domain event, DEVICE_REMOVED
(or DEVICE_REMOVAL_FAILED when the guest refused), and the wait for it
holds no thread. The events are watched once per connection, for every
domain (:class:`_Removals`).
"""

from __future__ import annotations

import asyncio
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import LibvirtError, LibvirtTimeout
from . import _libvirt as lv
from .connection import Connection

Removal = Literal["removed", "failed"]


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


@dataclass
class _Nic:
    """One NIC being replaced: what the unplug learns of it, and what the wait needs."""

    name: str
    mac: str
    link_up: bool
    uuid: str = ""
    alias: str = ""
    xml: str = ""  # the live <interface>, as it was unplugged
    removed: asyncio.Future[Removal] | None = None  # settled by its removal event


def _resolve(fut: asyncio.Future[Removal], how: Removal) -> None:
    if not fut.done():
        fut.set_result(how)


class _Removals:
    """Who waits for which device to be removed: (domain UUID, device alias) -> a future.

    libvirt calls :meth:`_on_removed` and :meth:`_on_failed` on the event
    loop's thread (its events are dispatched by :mod:`.eventloop`); they
    only settle a future, through ``call_soon_threadsafe`` so that any
    thread would do. An event nobody waits for is dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the waiters; held briefly, by the loop and the callbacks
        self._watch_lock = threading.Lock()  # the registration, an RPC: never taken by the loop
        self._watching: lv.Connection | None = None
        self._waiters: dict[tuple[str, str], asyncio.Future[Removal]] = {}

    def watch(self, conn: lv.Connection) -> None:
        """Have ``conn`` report device removals here, once per connection. Blocks: a worker thread."""
        with self._watch_lock:
            if self._watching is conn:
                return
            # Every domain: one registration serves every clone this connection ever replugs.
            conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed, None)
            conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, self._on_failed, None)
            self._watching = conn

    def expect(self, nic: _Nic, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``nic.removed`` a future of ``loop`` settled by the next removal event of that device.

        Any thread: a future is only made here; it is settled on its loop.
        """
        nic.removed = loop.create_future()
        with self._lock:
            self._waiters[(nic.uuid, nic.alias)] = nic.removed

    def forget(self, nic: _Nic) -> None:
        with self._lock:
            if nic.removed is not None and self._waiters.get((nic.uuid, nic.alias)) is nic.removed:
                del self._waiters[(nic.uuid, nic.alias)]

    def _settle(self, dom: lv.Domain, alias: str, how: Removal) -> None:
        with self._lock:
            fut = self._waiters.get((dom.UUIDString(), alias))  # the handle's own UUID: no call to libvirtd
        if fut is not None:
            fut.get_loop().call_soon_threadsafe(_resolve, fut, how)

    def _on_removed(self, _conn: Any, dom: lv.Domain, alias: str, _opaque: Any) -> None:
        self._settle(dom, alias, "removed")

    def _on_failed(self, _conn: Any, dom: lv.Domain, alias: str, _opaque: Any) -> None:
        self._settle(dom, alias, "failed")


class Nics(Connection):
    """NIC calls on running domains."""

    #: Made on first use, on the loop's thread (mixins of Connection have no __init__ of their own).
    _removals: _Removals | None = None

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

    async def replace_nic(self, name: str, mac: str, *, link_up: bool, timeout_s: float) -> None:
        """Replace the running domain's NIC with ``mac`` by an identical one, with its link ``link_up``.

        Unplug, wait until the guest released it, plug the same interface
        back (same MAC, model, PCI slot) and check that the live definition
        has it with that link state. The guest then reads the MAC of the
        definition. Raises LibvirtTimeout if the guest did not release the NIC
        within ``timeout_s`` of the unplug request (it needs ACPI hot-unplug;
        the NIC is left as the guest has it), LibvirtError if the guest refused
        (DEVICE_REMOVAL_FAILED), if there is no such NIC, or if the plugged
        one is not there afterwards.
        """
        if self._removals is None:
            self._removals = _Removals()
        removals, loop = self._removals, asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        nic = _Nic(name, mac, link_up)
        try:
            if await self._call(f"replace NIC {mac} of {name!r}", lambda: self._unplug(nic, removals, loop)):
                return
            await self._released(nic, deadline - loop.time(), timeout_s)
            await self._call(f"plug NIC {mac} into {name!r}", lambda: self._plug(self._dom_id(name, nic.uuid), nic))
        finally:
            removals.forget(nic)

    def _unplug(self, nic: _Nic, removals: _Removals, loop: asyncio.AbstractEventLoop) -> bool:
        """Ask for the unplug; if libvirt's own short wait saw the guest let go, plug at once (True)."""
        conn = self._connection()
        removals.watch(conn)
        dom = conn.lookupByName(nic.name)
        iface = _iface_by_mac(dom, nic.mac)
        if iface is None:
            raise LibvirtError(f"{nic.name!r} has no interface with MAC {nic.mac}")
        alias = iface.find("alias")
        if alias is None or not alias.get("name"):
            raise LibvirtError(f"the NIC {nic.mac} of {nic.name!r} has no device alias (is the domain running?)")
        nic.uuid, nic.alias, nic.xml = dom.UUIDString(), str(alias.get("name")), ET.tostring(iface, encoding="unicode")
        # Waited for before the unplug is asked for: the event may come before the call returns.
        removals.expect(nic, loop)
        dom.detachDeviceFlags(nic.xml, lv.VIR_DOMAIN_AFFECT_LIVE)
        if _iface_by_mac(dom, nic.mac) is not None:
            return False
        self._plug(dom, nic)
        return True

    async def _released(self, nic: _Nic, remaining_s: float, timeout_s: float) -> None:
        """Wait for the removal event; at the deadline the live XML has the last word."""
        assert nic.removed is not None
        try:
            how = await asyncio.wait_for(nic.removed, max(0.0, remaining_s))
        except TimeoutError:
            # An event lost with a dropped connection, or one sent before we watched.
            if await self._call(f"look for NIC {nic.mac} of {nic.name!r}",
                                lambda: _iface_by_mac(self._dom_id(nic.name, nic.uuid), nic.mac) is None):
                return
            raise LibvirtTimeout(f"the guest of {nic.name!r} did not release its NIC {nic.mac} within {timeout_s:g} s "
                              f"(clone.nic_release_timeout_s; does the guest handle ACPI hot-unplug?)") from None
        if how == "failed":
            raise LibvirtError(f"the guest of {nic.name!r} refused to release its NIC {nic.mac} "
                            f"(libvirt reported the device removal failed)")

    @staticmethod
    def _plug(dom: lv.Domain, nic: _Nic) -> None:
        """Plug the interface back; LibvirtError unless the live XML then has it with the link asked for."""
        iface = ET.fromstring(nic.xml)
        for tag in ("alias", "target"):  # libvirt names the new device and its tap itself
            for el in iface.findall(tag):
                iface.remove(el)
        _set_link_state(iface, nic.link_up)
        dom.attachDeviceFlags(ET.tostring(iface, encoding="unicode"), lv.VIR_DOMAIN_AFFECT_LIVE)
        now = _iface_by_mac(dom, nic.mac)
        link = now.find("link") if now is not None else None
        state = link.get("state", "up") if link is not None else "up"
        if now is None or state != ("up" if nic.link_up else "down"):
            raise LibvirtError(f"the NIC {nic.mac} plugged into {nic.name!r} is "
                            f"{'missing' if now is None else f'link {state}'} in its live definition")
