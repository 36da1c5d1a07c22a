"""Commands and files inside a clone, through its guest agent: ``exec``, file put and get.

qemu-guest-agent hands a guest-exec's captured output over only once the
process has exited, so output is streamed another way: the host creates two
files in the guest (``/run/instaclone/exec-<id>.out`` and ``.err``, mode 0600,
with guest-file-open, keeping their handles), then starts the command under
``sh`` with its stdout and stderr appended to them, and reads both handles at
their growing ends while it polls guest-exec-status. The wrapper unlinks the
files as soon as it has them open: the host's handles keep them readable, so
nothing is left behind whatever happens to the host. stdin is a third file,
written in chunks before the start. A command past its timeout is killed with
its descendants (one more guest-exec; ``kill`` is a shell builtin).

Under TCG every program started in the guest costs 100-400 ms, so an exec
starts one (``sh``, which ``exec``s the command; plus a subshell for the
unlinking), a put runs one script (sha256sum, chmod, mv) and a get one
``sha256sum``. Agent commands themselves are cheap (milliseconds).

The same code runs on qemu-guest-agent (the Debian guest) and on the busybox
test guest's ``ic-agent``, which implements the same commands.
"""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import suppress
from typing import Any

from ..errors import (
    AgentUnavailable,
    ChecksumMismatch,
    DomainNotFound,
    DomainReplaced,
    DomainStateInvalid,
    ExecTimeout,
    GuestFileError,
    GuestFileNotFound,
    InstacloneError,
    LibvirtError,
    NotFound,
)
from ..hv import Hypervisor, guestfiles as gf
from ..requests import ExecRequest, GetFileRequest, PutFileRequest
from .context import JobContext
from .customize import AGENT_CHANNEL, has_agent

#: Where the exec's output and input files live in the guest (made 0700 on first use).
EXEC_DIR = "/run/instaclone"
#: How long the agent may take to answer guest-ping before the clone counts as having none.
PING_S = 3
#: The environment of every command (guest-exec's env replaces the agent's), before the caller's.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
#: Output polling: the first interval after output or the start, and the longest.
POLL_MIN_S = 0.02
POLL_MAX_S = 0.25
#: How long a killed command may take to be reported exited.
KILL_WAIT_S = 10.0
#: Seconds allowed per MiB for a guest-side checksum (TCG: sha256sum does ~20 MiB/s).
SUM_S_PER_MIB = 0.5

# $1: the files' common path, $2: 1 if there is an .in file; then the command.
# The subshell's rm runs beside the command and is not its child.
_WRAPPER = r"""d=$1; i=$2; shift 2
if [ "$i" = 1 ]; then exec <"$d.in"; else exec </dev/null; fi
exec >>"$d.out" 2>>"$d.err"
(rm -f "$d.in" "$d.out" "$d.err" &)
cd / && exec "$@"
"""

# $1: a pid. Stops it, then its descendants as they are found (so none forks
# away), then kills them all; builtins only (read, set, case, kill).
_KILL_TREE = r"""t=" $1 " n=1
kill -STOP "$1" 2>/dev/null
while [ $n = 1 ]; do
    n=0
    for s in /proc/[0-9]*/stat; do
        read -r l 2>/dev/null < "$s" || continue
        p=${l%% *}; r=${l##*) }
        set -- $r
        case $t in *" $p "*) continue ;; esac
        case $t in *" $2 "*) t="$t$p "; kill -STOP "$p" 2>/dev/null; n=1 ;; esac
    done
done
kill -KILL $t 2>/dev/null
exit 0
"""

# $1 temp file, $2 expected sha256, $3 mode, $4 destination. Exit 3: the
# guest's copy differs (its sha256 on stdout); 4: the destination is a
# directory. The temp file is gone whatever the outcome.
_PLACE = r"""t=$1 want=$2 mode=$3 dst=$4
s=$(sha256sum "$t") || { rm -f "$t"; exit 2; }
s=${s%% *}
[ "$s" = "$want" ] || { rm -f "$t"; echo "$s"; exit 3; }
[ -d "$dst" ] && { rm -f "$t"; exit 4; }
chmod "$mode" "$t" && mv -f "$t" "$dst" || { rm -f "$t"; exit 5; }
"""

_HEX64 = re.compile(r"[0-9a-f]{64}")


async def _close_quietly(virt: Hypervisor, name: str, handle: int) -> None:
    """Close a guest file handle when it no longer matters whether that works (cleanup paths)."""
    with suppress(InstacloneError):
        await gf.file_close(virt, name, handle)


