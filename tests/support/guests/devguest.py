"""The project's test guest (built by ``scripts/build-guest.sh``): domain XML and drivers.

Used by the tests, the demo and the benchmarks, never by the daemon, and so
free of libvirt: it writes domain XML and talks to files and sockets.

The guest (a Debian cloud kernel and a busybox initramfs) boots in a few
seconds even without KVM, then:

* prints ``IC ready boot=<boot id>`` once and ``IC boot=<boot id> count=<n>``
  every second on its serial console (serial 0, logged to
  ``<workdir>/<name>.serial.log``), and writes the counter line to sector 0 of
  its data disk ``/dev/vda``. A clone keeps the boot id and counts on from
  where its source was; a rebooted guest has a new boot id and starts at 1.
* runs shell commands received on its second serial port, which the host
  reaches as the UNIX socket ``<workdir>/<name>.cmd.sock``: the host sends
  ``<id> <command>\\n``; the guest answers ``@@IC-BEGIN <id>\\n``, the
  command's stdout and stderr, ``\\n@@IC-END <id> <exit status>\\n``.
  :class:`GuestChannel` is the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from types import TracebackType

GUEST_DIR = Path(os.environ.get("INSTACLONE_GUEST_DIR", "/var/lib/instaclone/guest"))

#: Used when the guest directory has no ``cmdline`` file (build-guest.sh writes one).
DEFAULT_CMDLINE = "console=ttyS0 loglevel=1 panic=-1"

_COUNTER = re.compile(rb"^IC boot=(\S+) count=(\d+)[ \t\r]*$", re.MULTILINE)
_END = re.compile(rb"\n@@IC-END (\S+) (-?\d+)\r?\n")


def qemu_owner() -> tuple[int, int]:
    """uid, gid of libvirt's QEMU user (owner for directories QEMU writes in)."""
    import pwd

    try:
        pw = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return 0, 0
    return pw.pw_uid, pw.pw_gid


def accel() -> str:
    """``'kvm'`` or ``'tcg'``: what build-guest.sh found to work here.

    The environment variable ``INSTACLONE_ACCEL`` overrides it. Without a
    built guest the answer is ``'tcg'``, which works everywhere.
    """
    forced = os.environ.get("INSTACLONE_ACCEL", "").strip()
    if forced in ("kvm", "tcg"):
        return forced
    try:
        return "kvm" if (GUEST_DIR / "accel").read_text().strip() == "kvm" else "tcg"
    except OSError:
        return "tcg"


def domain_type() -> str:
    """The libvirt ``<domain type=...>`` for :func:`accel`: ``'kvm'`` or ``'qemu'`` (TCG)."""
    return "kvm" if accel() == "kvm" else "qemu"


def kernel_cmdline() -> str:
    """The guest kernel's command line, as build-guest.sh recorded it."""
    try:
        return (GUEST_DIR / "cmdline").read_text().strip() or DEFAULT_CMDLINE
    except OSError:
        return DEFAULT_CMDLINE


def serial_log_path(name: str, workdir: Path) -> Path:
    """Where the console of guest ``name`` defined with :func:`domain_xml` is logged."""
    return Path(workdir) / f"{name}.serial.log"


def cmd_sock_path(name: str, workdir: Path) -> Path:
    """The command channel socket of guest ``name`` defined with :func:`domain_xml`."""
    return Path(workdir) / f"{name}.cmd.sock"


#: Debian's ovmf package: firmware code (read-only) and the template of a VM's variable store.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def nvram_path(name: str, workdir: Path) -> Path:
    """The UEFI variable store of guest ``name`` defined with ``firmware="uefi"``."""
    return Path(workdir) / f"{name}_VARS.fd"


#: The ``balloon`` choices of :func:`base_domain` and :func:`domain_xml`.
BALLOONS = ("none", "virtio", "virtio-fpr")


