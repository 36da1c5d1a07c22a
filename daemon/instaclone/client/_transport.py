"""HTTP over the daemon's Unix socket: one aiohttp session, errors made typed.

Everything the client sends goes through :class:`Transport`: it owns the
session, turns an error answer into the :mod:`.errors` class of its code and
a connection problem into DaemonUnreachable / PermissionDenied (whose message
names the socket's real group and how to join it).
"""

from __future__ import annotations

import errno
import getpass
import grp
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp

from .errors import DaemonUnreachable, PermissionDenied, ProtocolError, from_answer

DEFAULT_SOCKET = "/run/instaclone/control.sock"
#: A request's default deadline: longer than the API's longest wait (600 s).
DEFAULT_TIMEOUT_S = 660.0
#: Extra time on top of a server-side wait (``?wait=``) before the client gives up.
WAIT_MARGIN_S = 30.0

Params = Mapping[str, str | int | float]


def resolve_socket(socket: str | os.PathLike[str] | None) -> str:
    """The socket path: the argument, else ``$INSTACLONE_SOCKET``, else /run/instaclone/control.sock."""
    if socket is not None:
        return os.fspath(socket)
    return os.environ.get("INSTACLONE_SOCKET") or DEFAULT_SOCKET


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _closed_dir(sock: str) -> str:
    """The first directory on the way to ``sock`` (from /) that this user may not enter."""
    parent = os.path.dirname(os.path.abspath(sock))
    chain = [parent]
    while chain[-1] != os.path.dirname(chain[-1]):
        chain.append(os.path.dirname(chain[-1]))
    return next((d for d in reversed(chain) if not os.access(d, os.X_OK)), parent)


def permission_message(sock: str) -> str:
    """Why this user may not connect to ``sock`` (EACCES), and what fixes it."""
    try:
        st = os.stat(sock)
        whose = "the socket's group"
    except PermissionError:  # a directory on the way is closed to us: say which, and its group
        closed = _closed_dir(sock)
        try:
            st = os.stat(closed)
        except OSError:
            return f"permission denied on {sock}: a directory on its path is closed to your user; ask an admin"
        if not st.st_mode & 0o010:  # not even its group may enter: joining a group does not help
            return (f"permission denied on {sock}: its directory {closed} (mode {st.st_mode & 0o777:03o}, group "
                    f"'{_group_name(st.st_gid)}') is closed to your user; ask an admin to open it to the socket's "
                    "group")
        whose = f"the group of its directory {closed}"
    except OSError as exc:
        return f"permission denied on {sock}: {exc.strerror or exc}"
    group = _group_name(st.st_gid)
    head = f"permission denied on {sock}: your user"
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return (f"{head} is in {whose} '{group}', but its mode {st.st_mode & 0o777:03o} keeps the group out; "
                "ask an admin to check the daemon's daemon.socket_mode (default 0660)")
    try:
        added_later = getpass.getuser() in grp.getgrgid(st.st_gid).gr_mem
    except (KeyError, OSError):
        added_later = False
    if added_later:
        return f"{head} was added to {whose} '{group}' after this session started; log in again (or: newgrp {group})"
    return f"{head} is not in {whose} '{group}'; ask an admin to run: usermod -aG {group} $USER, then log in again"


def _unreachable(sock: str, exc: BaseException) -> DaemonUnreachable:
    """The typed error of a failed connection to ``sock``."""
    os_error = getattr(exc, "os_error", None)
    err = os_error if isinstance(os_error, OSError) else exc if isinstance(exc, OSError) else None
    code = err.errno if err is not None else None
    if code == errno.EACCES or code == errno.EPERM:
        return PermissionDenied(permission_message(sock), socket=sock)
    if code == errno.ENOENT:
        return DaemonUnreachable(f"cannot reach instacloned at {sock}: no such socket (is the daemon running?)",
                                 socket=sock)
    if code == errno.ECONNREFUSED:
        return DaemonUnreachable(f"cannot reach instacloned at {sock}: connection refused (the daemon is not "
                                 "running, or is restarting)", socket=sock)
    reason = (err.strerror if err is not None and err.strerror else None) or str(exc) or type(exc).__name__
    return DaemonUnreachable(f"cannot reach instacloned at {sock}: {reason}", socket=sock)


@contextmanager
def translate_errors(sock: str) -> Iterator[None]:
    """Turn aiohttp's connection errors (connecting, or the daemon going away mid-answer) into ours."""
    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        raise _unreachable(sock, exc) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
        raise DaemonUnreachable(f"instacloned at {sock} went away mid-answer: {exc or type(exc).__name__}",
                                socket=sock) from None
    except TimeoutError:
        raise DaemonUnreachable(f"instacloned at {sock} did not answer in time", socket=sock) from None
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        raise _unreachable(sock, exc) from None


async def decode(resp: aiohttp.ClientResponse) -> Any:
    """The JSON of an answer; raises ProtocolError if it is not JSON."""
    raw = await resp.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"the daemon sent a non-JSON answer (HTTP {resp.status}): {raw[:200]!r}") from None


async def raise_for_error(resp: aiohttp.ClientResponse) -> None:
    """Raise the typed ApiError of an error answer (status >= 400); nothing for success."""
    if resp.status >= 400:
        raise from_answer(resp.status, await decode(resp))


class Transport:
    """One aiohttp session on the daemon's Unix socket, opened on first use."""

    def __init__(self, socket: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit=0: streams (events, exec) and requests share the session without queueing.
            conn = aiohttp.UnixConnector(path=self.socket, limit=0)
            self._session = aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _url(path: str) -> str:
        return f"http://instaclone{path}"

    async def json(self, method: str, path: str, *, body: object = None, params: Params | None = None,
                   timeout_s: float | None = None) -> Any:
        """Send one request and return its JSON answer; raises ApiError (typed), DaemonUnreachable, ProtocolError."""
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        with translate_errors(self.socket):
            async with self.session().request(method, self._url(path), json=body, params=params,
                                              timeout=timeout) as resp:
                await raise_for_error(resp)
                return await decode(resp)

    @asynccontextmanager
    async def stream(self, method: str, path: str, *, params: Params | None = None, body: object = None,
                     data: Any = None, headers: Mapping[str, str] | None = None,
                     ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streamed answer (no total deadline), after checking its status; connection errors translated.

        Errors raised while the caller reads the body are translated too.
        """
        kw: dict[str, Any] = {"data": data} if data is not None else {"json": body} if body is not None else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        with translate_errors(self.socket):
            async with self.session().request(method, self._url(path), params=params, headers=headers,
                                              timeout=timeout, **kw) as resp:
                await raise_for_error(resp)
                yield resp