class GuestProcess:
    """A command started in a guest: its ``pid`` and its :meth:`events` (call :meth:`close` always)."""

    def __init__(self, virt: Hypervisor, name: str, pid: int, handles: tuple[int, int], timeout_s: float,
                 log: Any) -> None:
        self.virt, self.name, self.pid, self.timeout_s, self.log = virt, name, pid, timeout_s, log
        self._out, self._err = handles
        self._open = True
        self.exited = False

    async def _read(self) -> tuple[list[dict[str, Any]], bool]:
        """One read of each stream: the events for what arrived (stdout first), and whether
        both reads reached the end of their file."""
        out = []
        at_end = True
        for handle, kind in ((self._out, "stdout"), (self._err, "stderr")):
            data, eof = await gf.file_read(self.virt, self.name, handle)
            if data:
                out.append({"type": kind, "data": data})
            at_end = at_end and eof
        return out, at_end

    async def _drain(self) -> AsyncIterator[dict[str, Any]]:
        """Everything left in both files (the process has exited: they grow no more)."""
        while True:
            got, at_end = await self._read()
            for ev in got:
                yield ev
            if at_end or not got:
                return

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """``started``, then ``stdout``/``stderr`` (``data``: bytes) as they come, then ``exit``
        (``exit_code``, ``signal``, ``duration_ms``) or ``error`` (:class:`ExecTimeout` as a dict).

        A signalled command has ``exit_code`` 128 + its signal, as in a shell.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.timeout_s
        yield {"type": "started", "pid": self.pid}
        delay = POLL_MIN_S
        while True:
            # Status first: a command that is done is drained at once (one read a stream).
            st = await gf.exec_status(self.virt, self.name, self.pid)
            if st is not None:
                self.exited = True
                async for ev in self._drain():
                    yield ev
                sig = st["signal"]
                code = 128 + int(sig) if sig is not None else int(st["exitcode"] if st["exitcode"] is not None else -1)
                yield {"type": "exit", "exit_code": code, "signal": sig,
                       "duration_ms": round((loop.time() - start) * 1000, 1)}
                return
            got, _ = await self._read()
            for ev in got:
                yield ev
            now = loop.time()
            if now >= deadline:
                await self.kill()
                async for ev in self._drain():
                    yield ev
                err = ExecTimeout(f"{self.timeout_s:g} s passed: the command (pid {self.pid}) and its "
                                  f"descendants were killed")
                yield {"type": "error", "error": {"code": err.code, "message": err.message}}
                return
            if got:
                delay = POLL_MIN_S
            else:
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, POLL_MAX_S)

    async def kill(self) -> None:
        """Kill the command and its descendants; wait (up to KILL_WAIT_S) until the agent saw it exit."""
        if self.exited:
            return
        await self.virt.agent_exec(self.name, ["/bin/sh", "-c", _KILL_TREE, "sh", str(self.pid)],
                                   timeout_s=KILL_WAIT_S)
        loop = asyncio.get_running_loop()
        end = loop.time() + KILL_WAIT_S
        while loop.time() < end:
            if await gf.exec_status(self.virt, self.name, self.pid) is not None:
                self.exited = True
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Kill the command if it still runs (the caller went away) and close the output handles."""
        if not self._open:
            return
        self._open = False
        try:
            await self.kill()
        except InstacloneError as exc:
            self.log.warning("exec.kill_failed", clone=self.name, pid=self.pid, error=exc.message)
        for h in (self._out, self._err):
            await _close_quietly(self.virt, self.name, h)


class GuestFileReader:
    """A file being read from a guest: its ``size`` and ``sha256`` (taken in the guest before
    reading) and its :meth:`chunks`; call :meth:`close` always."""

    def __init__(self, virt: Hypervisor, name: str, path: str, handle: int, size: int, sha256: str) -> None:
        self.virt, self.name, self.path, self.size, self.sha256 = virt, name, path, size, sha256
        self._handle: int | None = handle
        self.sent = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The file's bytes, CHUNK_BYTES at a time; GuestFileError if its size changed meanwhile."""
        assert self._handle is not None
        while True:
            try:
                data, eof = await gf.file_read(self.virt, self.name, self._handle)
            except LibvirtError as exc:
                raise GuestFileError(f"reading {self.path} in clone {self.name!r} failed: {exc.message}") from None
            if data:
                self.sent += len(data)
                if self.sent > self.size:
                    break
                yield data
            if eof or not data:
                break
        if self.sent != self.size:
            raise GuestFileError(f"{self.path} in clone {self.name!r} changed while it was read: "
                                 f"{self.sent} bytes read, {self.size} announced")

    async def close(self) -> None:
        if self._handle is not None:
            h, self._handle = self._handle, None
            await _close_quietly(self.virt, self.name, h)


