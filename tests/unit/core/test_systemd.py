"""instaclone.systemd: sd_notify, watchdog, socket activation, journald, and the unit files.

Every test talks to real sockets bound under tmp_path (or in the abstract
namespace) standing in for systemd's and journald's.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from instaclone import systemd
from instaclone.config import DaemonConfig
from tests.support.journald import parse_journal

UNIT_DIR = Path(__file__).resolve().parents[3] / "systemd"


@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket (systemd's or journald's end) and its path."""
    path = str(tmp_path / "s.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def notify_socket(dgram: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    monkeypatch.setenv("NOTIFY_SOCKET", dgram[1])
    return dgram[0]


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on ``sock``, without waiting."""
    out = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(65536))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


# -- sd_notify -------------------------------------------------------------------------------

def test_notify_sends_one_datagram_of_lines(notify_socket: socket.socket) -> None:
    assert systemd.notify("READY=1", "STATUS=serving") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"
    assert pending(notify_socket) == []


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"instaclone-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1") is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_socket_does_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False
    # Nobody listening: the error is swallowed, not raised.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody.sock"))
    assert systemd.notify("READY=1") is False


def test_notifier_messages(notify_socket: socket.socket) -> None:
    n = systemd.Notifier()
    assert n.ready("recovered 2 jobs\nlistening")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=recovered 2 jobs listening"
    assert n.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert n.status("3 jobs running")
    assert notify_socket.recv(4096) == b"STATUS=3 jobs running"
    assert n.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert n.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    lines = notify_socket.recv(4096).decode().split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert len(lines) == 2


# -- watchdog --------------------------------------------------------------------------------

@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    ("30000000", "nan", None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value or "", value)
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert systemd.Notifier().watchdog_interval_s() == expected


async def test_watchdog_loop_pings_until_stopped(notify_socket: socket.socket,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # a ping every 10 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notify_socket.setblocking(False)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.create_task(systemd.Notifier().watchdog_loop(stop))
    try:
        pings = [await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), 5) for _ in range(3)]
        assert pings == [b"WATCHDOG=1"] * 3
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    pending(notify_socket)
    await asyncio.sleep(0.05)
    assert pending(notify_socket) == [], "pinged after stop was set"


async def test_watchdog_loop_returns_without_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(systemd.Notifier().watchdog_loop(asyncio.Event()), 1)


# -- socket activation -----------------------------------------------------------------------

# The child does what systemd does between fork and exec: the listening socket
# goes to fd 3 and LISTEN_PID names the child itself (unknown to us before it runs).
CHILD = """
import json, os, socket, sys
src = int(sys.argv[1])
if src != 3:
    os.dup2(src, 3)
    os.close(src)
os.environ["LISTEN_PID"] = str(os.getpid())
from instaclone.systemd import listen_fds
socks = listen_fds()
print(json.dumps({
    "n": len(socks),
    "family": int(socks[0].family), "type": int(socks[0].type), "fd": socks[0].fileno(),
    "inheritable": os.get_inheritable(3),
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}), flush=True)
conn, _ = socks[0].accept()
conn.sendall(b"echo:" + conn.recv(100))
conn.close()
"""


def test_listen_fds_takes_over_passed_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"}
    env.pop("LISTEN_PID", None)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(listener.fileno())], env=env,
                             pass_fds=[listener.fileno()], stdout=subprocess.PIPE, text=True)
    try:
        listener.close()  # the child owns it now
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        assert info == {"n": 1, "family": socket.AF_UNIX, "type": socket.SOCK_STREAM, "fd": 3,
                        "inheritable": False, "env": []}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(path)
            client.sendall(b"hi")
            assert client.recv(100) == b"echo:hi"
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.parametrize("pid", ["other", "", "garbage"])
def test_listen_fds_ignores_other_process(monkeypatch: pytest.MonkeyPatch, pid: str) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1) if pid == "other" else pid)
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "control")
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_listen_fds_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd.listen_fds() == []


def test_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert systemd.under_systemd() is False
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    assert systemd.under_systemd() is True
    monkeypatch.delenv("JOURNAL_STREAM")
    monkeypatch.setenv("INVOCATION_ID", uuid.uuid4().hex)
    assert systemd.under_systemd() is True


# -- journald --------------------------------------------------------------------------------

def single(fields: dict[str, list[str]]) -> dict[str, str]:
    assert all(len(v) == 1 for v in fields.values()), f"repeated fields: {fields}"
    return {k: v[0] for k, v in fields.items()}


def test_journal_send_fields(dgram: tuple[socket.socket, str]) -> None:
    sock, path = dgram
    assert systemd.journal_send("hello", 6, {
        "job_id": "j-1", "clone": "web-1", "detail": "line one\nline two\n", "count": 3,
        "_trusted": "a", "9lives": "b", "odd-name.x": "c", "__": "dropped",
    }, path=path)
    assert single(parse_journal(sock.recv(65536))) == {
        "MESSAGE": "hello", "PRIORITY": "6", "JOB_ID": "j-1", "CLONE": "web-1",
        "DETAIL": "line one\nline two\n", "COUNT": "3", "TRUSTED": "a", "F_9LIVES": "b", "ODD_NAME_X": "c",
    }


def test_journal_send_without_journald(tmp_path: Path) -> None:
    assert systemd.journal_send("hello", 6, {}, path=str(tmp_path / "none.sock")) is False


def test_journal_send_too_big_for_a_datagram_goes_through_memfd(dgram: tuple[socket.socket, str]) -> None:
    sock, path = dgram
    big = "x" * 1_000_000 + "\nend"
    assert systemd.journal_send("big", 6, {"blob": big}, path=path)
    data, fds, _, _ = socket.recv_fds(sock, 16, 1)
    assert data == b"" and len(fds) == 1
    try:
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        entry = os.pread(fds[0], os.fstat(fds[0]).st_size, 0)
    finally:
        os.close(fds[0])
    assert single(parse_journal(entry))["BLOB"] == big


@pytest.fixture
def renderer(dgram: tuple[socket.socket, str]) -> Iterator[systemd.JournaldRenderer]:
    r = systemd.JournaldRenderer(path=dgram[1])
    yield r
    r.close()


def test_renderer_sends_event_and_drops_it(renderer: systemd.JournaldRenderer,
                                           dgram: tuple[socket.socket, str]) -> None:
    event = {"event": "job.state", "level": "warning", "timestamp": "2026-01-01T00:00:00Z",
             "job_id": "j-1", "clone": "web 1", "state": "rolling_back", "durations": {"stun": 12},
             "exception": "Traceback (most recent call last):\nValueError: boom"}
    with pytest.raises(structlog.DropEvent):
        renderer(None, "warning", dict(event))
    got = single(parse_journal(dgram[0].recv(65536)))
    assert got == {
        "MESSAGE": 'job.state job_id=j-1 clone="web 1" state=rolling_back durations="{\\"stun\\": 12}"'
                   "\nTraceback (most recent call last):\nValueError: boom",
        "PRIORITY": "5", "EVENT": "job.state", "SYSLOG_IDENTIFIER": "instacloned",
        "JOB_ID": "j-1", "CLONE": "web 1", "STATE": "rolling_back", "DURATIONS": '{"stun": 12}',
        "EXCEPTION": "Traceback (most recent call last):\nValueError: boom",
    }


def test_renderer_keeps_colliding_keys(renderer: systemd.JournaldRenderer,
                                       dgram: tuple[socket.socket, str]) -> None:
    with pytest.raises(structlog.DropEvent):
        renderer(None, "info", {"event": "x", "message": "m", "priority": 1})
    got = single(parse_journal(dgram[0].recv(65536)))
    assert got["MESSAGE"] == "x message=m priority=1" and got["PRIORITY"] == "6"
    assert got["DATA_MESSAGE"] == "m" and got["DATA_PRIORITY"] == "1"


def test_renderer_falls_back_to_json_line(tmp_path: Path) -> None:
    r = systemd.JournaldRenderer(path=str(tmp_path / "no-journald.sock"))
    try:
        event = {"event": "daemon.ready", "level": "info", "socket": "/run/instaclone/control.sock"}
        assert json.loads(r(None, "info", dict(event))) == event
    finally:
        r.close()


def test_renderer_echo_also_returns_line(dgram: tuple[socket.socket, str]) -> None:
    r = systemd.JournaldRenderer(path=dgram[1], echo=True)
    try:
        assert json.loads(r(None, "info", {"event": "e", "job_id": "j"})) == {"event": "e", "job_id": "j"}
        assert single(parse_journal(dgram[0].recv(65536)))["JOB_ID"] == "j"
    finally:
        r.close()


def test_renderer_in_structlog_chain(renderer: systemd.JournaldRenderer,
                                     dgram: tuple[socket.socket, str]) -> None:
    out = io.StringIO()
    log = structlog.wrap_logger(structlog.PrintLogger(file=out),
                                processors=[structlog.processors.add_log_level, renderer],
                                wrapper_class=structlog.make_filtering_bound_logger(0))
    for method, priority in (("debug", "7"), ("info", "6"), ("warning", "5"), ("error", "3"),
                             ("critical", "2")):
        getattr(log, method)("daemon.ready", job_id="j-9")
        got = single(parse_journal(dgram[0].recv(65536)))
        assert (got["PRIORITY"], got["EVENT"], got["JOB_ID"]) == (priority, "daemon.ready", "j-9")
    assert out.getvalue() == ""  # sent to journald, not printed a second time


# -- unit files ------------------------------------------------------------------------------

def verify_problems(unit_dir: Path) -> list[str]:
    """``systemd-analyze verify`` on our two units: a failure, or any stderr line about them."""
    service, sock = unit_dir / "instacloned.service", unit_dir / "instacloned.socket"
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", "--recursive-errors=no",
                           str(service), str(sock)],
                          cwd=unit_dir, capture_output=True, text=True, timeout=60)
    # Unknown keys and unparsable values are logged and ignored; systemd 252 exits 1 for them
    # only with --recursive-errors=no, so the stderr lines are checked as well.
    problems = [line for line in proc.stderr.splitlines() if "instacloned" in line]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}: {proc.stderr.strip()}")
    return problems


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart= names an executable that exists here."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not on PATH (package systemd)")
    exe = Path(sys.executable).parent / "instacloned"
    if not os.access(exe, os.X_OK):
        exe = Path(sys.executable)
    d = tmp_path / "units"
    d.mkdir()
    text = (UNIT_DIR / "instacloned.service").read_text()
    text, n = re.subn(r"^(ExecStart|ExecReload)=/opt/instaclone/\S+", rf"\1={exe}", text, flags=re.M)
    assert n == 2  # ExecStart and the ExecReload that checks the config
    (d / "instacloned.service").write_text(text)
    shutil.copy(UNIT_DIR / "instacloned.socket", d)
    return d


def test_units_verify_clean(units: Path) -> None:
    assert verify_problems(units) == []


@pytest.mark.parametrize(("unit", "good", "broken"), [
    ("instacloned.service", "WatchdogSec=30", "WatchdgSec=30"),
    ("instacloned.service", "Type=notify", "Type=notifyy"),
    ("instacloned.service", "[Service]", "[Servic]"),
    ("instacloned.socket", "ListenStream=", "ListenStrem="),
    ("instacloned.socket", "SocketMode=0660", "SocketMode=99999"),
])
def test_units_verify_catches_mistakes(units: Path, unit: str, good: str, broken: str) -> None:
    """The check above would fail on a broken unit (verify only warns on many of these)."""
    path = units / unit
    text = path.read_text()
    assert good in text
    path.write_text(text.replace(good, broken, 1))
    assert verify_problems(units) != []


def test_socket_unit_listens_where_the_daemon_binds() -> None:
    text = (UNIT_DIR / "instacloned.socket").read_text()
    assert re.findall(r"^ListenStream=(.*)$", text, flags=re.M) == [str(DaemonConfig().socket)]
    service = (UNIT_DIR / "instacloned.service").read_text()
    assert re.search(r"^RuntimeDirectory=instaclone$", service, flags=re.M)
    assert re.search(r"^RuntimeDirectoryPreserve=yes$", service, flags=re.M)


def test_reload_checks_the_config_before_signalling() -> None:
    """A broken file fails "systemctl reload" (exit status, error in systemctl status) and is never loaded."""
    service = (UNIT_DIR / "instacloned.service").read_text()
    (start,) = re.findall(r"^ExecStart=(\S+) --config (\S+)$", service, flags=re.M)
    reloads = re.findall(r"^ExecReload=(.*)$", service, flags=re.M)
    # systemd runs ExecReload= lines in order and stops at the first that fails.
    assert reloads == [f"{start[0]} --check-config --config {start[1]}", "/bin/kill -HUP $MAINPID"]


def test_documentation_uris() -> None:
    """Installed by scripts/install-service.sh (tests/ops/test_install.py checks the files are there)."""
    for unit in ("instacloned.service", "instacloned.socket"):
        text = (UNIT_DIR / unit).read_text()
        assert re.findall(r"^Documentation=(.*)$", text, flags=re.M) == [
            "man:instacloned(8) file:///usr/share/doc/instaclone/README.md"], unit


def test_default_socket_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """``instaclone`` when it exists and this process may give it; else the daemon's own group ("")."""
    import grp

    from instaclone import config

    real = grp.getgrnam

    def getgrnam(name: str) -> grp.struct_group:
        if name == "instaclone":
            return grp.struct_group(("instaclone", "x", 4242, []))
        return real(name)

    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert config.default_socket_group() == "instaclone"
    assert config.Config().daemon.socket_group == "instaclone"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000, 27])
    assert config.default_socket_group() == ""  # not root, not a member: keep its own group
    monkeypatch.setattr(os, "getgroups", lambda: [1000, 4242])
    assert config.default_socket_group() == "instaclone"

    def missing(name: str) -> grp.struct_group:
        raise KeyError(name)

    monkeypatch.setattr(grp, "getgrnam", missing)
    assert config.default_socket_group() == ""
    with pytest.raises(Exception, match=r"daemon.socket_group: no group named 'ops'"):
        config.from_dict({"daemon": {"socket_group": "ops"}})
    assert config.from_dict({"daemon": {"socket_group": ""}}).daemon.socket_group == ""
