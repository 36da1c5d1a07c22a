"""libvirt's event loop on asyncio: libvirtaio, fed safely from worker threads.

A libvirt connection only notices that libvirtd went away, and only sends
keepalive probes, if an event loop implementation is registered and running
(``virEventRegisterImpl``); without one, ``isAlive()`` stays true until a
call fails. libvirtaio is that implementation on asyncio, but it assumes
libvirt is called from the loop's own thread: it calls ``loop.add_reader``
and creates tasks right inside libvirt's add/update/remove callbacks.
Here libvirt runs on worker threads (every RPC call disables and re-enables
its socket's watch from the calling thread), and asyncio allows those
operations from the loop's thread only.

:class:`EventBridge` is what libvirt gets instead: each of its calls gets an
id of ours at once and is queued onto the loop with ``call_soon_threadsafe``,
in order, where libvirtaio applies it. Queued, never waited for: the calling
thread holds libvirt's client lock, which the loop needs to dispatch the
socket's event, so waiting would deadlock.

libvirt accepts one implementation per process, ever; asyncio may run one
loop after another (the tests do, one per test). The bridge is registered
once and keeps one libvirtaio instance per loop; :func:`attach` points new
watches at the running loop. Watches of a loop that was closed died with it.

:class:`LoopImpl` is libvirtaio with its timers on ``loop.call_later`` and
its free callbacks on ``loop.call_soon`` instead of tasks: libvirt removes a
connection's timer when the connection's last reference goes, which may be
whenever the garbage collector frees a domain object, and libvirtaio would
create and cancel an untracked task then (the daemon runs tracked tasks only).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from . import _libvirt as lv

ImplFactory = Callable[[asyncio.AbstractEventLoop], lv.AsyncIOImpl]


class _Timer:
    def __init__(self, cb: lv.TimeoutCallback, opaque: Any) -> None:
        self.cb = cb
        self.opaque = opaque
        self.timeout_ms = -1
        self.handle: asyncio.TimerHandle | None = None


class LoopImpl(lv.AsyncIOImpl):
    """libvirtaio's implementation, with timers and free callbacks as loop callbacks, not tasks.

    Every method runs on the loop's thread (the bridge sees to that).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._timers: dict[int, _Timer] = {}
        self._timer_ids = itertools.count(1)

    def _add_timeout(self, timeout: int, cb: lv.TimeoutCallback, opaque: Any) -> int:
        iden = next(self._timer_ids)
        self._timers[iden] = _Timer(cb, opaque)
        self._pending_inc()  # until its free callback ran, as libvirtaio counts
        self._arm(iden, timeout)
        return iden

    def _update_timeout(self, timer: int, timeout: int) -> None:
        if timer in self._timers:
            self._arm(timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        t = self._timers.pop(timer, None)
        if t is None:
            return -1
        if t.handle is not None:
            t.handle.cancel()
        self.schedule_ff_callback(timer, t.opaque)
        return 0

    def _arm(self, iden: int, timeout_ms: int) -> None:
        """libvirt's timer semantics: -1 off, 0 on every loop iteration, else every ``timeout_ms``."""
        t = self._timers[iden]
        t.timeout_ms = timeout_ms
        if t.handle is not None:
            t.handle.cancel()
            t.handle = None
        if timeout_ms >= 0:
            t.handle = self.loop.call_later(timeout_ms / 1000, self._fire, iden)

    def _fire(self, iden: int) -> None:
        t = self._timers.get(iden)
        if t is None:
            return
        t.handle = None
        t.cb(iden, t.opaque)  # may update or remove this very timer
        if self._timers.get(iden) is t and t.handle is None and t.timeout_ms >= 0:
            t.handle = self.loop.call_later(t.timeout_ms / 1000, self._fire, iden)

    def schedule_ff_callback(self, iden: int, opaque: Any) -> None:
        # Later, not now: libvirt may be inside the call that removed the watch.
        self.loop.call_soon(self._free, opaque)

    def _free(self, opaque: Any) -> None:
        lv.invoke_free_callback(opaque)
        self._pending_dec()


class EventBridge:
    """The six event-loop callbacks libvirt calls, applied by :class:`LoopImpl` on the asyncio loop."""

    def __init__(self, factory: ImplFactory = LoopImpl) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._impl: lv.AsyncIOImpl | None = None
        #: our id -> the libvirtaio instance (hence loop) that holds it
        self._owner: dict[int, lv.AsyncIOImpl] = {}
        #: our id -> libvirtaio's id; read and written on the loop's thread only
        self._theirs: dict[int, int] = {}

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` the one that watches from now on are added to."""
        with self._lock:
            if self._impl is None or self._impl.loop is not loop:
                self._impl = self._factory(loop)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        impl = self._impl
        return impl.loop if impl is not None else None

    def _new(self) -> tuple[int, lv.AsyncIOImpl] | None:
        with self._lock:
            if self._impl is None:
                return None
            mine = next(self._ids)
            self._owner[mine] = self._impl
            return mine, self._impl

    def _post(self, impl: lv.AsyncIOImpl, fn: Callable[[], object]) -> None:
        with suppress(RuntimeError):  # the loop is closed: whatever it watched went with it
            impl.loop.call_soon_threadsafe(fn)

    def _later(self, mine: int, fn: Callable[[lv.AsyncIOImpl, int], object], *, remove: bool = False) -> int:
        """Queue ``fn(impl, libvirtaio's id)`` for watch or timer ``mine``; -1 if it is unknown."""
        with self._lock:
            impl = self._owner.pop(mine, None) if remove else self._owner.get(mine)
        if impl is None:
            return -1

        def apply() -> None:
            # Queued after the add (same order as libvirt's calls), so the id is known.
            theirs = self._theirs.pop(mine, None) if remove else self._theirs.get(mine)
            if theirs is not None:
                fn(impl, theirs)

        self._post(impl, apply)
        return 0

    # -- file handles ------------------------------------------------------------------

    def add_handle(self, fd: int, events: int, cb: lv.HandleCallback, opaque: Any) -> int:
        new = self._new()
        if new is None:
            return -1
        mine, impl = new

        def dispatch(_theirs: int, fd_: int, events_: int, opaque_: Any) -> None:
            cb(mine, fd_, events_, opaque_)  # libvirt knows the watch by our id

        def apply() -> None:
            self._theirs[mine] = impl._add_handle(fd, events, dispatch, opaque)

        self._post(impl, apply)
        return mine

    def update_handle(self, watch: int, events: int) -> None:
        self._later(watch, lambda impl, theirs: impl._update_handle(theirs, events))

    def remove_handle(self, watch: int) -> int:
        return self._later(watch, lambda impl, theirs: impl._remove_handle(theirs), remove=True)

    # -- timers ------------------------------------------------------------------------

    def add_timeout(self, timeout_ms: int, cb: lv.TimeoutCallback, opaque: Any) -> int:
        new = self._new()
        if new is None:
            return -1
        mine, impl = new

        def dispatch(_theirs: int, opaque_: Any) -> None:
            cb(mine, opaque_)

        def apply() -> None:
            self._theirs[mine] = impl._add_timeout(timeout_ms, dispatch, opaque)

        self._post(impl, apply)
        return mine

    def update_timeout(self, timer: int, timeout_ms: int) -> None:
        self._later(timer, lambda impl, theirs: impl._update_timeout(theirs, timeout_ms))

    def remove_timeout(self, timer: int) -> int:
        return self._later(timer, lambda impl, theirs: impl._remove_timeout(theirs), remove=True)

    def register(self) -> None:
        """Make this bridge libvirt's event loop implementation (once per process)."""
        lv.register_event_impl(self.add_handle, self.update_handle, self.remove_handle,
                               self.add_timeout, self.update_timeout, self.remove_timeout)


_bridge: EventBridge | None = None
_bridge_lock = threading.Lock()


def attach(loop: asyncio.AbstractEventLoop) -> EventBridge:
    """Register the bridge with libvirt if not yet done, and point it at ``loop``.

    Must run before a connection is opened: libvirt adds a connection's
    socket and keepalive timer to the implementation registered at that time.
    """
    global _bridge
    with _bridge_lock:
        if _bridge is None:
            bridge = EventBridge()
            bridge.attach(loop)
            bridge.register()
            _bridge = bridge
        else:
            _bridge.attach(loop)
        return _bridge
