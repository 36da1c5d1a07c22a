"""The connection layer without libvirtd: reconnects, the close callback, the event-loop bridge.

A fake libvirt connection stands in for ``virConnect`` (tests/integration/test_hv_libvirtd.py
does the same against the real libvirtd, stopping it).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import libvirt
import pytest

from instaclone.hv import connection as hvconn
from instaclone.hv.eventloop import EventBridge, LoopImpl
from instaclone.hv.hypervisor import LibvirtHypervisor


def libvirt_error(message: str, code: int = libvirt.VIR_ERR_SYSTEM_ERROR) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 0, message, 2, None, None, None, 0, 0)
    return exc


class FakeConn:
    """What the connection layer uses of ``virConnect``."""

    def __init__(self) -> None:
        self.alive = True
        self.keepalive: tuple[int, int] | None = None
        self.close_cb: tuple[Any, Any] | None = None
        self.closed = False
        self.fail_next: list[Exception] = []  # raised by the next listAllDomains calls
        self.listed = 0

    def isAlive(self) -> int:  # noqa: N802
        return int(self.alive and not self.closed)

    def close(self) -> int:
        self.closed = True
        return 0

    def setKeepAlive(self, interval: int, count: int) -> int:  # noqa: N802
        self.keepalive = (interval, count)
        return 0

    def registerCloseCallback(self, cb: Any, opaque: Any) -> int:  # noqa: N802
        self.close_cb = (cb, opaque)
        return 0

    def unregisterCloseCallback(self) -> None:  # noqa: N802
        self.close_cb = None

    def listAllDomains(self, flags: int = 0) -> list[Any]:  # noqa: N802
        self.listed += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        return []

    def die(self, reason: int = libvirt.VIR_CONNECT_CLOSE_REASON_EOF) -> None:
        """libvirtd went away: libvirt marks the connection closed and calls the close callback."""
        self.alive = False
        assert self.close_cb is not None
        cb, opaque = self.close_cb
        cb(self, reason, opaque)


class Opener:
    """libvirt.open: hands out FakeConns; can refuse (libvirtd down) or hang (libvirtd stopped)."""

    def __init__(self) -> None:
        self.conns: list[FakeConn] = []
        self.down = False
        self.hang = threading.Event()
        self.hang.set()
        self.calls = 0

    def __call__(self, uri: str) -> FakeConn:
        self.calls += 1
        self.hang.wait(30)
        if self.down:
            raise libvirt_error("Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory")
        self.conns.append(FakeConn())
        return self.conns[-1]


@pytest.fixture
async def hv():
    opener = Opener()
    h = LibvirtHypervisor("test:///fake", threads=4, opener=opener)
    yield h, opener
    opener.hang.set()
    await h.close()


async def test_connect_sets_keepalive_and_a_close_callback(hv):
    h, opener = hv
    await h.connect()
    conn = opener.conns[0]
    assert conn.keepalive == (hvconn.KEEPALIVE_INTERVAL_S, hvconn.KEEPALIVE_COUNT)
    assert conn.close_cb is not None
    assert await h.is_connected() and await h.ensure_connected()
    assert opener.calls == 1


async def test_close_callback_makes_the_state_false_without_a_call(hv):
    h, opener = hv
    await h.connect()
    opener.conns[0].die()
    assert await h.is_connected() is False


@pytest.mark.parametrize("reason", [libvirt.VIR_CONNECT_CLOSE_REASON_EOF, libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE])
async def test_ensure_connected_reconnects_after_libvirtd_returns(hv, reason):
    h, opener = hv
    await h.connect()
    first = opener.conns[0]
    opener.down = True
    first.die(reason)
    assert await h.ensure_connected() is False  # libvirtd still away: False, no exception
    assert await h.ensure_connected() is False
    opener.down = False
    assert await h.ensure_connected() is True
    assert len(opener.conns) == 2 and await h.list_names() == [] and opener.conns[1].listed == 1
    # The dead connection was let go: callback unregistered, closed.
    assert first.closed and first.close_cb is None


async def test_a_call_on_a_dead_connection_opens_a_new_one(hv):
    h, opener = hv
    await h.connect()
    opener.conns[0].die()
    assert await h.list_names() == []
    assert len(opener.conns) == 2 and opener.conns[1].listed == 1


async def test_a_request_that_was_never_sent_is_sent_again_on_a_new_connection(hv):
    h, opener = hv
    await h.connect()
    opener.conns[0].fail_next = [libvirt_error("Cannot write data: Broken pipe")]
    assert await h.list_names() == []
    assert [c.listed for c in opener.conns] == [1, 1]


async def test_a_request_that_may_have_run_is_not_sent_again(hv):
    h, opener = hv
    await h.connect()
    opener.conns[0].fail_next = [libvirt_error("End of file while reading data: Input/output error")]
    with pytest.raises(hvconn.LibvirtUnavailable):
        await h.list_names()
    assert [c.listed for c in opener.conns] == [1]
    assert await h.ensure_connected() and len(opener.conns) == 2  # the next call gets a new connection


async def test_a_hung_reconnect_answers_false_in_time_and_runs_once(hv, monkeypatch):
    """libvirtd accepts the socket but does not answer: status says so without waiting on it."""
    monkeypatch.setattr(hvconn, "CONNECT_WAIT_S", 0.2)
    h, opener = hv
    await h.connect()
    opener.hang.clear()
    opener.conns[0].die(libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE)
    t0 = time.monotonic()
    assert await asyncio.gather(*[h.ensure_connected() for _ in range(3)]) == [False] * 3
    assert await h.ensure_connected() is False
    assert time.monotonic() - t0 < 2.0
    assert opener.calls == 2  # one reconnect attempt, however many asked
    opener.hang.set()
    for _ in range(50):
        if await h.ensure_connected():
            break
        await asyncio.sleep(0.05)
    assert await h.is_connected() and len(opener.conns) == 2


# -- the event-loop bridge -----------------------------------------------------------------


class RecordingImpl(LoopImpl):
    """The bridge's libvirtaio, with the free callbacks recorded instead of handed to libvirt."""

    freed: list[Any]

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.freed = []

    def _free(self, opaque: Any) -> None:
        self.freed.append(opaque)
        self._pending_dec()


