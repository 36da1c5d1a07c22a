"""Integration: a NIC replaced on the busybox guest under the real libvirtd, led by libvirt's event.

The guest is paused while its NIC is unplugged, so that it cannot release
it: libvirt's own wait inside the detach call (5 s) runs out, the call
returns with the NIC still there, and only the DEVICE_REMOVED event that
follows the guest's resume can end the wait (nothing polls). Run under the
lock, like every test on the shared libvirtd:

    flock /tmp/instaclone-integration.lock .venv/bin/pytest -m integration tests/integration/test_nics.py
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import pytest

from instaclone.errors import LibvirtTimeout
from instaclone.hv import LibvirtHypervisor as Hypervisor, domxml
from tests.support.host import libvirt_ready
from tests.support.vmlib import Scratch, assert_no_qemu_left, boot_source, undefine_new

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]

#: Longer than libvirt's own wait for an unplug inside virDomainDetachDeviceFlags (5 s on x86).
HELD_S = 6.5


@pytest.fixture
async def guest() -> AsyncIterator[tuple[Hypervisor, str]]:
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    before = set(await virt.list_names())
    try:
        await boot_source(virt, scratch, "nic-src")
        yield virt, domxml.macs((await virt.lookup("nic-src")).xml)[0]
    finally:
        await undefine_new(virt, before, "nic-")
        await virt.close()
        scratch.cleanup()
    assert_no_qemu_left(scratch)


def nic_link(xml: str, mac: str) -> str | None:
    """The live link state of the NIC with ``mac`` ("up" when unset), None if there is none."""
    for iface in ET.fromstring(xml).iterfind("./devices/interface"):
        m = iface.find("mac")
        if m is not None and m.get("address") == mac:
            link = iface.find("link")
            return link.get("state", "up") if link is not None else "up"
    return None


async def test_the_removal_event_ends_the_wait(guest):
    virt, mac = guest
    t0 = time.monotonic()
    await virt.replace_nic("nic-src", mac, link_up=False, timeout_s=30)  # a running guest: libvirt's own wait
    assert time.monotonic() - t0 < 5
    assert nic_link((await virt.lookup("nic-src")).xml, mac) == "down"

    await virt.suspend("nic-src")
    replacing = asyncio.create_task(virt.replace_nic("nic-src", mac, link_up=True, timeout_s=30))
    await asyncio.sleep(HELD_S)
    assert not replacing.done()
    resumed = time.monotonic()
    await virt.resume("nic-src")
    await asyncio.wait_for(replacing, 10)
    # Well before the 30 s deadline: the event (the XML is read again only at the deadline).
    assert time.monotonic() - resumed < 5
    assert nic_link((await virt.lookup("nic-src")).xml, mac) == "up"


async def test_a_guest_that_does_not_release_its_nic_times_out(guest):
    virt, mac = guest
    await virt.suspend("nic-src")
    try:
        with pytest.raises(LibvirtTimeout, match=r"did not release its NIC .* within 2 s \(clone\.nic_release"):
            await virt.replace_nic("nic-src", mac, link_up=True, timeout_s=2)
    finally:
        await virt.resume("nic-src")