async def _rechunk(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """``chunks`` regrouped into pieces of ``size`` bytes (the last one shorter)."""
    buf = bytearray()
    async for c in chunks:
        buf += c
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def _file_error(exc: LibvirtError, name: str, what: str, path: str) -> InstacloneError:
    """A guest's file error as ours: GuestFileNotFound for a missing file or directory."""
    if gf.guest_errno(exc) in ("ENOENT", "ENOTDIR"):
        return GuestFileNotFound(f"{what} {path} does not exist in clone {name!r}")
    return GuestFileError(f"{path} in clone {name!r}: {exc.message}")


class GuestOps:
    """exec, put and get inside clones instaclone made (never in a source or another domain)."""

    def __init__(self, svc: JobContext) -> None:
        self.svc = svc

    @property
    def virt(self) -> Hypervisor:
        return self.svc.virt

    async def reachable(self, name: str) -> None:
        """Return if ``name`` is a running clone of ours whose guest agent answers.

        NotFound (not one of our clones, or its domain is gone), DomainReplaced (its name
        belongs to another domain now: checked by the UUID recorded for it), DomainStateInvalid
        (domain_state_invalid: not running), AgentUnavailable (no agent channel, or no answer).
        """
        clone = await self.svc.store.get_clone(name)
        if clone is None:
            raise NotFound(f"no clone {name!r}: commands and files reach only clones instaclone made")
        try:
            # By the UUID recorded for it: a domain that took a gone clone's name is not reached.
            info = await self.virt.lookup_id(name, clone.uuid)
        except DomainReplaced as exc:
            raise DomainReplaced(f"clone {name!r} has no domain any more; {exc.message} (destroy the clone "
                                 "to forget it)") from None
        except DomainNotFound:
            raise NotFound(f"clone {name!r} has no domain any more (destroy it to forget it)") from None
        if info.state != "running":
            raise DomainStateInvalid(f"clone {name!r} is {info.state}, not running: commands and files need "
                                 f"its guest running")
        if not has_agent(info.xml):
            raise AgentUnavailable(
                f"clone {name!r} has no guest agent: its domain has no {AGENT_CHANNEL} channel. Add a virtio "
                f"channel of that name to the source's definition, run qemu-guest-agent in its guest, and "
                f"make new clones")
        try:
            await self.virt.agent(name, "guest-ping", timeout_s=PING_S)
        except InstacloneError as exc:
            raise AgentUnavailable(
                f"the guest agent of clone {name!r} does not answer guest-ping within {PING_S} s "
                f"({exc.message}): is qemu-guest-agent installed and running in the guest?") from None

    async def _create(self, name: str, path: str, mode: str) -> int:
        """guest-file-open of a file in EXEC_DIR, making the directory (0700) the first time."""
        try:
            return await gf.file_open(self.virt, name, path, mode)
        except LibvirtError as exc:
            if gf.guest_errno(exc) != "ENOENT":
                raise GuestFileError(f"cannot create {path} in clone {name!r}: {exc.message}") from None
        rc, out = await self.virt.agent_exec(name, ["mkdir", "-p", "-m", "0700", EXEC_DIR])
        if rc != 0:
            raise GuestFileError(f"cannot make {EXEC_DIR} in clone {name!r}: {out.strip()}")
        try:
            return await gf.file_open(self.virt, name, path, mode)
        except LibvirtError as exc:
            raise GuestFileError(f"cannot create {path} in clone {name!r}: {exc.message}") from None

    async def _remove(self, name: str, paths: list[str]) -> None:
        """Best effort: ``rm -f`` of ``paths`` in the guest (logged if it fails)."""
        try:
            await self.virt.agent_exec(name, ["rm", "-f", *paths])
        except InstacloneError as exc:
            self.svc.log.warning("guest.cleanup_failed", clone=name, paths=paths, error=exc.message)

    async def run(self, req: ExecRequest) -> GuestProcess:
        """Start ``req.argv`` in clone ``req.clone``; the returned process streams its output (see GuestProcess).

        The command runs in ``/`` with ``PATH`` (BASE_ENV) and ``req.env``, stdin from ``req.stdin``
        (else /dev/null). Raises as :meth:`reachable`, GuestFileError if the guest cannot hold the
        output files.
        """
        name, argv, env, stdin = req.clone, list(req.argv), req.env, req.stdin
        await self.reachable(name)
        base = f"{EXEC_DIR}/exec-{secrets.token_hex(8)}"
        handles: list[int] = []
        started = False
        try:
            handles.append(await self._create(name, base + ".out", "w+"))
            handles.append(await gf.file_open(self.virt, name, base + ".err", "w+"))
            if stdin:
                h = await gf.file_open(self.virt, name, base + ".in", "w")
                try:
                    for i in range(0, len(stdin), gf.WRITE_CHUNK_BYTES):
                        await gf.file_write(self.virt, name, h, stdin[i:i + gf.WRITE_CHUNK_BYTES])
                finally:
                    await gf.file_close(self.virt, name, h)
            env_list = [f"{k}={v}" for k, v in {**BASE_ENV, **(env or {})}.items()]
            pid = await gf.exec_start(self.virt, name, ["/bin/sh", "-c", _WRAPPER, "sh", base,
                                                        "1" if stdin else "0", *argv], env=env_list)
            started = True
        except LibvirtError as exc:
            raise GuestFileError(f"cannot start {argv[0]!r} in clone {name!r}: {exc.message}") from None
        finally:
            if not started:
                for h in handles:
                    await _close_quietly(self.virt, name, h)
                if handles:
                    await self._remove(name, [base + ".out", base + ".err", base + ".in"])
        self.svc.log.info("guest.exec", clone=name, argv0=argv[0], pid=pid)
        return GuestProcess(self.virt, name, pid, (handles[0], handles[1]), req.timeout_s, self.svc.log)

    async def put(self, req: PutFileRequest, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Write ``chunks`` to ``req.path`` in clone ``req.clone``: to a temp name beside it, then (size and
        sha256 checked in the guest, ``req.mode`` set) renamed onto it. Returns ``{path, bytes, sha256, mode}``.

        GuestFileNotFound (no such directory), GuestFileError (refused, is a directory, disk full),
        ChecksumMismatch (the bytes are not ``req.sha256``, or the guest's copy differs), and as
        :meth:`reachable`. A failed put leaves the path as it was and no temp file.
        """
        name, path, mode, sha256 = req.clone, req.path, req.mode, req.sha256
        await self.reachable(name)
        directory, base = posixpath.split(path)
        tmp = posixpath.join(directory, f".{base}.instaclone-{secrets.token_hex(6)}")
        try:
            h = await gf.file_open(self.virt, name, tmp, "w")
        except LibvirtError as exc:
            raise _file_error(exc, name, "directory", directory) from None
        digest = hashlib.sha256()
        size = 0
        closed = placed = False
        try:
            async for chunk in _rechunk(chunks, gf.WRITE_CHUNK_BYTES):
                await gf.file_write(self.virt, name, h, chunk)
                digest.update(chunk)
                size += len(chunk)
            guest_size = await gf.file_seek(self.virt, name, h, 0, "end")
            await gf.file_close(self.virt, name, h)
            closed = True
            got = digest.hexdigest()
            if sha256 is not None and got != sha256.lower():
                raise ChecksumMismatch(f"the body's sha256 is {got}, not {sha256.lower()} as its header says; "
                                       f"{path} in clone {name!r} was left as it was")
            if guest_size != size:
                raise ChecksumMismatch(f"the guest holds {guest_size} bytes of the {size} sent")
            placed = True  # the script removes the temp file whatever happens
            rc, out = await self.virt.agent_exec(name, ["/bin/sh", "-c", _PLACE, "sh", tmp, got, mode, path],
                                                 timeout_s=60 + size / (1 << 20) * SUM_S_PER_MIB)
        except LibvirtError as exc:
            raise GuestFileError(f"writing {path} in clone {name!r} failed: {exc.message}") from None
        finally:
            if not closed:
                await _close_quietly(self.virt, name, h)
            if not placed:
                await self._remove(name, [tmp])
        if rc == 3:
            raise ChecksumMismatch(f"the copy in clone {name!r} has sha256 {out.strip()}, not {got} as sent")
        if rc == 4:
            raise GuestFileError(f"{path} is a directory in clone {name!r}")
        if rc != 0:
            raise GuestFileError(f"cannot put {path} in place in clone {name!r} (exit {rc}): {out.strip()}")
        return {"path": path, "bytes": size, "sha256": got, "mode": mode}

    async def get(self, req: GetFileRequest) -> GuestFileReader:
        """Open ``req.path`` in clone ``req.clone`` for reading; its size and sha256 are taken first.

        GuestFileNotFound (no such file), GuestFileError (a directory, unreadable), and as :meth:`reachable`.
        """
        name, path = req.clone, req.path
        await self.reachable(name)
        try:
            h = await gf.file_open(self.virt, name, path, "r")
        except LibvirtError as exc:
            raise _file_error(exc, name, "file", path) from None
        try:
            size = await gf.file_seek(self.virt, name, h, 0, "end")
            await gf.file_seek(self.virt, name, h, 0, "set")
            rc, out = await self.virt.agent_exec(name, ["sha256sum", path],
                                                 timeout_s=60 + size / (1 << 20) * SUM_S_PER_MIB)
            sha = out.split()[0] if out.split() else ""
            if rc != 0 or not _HEX64.fullmatch(sha):
                raise GuestFileError(f"cannot read {path} in clone {name!r}: {out.strip()}")
        except BaseException as exc:
            await _close_quietly(self.virt, name, h)
            if isinstance(exc, LibvirtError):
                raise GuestFileError(f"cannot read {path} in clone {name!r}: {exc.message}") from None
            raise
        return GuestFileReader(self.virt, name, path, h, size, sha)
