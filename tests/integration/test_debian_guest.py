"""The Debian 12 test guest (scripts/build-debian-guest.sh, tests/support/guests/debianguest.py): XML and real boots."""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from instaclone.hv import LibvirtHypervisor as Hypervisor
from tests.support.guests import debianguest as dg
from tests.support.host import libvirt_ready
from tests.support.vmlib import Scratch


def _not_ready() -> str | None:
    return libvirt_ready() or dg.debian_ready()


@pytest.mark.parametrize("firmware,kernel", [("bios", "cloud"), ("bios", "generic"), ("uefi", "cloud"),
                                             ("uefi", "generic")])
def test_domain_xml(firmware, kernel):
    w = Path("/w")
    dom = ET.fromstring(dg.domain_xml("g1", disk=w / "g1.qcow2", workdir=w, firmware=firmware, kernel=kernel))
    assert dom.findtext("vcpu") == "1" and dom.find("genid") is not None
    assert dom.find("features/acpi") is not None
    assert dom.find("memoryBacking/source").get("type") == "file"
    assert dom.find("memoryBacking/access").get("mode") == "shared"
    assert dom.find("devices/disk/source").get("file") == "/w/g1.qcow2"
    assert dom.find("devices/disk/target").get("dev") == "vda"
    assert dom.find("devices/interface").get("type") == "user"
    assert dom.find("devices/serial/source").get("path") == "/w/g1.serial.log"
    assert dom.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert dom.find("devices/controller[@type='usb']").get("model") == "none"
    assert dom.find("devices/memballoon").get("model") == "none"
    machine = dom.find("os/type").get("machine")
    kernel_el = dom.find("os/kernel")
    if firmware == "bios":
        assert machine == "pc" and dom.find("os/loader") is None
    else:
        assert machine == "q35"
        assert dom.findtext("os/loader") == str(dg.OVMF_CODE)
        assert dom.find("os/nvram").get("template") == str(dg.OVMF_VARS)
        assert dom.findtext("os/nvram") == "/w/g1_VARS.fd"
    # UEFI with the cloud kernel boots the disk (systemd-boot); everything else is direct.
    if firmware == "uefi" and kernel == "cloud":
        assert kernel_el is None and dom.find("os/boot").get("dev") == "hd"
    else:
        assert kernel_el.text.endswith(f"vmlinuz-{kernel}")
        assert dom.findtext("os/initrd").endswith(f"initrd-{kernel}.img")


def test_domain_xml_rejects_bad_arguments():
    w = Path("/w")
    for kw in ({"firmware": "coreboot"}, {"kernel": "rt"}, {"memory_mib": 0}, {"nvram": w / "v.fd"}):
        with pytest.raises(ValueError):
            dg.domain_xml("g1", disk=w / "d", workdir=w, **kw)
    ram = ET.fromstring(dg.domain_xml("g1", disk=w / "d", workdir=w, file_backed_ram=False))
    assert ram.find("memoryBacking") is None


async def _check_guest(virt: Hypervisor, vm: dg.DebianVM) -> None:
    assert await virt.agent(vm.name, "guest-ping") == {}
    rc, out = await dg.gexec(virt, vm.name, "systemctl is-system-running; systemctl --failed --no-legend --plain")
    assert rc == 0 and out.strip() == "running", out
    rc, mid = await dg.gexec(virt, vm.name, "cat /etc/machine-id")
    assert rc == 0 and re.fullmatch(r"[0-9a-f]{32}\n", mid), mid
    # A real file on the root file system, not systemd's transient bind mount.
    rc, out = await dg.gexec(virt, vm.name, "findmnt -n /etc/machine-id")
    assert rc == 1 and out == "", out
    rc, out = await dg.gexec(virt, vm.name, "ls /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_rsa_key.pub")
    assert rc == 0, out
    # systemd is "running" once networkd runs; its DHCP lease may come a moment later.
    rc, out = await dg.gexec(virt, vm.name,
                             "for i in $(seq 60); do ip -4 -o addr show dev eth0 | grep -q 'inet 10.0.2.'"
                             " && break; sleep 0.5; done; ip -4 -o addr show dev eth0;"
                             " networkctl status eth0 --no-pager")
    assert rc == 0 and re.search(r"inet 10\.0\.2\.\d+/24", out) and "DHCP4" in out, out


async def _boot_and_check(firmware: str) -> None:
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    name = f"dg-{firmware}-{scratch.path.name}"
    vm = None
    try:
        vm = await dg.boot(virt, scratch, name, firmware=firmware)
        print(f"{name}: systemd running {vm.boot_s:.1f} s after start")
        await _check_guest(virt, vm)
        if firmware == "uefi":
            assert vm.nvram is not None and vm.nvram.parent == scratch.path
            assert vm.nvram.stat().st_size > 0
            # OVMF booted the disk (systemd-boot), not a kernel handed over by QEMU.
            serial = vm.serial_log.read_text(errors="replace")
            assert re.search(r"BdsDxe: starting Boot\d+ \"UEFI Misc Device\"", serial)
    finally:
        try:
            if vm is not None:
                await dg.remove(virt, vm)
            else:
                await virt.undefine(name)
        finally:
            await virt.close()
            scratch.cleanup()
    left = subprocess.run(["pgrep", "-f", f"qemu-system.*{scratch.path.name}"], capture_output=True, text=True)
    assert left.stdout == "", f"QEMU still running: {left.stdout}"
    assert not scratch.path.exists()


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
@pytest.mark.integration
@pytest.mark.skipif(_not_ready() is not None, reason=str(_not_ready()))
async def test_debian_guest_boots(firmware):
    await _boot_and_check(firmware)
