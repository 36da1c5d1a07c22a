"""hv.nics.replace_nic without libvirtd: the device-removed event against a fake libvirt connection.

The fake domain decides, inside ``detachDeviceFlags``, when the guest lets
go of the NIC and which event libvirt sends: before the call returns, a
while after it, never, DEVICE_REMOVAL_FAILED, or a removal with no event.
Events are delivered as libvirt does, on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import libvirt
import pytest

from instaclone.errors import LibvirtError, LibvirtTimeout
from instaclone.hv.hypervisor import LibvirtHypervisor

MAC = "52:54:00:12:34:56"
NIC = (f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/><alias name='net0'/>"
       "<address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/></interface>")
REMOVED = libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED
FAILED = libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED


class FakeDomain:
    def __init__(self, conn: FakeConn, name: str) -> None:
        self.conn, self._name, self.uuid = conn, name, str(uuid.uuid4())
        self.nic: str | None = NIC
        self.unplug: Callable[[FakeDomain], None] = lambda d: None  # what the guest and libvirt do
        self.plugged: list[str] = []
        self.stale_reads = 0  # XML reads that still show the NIC: they came just before its removal

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:  # noqa: N802
        return self.uuid

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        nic = NIC if self.stale_reads else self.nic
        self.stale_reads = max(0, self.stale_reads - 1)
        return f"<domain><name>{self._name}</name><devices>{nic or ''}</devices></domain>"

    def detachDeviceFlags(self, xml: str, flags: int = 0) -> int:  # noqa: N802
        assert self.conn.callbacks, "the events are watched before the unplug"
        assert ET.fromstring(xml).find("mac").get("address") == MAC  # type: ignore[union-attr]
        self.conn.log.append("detach")
        self.unplug(self)
        return 0

    def attachDeviceFlags(self, xml: str, flags: int = 0) -> int:  # noqa: N802
        assert self.nic is None, "plugged while the old NIC is still there"
        iface = ET.fromstring(xml)
        assert iface.find("alias") is None and iface.find("address") is not None  # same slot, new device
        ET.SubElement(iface, "alias", name="net1")
        self.nic = ET.tostring(iface, encoding="unicode")
        self.plugged.append(self.nic)
        self.conn.log.append("attach")
        return 0

    # -- what the guest and libvirt do; these run on the event loop's thread -----------

    def release(self, event: int | None = REMOVED) -> None:
        """The guest let go; libvirt removed the device and sends ``event`` (None: the event is lost)."""
        self.nic = None
        if event is not None:
            self.conn.emit(event, self, "net0")

    def later(self, delay_s: float, event: int | None = REMOVED, *, remove: bool = True) -> None:
        """From the worker thread inside the detach call: release after ``delay_s`` on the loop."""

        def go() -> None:
            if remove:
                self.nic = None
            if event is not None:
                self.conn.emit(event, self, "net0")

        self.conn.loop.call_soon_threadsafe(self.conn.loop.call_later, delay_s, go)


class FakeConn:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.domains: dict[str, FakeDomain] = {}
        self.callbacks: list[tuple[int, Any, Any]] = []
        self.log: list[str] = []

    def isAlive(self) -> int:  # noqa: N802
        return 1

    def close(self) -> int:
        return 0

    def setKeepAlive(self, interval: int, count: int) -> int:  # noqa: N802
        return 0

    def registerCloseCallback(self, cb: Any, opaque: Any) -> int:  # noqa: N802
        return 0

    def unregisterCloseCallback(self) -> None:  # noqa: N802
        pass

    def domainEventRegisterAny(self, dom: Any, event: int, cb: Any, opaque: Any) -> int:  # noqa: N802
        assert dom is None
        self.callbacks.append((event, cb, opaque))
        self.log.append(f"register {event}")
        return len(self.callbacks)

    def lookupByName(self, name: str) -> FakeDomain:  # noqa: N802
        return self.domains[name]

    def lookupByUUIDString(self, uuidstr: str) -> FakeDomain:  # noqa: N802
        return next(d for d in self.domains.values() if d.uuid == uuidstr)

    def emit(self, event: int, dom: FakeDomain, alias: str) -> None:
        assert asyncio.get_running_loop() is self.loop  # libvirt dispatches events on the loop
        for ev, cb, opaque in self.callbacks:
            if ev == event:
                cb(self, dom, alias, opaque)


@pytest.fixture
async def world():
    conn = FakeConn(asyncio.get_running_loop())
    h = LibvirtHypervisor("test:///fake", threads=4, opener=lambda uri: conn)
    dom = conn.domains["c1"] = FakeDomain(conn, "c1")
    conn.domains["other"] = FakeDomain(conn, "other")
    yield h, conn, dom
    await h.close()


def waiters(h: LibvirtHypervisor) -> int:
    assert h._removals is not None
    return len(h._removals._waiters)


async def test_event_before_the_wait(world):
    """libvirt's own short wait saw the removal: the event is queued before detach returns."""
    h, conn, dom = world

    def unplug(d: FakeDomain) -> None:
        # The XML read right after the detach still shows the NIC; the event is
        # dispatched on the loop before the detach call's result is.
        d.stale_reads = 1
        conn.loop.call_soon_threadsafe(d.release)

    dom.unplug = unplug
    t0 = time.monotonic()
    await h.replace_nic("c1", MAC, link_up=True, timeout_s=5)
    assert time.monotonic() - t0 < 2  # the event, not the check at the deadline
    assert conn.log == [f"register {REMOVED}", f"register {FAILED}", "detach", "attach"]
    assert "state='up'" in dom.plugged[0] or 'state="up"' in dom.plugged[0]
    assert waiters(h) == 0


