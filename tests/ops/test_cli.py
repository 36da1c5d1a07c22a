"""The CLI's conventions, run as a real subprocess against the fake API (tests/support/fakes.py).

No traceback ever (broken pipe, Ctrl-C, a daemon that goes away mid-stream), --version,
-q and -o table|wide|json|yaml on every list, help and the man page, permission errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from instaclone import __version__
from instaclone.cli import commandline, manual, tree
from instaclone.cli.output import to_yaml
from tests.support.fakes import fake_api

CLI = [sys.executable, "-m", "instaclone.cli"]
REPO = Path(__file__).resolve().parents[2]


async def run(sock: Path | str, *args: str, stdin: bytes | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """The CLI as a subprocess: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--socket", str(sock), *args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and "Error:" not in err.split("instaclone:")[0], err
    assert len(err.strip().splitlines()) <= 1, err


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[Any, Path]]:
    """The fake API with two clones (one job), a frozen source and an empty pool."""
    async with fake_api(tmp_path) as (client, virt, sock):
        status, _ = await client.call("POST", "/v1/jobs?wait=10", {"source": "src", "name": "c1", "count": 2})
        assert status == 201
        base = tmp_path / "tmpl.qcow2"
        base.write_bytes(b"base")
        virt.add_source("tmpl", base)
        status, body = await client.call("POST", "/v1/sources/tmpl/freeze")
        assert status == 200, body
        status, body = await client.call("POST", "/v1/pools", {"name": "p", "source": "tmpl", "size": 0})
        assert status == 201, body
        yield client, sock


#: What the webhook routes answer (the fake API has no webhook sender): canned, in the API's shape.
CANNED = {
    "/v1/webhooks": {"webhooks": [{"name": "ci", "url": "http://127.0.0.1:9/hook", "enabled": True,
                                   "events": ["clone.*"], "deliveries": {"pending": 1, "delivered": 3}}]},
    "/v1/webhooks/deliveries": {"deliveries": [
        {"id": 7, "event_cursor": 3, "event_id": "ev3", "event_type": "clone.ready", "job_id": "j1",
         "webhook": "ci", "status": "pending", "attempts": 2, "next_at": 1.7e9, "last_status": 500,
         "last_error": "HTTP 500", "updated_at": 1.7e9},
        {"id": 6, "event_cursor": 2, "event_id": "ev2", "event_type": "clone.requested", "job_id": "j1",
         "webhook": "ci", "status": "delivered", "attempts": 1, "next_at": 1.7e9, "last_status": 204,
         "last_error": None, "updated_at": 1.7e9}]},
}


@pytest.fixture
async def canned(tmp_path: Path) -> AsyncIterator[Path]:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(CANNED[request.path])

    runner, sock = await _one_shot_server(tmp_path, answer)
    yield sock
    await runner.cleanup()


#: Every list command: its argv, the API path and key of its items, and the field -q prints.
LISTS = [
    (["jobs", "ls"], "/v1/jobs", "jobs", "id"),
    (["clones", "ls"], "/v1/clones", "clones", "name"),
    (["frozen"], "/v1/frozen", "frozen", "name"),
    (["pool", "ls"], "/v1/pools", "pools", "name"),
    (["webhooks", "ls"], "/v1/webhooks", "webhooks", "name"),
    (["webhooks", "deliveries", "ls"], "/v1/webhooks/deliveries", "deliveries", "id"),
]


@pytest.mark.parametrize(("argv", "path", "key", "field"), LISTS, ids=[" ".join(x[0]) for x in LISTS])
async def test_every_list_has_the_same_output_options(world: tuple[Any, Path], canned: Path, argv: list[str],
                                                      path: str, key: str, field: str) -> None:
    client, sock = world
    if path in CANNED:
        items, sock = CANNED[path][key], canned
    else:
        _, body = await client.call("GET", path)
        items = body[key]
    assert items
    rc, out, err = await run(sock, *argv, "-o", "json")
    assert rc == 0, err
    assert json.loads(out) == items
    # -o before the command means the same.
    rc, out_before, _ = await run(sock, "-o", "json", *argv)
    assert json.loads(out_before) == items
    rc, yml, err = await run(sock, *argv, "-o", "yaml")
    assert rc == 0, err
    assert yml == to_yaml(items)
    rc, quiet, err = await run(sock, *argv, "-q")
    assert rc == 0, err
    assert quiet.split() == [str(i[field]) for i in items]
    rc, tab, err = await run(sock, *argv)
    assert rc == 0 and "\x1b" not in tab, err
    rc, wide, err = await run(sock, *argv, "-o", "wide")
    assert rc == 0, err
    head, wide_head = tab.splitlines()[0].split(), wide.splitlines()[0].split()
    assert all(h in wide_head for h in head)
    assert len(tab.splitlines()) == len(wide.splitlines()) == len(items) + 1
    if key != "webhooks":  # endpoints have nothing more to show
        assert len(wide_head) > len(head), (head, wide_head)
    else:
        assert tab == wide


