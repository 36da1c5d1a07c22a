"""The typed shim over libvirt-python: the only module that imports ``libvirt``.

libvirt-python ships no ``py.typed`` marker, so mypy sees its modules as
untyped. The names the hypervisor layer uses are declared here with types
(under ``TYPE_CHECKING``) and bound to libvirt's own objects at run time.
Everything else in :mod:`instaclone.hv` imports libvirt through this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import libvirt
import libvirt_qemu
import libvirtaio

# libvirt prints every error to stderr unless a handler is installed; we
# report errors ourselves, through exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

#: libvirt's callbacks into an event loop implementation (virEventRegisterImpl).
HandleCallback = Callable[[int, int, int, Any], None]  # (watch, fd, events, opaque)
TimeoutCallback = Callable[[int, Any], None]  # (timer, opaque)
CloseCallback = Callable[[Any, int, Any], None]  # (connection, reason, opaque)
#: DEVICE_REMOVED and DEVICE_REMOVAL_FAILED domain events: (connection, domain, device alias, opaque).
DeviceEventCallback = Callable[[Any, "Domain", str, Any], None]

if TYPE_CHECKING:

    class RawLibvirtError(Exception):
        def get_error_code(self) -> int | None: ...
        def get_error_message(self) -> str | None: ...

    class Domain:
        def name(self) -> str: ...
        def UUIDString(self) -> str: ...  # noqa: N802
        def ID(self) -> int: ...  # noqa: N802
        def state(self, flags: int = 0) -> list[int]: ...
        def isActive(self) -> int: ...  # noqa: N802
        def XMLDesc(self, flags: int = 0) -> str: ...  # noqa: N802
        def suspend(self) -> int: ...
        def resume(self) -> int: ...
        def createWithFlags(self, flags: int = 0) -> int: ...  # noqa: N802
        def destroy(self) -> int: ...
        def undefineFlags(self, flags: int = 0) -> int: ...  # noqa: N802
        def snapshotCreateXML(self, xmlDesc: str, flags: int = 0) -> object: ...  # noqa: N802, N803
        def updateDeviceFlags(self, xml: str, flags: int = 0) -> int: ...  # noqa: N802
        def attachDeviceFlags(self, xml: str, flags: int = 0) -> int: ...  # noqa: N802
        def detachDeviceFlags(self, xml: str, flags: int = 0) -> int: ...  # noqa: N802
        def blockPull(self, disk: str, bandwidth: int = 0, flags: int = 0) -> int: ...  # noqa: N802
        def blockRebase(self, disk: str, base: str, bandwidth: int = 0, flags: int = 0) -> int: ...  # noqa: N802
        def blockJobInfo(self, path: str, flags: int = 0) -> dict[str, int]: ...  # noqa: N802
        def blockJobAbort(self, disk: str, flags: int = 0) -> int: ...  # noqa: N802

    class Connection:
        def isAlive(self) -> int: ...  # noqa: N802
        def close(self) -> int: ...
        def lookupByName(self, name: str) -> Domain: ...  # noqa: N802
        def lookupByUUIDString(self, uuidstr: str) -> Domain: ...  # noqa: N802
        def listAllDomains(self, flags: int = 0) -> list[Domain]: ...  # noqa: N802
        def defineXML(self, xml: str) -> Domain: ...  # noqa: N802
        def setKeepAlive(self, interval: int, count: int) -> int: ...  # noqa: N802
        def registerCloseCallback(self, cb: CloseCallback, opaque: Any) -> int: ...  # noqa: N802
        def unregisterCloseCallback(self) -> None: ...  # noqa: N802
        def domainEventRegisterAny(self, dom: Domain | None, eventID: int,  # noqa: N802, N803
                                   cb: DeviceEventCallback, opaque: Any) -> int: ...

    class AsyncIOImpl:
        """libvirtaio's event loop implementation for one asyncio loop."""

        loop: asyncio.AbstractEventLoop

        def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None: ...
        def is_idle(self) -> bool: ...
        def schedule_ff_callback(self, iden: int, opaque: Any) -> None: ...
        def _pending_inc(self) -> None: ...
        def _pending_dec(self) -> None: ...
        def _add_handle(self, fd: int, event: int, cb: HandleCallback, opaque: Any) -> int: ...
        def _update_handle(self, watch: int, event: int) -> None: ...
        def _remove_handle(self, watch: int) -> int: ...
        def _add_timeout(self, timeout: int, cb: TimeoutCallback, opaque: Any) -> int: ...
        def _update_timeout(self, timer: int, timeout: int) -> None: ...
        def _remove_timeout(self, timer: int) -> int: ...

else:
    RawLibvirtError = libvirt.libvirtError
    Domain = libvirt.virDomain
    Connection = libvirt.virConnect
    AsyncIOImpl = libvirtaio.virEventAsyncIOImpl

# -- error codes -----------------------------------------------------------------------

