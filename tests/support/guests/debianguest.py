"""A real Debian 12 test guest (built by ``scripts/build-debian-guest.sh``): domain XML and a driver.

Free of libvirt, like :mod:`tests.support.guests.devguest`: it writes domain XML and
drives the guest through an :class:`instaclone.hv.Hypervisor` passed in
(libvirt's guest agent API), so the guest's own ``qemu-guest-agent`` answers.

The guest runs systemd, udev, dbus, qemu-guest-agent, sshd and
systemd-networkd (DHCP on eth0: ``net.ifnames=0``). Two kernels:
``"cloud"`` (linux-image-cloud-amd64, faster, no VM generation ID driver)
and ``"generic"`` (linux-image-amd64, ``CONFIG_VMGENID=y``).

Firmware:

* ``"bios"``: machine ``pc``, libvirt direct kernel boot of the chosen kernel
  and its Debian initramfs.
* ``"uefi"``: machine ``q35``, OVMF with an NVRAM file that libvirt creates
  from the OVMF template in the workdir. OVMF boots the disk:
  ``\\EFI\\BOOT\\BOOTX64.EFI`` on its EFI system partition is systemd-boot,
  whose default entry is the cloud kernel. With ``kernel="generic"`` OVMF boots
  the generic kernel directly instead (libvirt ``<kernel>`` under OVMF: still a
  UEFI boot through the kernel's EFI stub), since a disk boot always takes
  systemd-boot's default.

Guests boot from a qcow2 overlay whose backing file is the build's resolved
``root.qcow2`` (``<DEBIAN_DIR>/<hash12>/root.qcow2``), which the build script
never replaces, so a rebuild does not pull the disk from under a guest.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instaclone.errors import LibvirtError
from instaclone.hv import LibvirtHypervisor as Hypervisor

from . import devguest

DEBIAN_DIR = Path(os.environ.get("INSTACLONE_DEBIAN_DIR", "/var/lib/instaclone/debian"))

OVMF_CODE, OVMF_VARS = devguest.OVMF_CODE, devguest.OVMF_VARS

FIRMWARES = ("bios", "uefi")
KERNELS = ("cloud", "generic")

#: Used when the build directory has no ``cmdline`` file.
DEFAULT_CMDLINE = "root=/dev/vda2 rw console=ttyS0 quiet loglevel=3 net.ifnames=0 panic=-1"


def debian_ready() -> str | None:
    """None if the Debian guest is built and libvirt's OVMF firmware is present, else why not."""
    for f in ("root.qcow2", "vmlinuz-cloud", "initrd-cloud.img", "vmlinuz-generic", "initrd-generic.img"):
        if not (DEBIAN_DIR / f).exists():
            return f"Debian guest not built ({DEBIAN_DIR}/{f} missing): run scripts/build-debian-guest.sh"
    for f in (OVMF_CODE, OVMF_VARS):
        if not f.exists():
            return f"{f} missing: install Debian's ovmf package (scripts/setup.sh)"
    return None


def base_image() -> Path:
    """The current build's root disk, symlinks resolved (what overlays must point at)."""
    return (DEBIAN_DIR / "root.qcow2").resolve(strict=True)


def kernel_cmdline() -> str:
    try:
        return (DEBIAN_DIR / "cmdline").read_text().strip() or DEFAULT_CMDLINE
    except OSError:
        return DEFAULT_CMDLINE


#: Where a guest's console is logged and (UEFI) its NVRAM kept: as for the busybox guest.
serial_log_path = devguest.serial_log_path
nvram_path = devguest.nvram_path


