"""The hypervisor layer: the only module that imports ``libvirt``.

Every libvirt call runs on a worker thread (libvirt-python blocks), so the
event loop never waits on libvirtd. ``libvirtError`` is translated here, by
error code, into the project's :mod:`instaclone.errors`; nothing above this
layer sees a libvirt type.

Memory state is moved with QEMU's own migration stream, driven through the
QEMU monitor: the stream goes to a file descriptor that we hand to QEMU with
``getfd`` (``exec:`` URIs get QEMU killed by libvirt's seccomp sandbox, which
denies spawning processes).
"""

from __future__ import annotations

import asyncio
import re
import base64
import json
import os
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import libvirt
import libvirt_qemu

from .errors import (
    DomainExists,
    DomainNotFound,
    VirtConnectionError,
    VirtError,
    VirtStateError,
    VirtTimeout,
)

T = TypeVar("T")

# libvirt prints every error to stderr unless a handler is installed; we
# report errors ourselves, through exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_NOT_FOUND = {libvirt.VIR_ERR_NO_DOMAIN}
_EXISTS = {libvirt.VIR_ERR_DOM_EXIST}
_STATE = {libvirt.VIR_ERR_OPERATION_INVALID}
_TIMEOUT = {libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE}
_CONNECTION = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_SYSTEM_ERROR,
}


def translate(exc: libvirt.libvirtError, action: str) -> VirtError:
    """Map a libvirtError to our error tree by its code."""
    code = exc.get_error_code()
    msg = f"{action}: {exc.get_error_message() or exc}"
    if code in _NOT_FOUND:
        return DomainNotFound(msg, libvirt_code=code)
    if code in _EXISTS:
        return DomainExists(msg, libvirt_code=code)
    if code in _STATE:
        return VirtStateError(msg, libvirt_code=code)
    if code in _TIMEOUT:
        return VirtTimeout(msg, libvirt_code=code)
    if code in _CONNECTION:
        return VirtConnectionError(msg, libvirt_code=code)
    if code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in msg:
        return DomainExists(msg, libvirt_code=code)
    return VirtError(msg, libvirt_code=code)


#: Messages of a connection that libvirtd closed.
_LOST = re.compile(r"Broken pipe|client socket is closed|Cannot write data|Cannot recv data|"
                   r"End of file while reading|Connection reset|connection closed", re.I)
#: ... of those, the ones that mean the request was not sent at all.
_NOT_SENT = re.compile(r"Cannot write data|client socket is closed|Broken pipe", re.I)


@dataclass(frozen=True)
class Disk:
    target: str  # e.g. "vda"
    path: Path  # the active (top) image
    format: str  # e.g. "qcow2"
    readonly: bool = False


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str  # running | paused | shutoff | other
    reason: int
    xml: str  # migratable live XML (inactive XML if not running)
    disks: tuple[Disk, ...] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
}


def file_disks(xml: str) -> tuple[Disk, ...]:
    """The file-backed writable disks of a domain XML (CD-ROMs and the like excluded)."""
    root = ET.fromstring(xml)
    out = []
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.get("type") != "file":
            continue
        src = disk.find("source")
        tgt = disk.find("target")
        drv = disk.find("driver")
        if src is None or tgt is None or not src.get("file"):
            continue
        out.append(
            Disk(
                target=tgt.get("dev", ""),
                path=Path(src.get("file", "")),
                format=(drv.get("type", "raw") if drv is not None else "raw"),
                readonly=disk.find("readonly") is not None,
            )
        )
    return tuple(out)


