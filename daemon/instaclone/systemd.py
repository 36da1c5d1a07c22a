"""systemd integration without dependencies: sd_notify, watchdog, socket activation, journald.

Everything here is stdlib only and a no-op outside systemd: ``notify`` returns
False without ``$NOTIFY_SOCKET``, ``listen_fds`` returns ``[]`` without
``$LISTEN_PID``/``$LISTEN_FDS``, and ``journal_send`` returns False when no
journald listens. None of the notification or journal calls raise on I/O
errors: a daemon must never fail because its supervisor went away.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import re
import socket
import struct
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

#: journald's native socket (the environment override exists for tests).
JOURNAL_SOCKET = os.environ.get("INSTACLONE_JOURNAL_SOCKET", "/run/systemd/journal/socket")
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed fds start right after stdio
# A stuck PID 1 must not stall the event loop for long; a dropped ping is better.
_SEND_TIMEOUT_S = 1.0
# structlog level -> syslog priority (journald's PRIORITY field).
PRIORITIES = {"debug": 7, "info": 6, "notice": 5, "warning": 5, "warn": 5,
              "error": 3, "exception": 3, "critical": 2, "fatal": 2}


def notify(*fields: str) -> bool:
    """Send one sd_notify datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is
    unset or not a Unix socket address, or the send failed. Never raises.
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    if target.startswith("@"):
        address: str | bytes = b"\0" + target[1:].encode()  # abstract namespace
    elif target.startswith("/"):
        address = target
    else:
        return False  # unset, or a transport we do not speak (vsock:...)
    try:
        payload = "\n".join(fields).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto(payload, address)
    except Exception:  # noqa: BLE001 -- documented: notifying must never break the daemon
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the notify datagram.
    return " ".join(text.splitlines())


