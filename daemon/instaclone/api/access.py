"""Who may call what: the caller's socket peer credentials against ``[access]``."""

from __future__ import annotations

import grp
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..config import AccessConfig
from ..errors import Forbidden, InstacloneError
from .common import PEER, log
from .routes import needs_write

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]



class Access:
    """Who may call what, decided from the caller's SO_PEERCRED credentials.

    root and the daemon's own user may do anything; members of a write group
    may also mutate (POST, PUT, PATCH, DELETE, and routes declared
    ``needs_write``); members of a read group may read. With no
    read groups configured, anyone who can open the socket may read: the
    socket's mode and group are then the read gate.
    """

    def __init__(self, config: AccessConfig) -> None:
        self.write_gids = _gids(config.write_groups, "access.write_groups")
        self.read_gids = _gids(config.read_groups, "access.read_groups")
        self.open_read = not config.read_groups
        self.own_uid = os.getuid()

    def allows(self, peer: dict[str, Any] | None, *, write: bool) -> bool:
        if peer is None:
            return not write and self.open_read
        if peer["uid"] in (0, self.own_uid):
            return True
        groups = set(peer["groups"])
        if groups & self.write_gids:
            return True
        return not write and (self.open_read or bool(groups & self.read_gids))


ACCESS = web.AppKey("access", Access)


def _gids(names: tuple[str, ...], key: str) -> set[int]:
    out = set()
    for n in names:
        try:
            out.add(grp.getgrnam(n).gr_gid)
        except KeyError:
            log.warning("access.unknown_group", key=key, group=n)
    return out


def peer_of(request: web.Request) -> dict[str, Any] | None:
    """pid, uid, gid and groups of the process at the other end of a Unix socket (None: not one)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except OSError:
        return None
    groups = {gid}
    try:  # supplementary groups: SO_PEERCRED carries only the primary one
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass  # the caller exited already, or an odd kernel: its primary group is all we know
    return {"pid": pid, "uid": uid, "gid": gid, "groups": sorted(groups)}


@web.middleware
async def peer_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identify the caller (SO_PEERCRED), enforce read/write access, log every mutating call.

    The ``api.call`` line carries the final status, also when the handler
    raised (our error: its HTTP status; anything else: 500); a refused caller
    gets an ``api.forbidden`` line instead.
    """
    peer = peer_of(request)
    request[PEER] = peer
    write = needs_write(request)
    if not request.app[ACCESS].allows(peer, write=write):
        who = f"uid {peer['uid']}" if peer else "an unidentified caller"
        log.warning("api.forbidden", method=request.method, path=request.path, peer=peer)
        raise Forbidden(f"{who} may not {'change' if write else 'read'} anything here: "
                        f"{'write' if write else 'read'} access needs root or membership in "
                        f"access.{'write' if write else 'read'}_groups")
    if not write:
        return await handler(request)
    status = 500  # a bug: errors_as_json answers it as a 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except InstacloneError as exc:
        status = exc.http_status
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:  # every mutating call, answered or refused in its handler, with who made it
        log.info("api.call", method=request.method, path=request.path, status=status, peer=peer)