def domain_xml(name: str, *, disk: Path, workdir: Path, firmware: str = "bios", kernel: str = "cloud",
               memory_mib: int = 512, file_backed_ram: bool = True, nvram: Path | None = None,
               emulator: Path | None = None) -> str:
    """Libvirt domain XML for the Debian guest.

    One vCPU, ACPI, a ``<genid/>`` (libvirt picks the GUID), the qcow2
    ``disk`` as virtio ``vda``, a virtio NIC on user-mode networking, serial 0
    logged to :func:`serial_log_path`, the guest agent channel, no USB, no
    balloon, no graphics. ``file_backed_ram`` backs RAM with a shared file.
    ``firmware`` and ``kernel`` are described in the module docstring;
    ``nvram`` (UEFI only) defaults to :func:`nvram_path`. ``emulator`` names
    the QEMU binary (libvirt's default if None). Paths must be absolute and
    reachable by libvirt's QEMU user.
    """
    if firmware not in FIRMWARES:
        raise ValueError(f"firmware must be one of {FIRMWARES}, not {firmware!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if memory_mib <= 0:
        raise ValueError(f"memory_mib must be positive, not {memory_mib}")
    if nvram is not None and firmware != "uefi":
        raise ValueError("nvram is for firmware='uefi' only")
    direct = firmware == "bios" or kernel != "cloud"
    dom, os_, _ = devguest.base_domain(
        name, disk=disk, serial_log=serial_log_path(name, workdir), memory_mib=memory_mib,
        file_backed_ram=file_backed_ram, firmware=firmware, machine="q35" if firmware == "uefi" else "pc",
        nvram=nvram or nvram_path(name, workdir), on_reboot="restart", emulator=emulator)
    if direct:
        ET.SubElement(os_, "kernel").text = str((DEBIAN_DIR / f"vmlinuz-{kernel}").resolve())
        ET.SubElement(os_, "initrd").text = str((DEBIAN_DIR / f"initrd-{kernel}.img").resolve())
        ET.SubElement(os_, "cmdline").text = kernel_cmdline()
    else:
        ET.SubElement(os_, "boot", dev="hd")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


@dataclass
class DebianVM:
    name: str
    disk: Path
    workdir: Path
    nvram: Path | None
    serial_log: Path
    firmware: str = "bios"
    kernel: str = "cloud"
    #: Seconds from ``start`` until systemd said "running" (None if not waited).
    boot_s: float | None = None


def make_overlay(base: Path, disk: Path) -> None:
    """A qcow2 overlay ``disk`` on ``base`` (an absolute, resolved path)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(disk)],
                   check=True)
    os.chmod(disk, 0o644)


async def gexec(virt: Hypervisor, name: str, shell_cmd: str, timeout_s: float = 60) -> tuple[int, str]:
    """Run ``shell_cmd`` with ``/bin/sh -c`` through the guest agent: (exit status, stdout+stderr)."""
    return await virt.agent_exec(name, ["/bin/sh", "-c", shell_cmd], timeout_s=timeout_s)


async def wait_agent(virt: Hypervisor, name: str, timeout: float = 300) -> None:
    """Wait until the guest agent in ``name`` answers guest-ping."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last: Exception | None = None
    while loop.time() < end:
        try:
            await virt.agent(name, "guest-ping", timeout_s=2)
            return
        except LibvirtError as exc:
            last = exc
            await asyncio.sleep(0.5)
    raise TimeoutError(f"guest agent of {name} does not answer after {timeout} s (last: {last})")


async def wait_running(virt: Hypervisor, name: str, timeout: float = 300) -> str:
    """Wait until the agent answers and ``systemctl is-system-running --wait`` ends; its answer.

    "running" is the goal; "degraded" (a unit failed) is returned too, for
    the caller to judge. Raises TimeoutError.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    await wait_agent(virt, name, timeout)
    while True:
        left = end - loop.time()
        if left <= 0:
            raise TimeoutError(f"systemd in {name} not up after {timeout} s")
        try:
            _rc, out = await gexec(virt, name, "systemctl is-system-running --wait", timeout_s=left)
        except LibvirtError:
            # The agent can go away while the guest is still booting (udev restarts it).
            await asyncio.sleep(0.5)
            continue
        state = out.strip().splitlines()[-1] if out.strip() else ""
        if state in ("running", "degraded"):
            return state
        await asyncio.sleep(0.5)


async def boot(virt: Hypervisor, scratch: Any, name: str, *, firmware: str = "bios", kernel: str = "cloud",
               memory_mib: int = 512, file_backed_ram: bool = True, timeout: float = 300,
               require_running: bool = True, emulator: Path | None = None) -> DebianVM:
    """Define and start Debian guest ``name`` on an overlay in ``scratch.path``; wait until it is up.

    ``scratch`` is a :class:`tests.support.vmlib.Scratch` (anything with a ``path``
    QEMU can write in). Returns when the guest agent answers and systemd
    reports "running" (with ``require_running=False`` "degraded" is accepted
    too). Raises AssertionError if systemd is degraded, TimeoutError if it is
    not up within ``timeout`` s; the domain stays defined either way (remove
    it with ``virt.undefine(name)``). ``emulator`` as in :func:`domain_xml`.
    """
    workdir = Path(scratch.path)
    disk = workdir / f"{name}.qcow2"
    make_overlay(base_image(), disk)
    nvram = nvram_path(name, workdir) if firmware == "uefi" else None
    vm = DebianVM(name, disk, workdir, nvram, serial_log_path(name, workdir), firmware, kernel)
    xml = domain_xml(name, disk=disk, workdir=workdir, firmware=firmware, kernel=kernel,
                     memory_mib=memory_mib, file_backed_ram=file_backed_ram, nvram=nvram, emulator=emulator)
    await virt.define(xml)
    t0 = time.monotonic()
    await virt.start(name)
    state = await wait_running(virt, name, timeout)
    vm.boot_s = time.monotonic() - t0
    if state != "running" and require_running:
        _, failed = await gexec(virt, name, "systemctl --failed --no-legend --plain")
        raise AssertionError(f"systemd in {name} is {state}; failed units: {failed.strip()}")
    return vm


async def remove(virt: Hypervisor, vm: DebianVM) -> None:
    """Undefine ``vm``, then delete its overlay, NVRAM and serial log (undefine keeps files)."""
    await virt.undefine(vm.name)
    for p in (vm.disk, vm.nvram, vm.serial_log):
        if p is not None:
            Path(p).unlink(missing_ok=True)