VIR_ERR_INTERNAL_ERROR: Final[int] = libvirt.VIR_ERR_INTERNAL_ERROR
VIR_ERR_NO_CONNECT: Final[int] = libvirt.VIR_ERR_NO_CONNECT
VIR_ERR_INVALID_CONN: Final[int] = libvirt.VIR_ERR_INVALID_CONN
VIR_ERR_RPC: Final[int] = libvirt.VIR_ERR_RPC
VIR_ERR_SYSTEM_ERROR: Final[int] = libvirt.VIR_ERR_SYSTEM_ERROR
VIR_ERR_NO_DOMAIN: Final[int] = libvirt.VIR_ERR_NO_DOMAIN
VIR_ERR_DOM_EXIST: Final[int] = libvirt.VIR_ERR_DOM_EXIST
VIR_ERR_OPERATION_INVALID: Final[int] = libvirt.VIR_ERR_OPERATION_INVALID
VIR_ERR_OPERATION_FAILED: Final[int] = libvirt.VIR_ERR_OPERATION_FAILED
VIR_ERR_OPERATION_TIMEOUT: Final[int] = libvirt.VIR_ERR_OPERATION_TIMEOUT
VIR_ERR_AGENT_UNRESPONSIVE: Final[int] = libvirt.VIR_ERR_AGENT_UNRESPONSIVE

# -- domain states and flags -----------------------------------------------------------

VIR_DOMAIN_RUNNING: Final[int] = libvirt.VIR_DOMAIN_RUNNING
VIR_DOMAIN_BLOCKED: Final[int] = libvirt.VIR_DOMAIN_BLOCKED
VIR_DOMAIN_PAUSED: Final[int] = libvirt.VIR_DOMAIN_PAUSED
VIR_DOMAIN_SHUTDOWN: Final[int] = libvirt.VIR_DOMAIN_SHUTDOWN
VIR_DOMAIN_SHUTOFF: Final[int] = libvirt.VIR_DOMAIN_SHUTOFF
VIR_DOMAIN_CRASHED: Final[int] = libvirt.VIR_DOMAIN_CRASHED
VIR_DOMAIN_PMSUSPENDED: Final[int] = libvirt.VIR_DOMAIN_PMSUSPENDED

VIR_DOMAIN_XML_SECURE: Final[int] = libvirt.VIR_DOMAIN_XML_SECURE
VIR_DOMAIN_XML_INACTIVE: Final[int] = libvirt.VIR_DOMAIN_XML_INACTIVE
VIR_DOMAIN_XML_MIGRATABLE: Final[int] = libvirt.VIR_DOMAIN_XML_MIGRATABLE
VIR_DOMAIN_START_PAUSED: Final[int] = libvirt.VIR_DOMAIN_START_PAUSED
VIR_DOMAIN_AFFECT_LIVE: Final[int] = libvirt.VIR_DOMAIN_AFFECT_LIVE

VIR_DOMAIN_UNDEFINE_MANAGED_SAVE: Final[int] = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA: Final[int] = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
VIR_DOMAIN_UNDEFINE_KEEP_NVRAM: Final[int] = libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
#: Missing from old libvirt-python builds; 0 there (nothing to keep).
VIR_DOMAIN_UNDEFINE_KEEP_TPM: Final[int] = getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_TPM", 0)
VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA: Final[int] = libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA

VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY: Final[int] = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT: Final[int] = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA: Final[int] = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC: Final[int] = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC

# -- domain events ---------------------------------------------------------------------

VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: Final[int] = libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED
VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED: Final[int] = libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED

# -- connections -----------------------------------------------------------------------

VIR_CONNECT_CLOSE_REASON_ERROR: Final[int] = libvirt.VIR_CONNECT_CLOSE_REASON_ERROR
VIR_CONNECT_CLOSE_REASON_EOF: Final[int] = libvirt.VIR_CONNECT_CLOSE_REASON_EOF
VIR_CONNECT_CLOSE_REASON_KEEPALIVE: Final[int] = libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE
VIR_CONNECT_CLOSE_REASON_CLIENT: Final[int] = libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT


def open_connection(uri: str) -> Connection:
    """``virConnectOpen``; raises RawLibvirtError. Blocks: call it on a worker thread."""
    conn: Connection = libvirt.open(uri)
    return conn


def register_event_impl(
    add_handle: Callable[[int, int, HandleCallback, Any], int],
    update_handle: Callable[[int, int], None],
    remove_handle: Callable[[int], int],
    add_timeout: Callable[[int, TimeoutCallback, Any], int],
    update_timeout: Callable[[int, int], None],
    remove_timeout: Callable[[int], int],
) -> None:
    """``virEventRegisterImpl``: once per process, before the connections that should use it."""
    libvirt.virEventRegisterImpl(add_handle, update_handle, remove_handle, add_timeout, update_timeout,
                                 remove_timeout)


def invoke_free_callback(opaque: Any) -> None:
    """Free what libvirt attached to a removed watch or timer; from the event loop, never inside a libvirt call."""
    libvirt.virEventInvokeFreeCallback(opaque)


# -- QEMU-specific calls (libvirt_qemu) -------------------------------------------------


def qemu_agent_command(dom: Domain, cmd: str, timeout_s: int) -> str:
    """One guest agent command (JSON text in, JSON text out); raises RawLibvirtError."""
    reply: str = libvirt_qemu.qemuAgentCommand(dom, cmd, timeout_s, 0)
    return reply


def qemu_monitor_command(dom: Domain, cmd: str, files: list[int] | None = None) -> str:
    """One QMP command, optionally passing file descriptors along; raises RawLibvirtError."""
    if files:
        reply, _ = libvirt_qemu.qemuMonitorCommandWithFiles(dom, cmd, files, 0)
        return str(reply)
    return str(libvirt_qemu.qemuMonitorCommand(dom, cmd, 0))
