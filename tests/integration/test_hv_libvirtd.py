"""The connection tells the truth (issue 12, item 5): libvirtd stopped, hung, and back.

These tests stop the real libvirtd (started by scripts/setup.sh) and always
start it again as setup.sh does (scripts/start-libvirtd.sh) before they end;
virtlogd is never touched. Running domains survive a libvirtd restart
(libvirtd reconnects to their QEMU monitors). Like every integration test,
run them under the lock:

    flock /tmp/instaclone-integration.lock .venv/bin/pytest -m integration tests/integration/test_hv_libvirtd.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from instaclone.hv import LibvirtHypervisor
from instaclone.hv.connection import CONNECT_WAIT_S, KEEPALIVE_COUNT, KEEPALIVE_INTERVAL_S
from tests.support.host import libvirt_ready
from tests.support.proclib import DaemonProcess, NotifySocket, free_port, write_config
from tests.support.vmlib import Api, Scratch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready())),
    pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="stops libvirtd by hand (no systemd here)"),
]

#: The daemon refreshes STATUS= and the metric this often (daemon.WATCH_PERIOD_S, no watchdog set).
WATCH_PERIOD_S = 5.0
#: A stopped libvirtd closes the socket: noticed at once. Bound with room for a loaded machine.
STOP_NOTICED_S = 3.0
#: A hung libvirtd: keepalive gives up after about interval * (count + 1) seconds.
HANG_NOTICED_S = KEEPALIVE_INTERVAL_S * (KEEPALIVE_COUNT + 1) + 4.0


def _pid(name: str) -> int | None:
    try:
        pid = int(Path(f"/run/{name}.pid").read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() == name:
            return pid
    except (OSError, ValueError):
        pass
    return None


def _answers() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                          timeout=10).returncode == 0


class Libvirtd:
    """The running libvirtd, by the pid in its pid file; stopped, and started as setup.sh does."""

    def __init__(self) -> None:
        pid = _pid("libvirtd")
        assert pid is not None and _answers(), "libvirtd is not running"
        self.pid = pid
        self.virtlogd = _pid("virtlogd")

    def stop(self) -> float:
        """SIGTERM, as ``systemctl stop`` sends; the monotonic time the process was seen gone."""
        os.kill(self.pid, signal.SIGTERM)
        for _ in range(1000):
            if not Path(f"/proc/{self.pid}").exists():
                return time.monotonic()
            time.sleep(0.01)
        raise AssertionError(f"libvirtd {self.pid} did not stop")

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def start(self) -> None:
        """Start libvirtd again if it is not running (and continue it if frozen); wait until it answers."""
        if Path(f"/proc/{self.pid}").exists():
            self.thaw()
        else:
            subprocess.run([str(Path(__file__).resolve().parents[2] / "scripts" / "start-libvirtd.sh")],
                           check=True, timeout=60)
        for _ in range(100):
            pid = _pid("libvirtd")
            if pid is not None and _answers():
                self.pid = pid
                return
            time.sleep(0.2)
        raise AssertionError("libvirtd did not come back")


@pytest.fixture
def libvirtd() -> Iterator[Libvirtd]:
    d = Libvirtd()
    try:
        yield d
    finally:
        d.start()
        assert _pid("virtlogd") == d.virtlogd, "virtlogd changed"


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float, t0: float) -> float:
    """Seconds from ``t0`` until ``check()`` is true (polled every 50 ms); fails after ``timeout_s``."""
    while not await check():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


OLD_WAY = """
import libvirt, sys, time
conn = libvirt.open("qemu:///system")  # no event loop, no keepalive: how the connection was watched before
print("ready", flush=True)
sys.stdin.readline()
print(conn.isAlive(), flush=True)
"""


async def test_status_and_metric_follow_libvirtd_stop_and_start(tmp_path: Path, libvirtd: Libvirtd):
    scratch = Scratch()
    notify = NotifySocket(tmp_path / "notify")
    port = free_port()
    conf = write_config(tmp_path / "d.toml", scratch.path, daemon={"metrics_listen": f"127.0.0.1:{port}"})
    daemon = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path)}).start()
    hv = LibvirtHypervisor()
    old = subprocess.Popen([sys.executable, "-c", OLD_WAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout is not None and old.stdin is not None and old.stdout.readline().strip() == "ready"
        await hv.connect()
        ready = await notify.wait("READY", "1")
        assert "libvirt connected" in ready["STATUS"]

        async def health() -> bool:
            async with Api(scratch.path / "ctl.sock") as api:
                status, body = await api.call("GET", "/v1/health")
            assert status == 200, body
            return bool(body["libvirt_connected"])

        async def metric() -> float:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
                line = next(x for x in (await r.text()).splitlines() if x.startswith("instaclone_libvirt_up "))
            return float(line.split()[1])

        async def status_says(text: str) -> bool:
            for data in await notify.drain_raw():
                notify.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))
            with_status = [m["STATUS"] for m in notify.messages if "STATUS" in m]
            return bool(with_status) and text in with_status[-1]

        assert await health() and await metric() == 1.0 and await hv.is_connected()

        t0 = time.monotonic()
        gone = await asyncio.to_thread(libvirtd.stop) - t0
        down = {
            "is_connected": await until("is_connected() False", lambda: _not(hv.is_connected()), STOP_NOTICED_S, t0),
            "health": await until("/v1/health False", lambda: _not(health()), STOP_NOTICED_S, t0),
            "STATUS=": await until("STATUS= DISCONNECTED", lambda: status_says("libvirt DISCONNECTED"),
                                   STOP_NOTICED_S + WATCH_PERIOD_S, t0),
            "metric": await until("metric 0", lambda: _eq(metric(), 0.0), STOP_NOTICED_S + WATCH_PERIOD_S, t0),
        }
        # The control: a connection watched as before this change still claims to be alive.
        old.stdin.write("\n")
        old.stdin.flush()
        old_alive = old.stdout.readline().strip()

        t1 = time.monotonic()
        await asyncio.to_thread(libvirtd.start)
        started = time.monotonic() - t1
        back = {
            "ensure_connected": await until("ensure_connected() True", hv.ensure_connected, 10, t1),
            "health": await until("/v1/health True", health, 10, t1),
            "STATUS=": await until("STATUS= connected", lambda: status_says("libvirt connected"),
                                   10 + WATCH_PERIOD_S, t1),
            "metric": await until("metric 1", lambda: _eq(metric(), 1.0), 10 + WATCH_PERIOD_S, t1),
        }
        print(f"\nlibvirtd sent SIGTERM (process gone after {gone:.2f} s) -> false after (s): {_fmt(down)}; "
              f"old-style isAlive() then: {old_alive}")
        print(f"libvirtd started ({started:.2f} s until virsh answers) -> true after (s): {_fmt(back)}")
        assert old_alive == "1", "without an event loop the old connection should still have claimed alive"
        assert await hv.list_names() is not None
    finally:
        old.kill()
        old.wait()
        daemon.signal(signal.SIGTERM)
        await daemon.wait()
        daemon.kill()
        notify.close()
        await hv.close()
        scratch.cleanup()
    events = [e.get("event") for e in daemon.log_events()]
    assert "libvirt.connection_closed" in events


async def test_a_hung_libvirtd_is_noticed_by_keepalive(libvirtd: Libvirtd):
    hv = LibvirtHypervisor()
    await hv.connect()
    try:
        t0 = time.monotonic()
        libvirtd.freeze()
        try:
            hung = await until("is_connected() False", lambda: _not(hv.is_connected()), HANG_NOTICED_S, t0)
            t = time.monotonic()
            assert await hv.ensure_connected() is False  # the reconnect hangs too: answered in time anyway
            waited = time.monotonic() - t
        finally:
            libvirtd.thaw()
        t1 = time.monotonic()
        back = await until("ensure_connected() True", hv.ensure_connected, 10, t1)
        print(f"\nlibvirtd frozen -> is_connected() False after {hung:.2f} s (keepalive "
              f"{KEEPALIVE_INTERVAL_S} s x {KEEPALIVE_COUNT}); ensure_connected answered in {waited:.2f} s; "
              f"continued -> True after {back:.2f} s")
        assert hung > KEEPALIVE_INTERVAL_S  # it was the keepalive, not an error
        assert waited < CONNECT_WAIT_S + 1.0
        assert await hv.list_names() is not None
    finally:
        await hv.close()


async def _not(aw: Awaitable[bool]) -> bool:
    return not await aw


async def _eq(aw: Awaitable[float], want: float) -> bool:
    return await aw == want


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())
