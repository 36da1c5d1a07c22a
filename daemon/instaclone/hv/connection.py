"""The libvirt connection: worker threads, reconnects, and a state that tells the truth.

Every libvirt call runs on a worker thread (libvirt-python blocks), so the
event loop never waits on libvirtd. ``libvirtError`` is translated into
:mod:`instaclone.errors` (by :mod:`.translate`); nothing above this layer
sees a libvirt type.

The connection is watched by libvirt's own event loop on asyncio (see
:mod:`.eventloop`) with keepalive probes and a close callback: when
libvirtd stops, the socket's end of file (or, if libvirtd hangs, the
unanswered probes) closes the connection at once, and
:meth:`Connection.is_connected` says so without waiting for a call to fail.
:meth:`Connection.ensure_connected` opens a new one when libvirtd is back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar

from ..errors import DomainNotFound, DomainReplaced, LibvirtUnavailable
from ..log import get as get_logger
from . import _libvirt as lv, eventloop
from .translate import connection_lost, never_sent, translate

T = TypeVar("T")

#: Keepalive: a probe after this many idle seconds ...
KEEPALIVE_INTERVAL_S = 2
#: ... and the connection is closed when this many probes in a row got no answer
#: (a hung libvirtd is noticed after about interval * (count + 1) = 8 s).
KEEPALIVE_COUNT = 3
#: How long :meth:`Connection.ensure_connected` waits for a reconnect before it
#: answers False (the attempt goes on: a hung libvirtd may still accept it).
CONNECT_WAIT_S = 2.0

_CLOSE_REASONS = {
    lv.VIR_CONNECT_CLOSE_REASON_ERROR: "socket error (libvirtd stopped, or the connection broke)",
    lv.VIR_CONNECT_CLOSE_REASON_EOF: "end of file (libvirtd stopped)",
    lv.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout (libvirtd does not answer)",
    lv.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us",
}

Opener = Callable[[str], lv.Connection]


def _is_alive(conn: lv.Connection) -> bool:
    try:
        return bool(conn.isAlive())
    except lv.RawLibvirtError:
        return False


class _Link:
    """One open libvirt connection, and why it closed once libvirt says it did."""

    def __init__(self, conn: lv.Connection) -> None:
        self.conn = conn
        self.closed: str | None = None  # set by the close callback, from any thread

    @property
    def alive(self) -> bool:
        return self.closed is None and _is_alive(self.conn)


class Connection:
    """One libvirt connection used from a pool of worker threads."""

    def __init__(self, uri: str = "qemu:///system", *, threads: int = 8, agent_threads: int = 4,
                 opener: Opener = lv.open_connection,
                 keepalive: tuple[int, int] = (KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)) -> None:
        self.uri = uri
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="libvirt")
        # Guest-agent commands block their thread until the guest answers (up
        # to their timeout, 60 s for a file chunk): a hung or hostile guest
        # would hold the libvirt threads a stun's calls queue for. They get
        # their own bounded pool; past agent_threads they queue behind each
        # other, never in front of a stun.
        self._agent_pool = ThreadPoolExecutor(max_workers=agent_threads, thread_name_prefix="libvirt-agent")
        self._opener = opener
        self._keepalive = keepalive
        self._link: _Link | None = None
        self._conn_lock = threading.Lock()
        self._connecting: asyncio.Future[lv.Connection] | None = None
        self._log = get_logger(component="hv", uri=uri)

    # -- calls on worker threads ---------------------------------------------------------

    async def _call(self, action: str, fn: Callable[[], T], cancel: threading.Event | None = None, *,
                    agent: bool = False) -> T:
        """Run ``fn`` on a worker thread (``agent``: one of the guest-agent pool's); translate libvirt errors.

        If the caller is cancelled we still wait for the thread to finish: a
        libvirt call cannot be interrupted, and its effect must be known before
        any undo runs. Long operations take a ``cancel`` event that is set
        first, so that they stop early (e.g. cancel a migration).
        """
        loop = asyncio.get_running_loop()
        eventloop.attach(loop)  # before the thread may open a connection
        fut = loop.run_in_executor(self._agent_pool if agent else self._pool, self._run, action, fn)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if cancel is not None:
                cancel.set()
            await asyncio.wait([fut])
            raise

    def _run(self, action: str, fn: Callable[[], T]) -> T:
        link = self._link
        try:
            return fn()
        except lv.RawLibvirtError as exc:
            if not connection_lost(exc):
                raise translate(exc, action) from None
            # libvirtd went away (restarted, most likely): drop the dead
            # connection so that the next call opens a new one.
            self._drop(link)
            if not never_sent(exc):
                raise translate(exc, action) from None
        # The request never reached libvirtd: sending it once more on a
        # new connection cannot do anything twice.
        try:
            return fn()
        except lv.RawLibvirtError as exc:
            if connection_lost(exc):
                self._drop(self._link)
            raise translate(exc, action) from None

    # -- the connection (worker threads) -------------------------------------------------

    def _connection(self) -> lv.Connection:
        """The open connection, opening a new one if there is none or it died."""
        with self._conn_lock:
            link = self._link
            if link is not None and link.alive:
                return link.conn
            if link is not None:
                self._release(link)
            self._link = self._open_link()
            return self._link.conn

    def _open_link(self) -> _Link:
        try:
            conn = self._opener(self.uri)
        except lv.RawLibvirtError as exc:
            raise LibvirtUnavailable(f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}",
                                      libvirt_code=exc.get_error_code()) from None
        link = _Link(conn)
        try:
            # Both need the event loop (registered before the open, in _call).
            if conn.setKeepAlive(*self._keepalive) == 1:
                self._log.warning("libvirt.no_keepalive", why="libvirtd does not support keepalive")
            conn.registerCloseCallback(self._on_close, link)
        except lv.RawLibvirtError as exc:
            with suppress(lv.RawLibvirtError):
                conn.close()
            raise LibvirtUnavailable(f"cannot watch the libvirt connection to {self.uri}: "
                                      f"{exc.get_error_message()}", libvirt_code=exc.get_error_code()) from None
        return link

    def _on_close(self, _conn: object, reason: int, link: _Link) -> None:
        """libvirt's close callback: the loop's thread, or a worker whose call saw the end."""
        link.closed = _CLOSE_REASONS.get(reason, f"reason {reason}")
        if reason != lv.VIR_CONNECT_CLOSE_REASON_CLIENT:
            self._log.warning("libvirt.connection_closed", reason=link.closed)

    def _drop(self, link: _Link | None) -> None:
        """Forget ``link`` if it is still the current connection."""
        with self._conn_lock:
            if link is not None and self._link is link:
                self._link = None
                self._release(link)

    @staticmethod
    def _release(link: _Link) -> None:
        with suppress(lv.RawLibvirtError):
            link.conn.unregisterCloseCallback()
        with suppress(lv.RawLibvirtError):
            link.conn.close()

    def _dom(self, name: str) -> lv.Domain:
        return self._connection().lookupByName(name)

    def _dom_id(self, name: str, uuid: str) -> lv.Domain:
        """The domain whose UUID is ``uuid``, if it is named ``name``.

        DomainNotFound if neither the UUID nor the name is defined;
        DomainReplaced if the name now belongs to another UUID, or the UUID
        to another name. The handle names the domain by its UUID in every
        later call (libvirt looks a handle up by UUID on the daemon's side),
        so a domain defined under the name meanwhile is never reached.
        """
        conn = self._connection()
        try:
            dom = conn.lookupByUUIDString(uuid)
        except lv.RawLibvirtError as exc:
            if exc.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                raise
            holder = self._dom_or_none(name)
            if holder is None:
                raise DomainNotFound(f"no domain {name!r} (UUID {uuid})", libvirt_code=lv.VIR_ERR_NO_DOMAIN) from None
            raise DomainReplaced(f"domain {name!r} is not the one instaclone made: its UUID is "
                                 f"{holder.UUIDString()}, not {uuid}; it was left alone") from None
        if dom.name() != name:
            raise DomainReplaced(f"the domain instaclone made as {name!r} (UUID {uuid}) is named "
                                 f"{dom.name()!r} now; it was left alone")
        return dom

    def _dom_or_none(self, name: str) -> lv.Domain | None:
        try:
            return self._dom(name)
        except lv.RawLibvirtError as exc:
            if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                return None
            raise

    # -- public ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection; LibvirtUnavailable if libvirtd cannot be reached."""
        await self._call("connect", self._connection)

    async def is_connected(self) -> bool:
        """Whether the connection is open and alive; no reconnect, no call to libvirtd."""
        link = self._link
        if link is None or link.closed is not None:
            return False
        return await self._call("isAlive", lambda: _is_alive(link.conn))

    async def ensure_connected(self) -> bool:
        """True if connected, reconnecting first if the connection died (libvirtd restarted).

        Waits at most CONNECT_WAIT_S for the reconnect; never raises.
        """
        if await self.is_connected():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._reconnect()), CONNECT_WAIT_S)
        except (LibvirtUnavailable, TimeoutError):
            return False
        return await self.is_connected()

    def _reconnect(self) -> asyncio.Future[lv.Connection]:
        """The reconnect in progress, or a new one: one at a time however many callers wait."""
        if self._connecting is None or self._connecting.done():
            loop = asyncio.get_running_loop()
            eventloop.attach(loop)
            self._connecting = loop.run_in_executor(self._pool, self._connection)
            # An attempt that outlived its waiters must not log "exception never retrieved".
            self._connecting.add_done_callback(_consume)
        return self._connecting

    async def close(self) -> None:
        """Close the connection and stop the worker threads (after their calls finish)."""

        def do() -> None:
            with self._conn_lock:
                if self._link is not None:
                    self._release(self._link)
                    self._link = None

        await self._call("close", do)
        # libvirt removed the connection's watches from the loop (queued): let them go.
        await asyncio.sleep(0)
        await asyncio.to_thread(self._agent_pool.shutdown, wait=True)
        await asyncio.to_thread(self._pool.shutdown, wait=True)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
