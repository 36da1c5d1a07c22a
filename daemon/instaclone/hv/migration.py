"""Memory and device state, moved with QEMU's own migration stream through the QEMU monitor.

The stream goes to a file descriptor that we open and hand to QEMU (``exec:``
URIs get QEMU killed by libvirt's seccomp sandbox, which denies spawning
processes, and QEMU must never open a path of ours itself). QEMU 8.2 and later
take it into an fdset (``add-fd``) and migrate to ``file:/dev/fdset/N``; older
ones get it with ``getfd`` and migrate to ``fd:NAME``, which QEMU 9.1
deprecated for files (it warns in the domain's log on every save).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..errors import DomainStateInvalid, LibvirtError, LibvirtTimeout
from . import _libvirt as lv
from .connection import Connection
from .records import MigrationInfo, QemuFacts


def qmp(dom: lv.Domain, command: str, arguments: dict[str, Any] | None = None,
        files: list[int] | None = None) -> Any:
    """One QMP command on ``dom``'s monitor; its "return" value. LibvirtError if QEMU answers an error."""
    cmd: dict[str, Any] = {"execute": command}
    if arguments is not None:
        cmd["arguments"] = arguments
    data = json.loads(lv.qemu_monitor_command(dom, json.dumps(cmd), files))
    if "error" in data:
        raise LibvirtError(f"QEMU {command}: {data['error'].get('desc', data['error'])}")
    return data.get("return")


