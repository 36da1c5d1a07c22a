"""Who may call what: the caller's socket peer credentials against ``[access]``."""

from __future__ import annotations

import fnmatch
import grp
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..config import AccessConfig
from ..errors import Forbidden, InstacloneError
from .common import PEER, log
from .routes import needs_admin, needs_write

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]



#: Linux's SO_PEERGROUPS (since 4.13; Python's socket module may not name it).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: What one group id takes in SO_PEERGROUPS' answer (gid_t).
_GID = struct.Struct("=I")
#: The largest answer Python's getsockopt may ask for (1024 bytes): 256 groups. A peer in more gets
#: ERANGE, and only its primary group counts (fails closed).
_MAX_GROUPS_BYTES = 1024


@dataclass(frozen=True)
class Peer:
    """The process at the other end of the control socket, as the kernel saw it when it connected."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]  # its primary and supplementary groups

    def to_log(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "groups": list(self.groups)}


@dataclass(frozen=True)
class Caller:
    """Who a request acts for, and what the policy lets it reach (:meth:`Access.caller`).

    An admin (root, the daemon's own user, a member of ``access.admin_groups``)
    reaches everything; anyone else only what its uid owns, and only the sources
    its groups' ``access.sources`` patterns match (``sources`` None: every source).
    """

    uid: int | None  # None: not a Unix socket peer (owns nothing)
    admin: bool
    sources: tuple[str, ...] | None = None

    def owns(self, owner: int | None) -> bool:
        """May this caller see and act on an object of ``owner`` (None: unknown, from before owners: root's)?"""
        if self.admin:
            return True
        return self.uid is not None and owner is not None and owner == self.uid

    def may_use_source(self, name: str) -> bool:
        """Do this caller's ``access.sources`` patterns let it clone, freeze or prepare ``name``?"""
        if self.admin or self.sources is None:
            return True
        return any(fnmatch.fnmatchcase(name, p) for p in self.sources)

    @property
    def who(self) -> str:
        return f"uid {self.uid}" if self.uid is not None else "an unidentified caller"


#: An unidentified caller's: owns nothing, no source (reads only, and only with open read access).
NOBODY = Caller(uid=None, admin=False, sources=())


class Access:
    """Who may call what, decided from the caller's SO_PEERCRED uid and SO_PEERGROUPS groups.

    Admins (root, the daemon's own user, members of ``access.admin_groups``)
    may do anything; members of a write group may also mutate (POST, PUT,
    PATCH, DELETE, and routes declared ``needs_write``); members of a read
    group may read. With no read groups configured, anyone who can open the
    socket may read: the socket's mode and group are then the read gate.
    Which objects and sources a non-admin reaches is the :class:`Caller`'s.
    """

    def __init__(self, config: AccessConfig) -> None:
        self.write_gids = _gids(config.write_groups, "access.write_groups")
        self.read_gids = _gids(config.read_groups, "access.read_groups")
        self.admin_gids = _gids(config.admin_groups, "access.admin_groups")
        self.open_read = not config.read_groups
        self.own_uid = os.getuid()
        self.config = config
        # The groups access.sources names, by gid ("*" applies to everyone).
        self.source_gids = {g: gid for g, gid in ((g, _gid(g, "access.sources")) for g, _ in config.sources
                                                  if g != "*") if gid is not None}

    def is_admin(self, peer: Peer | None) -> bool:
        if peer is None:
            return False
        return peer.uid in (0, self.own_uid) or bool(set(peer.groups) & self.admin_gids)

    def allows(self, peer: Peer | None, *, write: bool) -> bool:
        if peer is None:
            return not write and self.open_read
        if self.is_admin(peer):
            return True
        groups = set(peer.groups)
        if groups & self.write_gids:
            return True
        return not write and (self.open_read or bool(groups & self.read_gids))

    def caller(self, peer: Peer | None) -> Caller:
        """The policy's view of ``peer``: admin or not, and its sources."""
        if peer is None:
            return NOBODY
        if self.is_admin(peer):
            return Caller(uid=peer.uid, admin=True)
        names = {g for g, gid in self.source_gids.items() if gid in peer.groups}
        return Caller(uid=peer.uid, admin=False, sources=self.config.sources_of(names))


ACCESS = web.AppKey("access", Access)
#: The :class:`Caller` of a request (set by :func:`peer_credentials`).
CALLER = web.RequestKey("caller", Caller)


def caller_of(request: web.Request) -> Caller:
    """Who ``request`` acts for (an unidentified caller if the middleware did not run)."""
    caller = request.get(CALLER)
    return caller if isinstance(caller, Caller) else NOBODY


def _gid(name: str, key: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("access.unknown_group", key=key, group=name)
        return None


def _gids(names: tuple[str, ...], key: str) -> set[int]:
    return {gid for gid in (_gid(n, key) for n in names) if gid is not None}


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's groups as the kernel recorded them at connect (SO_PEERGROUPS); raises OSError.

    Never read from /proc/<pid>/status: the pid may have exited and been
    reused by another process by the time it is read.
    """
    # A buffer too short for the list is refused (ERANGE), never filled with part of it.
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_GROUPS_BYTES)
    return tuple(g for (g,) in _GID.iter_unpack(raw[:len(raw) - len(raw) % _GID.size]))


def peer_of(request: web.Request) -> Peer | None:
    """pid, uid, gid and groups of the process at the other end of a Unix socket (None: not one).

    A kernel without SO_PEERGROUPS (before 4.13), or a peer in more than 256 groups, leaves the
    primary group only (logged).
    """
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except OSError:
        return None
    groups = {gid}
    try:
        groups.update(peer_groups(sock))
    except OSError as exc:
        log.warning("access.no_peer_groups", uid=uid, error=str(exc))
    return Peer(pid, uid, gid, tuple(sorted(groups)))


@web.middleware
async def peer_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identify the caller (SO_PEERCRED), enforce read/write access, log every mutating call.

    The ``api.call`` line carries the final status, also when the handler
    raised (our error: its HTTP status; anything else: 500); a refused caller
    gets an ``api.forbidden`` line instead.
    """
    access = request.app[ACCESS]
    found = peer_of(request)
    peer = found.to_log() if found else None
    request[PEER] = peer
    request[CALLER] = caller = access.caller(found)
    write = needs_write(request)
    if not access.allows(found, write=write):
        log.warning("api.forbidden", method=request.method, path=request.path, peer=peer)
        rule = f"access.{'write' if write else 'read'}_groups"
        raise Forbidden(f"{caller.who} may not {'change' if write else 'read'} anything here: "
                        f"{'write' if write else 'read'} access needs root or membership in {rule}", rule=rule)
    if needs_admin(request) and not caller.admin:
        log.warning("api.forbidden", method=request.method, path=request.path, peer=peer)
        raise Forbidden(f"{caller.who} may not do this: it needs an admin (root, the daemon's user or "
                        "membership in access.admin_groups)", rule="access.admin_groups")
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
