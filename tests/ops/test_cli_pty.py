"""The CLI in a real pseudo-terminal: ``clone --wait``'s progress display and shell completion.

The fake API (tests/support/fakes.py) serves in the test's event loop; the CLI (and bash/zsh) run as
subprocesses on a pty from ``pty.openpty``, read in a thread with the time each byte came.
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from instaclone.states import HAPPY_PATH
from tests.support.fakes import fake_api

CLI = [sys.executable, "-m", "instaclone.cli"]
#: Each step of a clone job takes about this long in the fake hypervisor.
STEP_S = 0.35


class Pty:
    """A subprocess on a pseudo-terminal; what it printed, with the time each chunk came."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     start_new_session=True)
        os.close(slave)
        self.chunks: list[tuple[float, bytes]] = []

    @property
    def text(self) -> str:
        return b"".join(c for _, c in self.chunks).decode(errors="replace")

    def read_until(self, pattern: str, timeout: float = 20.0) -> str:
        """Read until ``pattern`` (a regex) is in the output since the start; the output. Blocking."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen in {self.text!r}")
            if not self._read_some(deadline):
                raise AssertionError(f"EOF before {pattern!r}: {self.text!r}")
        return self.text

    def read_to_end(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while self._read_some(deadline):
            pass
        return self.text

    def _read_some(self, deadline: float) -> bool:
        import select

        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"nothing more within the timeout: {self.text!r}")
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the other side closed
            return False
        if not data:
            return False
        self.chunks.append((time.time(), data))
        return True

    def write(self, data: str) -> None:
        os.write(self.master, data.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)

    def first_seen(self, needle: str) -> float:
        """When ``needle`` was first complete in the output (wall clock)."""
        acc = b""
        for at, chunk in self.chunks:
            acc += chunk
            if needle.encode() in acc:
                return at
        raise AssertionError(f"{needle!r} not in {self.text!r}")


@pytest.fixture
async def slow_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, Any, Path]]:
    # fake_api has no event bus (the daemon's wakes followers at each commit): followers look often.
    monkeypatch.setattr("instaclone.api.stream.FOLLOW_CHECK_S", 0.05)
    async with fake_api(tmp_path) as (client, virt, sock):
        for method in ("suspend", "snapshot_disks", "save_state", "define", "start", "resume"):
            virt.delay[method] = STEP_S
        yield client, virt, sock


def _env(sock: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "INSTACLONE_SOCKET": str(sock), "COLUMNS": "120", **extra}


def _as_reached(job: dict[str, Any], shown_at: dict[str, float]) -> None:
    """Each state's line was shown soon after the daemon reached it (not all at the job's end)."""
    reached = {h["state"]: h["at"] for h in job["history"]}
    assert len(reached) >= 5 and reached["Unstunned"] - reached["Requested"] > 3 * STEP_S, reached
    for state, at in shown_at.items():
        late = at - reached[state]
        assert -0.05 < late < STEP_S, (state, late, reached, shown_at)


async def test_wait_progress_on_a_terminal(slow_api: tuple[Any, Any, Path]) -> None:
    client, _virt, sock = slow_api
    term = Pty([*CLI, "clone", "src", "--name", "pt", "--wait"], _env(sock, TERM="xterm"))
    try:
        text = await asyncio.to_thread(term.read_to_end)
        assert term.proc.wait(10) == 0, text
        states = [s.value for s in HAPPY_PATH]
        seen = [term.first_seen(f"  {s:<20} +") for s in states]
        assert seen == sorted(seen), text
        job_id = re.search(r"job ([0-9a-f]{16}): cloning", text)
        assert job_id, text
        _, body = await client.call("GET", f"/v1/jobs/{job_id.group(1)}")
        _as_reached(body["job"], dict(zip(states, seen, strict=True)))
        # On a terminal the waiting line is redrawn in place and erased at the end.
        assert "\r\x1b[K  ... waiting" in text
        assert "clone pt  uuid=" in text
        assert text.count("Unstunned") == 1 + text.count("state=Unstunned")
    finally:
        term.close()


async def test_wait_progress_piped_is_plain_lines(slow_api: tuple[Any, Any, Path]) -> None:
    client, _, sock = slow_api
    proc = await asyncio.create_subprocess_exec(*CLI, "clone", "src", "--name", "pp", "--wait",
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(sock))
    assert proc.stdout is not None
    lines: list[tuple[float, str]] = []
    while line := await asyncio.wait_for(proc.stdout.readline(), 30):
        lines.append((time.time(), line.decode()))
    assert await proc.wait() == 0
    text = "".join(x for _, x in lines)
    assert "\x1b" not in text and "\r" not in text and "waiting" not in text
    at = {s.value: next(t for t, x in lines if x.startswith(f"  {s.value:<20} +")) for s in HAPPY_PATH}
    job_id = re.search(r"job ([0-9a-f]{16}): cloning", text)
    assert job_id, text
    _, body = await client.call("GET", f"/v1/jobs/{job_id.group(1)}")
    _as_reached(body["job"], at)


async def test_cp_upload_progress_on_a_terminal(tmp_path: Path) -> None:
    """A big upload shows its progress as the bytes go (the client's put_file progress), then clears it."""
    import hashlib

    from aiohttp import web

    size = 12 << 20  # over the CLI's 8 MiB threshold

    async def put(request: web.Request) -> web.Response:
        digest, got = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 20):
            digest.update(chunk)
            got += len(chunk)
            await asyncio.sleep(0.25)  # a slow guest: about 3 s in all
        return web.json_response({"file": {"path": request.query["path"], "bytes": got,
                                           "sha256": digest.hexdigest(), "mode": request.query.get("mode")}})

    app = web.Application()
    app.router.add_put("/v1/clones/{name}/files", put)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "api.sock"
    await web.UnixSite(runner, str(sock)).start()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(size))
    term = Pty([*CLI, "cp", str(src), "c1:/tmp/big.bin"], _env(sock, TERM="xterm"))
    try:
        await asyncio.to_thread(term.read_until, r"MiB / 12\.0 MiB +\d+%")
        text = await asyncio.to_thread(term.read_to_end)
        assert term.proc.wait(10) == 0, text
        shown = [int(p) for p in re.findall(r"(\d+)%", text)]
        assert shown and shown == sorted(shown) and shown[0] < 100, text  # it moved as the bytes went
        assert text.endswith("\r\x1b[K"), text  # and the line is gone at the end
    finally:
        term.close()
        await runner.cleanup()