class Hypervisor:
    """Async access to one libvirt connection."""

    def __init__(self, uri: str = "qemu:///system", *, threads: int = 8) -> None:
        self.uri = uri
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="libvirt")
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------

    async def _call(self, action: str, fn: Callable[[], T], cancel: threading.Event | None = None) -> T:
        """Run ``fn`` on a worker thread; translate libvirt errors.

        If the caller is cancelled we still wait for the thread to finish: a
        libvirt call cannot be interrupted, and its effect must be known before
        any undo runs. Long operations take a ``cancel`` event that is set
        first, so that they stop early (e.g. cancel a migration).
        """

        def wrapped() -> T:
            conn = self._conn
            try:
                return fn()
            except libvirt.libvirtError as exc:
                if not self._connection_lost(exc):
                    raise translate(exc, action) from None
                # libvirtd went away (restarted, most likely): drop the dead
                # connection so that the next call opens a new one.
                self._drop(conn)
                if not _NOT_SENT.search(exc.get_error_message() or ""):
                    raise translate(exc, action) from None
            # The request never reached libvirtd: sending it once more on a
            # new connection cannot do anything twice.
            try:
                return fn()
            except libvirt.libvirtError as exc:
                if self._connection_lost(exc):
                    self._drop(self._conn)
                raise translate(exc, action) from None

        fut = asyncio.get_running_loop().run_in_executor(self._pool, wrapped)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if cancel is not None:
                cancel.set()
            await asyncio.wait([fut])
            raise

    def _connection(self) -> libvirt.virConnect:
        with self._conn_lock:
            if self._conn is None or not self._alive(self._conn):
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise VirtConnectionError(
                        f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}",
                        libvirt_code=exc.get_error_code(),
                    ) from None
            return self._conn

    @staticmethod
    def _connection_lost(exc: libvirt.libvirtError) -> bool:
        code = exc.get_error_code()
        msg = exc.get_error_message() or ""
        return code in (libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN) or (
            code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR) and bool(_LOST.search(msg)))

    def _drop(self, conn: libvirt.virConnect | None) -> None:
        with self._conn_lock:
            if conn is not None and self._conn is conn:
                with suppress(libvirt.libvirtError):
                    conn.close()
                self._conn = None

    @staticmethod
    def _alive(conn: libvirt.virConnect) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _dom(self, name: str) -> libvirt.virDomain:
        return self._connection().lookupByName(name)

    def _dom_or_none(self, name: str) -> libvirt.virDomain | None:
        try:
            return self._dom(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    async def connect(self) -> None:
        await self._call("connect", self._connection)

    async def is_connected(self) -> bool:
        conn = self._conn
        return conn is not None and await self._call("isAlive", lambda: self._alive(conn))

    async def ensure_connected(self) -> bool:
        """True if connected, reconnecting first if the connection died (libvirtd restarted)."""
        try:
            if not await self.is_connected():
                await self.connect()
            return await self.is_connected()
        except VirtConnectionError:
            return False

    async def close(self) -> None:
        def do() -> None:
            with self._conn_lock:
                if self._conn is not None:
                    try:
                        self._conn.close()
                    except libvirt.libvirtError:
                        pass
                    self._conn = None

        await self._call("close", do)
        self._pool.shutdown(wait=True)

    # -- domains ------------------------------------------------------------------

    async def lookup(self, name: str) -> DomainInfo:
        """Name, UUID, state and migratable XML of a domain; DomainNotFound if absent."""

        def do() -> DomainInfo:
            dom = self._dom(name)
            state, reason = dom.state()
            flags = libvirt.VIR_DOMAIN_XML_SECURE
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_XML_MIGRATABLE
            xml = dom.XMLDesc(flags)
            return DomainInfo(
                name=dom.name(),
                uuid=dom.UUIDString(),
                state=_STATE_NAMES.get(state, "other"),
                reason=reason,
                xml=xml,
                disks=file_disks(xml),
            )

        return await self._call(f"look up domain {name!r}", do)

    async def inactive_xml(self, name: str) -> str:
        """The persistent (next-boot) definition of ``name``."""

        def do() -> str:
            return str(self._dom(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))

        return await self._call(f"definition of {name!r}", do)

    async def exists(self, name: str) -> bool:
        try:
            await self._call(f"look up domain {name!r}", lambda: self._dom(name))
        except DomainNotFound:
            return False
        return True

    async def state(self, name: str) -> str:
        def do() -> str:
            return _STATE_NAMES.get(self._dom(name).state()[0], "other")

        return await self._call(f"state of {name!r}", do)

    async def list_names(self) -> list[str]:
        def do() -> list[str]:
            return sorted(d.name() for d in self._connection().listAllDomains(0))

        return await self._call("list domains", do)

    async def suspend(self, name: str) -> None:
        await self._call(f"pause {name!r}", lambda: self._dom(name).suspend())

    async def resume(self, name: str) -> None:
        """Resume ``name``; a domain that is already running is left alone."""

        def do() -> None:
            dom = self._dom(name)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()

        await self._call(f"resume {name!r}", do)

    async def define(self, xml: str) -> str:
        """Define a persistent domain; returns its name."""

        def do() -> str:
            return str(self._connection().defineXML(xml).name())

        return await self._call("define domain", do)

    async def start(self, name: str, *, paused: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        await self._call(f"start {name!r}", lambda: self._dom(name).createWithFlags(flags))

    async def destroy(self, name: str) -> None:
        """Power off ``name`` if it runs; absent or stopped domains are fine."""

        def do() -> None:
            dom = self._dom_or_none(name)
            if dom is not None and dom.isActive():
                try:
                    dom.destroy()
                except libvirt.libvirtError as exc:
                    if dom.isActive():
                        raise exc

        await self._call(f"destroy {name!r}", do)

    async def undefine(self, name: str) -> None:
        """Remove the definition of ``name`` (stopping it first); absent is fine.

        Never deletes a file: NVRAM and TPM state named by the definition are
        kept (whoever created them removes them).
        """

        def do() -> None:
            dom = self._dom_or_none(name)
            if dom is None:
                return
            if dom.isActive():
                dom.destroy()
            # KEEP_NVRAM / KEEP_TPM: libvirt would delete whatever path the
            # definition names, which may be a file that is not ours (a clone
            # defined with its source's <nvram> lost the source's UEFI
            # variables that way). Files we made are removed by their owner.
            dom.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
                | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_TPM", 0)
                | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            )

        await self._call(f"undefine {name!r}", do)

    async def snapshot_disks(self, name: str, overlays: dict[str, Path]) -> None:
        """External disk-only snapshot: each disk target gets a new overlay file.

        The old top image becomes the read-only backing file of the overlay.
        No snapshot metadata is kept (the overlays belong to instaclone).
        """
        disks = "".join(
            f"<disk name='{tgt}' snapshot='external'><driver type='qcow2'/>"
            f"<source file='{_xml_attr(str(path))}'/></disk>"
            for tgt, path in overlays.items()
        )
        xml = f"<domainsnapshot><description>instaclone</description><disks>{disks}</disks></domainsnapshot>"
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        await self._call(
            f"disk snapshot of {name!r}", lambda: self._dom(name).snapshotCreateXML(xml, flags)
        )

    # -- guest agent ----------------------------------------------------------------

    async def agent(self, name: str, command: str, arguments: dict[str, Any] | None = None,
                    *, timeout_s: int = 10) -> Any:
        """Run one QEMU guest agent command through libvirt; returns its "return" value."""

        def do() -> Any:
            cmd: dict[str, Any] = {"execute": command}
            if arguments is not None:
                cmd["arguments"] = arguments
            reply = json.loads(libvirt_qemu.qemuAgentCommand(self._dom(name), json.dumps(cmd), timeout_s, 0))
            if "error" in reply:
                raise VirtError(f"guest agent {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

        return await self._call(f"guest agent {command} in {name!r}", do)

    async def agent_exec(self, name: str, argv: list[str], *, stdin: bytes = b"",
                         timeout_s: float = 30.0) -> tuple[int, str]:
        """Run ``argv`` in the guest (guest-exec); returns (exit status, stdout+stderr)."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = (await self.agent(name, "guest-exec", args))["pid"]
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        delay = 0.02
        while True:
            st = await self.agent(name, "guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")) + base64.b64decode(st.get("err-data", ""))
                return int(st.get("exitcode", -1)), out.decode(errors="replace")
            if loop.time() > end:
                raise VirtTimeout(f"{argv[0]} in {name!r} did not finish within {timeout_s:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)  # one status call is ~1 ms; a coarser poll adds up to its step to every command

    # -- network interfaces ---------------------------------------------------------

    @staticmethod
    def _iface_by_mac(dom: libvirt.virDomain, mac: str) -> ET.Element | None:
        for iface in ET.fromstring(dom.XMLDesc(0)).iterfind("./devices/interface"):
            m = iface.find("mac")
            if m is not None and m.get("address", "").lower() == mac.lower():
                return iface
        return None

    async def set_link(self, name: str, mac: str, *, up: bool) -> None:
        """Set the link state of the running domain's NIC with ``mac``."""

        def do() -> None:
            dom = self._dom(name)
            iface = self._iface_by_mac(dom, mac)
            if iface is None:
                raise VirtError(f"{name!r} has no interface with MAC {mac}")
            for old in iface.findall("link"):
                iface.remove(old)
            ET.SubElement(iface, "link", {"state": "up" if up else "down"})
            dom.updateDeviceFlags(ET.tostring(iface, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)

        await self._call(f"set link of {name!r} {mac}", do)

    async def replug_interface(self, name: str, mac: str, *, link_up: bool, timeout_s: float = 10.0) -> None:
        """Hot-unplug the NIC with ``mac`` and plug an identical one back.

        A VM restored from another's state keeps that VM's MAC inside its
        virtio-net device state; a freshly plugged device makes the guest
        read the MAC of the definition. Needs guest ACPI hotplug.
        """

        def do() -> None:
            dom = self._dom(name)
            iface = self._iface_by_mac(dom, mac)
            if iface is None:
                raise VirtError(f"{name!r} has no interface with MAC {mac}")
            dom.detachDeviceFlags(ET.tostring(iface, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            deadline = time.monotonic() + timeout_s
            while self._iface_by_mac(dom, mac) is not None:
                if time.monotonic() > deadline:
                    raise VirtTimeout(f"the guest of {name!r} did not release its NIC {mac} within "
                                      f"{timeout_s:g} s (no ACPI hotplug in the guest?)")
                time.sleep(0.05)
            for tag in ("alias", "link", "target"):
                for el in iface.findall(tag):
                    iface.remove(el)
            ET.SubElement(iface, "link", {"state": "up" if link_up else "down"})
            dom.attachDeviceFlags(ET.tostring(iface, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)

        await self._call(f"replug NIC {mac} of {name!r}", do)

    # -- QEMU monitor: memory and device state --------------------------------------

    def _qmp(self, dom: libvirt.virDomain, command: str, arguments: dict[str, Any] | None = None,
             files: list[int] | None = None) -> Any:
        cmd: dict[str, Any] = {"execute": command}
        if arguments is not None:
            cmd["arguments"] = arguments
        text = json.dumps(cmd)
        if files:
            reply, _ = libvirt_qemu.qemuMonitorCommandWithFiles(dom, text, files, 0)
        else:
            reply = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
        data = json.loads(reply)
        if "error" in data:
            raise VirtError(f"QEMU {command}: {data['error'].get('desc', data['error'])}")
        return data.get("return")

    async def ram_file(self, name: str, alias: str = "pc.ram") -> tuple[Path, bool] | None:
        """(path, shared) of the file behind the domain's RAM backend, or None if not file-backed."""

        def do() -> tuple[Path, bool] | None:
            dom = self._dom(name)
            try:
                path = self._qmp(dom, "qom-get", {"path": f"/objects/{alias}", "property": "mem-path"})
                share = self._qmp(dom, "qom-get", {"path": f"/objects/{alias}", "property": "share"})
            except VirtError:
                return None  # not a memory-backend-file
            return Path(path), bool(share)

        return await self._call(f"RAM file of {name!r}", do)

    def _wait_migration(self, dom: libvirt.virDomain, what: str, timeout_s: float,
                        cancel: threading.Event) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        while True:
            info = self._qmp(dom, "query-migrate") or {}
            status = info.get("status")
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                raise VirtError(f"{what} failed: {info.get('error-desc', status)}")
            if cancel.is_set() or time.monotonic() > deadline:
                try:
                    self._qmp(dom, "migrate_cancel")
                except VirtError:
                    pass
                if cancel.is_set():
                    raise VirtError(f"{what} was cancelled")
                raise VirtTimeout(f"{what} did not finish within {timeout_s:g} s (status {status})")
            cancel.wait(delay)
            delay = min(delay * 2, 0.05)

    def _set_caps(self, dom: libvirt.virDomain, ignore_shared: bool) -> None:
        self._qmp(dom, "migrate-set-capabilities", {
            "capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]
        })

    async def save_state(self, name: str, path: Path, *, ignore_shared: bool = False,
                         timeout_s: float = 120.0) -> dict[str, Any]:
        """Write the (paused) domain's migration stream to ``path``.

        With ``ignore_shared``, RAM in shared memory backends is skipped and
        only device state is written. The domain stays paused and can be
        resumed afterwards. Returns QEMU's final migration statistics.
        """

        def do() -> dict[str, Any]:
            dom = self._dom(name)
            # QEMU migrates a VM only once per pause: a second save fails with
            # "Can't migrate the vm that was paused due to previous migration".
            if (self._qmp(dom, "query-status") or {}).get("status") == "postmigrate":
                raise VirtStateError(
                    f"{name!r} was already captured during this pause (it was paused by its owner and "
                    "cloned before); resume it, or freeze it with 'instaclone freeze' to clone it repeatedly")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                self._set_caps(dom, ignore_shared)
                # QEMU's default bandwidth cap (32 MiB/s) is for networks, not files.
                self._qmp(dom, "migrate-set-parameters", {"max-bandwidth": 1 << 40})
                self._qmp(dom, "getfd", {"fdname": "instaclone-out"}, files=[fd])
            finally:
                os.close(fd)
            self._qmp(dom, "migrate", {"uri": "fd:instaclone-out"})
            return self._wait_migration(dom, f"saving state of {name!r}", timeout_s, cancel)

        cancel = threading.Event()
        return await self._call(f"save state of {name!r}", do, cancel)

    async def load_state(self, name: str, path: Path, *, ignore_shared: bool = False,
                         timeout_s: float = 120.0) -> None:
        """Feed ``path`` into a domain started paused with ``-incoming defer``."""

        def do() -> None:
            dom = self._dom(name)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._set_caps(dom, ignore_shared)
                self._qmp(dom, "getfd", {"fdname": "instaclone-in"}, files=[fd])
            finally:
                os.close(fd)
            self._qmp(dom, "migrate-incoming", {"uri": "fd:instaclone-in"})
            self._wait_migration(dom, f"loading state into {name!r}", timeout_s, cancel)

        cancel = threading.Event()
        await self._call(f"load state into {name!r}", do, cancel)

    # -- block jobs -------------------------------------------------------------------

    @staticmethod
    def _disk_chain(xml: str, target: str) -> list[Path] | None:
        """The images of disk ``target`` in a live domain XML, active layer first; None if no such disk."""
        for disk in ET.fromstring(xml).iterfind("./devices/disk"):
            tgt = disk.find("target")
            if tgt is None or tgt.get("dev") != target:
                continue
            chain: list[Path] = []
            node: ET.Element | None = disk
            while node is not None:
                src = node.find("source")
                path = (src.get("file") or src.get("dev")) if src is not None else None
                if not path:
                    break
                chain.append(Path(path))
                node = node.find("backingStore")
            return chain
        return None

    async def backing_chain(self, name: str, target: str) -> list[Path]:
        """Disk ``target`` of the running domain ``name`` as QEMU uses it: active layer first.

        This is libvirt's view (the live XML's ``backingStore`` elements),
        which a block job updates when it completes.
        """

        def do() -> list[Path]:
            chain = self._disk_chain(self._dom(name).XMLDesc(0), target)
            if chain is None:
                raise VirtError(f"{name!r} has no disk {target!r}")
            return chain

        return await self._call(f"backing chain of {name!r} {target}", do)

    async def _abort_block_job(self, name: str, target: str) -> None:
        """Cancel the block job on ``target`` and wait until it is gone; no job is fine."""

        def do() -> None:
            dom = self._dom(name)
            try:
                # Without VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC libvirt returns once the job is gone.
                dom.blockJobAbort(target, 0)
            except libvirt.libvirtError as exc:
                if dom.blockJobInfo(target, 0):
                    raise exc

        await self._call(f"abort block job of {name!r} {target}", do)

    async def block_pull(self, name: str, target: str, *, base: Path | None, timeout_s: float) -> None:
        """Live block pull on disk ``target`` of the running ``name``; returns when it is done.

        QEMU copies into the active layer every cluster that the images
        between it and ``base`` hold, then makes ``base`` the active layer's
        backing file (``base=None``: everything, no backing file left). Only
        the active layer is written; the images dropped from the chain stay
        as they are. The guest runs on throughout.

        libvirt reports no result for a finished job (it just disappears from
        ``blockJobInfo``) unless one listens to its events, so success is
        read from the live XML afterwards: the chain must be shortened.
        After ``timeout_s`` (or if the caller is cancelled) the job is
        aborted, which leaves the chain as it was, and VirtTimeout raised.
        """
        what = f"block pull of {name!r} {target}" + (f" down to {base}" if base is not None else "")

        def start() -> None:
            dom = self._dom(name)
            if base is None:
                dom.blockPull(target, 0, 0)
            else:
                # flags 0: a pull (not a copy) that keeps ``base`` as backing file.
                dom.blockRebase(target, str(base), 0, 0)

        await self._call(what, start)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = 0.005
        last: dict[str, Any] = {}
        try:
            while True:
                info = await self._call(what, lambda: self._dom(name).blockJobInfo(target, 0))
                if not info:
                    break
                last = dict(info)
                if loop.time() > deadline:
                    await self._abort_block_job(name, target)
                    raise VirtTimeout(f"{what} did not finish within {timeout_s:g} s "
                                      f"({last.get('cur')}/{last.get('end')} bytes); aborted")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        except asyncio.CancelledError:
            with suppress(VirtError):
                await self._abort_block_job(name, target)
            raise
        chain = await self.backing_chain(name, target)
        done = len(chain) == 1 if base is None else (len(chain) >= 2 and chain[1] == Path(base))
        if not done:
            progress = f"{last.get('cur')}/{last.get('end')}" if last else "no progress seen"
            raise VirtError(f"{what} ended without shortening the chain ({progress}); "
                            f"the chain is still {' <- '.join(map(str, reversed(chain)))}")


def _xml_attr(value: str) -> str:
    return (value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&quot;"))
