"""Files and processes inside a guest, through the QEMU guest agent's commands.

Thin typed wrappers over ``guest-file-*``, ``guest-exec`` (without captured
output) and ``guest-exec-status``, written against qemu-guest-agent's
semantics (also those of the busybox test guest's ``ic-agent``). Every call
goes through :meth:`~instaclone.hv.agent.Agent.agent` (one agent command on
a thread of the guest-agent pool, never one a stun's calls wait for), so
this module needs only something with that method.

The agent's errors arrive as :class:`~instaclone.errors.LibvirtError` whose
message carries the guest's ``strerror`` ("... : No such file or directory");
:func:`guest_errno` tells them apart.
"""

from __future__ import annotations

import base64
from typing import Any, Protocol

from ..errors import LibvirtError

#: Bytes per guest-file-read: 1.4 MB of base64 in one agent reply, well inside
#: libvirt's 4 MiB string limit and the agents' limits.
CHUNK_BYTES = 1 << 20
#: Bytes per guest-file-write. Host-to-guest messages much larger than the
#: guest's virtio-serial receive ring (128 pages) were cut or lost under TCG
#: (measured on the busybox guest: 240 KiB writes failed, 160 KiB worked);
#: 64 KiB goes as fast as 96 KiB (4.5 MiB/s) with room to spare.
WRITE_CHUNK_BYTES = 64 << 10
#: Seconds one file command may take (a 1 MiB chunk under TCG takes ~0.1 s).
FILE_CALL_S = 60


class AgentCaller(Protocol):
    async def agent(self, name: str, command: str, arguments: dict[str, Any] | None = None,
                    *, timeout_s: int = 10) -> Any: ...


def guest_errno(exc: LibvirtError) -> str | None:
    """Which guest error ``exc`` reports: "ENOENT", "EACCES", "EISDIR", ... or None."""
    msg = exc.message
    for text, name in (("No such file or directory", "ENOENT"), ("Permission denied", "EACCES"),
                       ("Is a directory", "EISDIR"), ("Not a directory", "ENOTDIR"),
                       ("No space left on device", "ENOSPC"), ("Read-only file system", "EROFS")):
        if text in msg:
            return name
    return None


async def file_open(virt: AgentCaller, name: str, path: str, mode: str) -> int:
    """Open ``path`` in the guest with fopen ``mode`` ("r", "w", "w+", ...); returns the handle.

    A file it creates has mode 0600. LibvirtError (see :func:`guest_errno`) if it cannot.
    """
    return int(await virt.agent(name, "guest-file-open", {"path": path, "mode": mode}, timeout_s=FILE_CALL_S))


async def file_read(virt: AgentCaller, name: str, handle: int, count: int = CHUNK_BYTES) -> tuple[bytes, bool]:
    """Up to ``count`` bytes from the handle's position: (data, whether the end of file was hit).

    At the end of a file that another process appends to, a later read returns the new bytes
    (qemu-ga clears the stream's EOF flag after each read).
    """
    r = await virt.agent(name, "guest-file-read", {"handle": handle, "count": count}, timeout_s=FILE_CALL_S)
    data = base64.b64decode(r.get("buf-b64", "")) if r.get("count") else b""
    return data, bool(r.get("eof"))


async def file_write(virt: AgentCaller, name: str, handle: int, data: bytes) -> None:
    """Write all of ``data`` at the handle's position; LibvirtError if the guest wrote less."""
    r = await virt.agent(name, "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()},
                         timeout_s=FILE_CALL_S)
    if int(r.get("count", -1)) != len(data):
        raise LibvirtError(f"guest-file-write wrote {r.get('count')} of {len(data)} bytes")


async def file_seek(virt: AgentCaller, name: str, handle: int, offset: int, whence: str = "set") -> int:
    """Move the handle's position (``whence``: "set", "cur" or "end"); returns the new position."""
    r = await virt.agent(name, "guest-file-seek", {"handle": handle, "offset": offset, "whence": whence},
                         timeout_s=FILE_CALL_S)
    return int(r["position"])


async def file_close(virt: AgentCaller, name: str, handle: int) -> None:
    """Close the handle (flushing what was written; LibvirtError if that fails, e.g. ENOSPC)."""
    await virt.agent(name, "guest-file-close", {"handle": handle}, timeout_s=FILE_CALL_S)


async def exec_start(virt: AgentCaller, name: str, argv: list[str], *, env: list[str] | None = None,
                     input_data: bytes | None = None, capture: bool = False) -> int:
    """Start ``argv`` in the guest (guest-exec); returns its pid.

    ``env`` ("K=V" strings) replaces the agent's environment, as g_spawn's envp does in
    qemu-ga. Without ``capture`` the program's output goes to /dev/null.
    """
    # "arg" last: ic-agent's small JSON reader takes the first match of a key,
    # and the strings in "arg" may be anything.
    args: dict[str, Any] = {"path": argv[0]}
    if env is not None:
        args["env"] = env
    args["capture-output"] = capture
    if input_data:
        args["input-data"] = base64.b64encode(input_data).decode()
    args["arg"] = argv[1:]
    return int((await virt.agent(name, "guest-exec", args))["pid"])


async def exec_status(virt: AgentCaller, name: str, pid: int) -> dict[str, Any] | None:
    """None while ``pid`` runs; once it exited, ``{"exitcode": int|None, "signal": int|None,
    "out": bytes, "err": bytes}`` (the agent then forgets the process)."""
    st = await virt.agent(name, "guest-exec-status", {"pid": pid})
    if not st.get("exited"):
        return None
    return {"exitcode": st.get("exitcode"), "signal": st.get("signal"),
            "out": base64.b64decode(st.get("out-data", "")), "err": base64.b64decode(st.get("err-data", ""))}