async def test_quiet_on_single_objects(world: tuple[Any, Path]) -> None:
    _, sock = world
    rc, out, err = await run(sock, "-q", "clone", "src", "--name", "q1", "--count", "2", "--wait")
    assert rc == 0, err
    assert out.split() == ["q1-1", "q1-2"]
    rc, out, err = await run(sock, "clone", "src", "--name", "q2", "-q")
    assert rc == 0 and len(out.split()) == 1 and len(out.strip()) == 16, (out, err)
    rc, out, err = await run(sock, "destroy", "q1-1", "-q")
    assert (rc, out) == (0, "q1-1\n"), err
    rc, out, err = await run(sock, "pool", "show", "p", "-o", "yaml")
    assert rc == 0 and "name: p\n" in out, err


def test_yaml_emitter() -> None:
    data = {"b": [1, 2.5, None, True], "a": {"x": "yes", "y": "plain text", "z": "a: b", "e": [], "m": {}},
            "c": [{"k": "v", "l": [1]}, "10", "-x", ""]}
    assert to_yaml(data) == (
        'a:\n  e: []\n  m: {}\n  x: "yes"\n  "y": plain text\n  z: "a: b"\n'
        'b:\n  - 1\n  - 2.5\n  - null\n  - true\n'
        'c:\n  - k: v\n    l:\n      - 1\n  - "10"\n  - "-x"\n  - ""\n')
    assert 'x: ".inf"' in to_yaml({"x": ".inf"}) and "- \"2026-01-01\"" in to_yaml(["2026-01-01"])
    yaml = pytest.importorskip("yaml")
    odd = ["~", "Null", "#x", "a #b", "x ", "@x", "*a", "!t", "%x", "|", ">", "?x", "[", "{", "c:", "1e5", "0o17",
           "12:30", ".inf", ".NaN", "é\n\t\"", [[1, 2], {"a": {"b": [{"c": 1}]}}], {"1": 2, "true": 3}]
    for doc in (data, odd):
        assert yaml.safe_load(to_yaml(doc)) == doc


async def test_version_and_help() -> None:
    rc, out, err = await run("/nonexistent", "--version")
    assert (rc, out) == (0, f"instaclone {__version__}\n"), err
    rc, out, _ = await run("/nonexistent", "help", "exit-codes")
    assert rc == 0 and "141" in out and "125" in out
    rc, out, _ = await run("/nonexistent", "help", "pool", "claim")
    assert rc == 0 and out.startswith("usage: instaclone pool claim")
    rc, _, err = await run("/nonexistent", "help", "nosuch")
    assert rc == 2 and "no help on" in err
    rc, _, err = await run("/nonexistent", "jobs", "frob")
    assert rc == 2 and "Traceback" not in err


def test_man_page_is_up_to_date() -> None:
    """docs/man/instaclone.1 is what the parser prints (regenerate: instaclone help --man > docs/man/instaclone.1)."""
    page = manual.man_page(commandline.parser())
    assert (REPO / "docs/man/instaclone.1").read_text() == page
    for path, _ in tree.walk(commandline.parser()):
        if path and path[0] not in ("help", "completion") and len(path) == 1:
            assert f".SS instaclone {path[0]}".replace("-", "\\-") in page, path


