"""Integration: commands and files inside clones through their guest agent (busybox guest's ic-agent).

Real libvirt + QEMU, the test guest of scripts/build-guest.sh, the daemon's
API on its socket. Prints the figures docs/guide/exec.md quotes (exec latency of
``true``, cp throughput both ways) with ``pytest -s``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import statistics
import subprocess
import time
from typing import Any

import aiohttp
import pytest

from tests.support.execlib import exec_events, output, run
from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api, boot_source

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]


async def make_clone(config: Any, source: str, name: str) -> None:
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("POST", "/v1/jobs?wait=300",
                                      {"source": source, "name": name, "customize": False})
    assert status == 201 and body["job"]["state"] == "Unstunned", body


async def test_exec_streams_and_files_round_trip(world):
    scratch, virt, _daemon, config = world
    sock = config.daemon.socket
    await boot_source(virt, scratch, "ic-gx-src")
    await make_clone(config, "ic-gx-src", "ic-gx-c")
    c = "ic-gx-c"

    # Lines printed a second apart arrive as they come, before the exit.
    status, evs = await exec_events(sock, c, {"argv": ["sh", "-c", "for i in 1 2 3; do echo line$i; sleep 1; done"]})
    assert status == 200
    chunks = [(t, e) for t, e in evs if e["type"] == "stdout"]
    exit_t, last = evs[-1]
    assert last["type"] == "exit" and last["exit_code"] == 0 and last["signal"] is None, last
    assert output(evs, "stdout") == b"line1\nline2\nline3\n"
    assert len(chunks) >= 2, evs
    assert chunks[0][0] < exit_t - 1.0, (chunks, exit_t)  # the first line came well before the end

    # Exit code and stderr; env; stdin; argv with spaces, quotes and UTF-8.
    last, out, err = await run(sock, c, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (last["exit_code"], out, err) == (7, b"out\n", b"err\n")
    last, out, _ = await run(sock, c, ["sh", "-c", 'echo "$FOO|$2"', "sh", "a b", "é \"q\" 'x'"],
                             env={"FOO": "bar baz"})
    assert out == "bar baz|é \"q\" 'x'\n".encode(), out
    data = os.urandom(300_000)
    last, out, _ = await run(sock, c, ["cat"], stdin=base64.b64encode(data).decode())
    assert last["exit_code"] == 0 and out == data
    last, out, err = await run(sock, c, ["no-such-program"])
    assert last["exit_code"] == 127 and b"not found" in err, (last, err)

    # A command past its timeout is killed with its descendants.
    status, evs = await exec_events(sock, c, {"argv": ["sh", "-c", "sleep 300 & sleep 301; echo never"],
                                              "timeout_s": 2})
    last = evs[-1][1]
    assert last["type"] == "error" and last["error"]["code"] == "exec_timeout", last
    assert b"never" not in output(evs, "stdout")
    _, out, _ = await run(sock, c, ["sh", "-c", "ps -o args; ls -A /run/instaclone"])
    assert b"sleep 30" not in out, out
    assert b"exec-" not in out, out  # no output files left behind

    # Latency of `true` (TCG).
    times = []
    for _ in range(10):
        t0 = time.monotonic()
        last, _, _ = await run(sock, c, ["true"])
        times.append(time.monotonic() - t0)
        assert last["exit_code"] == 0
    print(f"\nexec true: p50 {statistics.median(times) * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")

    # A 5 MiB random file there and back, checksums equal.
    blob = os.urandom(5 << 20)
    sha = hashlib.sha256(blob).hexdigest()
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
        t0 = time.monotonic()
        async with s.put(f"http://x/v1/clones/{c}/files?path=/tmp/blob&mode=0600", data=blob,
                         headers={"X-Instaclone-SHA256": sha}) as r:
            body = await r.json()
            assert r.status == 200, body
        put_s = time.monotonic() - t0
        assert body["file"] == {"path": "/tmp/blob", "bytes": len(blob), "sha256": sha, "mode": "0600"}
        t0 = time.monotonic()
        async with s.get(f"http://x/v1/clones/{c}/files?path=/tmp/blob") as r:
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == len(blob)
            assert r.headers["X-Instaclone-SHA256"] == sha
            back = await r.read()
        get_s = time.monotonic() - t0
        assert back == blob
        print(f"cp 5 MiB: put {5 / put_s:.1f} MiB/s ({put_s:.2f} s), get {5 / get_s:.1f} MiB/s ({get_s:.2f} s)")
        _, out, _ = await run(sock, c, ["sh", "-c", "stat -c %a /tmp/blob; ls -A /tmp"])
        assert out.split()[0] == b"600" and b"instaclone" not in out, out

        # Errors: a missing file, a missing directory, a body that is not what its header says.
        async with s.get(f"http://x/v1/clones/{c}/files?path=/tmp/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "guest_file_not_found"
        async with s.put(f"http://x/v1/clones/{c}/files?path=/nodir/x", data=b"x") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "guest_file_not_found"
        async with s.put(f"http://x/v1/clones/{c}/files?path=/tmp/blob", data=b"other",
                         headers={"X-Instaclone-SHA256": sha}) as r:
            assert r.status == 422 and (await r.json())["error"]["code"] == "checksum_mismatch"
        async with s.get(f"http://x/v1/clones/{c}/files?path=/tmp") as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "guest_file_error"
        # The source is not reachable: only clones instaclone made.
        async with s.post("http://x/v1/clones/ic-gx-src/exec", json={"argv": ["true"]}) as r:
            assert r.status == 404
    # The failed put left the file as it was.
    _, out, _ = await run(sock, c, ["sha256sum", "/tmp/blob"])
    assert out.split()[0].decode() == sha


async def test_clone_without_agent_channel_is_agent_unavailable(world):
    scratch, virt, _daemon, config = world
    # The test guest, without its agent channel.
    disk = scratch.path / "ic-gx-na.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(devguest.GUEST_DIR / "base.qcow2"),
                    "-F", "qcow2", str(disk)], check=True)
    xml = devguest.domain_xml("ic-gx-na", disk=disk, workdir=scratch.path)
    xml = re.sub(r"<channel type=.unix.>.*?</channel>", "", xml, flags=re.S)
    assert "guest_agent" not in xml
    await virt.define(xml)
    await virt.start("ic-gx-na")
    await devguest.wait_counter(devguest.serial_log_path("ic-gx-na", scratch.path), above=1, timeout=60)
    await make_clone(config, "ic-gx-na", "ic-gx-nac")
    status, evs = await exec_events(config.daemon.socket, "ic-gx-nac", {"argv": ["true"]})
    err = evs[0][1]["error"]
    assert status == 409 and err["code"] == "agent_unavailable", evs
    assert "org.qemu.guest_agent.0" in err["message"]