async def wait_for(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


async def test_bridge_applies_calls_from_worker_threads_on_the_loop():
    loop = asyncio.get_running_loop()
    impls: list[RecordingImpl] = []
    bridge = EventBridge(factory=lambda lp: impls.append(RecordingImpl(lp)) or impls[-1])
    bridge.attach(loop)
    a, b = socket.socketpair()
    seen: list[tuple[int, int, bool]] = []  # (watch, fd, on the loop's thread)

    def on_event(watch: int, fd: int, events: int, opaque: Any) -> None:
        seen.append((watch, fd, threading.current_thread() is threading.main_thread()))
        a.recv(100)

    watch = await asyncio.to_thread(bridge.add_handle, a.fileno(), libvirt.VIR_EVENT_HANDLE_READABLE,
                                    on_event, "handle-opaque")
    b.send(b"x")
    await wait_for(lambda: seen)
    assert seen == [(watch, a.fileno(), True)]  # our id, on the loop's thread
    await asyncio.to_thread(bridge.update_handle, watch, 0)
    await asyncio.sleep(0.05)
    b.send(b"y")
    await asyncio.sleep(0.1)
    assert len(seen) == 1  # not watched any more
    assert await asyncio.to_thread(bridge.remove_handle, watch) == 0
    assert await asyncio.to_thread(bridge.remove_handle, watch) == -1
    await wait_for(lambda: impls[0].freed == ["handle-opaque"])
    assert impls[0].is_idle()
    a.close()
    b.close()


async def test_bridge_timers_repeat_until_removed_and_are_no_tasks():
    loop = asyncio.get_running_loop()
    impl = RecordingImpl(loop)
    bridge = EventBridge(factory=lambda lp: impl)
    bridge.attach(loop)
    tasks = asyncio.all_tasks()
    fired: list[int] = []
    timer = await asyncio.to_thread(bridge.add_timeout, 10, lambda t, opaque: fired.append(t), "timer-opaque")
    await wait_for(lambda: len(fired) >= 3)
    assert set(fired) == {timer}
    assert asyncio.all_tasks() == tasks  # libvirt may drop a timer at any time (GC): no task to leak
    await asyncio.to_thread(bridge.update_timeout, timer, 0)  # 0: on every loop iteration
    n = len(fired)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(fired) >= n + 3
    await asyncio.to_thread(bridge.update_timeout, timer, -1)
    await asyncio.sleep(0.05)
    n = len(fired)
    await asyncio.sleep(0.1)
    assert len(fired) == n
    await asyncio.to_thread(bridge.remove_timeout, timer)
    await wait_for(lambda: impl.freed == ["timer-opaque"])
    assert impl.is_idle()


def test_bridge_survives_a_closed_loop_and_follows_the_next():
    """pytest-asyncio runs a loop per test: a watch added while the old loop is closed is dropped, not an error."""
    impls: list[RecordingImpl] = []
    bridge = EventBridge(factory=lambda lp: impls.append(RecordingImpl(lp)) or impls[-1])
    old = asyncio.new_event_loop()
    bridge.attach(old)
    old.close()
    assert bridge.add_timeout(10, lambda t, o: None, None) > 0
    new = asyncio.new_event_loop()
    try:
        bridge.attach(new)
        assert bridge.loop is new and len(impls) == 2
        fired: list[int] = []
        bridge.add_timeout(0, lambda t, o: fired.append(t), None)
        new.run_until_complete(asyncio.sleep(0.05))
        assert fired
    finally:
        for t in asyncio.all_tasks(new):
            t.cancel()
        new.run_until_complete(asyncio.sleep(0))
        new.close()