def _closed_pipe_run(sock: Path, *args: str) -> tuple[int, str]:
    """Run the CLI with a stdout pipe whose reader is gone (like ``| head`` having exited)."""
    r, w = os.pipe()
    proc = subprocess.Popen([*CLI, "--socket", str(sock), *args], stdout=w, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    os.close(w)
    os.close(r)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


async def test_broken_pipe_is_quiet(world: tuple[Any, Path]) -> None:
    _, sock = world
    for args in (["jobs", "ls"], ["clone", "src", "--name", "bp", "--wait"], ["events"], ["help", "--man"]):
        rc, err = await asyncio.to_thread(_closed_pipe_run, sock, *args)
        assert (rc, err) == (141, ""), (args, err)
    # The shell's own `| head -1` on a long answer: the status of the pipeline is head's.
    script = f"{' '.join(CLI)} --socket {sock} help --man | head -1"
    proc = await asyncio.create_subprocess_shell(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert out.decode().startswith(".TH INSTACLONE") and err == b"", err


async def test_unreachable_and_permission(tmp_path: Path) -> None:
    rc, out, err = await run(tmp_path / "none.sock", "clones", "ls")
    assert rc == 3 and "cannot reach instacloned" in err and out == ""
    no_traceback(err)
    # A user who may not open the socket: EACCES, a permission problem (exit 4) that says the fix.
    err = await _as_nobody(tmp_path / "none.sock")  # pytest's tmp root is 0700: a closed directory
    assert "permission denied" in err and "directory" in err
    open_dir = Path(tempfile.mkdtemp(prefix="instaclone-cli-"))
    try:
        open_dir.chmod(0o755)
        async with fake_api(open_dir) as (_client, _virt, sock):
            sock.chmod(0o660)
            err = await _as_nobody(sock)
    finally:
        shutil.rmtree(open_dir)
    assert "not in the socket's group 'root'" in err and "usermod -aG root" in err, err


async def _as_nobody(sock: Path) -> str:
    """``clones ls`` as uid/gid 65534 with no groups: its stderr (asserting exit 4, one line, no stdout)."""
    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *CLI, "--socket", str(sock), "clones", "ls",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HOME": "/", "USER": "nobody"})
    out, err_b = await proc.communicate()
    err = err_b.decode()
    assert (proc.returncode, out) == (4, b""), err
    no_traceback(err)
    return err


async def _one_shot_server(tmp_path: Path, handler: Any) -> tuple[web.AppRunner, Path]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "odd.sock"
    await web.UnixSite(runner, str(sock)).start()
    return runner, sock


async def test_forbidden_is_a_permission_error(tmp_path: Path) -> None:
    async def forbidden(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "forbidden", "message": "uid 1000 may not change anything"}},
                                 status=403)

    runner, sock = await _one_shot_server(tmp_path, forbidden)
    try:
        rc, _, err = await run(sock, "destroy", "x")
    finally:
        await runner.cleanup()
    assert rc == 4 and "permission problem" in err and "access.write_groups" in err
    no_traceback(err)


async def test_daemon_vanishing_mid_stream(tmp_path: Path) -> None:
    """``events -f`` while the daemon dies: the events so far, then (retries spent) one line and exit 3."""
    died = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        line = {"id": "e1", "cursor": 1, "type": "clone.requested", "data": {"job_id": "j1", "at": 1.0}}
        await resp.write(json.dumps(line).encode() + b"\n")
        await asyncio.sleep(0.3)
        assert request.transport is not None
        request.transport.abort()  # the daemon dies: no end of the chunked body
        died.set()
        return resp

    runner, sock = await _one_shot_server(tmp_path, events)
    cli = asyncio.ensure_future(run(sock, "events", "-f"))
    try:
        await asyncio.wait_for(died.wait(), 30)
    finally:
        await runner.cleanup()  # and it does not come back
    rc, out, err = await cli
    assert rc == 3, err
    assert "clone.requested" in out
    assert "cannot reach instacloned" in err
    no_traceback(err)


async def test_ctrl_c_is_quiet(world: tuple[Any, Path]) -> None:
    _, sock = world
    proc = await asyncio.create_subprocess_exec(*CLI, "--socket", str(sock), "events", "-f", stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 30)  # it is following
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130
    assert err.decode() == "instaclone: interrupted\n"


async def test_usage_errors_exit_2(world: tuple[Any, Path]) -> None:
    _, sock = world
    rc, _, err = await run(sock, "clone", "src", "--name", "u", "--config", "nokey")
    assert rc == 2 and "KEY=VALUE" in err
    rc, _, err = await run(sock, "exec", "c1-1")
    assert rc == 2 and "say what to run" in err
    rc, _, err = await run(sock, "cp", "a", "b")
    assert rc == 2 and "name a clone" in err


def test_cli_needs_none_of_the_daemons_dependencies() -> None:
    """The CLI is in the base install (the client's: aiohttp only): it imports and runs without them."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'libvirt', 'structlog', 'prometheus_client', 'yaml'}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from instaclone.cli import main\n"
        "assert main(['completion', 'zsh']) == 0 and main(['help', 'exit-codes']) == 0\n"
        "# Commands that need no daemon need no aiohttp either (fast in a shell's startup file).\n"
        "assert not [m for m in sys.modules if m.startswith(('aiohttp', 'instaclone.client'))], sys.modules\n"
        "assert main(['--socket', '/nonexistent', 'clones', 'ls']) == 3\n"
        "assert not [m for m in sys.modules if m.startswith(('instaclone.jobs', 'instaclone.api', 'instaclone.hv'))]\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0\n"
        "else:\n"
        "    raise AssertionError('--version did not exit')\n"
        "print('all good')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.splitlines()[-1]) == (0, "all good"), out.stderr
