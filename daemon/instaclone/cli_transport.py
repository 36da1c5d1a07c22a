"""The CLI's one way to the daemon: ``Ctx`` (socket + output options) and ``CliError``.

Every failure becomes a ``CliError`` carrying its exit status (``cli_parser.EXIT_*``): the daemon's
own errors (1), unreachable (3, also when it goes away mid-answer), permission (4: the socket's
EACCES or the API's 403, with how to fix it).
"""

from __future__ import annotations

import errno
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from .cli_output import Output
from .cli_exit import EXIT_FAILED, EXIT_PERMISSION, EXIT_UNREACHABLE, EXIT_USAGE


class CliError(Exception):
    """A failure to report as one line, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # the API's error code, when the daemon answered with one


def _permission(sock: str) -> CliError:
    return CliError(f"permission denied on {sock}: this user may not open instacloned's socket; add it to the "
                    "socket's group (usually 'instaclone': usermod -aG instaclone $USER, then log in again)",
                    EXIT_PERMISSION)


def _unreachable(sock: str, exc: BaseException) -> CliError:
    os_error = getattr(exc, "os_error", exc)
    if isinstance(os_error, OSError) and os_error.errno in (errno.EACCES, errno.EPERM):
        return _permission(sock)
    reason = getattr(os_error, "strerror", None) or str(exc) or type(exc).__name__
    return CliError(f"cannot reach instacloned at {sock}: {reason}", EXIT_UNREACHABLE)


def _api_error(status: int, data: Any) -> CliError:
    err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
    message = f"{err.get('message', 'HTTP ' + str(status))} [{err.get('code', '?')}]"
    if status == 403:
        return CliError(message + "; this is a permission problem: ask an admin to add your user to a group "
                                  "in access.write_groups", EXIT_PERMISSION, err.get("code"))
    return CliError(message, code=err.get("code"))


#: Failing to connect (aiohttp wraps the socket's OSError; the bare ones for safety).
_CONNECT = (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError, PermissionError)
#: The daemon went away in the middle of an answer.
_GONE = (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)


@dataclass
class Ctx:
    """What every command gets: the daemon's socket and the output options."""

    sock: str
    out: Output

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      timeout_s: float = 660.0) -> dict[str, Any]:
        """One call; its JSON answer. Raises CliError (daemon error 1, unreachable 3, permission 4)."""
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.sock),
                                      timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
                s.request(method, f"http://instaclone{path}", json=body) as resp,
            ):
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    raise CliError(f"daemon sent a non-JSON answer (HTTP {resp.status})") from None
                if resp.status >= 400:
                    raise _api_error(resp.status, data)
                return dict(data)
        except _CONNECT as exc:
            raise _unreachable(self.sock, exc) from None
        except _GONE as exc:
            raise CliError(f"instacloned at {self.sock} went away mid-answer ({type(exc).__name__})",
                           EXIT_UNREACHABLE) from None
        except TimeoutError:
            raise CliError(f"instacloned at {self.sock} did not answer in {timeout_s:g} s", EXIT_UNREACHABLE) from None

    async def stream(self, path: str) -> AsyncIterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer, as they come (no deadline)."""
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.sock),
                                      timeout=aiohttp.ClientTimeout(total=None)) as s,
                s.get(f"http://instaclone{path}") as resp,
            ):
                if resp.status >= 400:
                    raise _api_error(resp.status, await resp.json(content_type=None))
                async for raw in resp.content:
                    if raw.strip():
                        yield json.loads(raw)
        except _CONNECT as exc:
            raise _unreachable(self.sock, exc) from None
        except _GONE:
            raise CliError(f"instacloned at {self.sock} closed the stream (stopping?)", EXIT_UNREACHABLE) from None

    @asynccontextmanager
    async def open(self, method: str, path: str, *, body: Any = None, data: Any = None,
                   headers: dict[str, str] | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streamed answer (no deadline) after its status was checked; errors as for ``request``.

        Only the transport's own errors are translated: an OSError of the caller's (writing a
        local file, a closed stdout) passes through as it is.
        """
        kw: dict[str, Any] = {"data": data} if data is not None else {"json": body}
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.sock),
                                      timeout=aiohttp.ClientTimeout(total=None)) as s,
                s.request(method, f"http://instaclone{path}", headers=headers, **kw) as resp,
            ):
                if resp.status >= 400:
                    try:
                        answer = await resp.json(content_type=None)
                    except ValueError:
                        answer = None
                    raise _api_error(resp.status, answer)
                yield resp
        except _CONNECT as exc:
            raise _unreachable(self.sock, exc) from None
        except _GONE as exc:
            raise CliError(f"instacloned at {self.sock} went away mid-answer ({type(exc).__name__})",
                           EXIT_UNREACHABLE) from None


def kv(pairs: list[str], option: str = "--config") -> dict[str, str]:
    """``KEY=VALUE`` options to a dict; a malformed one is a usage error."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise CliError(f"{option} wants KEY=VALUE, got {p!r}", EXIT_USAGE)
        out[key] = value
    return out
