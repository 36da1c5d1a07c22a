"""The project's test guest (built by ``scripts/build-guest.sh``): domain XML and drivers.

Used by the tests, the demo and the benchmarks; not by the daemon. The guest
prints ``IC boot=<id> count=<n>`` on its serial console every second, writes
the same line to sector 0 of its data disk, and runs commands sent to its
second serial port (a UNIX socket on the host), framing their output as
``@@IC-BEGIN <id>`` ... ``@@IC-END <id> <status>``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import sys
import uuid
from pathlib import Path
from xml.sax.saxutils import quoteattr

GUEST_DIR = Path(os.environ.get("INSTACLONE_GUEST_DIR", "/var/lib/instaclone/guest"))

_COUNTER = re.compile(r"^IC boot=(\S+) count=(\d+)\s*$")


def accel() -> str:
    """'kvm' where KVM was shown to work by build-guest.sh, else 'tcg' (env INSTACLONE_ACCEL wins)."""
    forced = os.environ.get("INSTACLONE_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    try:
        return "kvm" if (GUEST_DIR / "accel").read_text().strip() == "kvm" else "tcg"
    except OSError:
        return "tcg"


def domain_xml(name: str, *, disk: Path, workdir: Path, memory_mib: int = 256,
               file_backed_ram: bool = False) -> str:
    """Libvirt domain XML for the test guest.

    Serial 0 (the console) logs to ``workdir/<name>.serial.log``; serial 1 is
    the command channel at ``workdir/<name>.cmd.sock``. Guest ACPI is on (NIC
    hot-plug needs it); the NIC uses user-mode networking, which needs no
    host setup.
    """
    dom_type = "kvm" if accel() == "kvm" else "qemu"
    cmdline = (GUEST_DIR / "cmdline").read_text().strip() if (GUEST_DIR / "cmdline").exists() \
        else "console=ttyS0 loglevel=1 panic=-1"
    backing = ("<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
               if file_backed_ram else "")
    log = workdir / f"{name}.serial.log"
    sock = workdir / f"{name}.cmd.sock"
    return f"""<domain type='{dom_type}'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  {backing}
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{GUEST_DIR / 'vmlinuz'}</kernel>
    <initrd>{GUEST_DIR / 'initrd.img'}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path={quoteattr(str(log))}/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path={quoteattr(str(sock))}/><target port='1'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def read_counter(serial_log: Path) -> tuple[str, int] | None:
    """(boot id, count) of the last counter line in ``serial_log``, if any."""
    try:
        text = serial_log.read_text(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        m = _COUNTER.match(line)
        if m:
            return m.group(1), int(m.group(2))
    return None


async def wait_counter(serial_log: Path, *, above: int = 0, timeout: float = 30) -> tuple[str, int]:
    """Wait until the guest's counter exceeds ``above``; return (boot id, count)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        got = read_counter(serial_log)
        if got and got[1] > above:
            return got
        if loop.time() > end:
            raise TimeoutError(f"counter in {serial_log} did not pass {above} within {timeout} s (last: {got})")
        await asyncio.sleep(0.2)


class GuestChannel:
    """Runs shell commands in the guest over its command serial port."""

    _ids = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, sock_path: Path, timeout: float = 10) -> "GuestChannel":
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock_path))
                return cls(reader, writer)
            except OSError:
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.2)

    async def run(self, cmd: str, timeout: float = 20) -> tuple[int, str]:
        """Run ``cmd`` (one line of sh) in the guest; return (exit status, output)."""
        if "\n" in cmd:
            raise ValueError("command must be a single line")
        tag = f"{os.getpid()}x{next(self._ids)}x{uuid.uuid4().hex[:6]}"
        async with self._lock:
            self._writer.write(f"{tag} {cmd}\n".encode())
            await self._writer.drain()
            return await asyncio.wait_for(self._collect(tag), timeout)

    async def _collect(self, tag: str) -> tuple[int, str]:
        out: list[str] = []
        inside = False
        while True:
            raw = await self._reader.readline()
            if not raw:
                raise ConnectionError("guest command channel closed")
            line = raw.decode(errors="replace").rstrip("\r\n")
            if not inside:
                # Anything before our BEGIN (echo of a half-read line, output
                # of an earlier command) is not ours.
                inside = line == f"@@IC-BEGIN {tag}"
                continue
            if line.startswith(f"@@IC-END {tag} "):
                return int(line.rsplit(" ", 1)[1]), "\n".join(out).strip("\n")
            out.append(line)

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m instaclone.devguest")
    sub = p.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("xml", help="print the test guest's domain XML")
    x.add_argument("name")
    x.add_argument("--disk", type=Path, required=True)
    x.add_argument("--workdir", type=Path, required=True)
    x.add_argument("--memory-mib", type=int, default=256)
    x.add_argument("--file-backed-ram", action="store_true")
    a = p.parse_args(argv)
    sys.stdout.write(domain_xml(a.name, disk=a.disk.absolute(), workdir=a.workdir.absolute(),
                                memory_mib=a.memory_mib, file_backed_ram=a.file_backed_ram))
    return 0


if __name__ == "__main__":
    sys.exit(main())