# -- completion -----------------------------------------------------------------------------------


@pytest.fixture
async def named_api(tmp_path: Path) -> AsyncIterator[tuple[Path, Path]]:
    """The fake API with clones alpha and beta, a pool ci-pool, and a bin/instaclone wrapper to type."""
    async with fake_api(tmp_path) as (client, _virt, sock):
        for name in ("alpha", "beta"):
            status, _ = await client.call("POST", "/v1/jobs?wait=10", {"source": "src", "name": name})
            assert status == 201
        status, _ = await client.call("POST", "/v1/pools", {"name": "ci-pool", "source": "src", "size": 0})
        assert status == 201
        bindir = tmp_path / "bin"
        bindir.mkdir()
        wrapper = bindir / "instaclone"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m instaclone.cli \"$@\"\n")
        wrapper.chmod(0o755)
        yield sock, bindir


def _script(bindir: Path, shell: str) -> Path:
    out = subprocess.run([str(bindir / "instaclone"), "completion", shell], capture_output=True, text=True,
                         check=True)
    path = bindir.parent / f"completion.{shell}"
    path.write_text(out.stdout)
    return path


async def _typed(term: Pty, line: str, expect: str) -> str:
    term.write(line)
    return await asyncio.to_thread(term.read_until, expect, 30)


async def test_bash_completion_in_a_terminal(named_api: tuple[Path, Path]) -> None:
    sock, bindir = named_api
    script = _script(bindir, "bash")
    env = _env(sock, PATH=f"{bindir}:{os.environ['PATH']}", TERM="dumb", PS1="READY$ ", HOME=str(bindir.parent))
    term = Pty(["bash", "--norc", "--noprofile", "-i"], env)
    try:
        await _typed(term, f"source {script}; echo sourced\n", r"sourced\r?\nREADY\$ ")
        # Commands from the parser.
        await _typed(term, "instaclone des\t", r"instaclone destroy ")
        # Clone names from the daemon, listed on the second TAB.
        await _typed(term, "\t\t", r"alpha\s+beta")
        term.write("\x15")  # ^U: clear the line
        await _typed(term, "instaclone pool show \t", r"pool show ci-pool ")
        term.write("\x15")
        await _typed(term, "instaclone clones ls -o \t\t", r"json\s+table\s+wide\s+yaml")
        term.write("\x15")
        await _typed(term, "instaclone cp /etc/hostname al\t", r"cp /etc/hostname alpha:")
        term.write("\x15exit\n")
    finally:
        term.close()


async def test_completion_is_quiet_without_a_daemon(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "--socket", str(tmp_path / "none.sock"), "__complete", "clone"],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (apt-get install zsh)")
async def test_zsh_completion_in_a_terminal(named_api: tuple[Path, Path]) -> None:
    sock, bindir = named_api
    script = _script(bindir, "zsh")
    env = _env(sock, PATH=f"{bindir}:{os.environ['PATH']}", TERM="xterm", HOME=str(bindir.parent))
    term = Pty(["zsh", "-f", "-i"], env)
    try:
        await _typed(term, "PS1='READY%# '; autoload -U compinit && compinit -u; source " + str(script)
                     + "; echo sourced\n", r"sourced")
        await _typed(term, "instaclone des\t", r"instaclone destroy")
        await _typed(term, " \t", r"alpha\s+beta")
        term.write("\x15")
        await _typed(term, "instaclone pool show \t", r"ci-pool")
        term.write("\x15exit\n")
    finally:
        term.close()


async def test_wait_timeout_says_the_job_runs_on(slow_api: tuple[Any, Any, Path]) -> None:
    _, _, sock = slow_api
    proc = await asyncio.create_subprocess_exec(*CLI, "clone", "src", "--name", "pt2", "--wait", "--timeout", "0.5",
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(sock))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err
    assert "still running after 0.5 s: instaclone jobs show" in out.decode()
    assert "Unstunned" not in out.decode()