async def test_event_after_the_detach_returned_with_others_ignored(world, monkeypatch):
    h, conn, dom = world

    def unplug(d: FakeDomain) -> None:
        other = conn.domains["other"]
        conn.loop.call_soon_threadsafe(conn.emit, REMOVED, other, "net0")  # another domain's NIC
        conn.loop.call_soon_threadsafe(conn.emit, REMOVED, d, "net7")  # another device of this one
        d.later(0.3)

    def no_sleep(_s: float) -> None:
        raise AssertionError("a thread sleeps")

    dom.unplug = unplug
    monkeypatch.setattr(time, "sleep", no_sleep)
    t0 = time.monotonic()
    await h.replace_nic("c1", MAC, link_up=False, timeout_s=5)
    took = time.monotonic() - t0
    assert 0.3 <= took < 2, took
    assert conn.log[-2:] == ["detach", "attach"] and dom.nic is not None and "down" in dom.nic
    assert waiters(h) == 0


async def test_no_event_times_out_with_a_clear_error(world):
    h, conn, dom = world
    t0 = time.monotonic()
    with pytest.raises(LibvirtTimeout) as ei:
        await h.replace_nic("c1", MAC, link_up=True, timeout_s=1)
    assert 1 <= time.monotonic() - t0 < 3
    assert ei.value.message == (f"the guest of 'c1' did not release its NIC {MAC} within 1 s "
                                "(clone.nic_release_timeout_s; does the guest handle ACPI hot-unplug?)")
    assert "attach" not in conn.log and dom.nic == NIC  # left as the guest has it
    assert waiters(h) == 0


async def test_removal_failed_event_is_an_error_at_once(world):
    h, conn, dom = world
    dom.unplug = lambda d: d.later(0.05, FAILED, remove=False)
    t0 = time.monotonic()
    with pytest.raises(LibvirtError, match="refused to release its NIC") as ei:
        await h.replace_nic("c1", MAC, link_up=True, timeout_s=30)
    assert time.monotonic() - t0 < 5 and not isinstance(ei.value, LibvirtTimeout)
    assert "attach" not in conn.log and waiters(h) == 0


async def test_removal_already_complete_needs_no_event(world):
    """The device is gone when the detach returns, and no event comes (sent before we watched)."""
    h, conn, dom = world
    dom.unplug = lambda d: d.release(event=None)
    t0 = time.monotonic()
    await h.replace_nic("c1", MAC, link_up=True, timeout_s=30)
    assert time.monotonic() - t0 < 5
    assert conn.log[-2:] == ["detach", "attach"]


async def test_a_lost_event_is_caught_by_the_check_at_the_deadline(world):
    h, conn, dom = world
    dom.unplug = lambda d: d.later(0.1, event=None)
    await h.replace_nic("c1", MAC, link_up=True, timeout_s=0.5)
    assert conn.log[-2:] == ["detach", "attach"]


async def test_events_are_watched_once_per_connection(world):
    h, conn, dom = world
    dom.unplug = lambda d: d.release(event=None)
    await h.replace_nic("c1", MAC, link_up=True, timeout_s=5)
    dom.nic = NIC
    await h.replace_nic("c1", MAC, link_up=True, timeout_s=5)
    assert [e for e in conn.log if e.startswith("register")] == [f"register {REMOVED}", f"register {FAILED}"]


async def test_missing_nic_and_a_plug_that_did_not_take_are_errors(world):
    h, _conn, dom = world
    with pytest.raises(LibvirtError, match="has no interface with MAC 52:54:00:00:00:01"):
        await h.replace_nic("c1", "52:54:00:00:00:01", link_up=True, timeout_s=5)
    dom.unplug = lambda d: d.release(event=None)
    dom.attachDeviceFlags = lambda xml, flags=0: 0  # type: ignore[method-assign]
    with pytest.raises(LibvirtError, match="is missing in its live definition"):
        await h.replace_nic("c1", MAC, link_up=True, timeout_s=5)
