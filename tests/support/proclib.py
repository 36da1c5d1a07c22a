"""The daemon as a real process, driven the way systemd drives it (for tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .host import REPO

EXE = Path(sys.executable).parent / "instacloned"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifySocket:
    """A real sd_notify receiver: an AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self.pos = 0

    async def wait(self, key: str, value: str | None = None, timeout: float = 60.0) -> dict[str, str]:
        """The next message (after the last one waited for) carrying KEY[=VALUE]."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            for i in range(self.pos, len(self.messages)):
                m = self.messages[i]
                if key in m and (value is None or m[key] == value):
                    self.pos = i + 1
                    return m
            left = end - loop.time()
            if left <= 0:
                raise AssertionError(f"no {key}={value} in {self.messages[self.pos:]}")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), left)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    async def drain_raw(self) -> list[bytes]:
        """Every datagram waiting on the socket, raw."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(1 << 20))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()



def write_config(path: Path, scratch_dir: Path, **sections: dict[str, Any]) -> Path:
    base: dict[str, dict[str, Any]] = {
        "daemon": {"state_dir": str(scratch_dir / "state"), "socket": str(scratch_dir / "ctl.sock"),
                   "log_format": "json", "shutdown_grace_s": 5.0},
        "clone": {"stun_deadline_ms": 60000},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


SD_LAUNCH = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="control")
os.execv(sys.argv[2], sys.argv[2:])
"""


class DaemonProcess:
    def __init__(self, config: Path, *, env: dict[str, str] | None = None, listen_fd: int | None = None) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.listen_fd = listen_fd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.with_suffix(".log")

    def start(self) -> DaemonProcess:
        args = [str(EXE), "--config", str(self.config)]
        if self.listen_fd is not None:
            # As systemd does: the socket as fd 3, LISTEN_PID set to the pid that
            # execs the daemon (exec keeps it), LISTEN_FDS=1.
            args = [sys.executable, "-c", SD_LAUNCH, str(self.listen_fd), *args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         pass_fds=() if self.listen_fd is None else (self.listen_fd,))
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        end = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > end:
                raise AssertionError(f"daemon did not exit; log:\n{self.log_text()}")
            await asyncio.sleep(0.1)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def restart_libvirtd() -> None:
    """Kill libvirtd and start it again as scripts/setup.sh does, waiting until it answers."""
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    for _ in range(100):
        if subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    # As setup.sh starts it (under a reaper), waiting until it answers.
    subprocess.run([str(REPO / "scripts" / "start-libvirtd.sh")], check=True, timeout=60)
