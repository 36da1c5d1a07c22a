"""Commands inside a clone, through its guest agent: ``instaclone exec`` and ``instaclone cp``.

``exec`` writes the command's stdout and stderr to its own as they come and exits with the
command's status (128+S when a signal S killed it, 124 when it ran past ``--timeout``); when the
command could not be run at all (no agent in the guest, the clone not running, no daemon) it
prints one line and exits 125, like ``docker exec``, so that a script can tell the two apart.

``cp`` copies one file in either direction (``CLONE:/abs/path`` on one side, ``-`` for stdin or
stdout), in chunks, never holding the whole file; the size and SHA-256 are checked on arrival.
A download goes to a temporary name next to the destination and is renamed onto it only when
both match.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .cli_exit import EXIT_EXEC_TIMEOUT, EXIT_EXEC_TOOL, EXIT_USAGE
from .cli_transport import CliError, Ctx, kv

#: Bytes per chunk read from a local file or stdin, and from the daemon's answer.
CHUNK = 1 << 20
#: Files at least this big show a progress line on a terminal (stderr).
PROGRESS_MIN_BYTES = 8 << 20
#: ``CLONE:/path``: a clone name, a colon, an absolute path (use ``./a:b`` for a local name with a colon).
_REMOTE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.+-]*):(/.*)")

Handler = Callable[[Ctx, argparse.Namespace], Awaitable[int]]


# -- exec -----------------------------------------------------------------------------------------


def split_exec(args: argparse.Namespace) -> None:
    """Sort ``exec``'s remainder into options and the command (``CLONE [-i] [--env K=V] -- CMD ...``).

    argparse gives everything after CLONE as the command; options written between CLONE and ``--``
    are taken here. Raises CliError (usage) if there is no command.
    """
    rest: list[str] = list(args.argv)
    if "--" in rest:
        i = rest.index("--")
        opts, rest = rest[:i], rest[i + 1:]
        it = iter(opts)
        for o in it:
            if o in ("-i", "--interactive"):
                args.interactive = True
            elif o in ("--env", "--timeout"):
                value = next(it, None)
                if value is None:
                    raise CliError(f"exec: {o} wants a value", EXIT_USAGE)
                _set_exec_option(args, o, value)
            elif o.startswith(("--env=", "--timeout=")):
                _set_exec_option(args, *o.split("=", 1))
            else:
                raise CliError(f"exec: unknown option {o!r} before '--'", EXIT_USAGE)
    if not rest or not rest[0]:
        raise CliError("exec: say what to run: instaclone exec CLONE -- CMD [ARG...]", EXIT_USAGE)
    args.argv = rest


def _set_exec_option(args: argparse.Namespace, option: str, value: str) -> None:
    if option == "--env":
        args.env.append(value)
        return
    try:
        args.timeout = float(value)
    except ValueError:
        raise CliError(f"exec: --timeout wants seconds, got {value!r}", EXIT_USAGE) from None


def _agent_hint(exc: CliError) -> str:
    if exc.code == "agent_unavailable":
        return ("; the guest needs qemu-guest-agent running and a virtio-serial channel named "
                "org.qemu.guest_agent.0 (instaclone check SRC tells)")
    return ""


async def _exec(ctx: Ctx, args: argparse.Namespace) -> int:
    body: dict[str, object] = {"argv": args.argv, "timeout_s": args.timeout}
    try:
        if args.env:
            body["env"] = kv(args.env, "--env")
    except CliError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.interactive:
        # The protocol takes stdin whole, with the request: read it to its end first.
        body["stdin"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    out, err = sys.stdout.buffer, sys.stderr.buffer
    sys.stdout.flush()
    try:
        async with ctx.open("POST", f"/v1/clones/{args.clone}/exec", body=body) as resp:
            async for raw in resp.content:
                if not raw.strip():
                    continue
                line = json.loads(raw)
                kind = line.get("type")
                if kind in ("stdout", "stderr"):
                    stream = out if kind == "stdout" else err
                    stream.write(base64.b64decode(line.get("data", "")))
                    stream.flush()
                elif kind == "exit":
                    sig = line.get("signal")
                    return 128 + int(sig) if sig else int(line.get("exit_code", 0))
                elif kind == "error":
                    e = line.get("error") or {}
                    if e.get("code") == "exec_timeout":
                        raise CliError(f"exec: {e.get('message')} [exec_timeout]", EXIT_EXEC_TIMEOUT)
                    raise CliError(f"exec: {e.get('message')} [{e.get('code')}]", EXIT_EXEC_TOOL)
    except CliError as exc:
        if exc.status in (EXIT_EXEC_TIMEOUT, EXIT_EXEC_TOOL):
            raise
        raise CliError(f"{exc}{_agent_hint(exc)}", EXIT_EXEC_TOOL, exc.code) from None
    raise CliError("exec: the daemon's answer ended before the command's exit status", EXIT_EXEC_TOOL)


# -- cp -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    clone: str
    path: str


def parse_location(arg: str) -> Remote | str:
    """``CLONE:/abs/path`` as a Remote; anything else is a local path (or ``-``)."""
    m = _REMOTE.fullmatch(arg)
    return Remote(m.group(1), m.group(2)) if m else arg


class _Meter:
    """A progress line on stderr for big copies, on a terminal only."""

    def __init__(self, total: int | None, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.on = sys.stderr.isatty() and (total is None or total >= PROGRESS_MIN_BYTES)
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.on and now - self._last > 0.2:
            self._last = now
            pct = f" {100 * self.done // self.total:3d}%" if self.total else ""
            sys.stderr.write(f"\r\x1b[K{self.label}: {self.done / 2**20:.1f} MiB"
                             + (f" / {self.total / 2**20:.1f} MiB" if self.total else "") + pct)
            sys.stderr.flush()

    def close(self) -> None:
        if self.on and self._last:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


async def _upload(ctx: Ctx, src: str, dst: Remote, mode: str | None) -> int:
    headers: dict[str, str] = {}
    if src == "-":
        if dst.path.endswith("/"):
            raise CliError("cp: name the file in the clone when copying stdin (CLONE:/dir/NAME)", EXIT_USAGE)
        stream: BinaryIO = sys.stdin.buffer
        total: int | None = None
        path = dst.path
    else:
        local = Path(src)
        try:
            st = local.stat()
        except OSError as exc:
            raise CliError(f"cp: {src}: {exc.strerror}", EXIT_USAGE) from None
        if stat.S_ISDIR(st.st_mode):
            raise CliError(f"cp: {src} is a directory: cp copies one file (for a tree: tar -C {src} -c . | "
                           f"instaclone exec -i {dst.clone} -- tar -C DIR -x)", EXIT_USAGE)
        path = dst.path + local.name if dst.path.endswith("/") else dst.path
        mode = mode or f"{stat.S_IMODE(st.st_mode):04o}"
        total = st.st_size
        headers["X-Instaclone-SHA256"] = _sha256_of(local)
        stream = local.open("rb")
    digest = hashlib.sha256()
    meter = _Meter(total, f"{src} -> {dst.clone}:{path}")

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            meter.add(len(chunk))
            yield chunk

    query = f"?path={_q(path)}" + (f"&mode={_q(mode)}" if mode else "")
    headers["Content-Type"] = "application/octet-stream"
    try:
        async with ctx.open("PUT", f"/v1/clones/{dst.clone}/files{query}", data=chunks(), headers=headers) as resp:
            info = (await resp.json(content_type=None))["file"]
    finally:
        meter.close()
        if stream is not sys.stdin.buffer:
            stream.close()
    if info.get("bytes") != meter.done or str(info.get("sha256", "")).lower() != digest.hexdigest():
        raise CliError(f"cp: the clone holds {info.get('bytes')} bytes sha256 {info.get('sha256')}, "
                       f"sent {meter.done} bytes sha256 {digest.hexdigest()}")
    return 0


async def _download(ctx: Ctx, src: Remote, dst: str) -> int:
    target: Path | None = None
    if dst != "-":
        target = Path(dst)
        if target.is_dir() or dst.endswith("/"):
            target = target / (Path(src.path).name or "file")
    async with ctx.open("GET", f"/v1/clones/{src.clone}/files?path={_q(src.path)}") as resp:
        size = int(resp.headers.get("Content-Length", "-1"))
        want = resp.headers.get("X-Instaclone-SHA256", "").lower()
        digest, meter = hashlib.sha256(), _Meter(size if size >= 0 else None, f"{src.clone}:{src.path} -> {dst}")
        tmp: Path | None = None
        try:
            if target is None:
                out: BinaryIO = sys.stdout.buffer
                sys.stdout.flush()
            else:
                fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
                tmp, out = Path(name), os.fdopen(fd, "wb")
            async for chunk in resp.content.iter_chunked(CHUNK):
                digest.update(chunk)
                meter.add(len(chunk))
                out.write(chunk)
            out.flush()
            if (size >= 0 and meter.done != size) or (want and digest.hexdigest() != want):
                raise CliError(f"cp: got {meter.done} bytes sha256 {digest.hexdigest()}, the clone said "
                               f"{size} bytes sha256 {want or '?'}" + ("" if target is None else "; nothing written"))
            if tmp is not None and target is not None:
                out.close()
                os.replace(tmp, target)
                tmp = None
        except FileNotFoundError as exc:
            raise CliError(f"cp: {dst}: {exc.strerror}", EXIT_USAGE) from None
        finally:
            meter.close()
            if tmp is not None:
                with contextlib.suppress(OSError):
                    out.close()
                tmp.unlink(missing_ok=True)
    return 0


def _q(s: str) -> str:
    from urllib.parse import quote
    return quote(s, safe="/")


async def _cp(ctx: Ctx, args: argparse.Namespace) -> int:
    src, dst = parse_location(args.src), parse_location(args.dst)
    if isinstance(src, Remote) and isinstance(dst, Remote):
        raise CliError("cp: one side must be local (copy through a local file for clone to clone)", EXIT_USAGE)
    if isinstance(dst, Remote):
        assert isinstance(src, str)
        return await _upload(ctx, src, dst, args.mode)
    if isinstance(src, Remote):
        return await _download(ctx, src, dst)
    raise CliError("cp: name a clone on one side: CLONE:/abs/path (both sides are local)", EXIT_USAGE)


def commands() -> dict[str, Handler]:
    return {"exec": _exec, "cp": _cp}