def _wait_migration(dom: lv.Domain, what: str, timeout_s: float, cancel: threading.Event) -> dict[str, Any]:
    """Poll QEMU until the migration completes; cancel it on timeout or ``cancel``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        info = qmp(dom, "query-migrate") or {}
        status = info.get("status")
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled"):
            raise LibvirtError(f"{what} failed: {info.get('error-desc', status)}")
        if cancel.is_set() or time.monotonic() > deadline:
            with suppress(LibvirtError):  # it ended meanwhile; the error below says why we stopped
                qmp(dom, "migrate_cancel")
            if cancel.is_set():
                raise LibvirtError(f"{what} was cancelled")
            raise LibvirtTimeout(f"{what} did not finish within {timeout_s:g} s (status {status})")
        cancel.wait(delay)
        # A device-state save or load takes 10-50 ms: a look every 10 ms at
        # most keeps the wait from adding much to it.
        delay = min(delay * 2, 0.01)


def _set_caps(dom: lv.Domain, ignore_shared: bool, *, pause_before_switchover: bool = False,
              auto_converge: bool = False, mapped_ram: bool | None = None) -> None:
    # Every capability we ever set, every time: QEMU keeps them between
    # migrations, and a save with pause-before-switchover left on from a
    # pre-copy would wait at switchover for ever. mapped-ram and multifd
    # only where the caller knows that QEMU has them (None: not mentioned;
    # a QEMU before 9.0 refuses the whole command for a name it lacks).
    caps = {"x-ignore-shared": ignore_shared, "pause-before-switchover": pause_before_switchover,
            "auto-converge": auto_converge}
    if mapped_ram is not None:
        caps |= {"mapped-ram": mapped_ram, "multifd": mapped_ram}
    qmp(dom, "migrate-set-capabilities", {
        "capabilities": [{"capability": k, "state": v} for k, v in caps.items()]
    })


def _facts(dom: lv.Domain) -> QemuFacts:
    q = (qmp(dom, "query-version") or {}).get("qemu") or {}
    kvm = qmp(dom, "query-kvm") or {}
    version = (int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)))
    return QemuFacts(version, "kvm" if kvm.get("enabled") else "tcg")


def _file_caps(dom: lv.Domain, facts: QemuFacts, ignore_shared: bool, channels: int, *, outgoing: bool) -> None:
    """Capabilities and parameters of a save to (or a load from) a file: the two sides must agree.

    ``channels`` > 0: QEMU's mapped-ram format (each RAM page at its own
    offset, zero pages never written, so the file is sparse) through that many
    multifd channels; 0: the sequential stream.
    """
    if channels and not facts.mapped_ram:
        raise LibvirtError(f"the mapped-ram format needs QEMU 9.0 or later; this domain runs QEMU {facts.text}")
    _set_caps(dom, ignore_shared, mapped_ram=bool(channels) if facts.mapped_ram else None)
    params: dict[str, int] = {}
    if outgoing:
        # QEMU's default bandwidth cap (32 MiB/s) is for networks, not files.
        params["max-bandwidth"] = 1 << 40
    if channels:
        params["multifd-channels"] = channels
    if params:  # each command is a round trip, inside the stun for a save
        qmp(dom, "migrate-set-parameters", params)


def _reset_file_caps(dom: lv.Domain, facts: QemuFacts, channels: int) -> None:
    """mapped-ram and multifd off again: QEMU keeps them, and a later socket migration (a pre-copy) fails with them."""
    if channels:
        with suppress(LibvirtError):  # the domain is gone, or a migration still runs: nothing to keep clean
            _set_caps(dom, False, mapped_ram=False)


@contextmanager
def _stream_uri(dom: lv.Domain, fd: int, facts: QemuFacts, tag: str) -> Iterator[str]:
    """The migration URI by which ``dom``'s QEMU reaches our open file ``fd``; the caller closes ``fd``.

    QEMU 8.2+: the descriptor goes into a new fdset (``add-fd``), the URI is
    ``file:/dev/fdset/N``, and the fdset is removed (``remove-fd``) when the
    block ends, also when it failed; QEMU keeps its own duplicates until the
    migration is over. Older QEMUs: ``getfd`` + ``fd:NAME`` (QEMU takes the
    descriptor when the migration starts).
    """
    if not facts.file_migration:
        qmp(dom, "getfd", {"fdname": tag}, files=[fd])
        yield f"fd:{tag}"
        return
    fdset = int((qmp(dom, "add-fd", {"opaque": tag}, files=[fd]) or {})["fdset-id"])
    try:
        yield f"file:/dev/fdset/{fdset}"
    finally:
        with suppress(LibvirtError):  # the domain is gone: so is its fdset
            qmp(dom, "remove-fd", {"fdset-id": fdset})


def _finishing(dom: lv.Domain) -> bool:
    """QEMU's run state is still finish-migrate: a migration's end is not settled yet."""
    return (qmp(dom, "query-status") or {}).get("status") == "finish-migrate"


#: Statuses of a migration that is still in flight (QEMU's MigrationStatus).
IN_FLIGHT = ("setup", "active", "pre-switchover", "device", "postcopy-active", "postcopy-paused",
             "postcopy-recover", "wait-unplug", "cancelling")


#: QEMU processes whose facts are remembered (a start gives a domain a new ID: a new entry).
FACTS_KEPT = 512


class Migration(Connection):
    """RAM file lookup, save and load of a domain's migration stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: (UUID, domain ID) -> what that QEMU process said of itself
        self._facts_seen: dict[tuple[str, int], QemuFacts] = {}

    def _facts_of(self, dom: lv.Domain) -> QemuFacts:
        """``dom``'s QEMU facts, asked once per QEMU process: every save and load needs them, inside the stun.

        A running domain's ID is its QEMU process's (libvirt gives every start
        a new one; ``ID()`` and ``UUIDString()`` cost no round trip).
        """
        key = (dom.UUIDString(), dom.ID())
        facts = self._facts_seen.get(key)
        if facts is None:
            facts = _facts(dom)
            if len(self._facts_seen) >= FACTS_KEPT:
                self._facts_seen.clear()
            self._facts_seen[key] = facts
        return facts

    async def ram_file(self, name: str, alias: str = "pc.ram") -> tuple[Path, bool] | None:
        """(path, shared) of the file behind the domain's RAM backend, or None if not file-backed."""

        def do() -> tuple[Path, bool] | None:
            dom = self._dom(name)
            try:
                path = qmp(dom, "qom-get", {"path": f"/objects/{alias}", "property": "mem-path"})
                share = qmp(dom, "qom-get", {"path": f"/objects/{alias}", "property": "share"})
            except LibvirtError:
                return None  # not a memory-backend-file
            return Path(path), bool(share)

        return await self._call(f"RAM file of {name!r}", do)

    async def qemu_facts(self, name: str) -> QemuFacts:
        """The active domain's QEMU version and accelerator (QMP ``query-version``, ``query-kvm``)."""

        return await self._call(f"QEMU version of {name!r}", lambda: self._facts_of(self._dom(name)))

    async def save_state(self, name: str, path: Path, *, ignore_shared: bool = False,
                         mapped_ram_channels: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
        """Write the (paused) domain's migration stream to ``path``.

        With ``ignore_shared``, RAM in shared memory backends is skipped and
        only device state is written. ``mapped_ram_channels`` > 0 writes
        QEMU's mapped-ram format (QEMU 9.0+: RAM pages at fixed offsets,
        zero pages left as holes) with that many parallel channels; a load
        must name the same. The domain stays paused and can be resumed
        afterwards. Returns QEMU's final migration statistics.
        DomainStateInvalid if the domain was already captured during this pause.
        """
        cancel = threading.Event()

        def do() -> dict[str, Any]:
            dom = self._dom(name)
            # QEMU migrates a VM only once per pause: a second save fails with
            # "Can't migrate the vm that was paused due to previous migration".
            if (qmp(dom, "query-status") or {}).get("status") == "postmigrate":
                raise DomainStateInvalid(
                    f"{name!r} was already captured during this pause (it was paused by its owner and "
                    "cloned before); resume it, or freeze it with 'instaclone freeze' to clone it repeatedly")
            facts = self._facts_of(dom)
            _file_caps(dom, facts, ignore_shared, mapped_ram_channels, outgoing=True)
            try:
                # Never through a link (the directory is root's; issue 21).
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    raise LibvirtError(f"cannot create the state file {path} of {name!r}: {exc.strerror}") from None
                try:
                    with _stream_uri(dom, fd, facts, "instaclone-out") as uri:
                        os.close(fd)  # QEMU has its own now
                        fd = -1
                        qmp(dom, "migrate", {"uri": uri})
                        return _wait_migration(dom, f"saving state of {name!r}", timeout_s, cancel)
                finally:
                    if fd >= 0:
                        os.close(fd)
            finally:
                _reset_file_caps(dom, facts, mapped_ram_channels)

        return await self._call(f"save state of {name!r}", do, cancel)

    async def load_state(self, name: str, path: Path, *, ignore_shared: bool = False,
                         mapped_ram_channels: int = 0, timeout_s: float = 120.0) -> None:
        """Feed ``path`` into a domain started paused with ``-incoming defer``.

        ``ignore_shared`` and ``mapped_ram_channels`` as the save that wrote it had them.
        """
        cancel = threading.Event()

        def do() -> None:
            dom = self._dom(name)
            facts = self._facts_of(dom)
            _file_caps(dom, facts, ignore_shared, mapped_ram_channels, outgoing=False)
            try:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError as exc:
                    raise LibvirtError(f"cannot open the state file {path} for {name!r}: {exc.strerror}") from None
                try:
                    with _stream_uri(dom, fd, facts, "instaclone-in") as uri:
                        os.close(fd)
                        fd = -1
                        qmp(dom, "migrate-incoming", {"uri": uri})
                        _wait_migration(dom, f"loading state into {name!r}", timeout_s, cancel)
                finally:
                    if fd >= 0:
                        os.close(fd)
            finally:
                _reset_file_caps(dom, facts, mapped_ram_channels)

        await self._call(f"load state into {name!r}", do, cancel)

    # -- live pre-copy into a shadow QEMU (memory backend filecow, mode precopy) --------

    async def migrate_live(self, name: str, target: str, *, downtime_ms: int, auto_converge: bool = True) -> None:
        """Start a live pre-copy migration of ``name`` into the paused incoming ``target``."""

        def do() -> None:
            src, dst = self._dom(name), self._dom(target)
            if (qmp(src, "query-migrate") or {}).get("status") in IN_FLIGHT:
                raise DomainStateInvalid(f"{name!r} is already being migrated")
            out, inc = socket.socketpair()
            try:
                qmp(dst, "getfd", {"fdname": "instaclone-precopy-in"}, files=[inc.fileno()])
                qmp(dst, "migrate-incoming", {"uri": "fd:instaclone-precopy-in"})
                _set_caps(src, False, pause_before_switchover=True, auto_converge=auto_converge)
                qmp(src, "migrate-set-parameters", {"max-bandwidth": 1 << 40, "downtime-limit": int(downtime_ms)})
                qmp(src, "getfd", {"fdname": "instaclone-precopy-out"}, files=[out.fileno()])
            finally:
                # QEMU has its own copies now; ours would keep the stream open
                # after either side is gone.
                out.close()
                inc.close()
            qmp(src, "migrate", {"uri": "fd:instaclone-precopy-out"})

        await self._call(f"live migration of {name!r} into {target!r}", do)

    async def wait_migration(self, name: str, *, until: tuple[str, ...], timeout_s: float) -> MigrationInfo:
        """Poll until the migration's status is in ``until``; LibvirtError if it failed, LibvirtTimeout if late."""
        cancel = threading.Event()

        def do() -> MigrationInfo:
            dom = self._dom(name)
            deadline = time.monotonic() + timeout_s
            last_running = time.monotonic()
            while True:
                looked = time.monotonic()
                info = qmp(dom, "query-migrate") or {}
                status = str(info.get("status", "none"))
                # "completed" shows before QEMU leaves its finish-migrate run
                # state (in a bottom half); until then a `cont` fails with
                # "Migration is not finalized yet".
                if status in until and not (status == "completed" and _finishing(dom)):
                    return MigrationInfo(status, dict(info), last_running)
                if status in ("failed", "cancelled"):
                    raise LibvirtError(f"migration of {name!r} {status}: {info.get('error-desc', status)}")
                if status == "active":
                    last_running = looked
                if cancel.is_set():
                    raise LibvirtError(f"waiting for the migration of {name!r} was cancelled")
                if time.monotonic() > deadline:
                    raise LibvirtTimeout(f"the migration of {name!r} was not {'/'.join(until)} within "
                                      f"{timeout_s:g} s (status {status}, "
                                      f"{(info.get('ram') or {}).get('remaining', '?')} bytes of RAM to go)")
                # The first pass over RAM takes seconds; once QEMU iterates
                # over dirty pages the switchover can come any moment, and the
                # gap between looks bounds how well the stun is measured.
                rounds = (info.get("ram") or {}).get("dirty-sync-count", 0)
                cancel.wait(0.001 if status != "active" or rounds >= 2 else 0.01)

        return await self._call(f"wait for the migration of {name!r}", do, cancel)

    async def continue_migration(self, name: str) -> None:
        await self._call(f"continue the migration of {name!r}",
                         lambda: qmp(self._dom(name), "migrate-continue", {"state": "pre-switchover"}))

    async def cancel_migration(self, name: str) -> bool:
        """Cancel an in-flight outgoing migration of ``name`` and wait until QEMU is done with it.

        A domain that is not running (destroyed, crashed) has no migration:
        nothing to cancel.
        """

        def do() -> bool:
            dom = self._dom(name)
            if not dom.isActive():
                return False
            cancelled = (qmp(dom, "query-migrate") or {}).get("status") in IN_FLIGHT
            if cancelled:
                with suppress(LibvirtError):  # it ended meanwhile
                    qmp(dom, "migrate_cancel")
            # Also when it had completed: until QEMU leaves finish-migrate,
            # the source cannot be resumed.
            deadline = time.monotonic() + 30.0
            while (qmp(dom, "query-migrate") or {}).get("status") in IN_FLIGHT or _finishing(dom):
                if time.monotonic() > deadline:
                    raise LibvirtTimeout(f"the migration of {name!r} did not end within 30 s of migrate_cancel")
                time.sleep(0.005)
            return cancelled

        return await self._call(f"cancel the migration of {name!r}", do)
