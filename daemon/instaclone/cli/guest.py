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
import asyncio
import contextlib
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .command import Arg, Commands
from .context import CliError, Ctx, cli_error, kv, raw
from .exitcodes import EXIT_EXEC_TIMEOUT, EXIT_EXEC_TOOL, EXIT_USAGE

#: Bytes per chunk read from a local file or stdin, and from the daemon's answer.
CHUNK = 1 << 20
#: Files at least this big show a progress line on a terminal (stderr).
PROGRESS_MIN_BYTES = 8 << 20
#: ``CLONE:/path``: a clone name, a colon, an absolute path (use ``./a:b`` for a local name with a colon).
_REMOTE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.+-]*):(/.*)")

COMMANDS = Commands()


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


@COMMANDS.command("exec", help="run a command inside a clone (exit status: the command's)",
                  usage="instaclone exec [-i] [--env K=V] [--timeout S] CLONE -- CMD [ARG...]", args=[
    Arg("clone", help="a clone made by instaclone"),
    Arg("argv", nargs=argparse.REMAINDER, metavar="CMD", help="the command and its arguments"),
    Arg("-i", "--interactive", action="store_true", help="send this command's stdin to the command"),
    Arg("--env", action="append", default=[], metavar="K=V", help="environment variable; repeatable"),
    Arg("--timeout", type=float, default=300.0, metavar="S",
        help="kill the command after S seconds (default 300; exit 124)"),
])
async def _exec(ctx: Ctx, args: argparse.Namespace) -> int:
    from instaclone.client import ClientError, ExecOutput, ExecTimeout

    split_exec(args)
    env = kv(args.env, "--env") if args.env else None
    # The protocol takes stdin whole, with the request: read it to its end first.
    # In a thread: the loop stays free to see a Ctrl-C while this waits on a terminal.
    stdin = await asyncio.to_thread(sys.stdin.buffer.read) if args.interactive else None
    out, err = sys.stdout.buffer, sys.stderr.buffer
    sys.stdout.flush()
    try:
        async for item in ctx.client.exec_stream(args.clone, args.argv, env=env, timeout_s=args.timeout, stdin=stdin):
            if isinstance(item, ExecOutput):
                stream = out if item.stream == "stdout" else err
                stream.write(item.data)
                stream.flush()
            else:
                return 128 + item.signal if item.signal else item.exit_code
    except ExecTimeout as exc:
        raise CliError(f"exec: {exc}", EXIT_EXEC_TIMEOUT, exc.code) from None
    except ClientError as exc:
        e = cli_error(exc)
        hint = _agent_hint(e)
        raise CliError(f"exec: {e}{hint}", EXIT_EXEC_TOOL, e.code) from None
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
        self._last = time.monotonic() + 0.8  # the first line after a second: small files show none

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
        if self.on and self.done:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class _Writer:
    """A binary writer that counts what passes through it for the progress line."""

    def __init__(self, out: BinaryIO, meter: _Meter) -> None:
        self.out, self.meter = out, meter

    def write(self, data: bytes) -> int:
        n = self.out.write(data)
        self.out.flush() if self.out is sys.stdout.buffer else None
        self.meter.add(len(data))
        return n


async def _upload(ctx: Ctx, src: str, dst: Remote, mode: str | None) -> int:
    if src == "-":
        if dst.path.endswith("/"):
            raise CliError("cp: name the file in the clone when copying stdin (CLONE:/dir/NAME)", EXIT_USAGE)
        # The client sends a file with its size and checksum up front: spool stdin to a file first
        # (on disk, never whole in memory).
        with tempfile.NamedTemporaryFile(prefix="instaclone-cp-") as spool:
            await asyncio.to_thread(shutil.copyfileobj, sys.stdin.buffer, spool, CHUNK)
            spool.flush()
            await _put(ctx, Path(spool.name), dst, dst.path, mode or "0644")
        return 0
    local = Path(src)
    try:
        st = await asyncio.to_thread(local.stat)
    except OSError as exc:
        raise CliError(f"cp: {src}: {exc.strerror}", EXIT_USAGE) from None
    if stat.S_ISDIR(st.st_mode):
        raise CliError(f"cp: {src} is a directory: cp copies one file (for a tree: tar -C {src} -c . | "
                       f"instaclone exec -i {dst.clone} -- tar -C DIR -x)", EXIT_USAGE)
    path = dst.path + local.name if dst.path.endswith("/") else dst.path
    await _put(ctx, local, dst, path, mode or f"{stat.S_IMODE(st.st_mode):04o}")
    return 0


async def _put(ctx: Ctx, local: Path, dst: Remote, path: str, mode: str) -> None:
    size = (await asyncio.to_thread(local.stat)).st_size
    meter = _Meter(size, f"{local} -> {dst.clone}:{path}")
    try:
        info = await ctx.client.put_file(dst.clone, local, path, mode=mode, progress=meter.add)
    finally:
        meter.close()
    if not ctx.out.quiet and ctx.out.machine:
        ctx.out.emit(raw(info))


def _local_target(dst: str, src: Remote) -> Path:
    """Where a download goes: ``dst``, or the source's basename in it when it is a directory."""
    target = Path(dst)
    if target.is_dir() or dst.endswith("/"):
        target = target / (Path(src.path).name or "file")
    if not target.parent.is_dir():
        raise CliError(f"cp: {target.parent}: no such directory", EXIT_USAGE)
    return target


async def _download(ctx: Ctx, src: Remote, dst: str) -> int:
    meter = _Meter(None, f"{src.clone}:{src.path} -> {dst}")
    try:
        if dst == "-":
            sys.stdout.flush()
            await ctx.client.get_file(src.clone, src.path, _Writer(sys.stdout.buffer, meter))  # type: ignore[arg-type]
            return 0
        target = await asyncio.to_thread(_local_target, dst, src)
        # A temporary file next to the target, renamed onto it once the size and checksum match.
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                info = await ctx.client.get_file(src.clone, src.path, _Writer(f, meter))  # type: ignore[arg-type]
            os.replace(name, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        if ctx.out.machine and not ctx.out.quiet:
            ctx.out.emit({"path": str(target), "bytes": info.size, "sha256": info.sha256})
        return 0
    finally:
        meter.close()


@COMMANDS.command("cp", help="copy a file into or out of a clone (CLONE:/path on one side; '-': stdin/stdout)",
                  usage="instaclone cp SRC DST   (one of them CLONE:/abs/path)", args=[
    Arg("src", help="a local file, '-' (stdin) or CLONE:/abs/path"),
    Arg("dst", help="a local file or directory, '-' (stdout) or CLONE:/abs/path"),
    Arg("--mode", help="file mode in the guest (octal, e.g. 0755; default: the local file's, 0644 from stdin)"),
])
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