def base_domain(name: str, *, disk: Path, serial_log: Path, memory_mib: int, file_backed_ram: bool,
                firmware: str = "bios", machine: str = "pc", nvram: Path | None = None,
                on_reboot: str = "destroy", balloon: str = "none", emulator: Path | None = None,
                ) -> tuple[ET.Element, ET.Element, ET.Element]:
    """The parts every test guest shares: (``<domain>``, its ``<os>``, its ``<devices>``).

    One vCPU, a ``<genid/>`` (libvirt picks the GUID; clones get a new one),
    ACPI (PCI hot-plug needs it), ``machine`` with SeaBIOS or (``firmware="uefi"``)
    OVMF and a variable store at ``nvram`` made from OVMF's template, the
    qcow2 ``disk`` as virtio ``vda``, a virtio NIC on user-mode networking (no
    host setup), serial 0 logged to ``serial_log``, the guest agent channel,
    no graphics, no USB. ``file_backed_ram`` backs RAM with a shared file.
    ``balloon`` is one of :data:`BALLOONS`: ``"none"`` (the default, no
    balloon device), ``"virtio"`` (a virtio balloon) or ``"virtio-fpr"`` (a
    virtio balloon with free page reporting, ``freePageReporting='on'``: the
    guest reports pages it freed and QEMU discards them from guest RAM).
    ``emulator`` names the QEMU binary (``<emulator>``; libvirt's default QEMU
    if None), such as the QEMU 7.2 of :func:`tests.support.host.second_qemu`.
    Mind: QEMU 7.2 discards by punching holes into the RAM file even when it
    maps it privately, so a filecow clone that discards (free page reporting,
    or an inflated balloon) zeroes pages in the frozen file its siblings map.
    The caller adds the boot method to ``<os>``.
    """
    if memory_mib <= 0:
        raise ValueError(f"memory_mib must be positive, not {memory_mib}")
    if firmware not in ("bios", "uefi"):
        raise ValueError(f"firmware must be 'bios' or 'uefi', not {firmware!r}")
    if balloon not in BALLOONS:
        raise ValueError(f"balloon must be one of {', '.join(BALLOONS)}, not {balloon!r}")
    dom = ET.Element("domain", type=domain_type())
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "genid")
    ET.SubElement(dom, "memory", unit="MiB").text = str(int(memory_mib))
    if file_backed_ram:
        mb = ET.SubElement(dom, "memoryBacking")
        ET.SubElement(mb, "source", type="file")
        ET.SubElement(mb, "access", mode="shared")
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine=machine).text = "hvm"
    if firmware == "uefi":
        if nvram is None:
            raise ValueError("firmware='uefi' needs an nvram path")
        ET.SubElement(os_, "loader", readonly="yes", type="pflash").text = str(OVMF_CODE)
        ET.SubElement(os_, "nvram", template=str(OVMF_VARS)).text = str(nvram)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = on_reboot
    ET.SubElement(dom, "on_crash").text = "destroy"
    dev = ET.SubElement(dom, "devices")
    if emulator is not None:
        ET.SubElement(dev, "emulator").text = str(emulator)
    d = ET.SubElement(dev, "disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="qcow2")
    ET.SubElement(d, "source", file=str(disk))
    ET.SubElement(d, "target", dev="vda", bus="virtio")
    nic = ET.SubElement(dev, "interface", type="user")
    ET.SubElement(nic, "model", type="virtio")
    # type='file': libvirt hands QEMU a virtlogd pipe and the log file can be
    # read while the guest runs.
    s0 = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(s0, "source", path=str(serial_log))
    ET.SubElement(s0, "target", port="0")
    ch = ET.SubElement(dev, "channel", type="unix")
    ET.SubElement(ch, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(dev, "controller", type="usb", model="none")
    if balloon == "none":
        ET.SubElement(dev, "memballoon", model="none")
    else:
        mem = ET.SubElement(dev, "memballoon", model="virtio")
        if balloon == "virtio-fpr":
            mem.set("freePageReporting", "on")
    return dom, os_, dev


def domain_xml(name: str, *, disk: Path, workdir: Path, memory_mib: int = 256,
               file_backed_ram: bool = False, firmware: str = "bios", balloon: str = "none",
               emulator: Path | None = None) -> str:
    """Libvirt domain XML for the test guest.

    :func:`base_domain` (serial 0 logged to :func:`serial_log_path`, a UEFI
    variable store at :func:`nvram_path`), direct kernel boot from
    :data:`GUEST_DIR`, and serial 1 a UNIX socket at :func:`cmd_sock_path`
    (QEMU listens). Paths must be absolute and reachable by libvirt's QEMU user.
    ``balloon`` and ``emulator`` as in :func:`base_domain` (the guest's initramfs
    loads virtio_balloon; a guest built before it did ignores the device).
    """
    dom, os_, dev = base_domain(name, disk=disk, serial_log=serial_log_path(name, workdir),
                                memory_mib=memory_mib, file_backed_ram=file_backed_ram, firmware=firmware,
                                nvram=nvram_path(name, workdir), balloon=balloon, emulator=emulator)
    ET.SubElement(os_, "kernel").text = str(GUEST_DIR / "vmlinuz")
    ET.SubElement(os_, "initrd").text = str(GUEST_DIR / "initrd.img")
    ET.SubElement(os_, "cmdline").text = kernel_cmdline()
    s1 = ET.SubElement(dev, "serial", type="unix")
    ET.SubElement(s1, "source", mode="bind", path=str(cmd_sock_path(name, workdir)))
    ET.SubElement(s1, "target", port="1")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def read_counter(serial_log: Path) -> tuple[str, int] | None:
    """(boot id, count) from the last complete counter line in ``serial_log``, or None."""
    try:
        with open(serial_log, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            # Counter lines are ~60 bytes: the tail holds the newest.
            f.seek(max(0, size - 16384))
            tail = f.read()
    except OSError:
        return None
    # A last line without its newline may still be being written.
    tail = tail[: tail.rfind(b"\n") + 1]
    matches = list(_COUNTER.finditer(tail))
    if not matches:
        return None
    return matches[-1].group(1).decode(errors="replace"), int(matches[-1].group(2))


async def wait_counter(serial_log: Path, *, above: int = 0, timeout: float = 30) -> tuple[str, int]:
    """Wait until the counter in ``serial_log`` is greater than ``above``; return (boot id, count).

    Raises TimeoutError after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        got = read_counter(serial_log)
        if got is not None and got[1] > above:
            return got
        if loop.time() >= end:
            raise TimeoutError(f"guest counter in {serial_log} not above {above} after {timeout} s "
                               f"(last: {got})")
        await asyncio.sleep(0.1)


class GuestChannel:
    """Client of the guest's command channel (its second serial port).

    One command at a time (concurrent :meth:`run` calls queue). Whatever else
    is in the channel, such as the output of a command that was running when
    the VM was cloned, or of one a timed-out :meth:`run` gave up on, is
    skipped: only the output framed with this call's id is returned.
    """

    _ids = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._buf = b""

    @classmethod
    async def connect(cls, sock_path: Path, timeout: float = 10) -> GuestChannel:
        """Connect to the channel's socket, retrying until it exists (QEMU creates it at start)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock_path), limit=1 << 20)
                break
            except OSError as exc:
                if loop.time() >= end:
                    raise ConnectionError(f"cannot connect to guest channel {sock_path}: {exc}") from exc
                await asyncio.sleep(0.1)
        chan = cls(reader, writer)
        # Right after boot the guest may not have switched ttyS1 to raw mode
        # yet, and that switch can drop a line already received: say hello
        # until the guest answers.
        while True:
            try:
                await chan.run("true", timeout=2)
                return chan
            except TimeoutError:
                if loop.time() >= end + 60:
                    await chan.close()
                    raise ConnectionError(f"guest channel {sock_path} does not answer") from None

    async def run(self, cmd: str, timeout: float = 20) -> tuple[int, str]:
        """Run ``cmd`` with ``sh -c`` in the guest; return (exit status, stdout+stderr).

        The output is returned as the command wrote it (trailing newline
        included; bytes that are not UTF-8 replaced). ``cmd`` must be one line.
        Raises TimeoutError (the guest may still be running the command) or
        ConnectionError.
        """
        if "\n" in cmd or "\r" in cmd:
            raise ValueError("guest commands must be a single line")
        tag = f"h{os.getpid()}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        async with self._lock:
            # The leading newline ends any partial line the guest holds (it
            # skips the noise), so our line is read whole.
            self._writer.write(f"\n{tag} {cmd}\n".encode())
            await self._writer.drain()
            rc, out = await asyncio.wait_for(self._collect(tag.encode()), timeout)
        return rc, out.decode(errors="replace")

    async def _collect(self, tag: bytes) -> tuple[int, bytes]:
        begin = b"@@IC-BEGIN " + tag + b"\n"
        # Wait for our BEGIN at the start of a line; drop everything before it.
        while True:
            i = self._buf.find(begin)
            if i >= 0 and (i == 0 or self._buf[i - 1:i] == b"\n"):
                self._buf = self._buf[i + len(begin):]
                break
            # Keep enough for a BEGIN split across reads.
            self._buf = self._buf[-len(begin):]
            await self._fill()
        # Then for the END with our id (output in between is the command's).
        while True:
            for m in _END.finditer(self._buf):
                if m.group(1) == tag:
                    out = self._buf[:m.start()]
                    self._buf = self._buf[m.end():]
                    return int(m.group(2)), out
            await self._fill()

    async def _fill(self) -> None:
        data = await self._reader.read(65536)
        if not data:
            raise ConnectionError("guest command channel closed")
        self._buf += data

    async def close(self) -> None:
        """Close the connection (the guest keeps serving; reconnect at will)."""
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> GuestChannel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.guests.devguest xml NAME --disk D --workdir W [...]``: print domain XML."""
    p = argparse.ArgumentParser(prog="python -m tests.support.guests.devguest",
                                description="instaclone's test guest")
    sub = p.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("xml", help="print the test guest's libvirt domain XML")
    x.add_argument("name")
    x.add_argument("--disk", type=Path, required=True, help="qcow2 data disk (vda)")
    x.add_argument("--workdir", type=Path, required=True,
                   help="directory for NAME.serial.log and NAME.cmd.sock")
    x.add_argument("--memory-mib", type=int, default=256)
    x.add_argument("--file-backed-ram", action="store_true", help="back guest RAM with a shared file")
    x.add_argument("--balloon", choices=BALLOONS, default="none",
                   help="memory balloon: none (default), virtio, or virtio with free page reporting")
    x.add_argument("--emulator", type=Path, default=None,
                   help="the QEMU binary the domain runs (default: libvirt's)")
    a = p.parse_args(argv)
    sys.stdout.write(domain_xml(a.name, disk=a.disk.absolute(), workdir=a.workdir.absolute(),
                                memory_mib=a.memory_mib, file_backed_ram=a.file_backed_ram,
                                balloon=a.balloon, emulator=a.emulator))
    return 0


if __name__ == "__main__":
    sys.exit(main())