class Notifier:
    """The sd_notify messages instacloned sends; each returns ``notify``'s result."""

    def ready(self, status: str = "") -> bool:
        """Start-up (or a reload) is complete: systemd marks the unit active."""
        return notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status``."""
        return notify(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        """Shutdown has begun (jobs are being drained/rolled back)."""
        return notify("STOPPING=1")

    def reloading(self) -> bool:
        """A reload has begun; send ``ready()`` when it is done.

        MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this
        message to the reload it requested; older versions ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """One keep-alive ping for ``WatchdogSec=``."""
        return notify("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """Seconds between pings (half the watchdog period), or None if no watchdog is armed for us.

        Follows sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive
        integer and ``$WATCHDOG_PID``, when set, must be our pid.
        """
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", ""))
            pid = os.environ.get("WATCHDOG_PID")
            if pid is not None and int(pid) != os.getpid():
                return None
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None

    async def watchdog_loop(self, stop: asyncio.Event) -> None:
        """Ping now and then every ``watchdog_interval_s()`` until ``stop`` is set.

        Runs on the event loop on purpose: a blocked loop stops the pings and
        systemd restarts the daemon. Returns at once when no watchdog is armed.
        """
        interval = self.watchdog_interval_s()
        if interval is None:
            return
        while not stop.is_set():
            self.watchdog()
            try:
                async with asyncio.timeout(interval):  # not wait_for: it can swallow a cancel on 3.11
                    await stop.wait()
            except TimeoutError:
                pass


def listen_fds() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (sd_listen_fds(3)), or ``[]``.

    Only when ``$LISTEN_PID`` is our pid: fds 3 .. 3+$LISTEN_FDS-1 become
    close-on-exec ``socket.socket`` objects (family and type read from the
    fd). LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES are always removed from
    ``os.environ`` so child processes never inherit them. Raises OSError if a
    passed fd is not a socket (a unit with ListenFIFO=, which we do not use).
    """
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(n, 0)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def under_systemd() -> bool:
    """True when started by systemd (``$INVOCATION_ID``) or logging to the journal (``$JOURNAL_STREAM``)."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def journal_field_name(key: str) -> str | None:
    """``key`` as a valid journal field name, or None if nothing valid remains.

    Upper-cased, invalid characters become '_', leading '_' are stripped
    (those names are journald's trusted fields and would be dropped), a
    leading digit gets an ``F_`` prefix, and the result is cut to 64 chars.
    """
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if name[:1].isdigit():
        name = "F_" + name
    return name[:64] or None


def _journal_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def journal_payload(message: str, priority: int, fields: Mapping[str, object]) -> bytes:
    """The native-protocol datagram: ``KEY=value\\n``, or the binary form for values with newlines."""
    out = bytearray()
    for key, value in (("MESSAGE", message), ("PRIORITY", str(priority)), *fields.items()):
        name = journal_field_name(key)
        if name is None:
            continue
        data = _journal_value(value).encode("utf-8", "replace")
        if b"\n" in data:  # KEY\n<u64 LE length><data>\n
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def _send_journal(sock: socket.socket, payload: bytes, path: str) -> bool:
    try:
        sock.sendto(payload, path)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
            return False
    # Too big for one datagram: journald accepts a sealed memfd holding it.
    try:
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            # Not socket.send_fds: Python 3.11's ignores its address argument.
            sock.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, path)
            return True
        finally:
            os.close(fd)
    except OSError:
        return False


def journal_send(message: str, priority: int, fields: Mapping[str, object], *,
                 path: str = JOURNAL_SOCKET) -> bool:
    """Send one entry to journald; True if it was handed over, False otherwise. Never raises OSError."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False
    with sock:
        return _send_journal(sock, journal_payload(message, priority, fields), path)


def _logfmt(value: object) -> str:
    text = _journal_value(value)
    return text if text and not re.search(r'[\s="]', text) else json.dumps(text)


_OWN_FIELDS = frozenset({"MESSAGE", "PRIORITY", "EVENT", "SYSLOG_IDENTIFIER"})


class JournaldRenderer:
    """Final structlog processor: each event becomes one native journald entry.

    Fields: every event-dict key upper-cased (``job_id`` -> ``JOB_ID``; non
    strings JSON-encoded), ``EVENT`` the event name, ``PRIORITY`` from the
    level, ``SYSLOG_IDENTIFIER``. ``MESSAGE`` is what ``journalctl -u`` shows:
    the event name and its ``key=value`` pairs, then any traceback.

    When journald took the entry it raises ``structlog.DropEvent`` so the
    logger does not also print it (stdout is the journal too under systemd)
    unless ``echo`` is true. When journald is unreachable it returns the
    JSON line for the logger to print: logs fall back to stdout.
    """

    def __init__(self, identifier: str = "instacloned", *, path: str = JOURNAL_SOCKET,
                 echo: bool = False) -> None:
        self.identifier, self.path, self.echo = identifier, path, echo
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Logging runs on the event loop: never wait for a busy journald. A
        # full socket buffer (EAGAIN) makes this entry go to stdout instead.
        self._sock.setblocking(False)

    def close(self) -> None:
        self._sock.close()

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        event = str(event_dict.get("event", ""))
        level = str(event_dict.get("level", method_name)).lower()
        extra = {k: v for k, v in event_dict.items() if k not in ("event", "level", "timestamp")}
        message = " ".join([event, *(f"{k}={_logfmt(v)}" for k, v in extra.items() if k != "exception")])
        if "exception" in extra:
            message += "\n" + str(extra["exception"])
        # A key that would land on one of our own fields keeps its value under DATA_<KEY>.
        fields = {f"data_{k}" if journal_field_name(k) in _OWN_FIELDS else k: v for k, v in extra.items()}
        fields.update(EVENT=event, SYSLOG_IDENTIFIER=self.identifier)
        sent = _send_journal(self._sock, journal_payload(message, PRIORITIES.get(level, 6), fields), self.path)
        if sent and not self.echo:
            import structlog  # only reached as a structlog processor, where structlog is loaded

            raise structlog.DropEvent
        return json.dumps(event_dict, default=str)
