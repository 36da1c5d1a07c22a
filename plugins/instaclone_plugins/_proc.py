"""Running helper programs without blocking the event loop."""

from __future__ import annotations

import asyncio

from instaclone.plugin_api import StorageError


async def run(*argv: str, timeout_s: float = 60.0) -> str:
    """Run ``argv`` (no shell); return stdout, raise StorageError with stderr on failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise StorageError(f"{argv[0]} is not installed") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise StorageError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed: {msg}")
    return out.decode(errors="replace")
