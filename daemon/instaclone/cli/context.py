"""What every command gets (``Ctx``: the client, the output options) and ``CliError``.

The CLI reaches the daemon only through ``instaclone.client`` (the one HTTP client; an import
contract in pyproject.toml says so). Every failure becomes a ``CliError`` carrying its exit
status (``exitcodes``): the daemon's own
errors (1), unreachable (3, also when it goes away mid-answer), permission (4: the socket's
EACCES, whose message from the client names the group and the ``usermod`` that fixes it, or the
API's 403 ``forbidden``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .exitcodes import EXIT_FAILED, EXIT_PERMISSION, EXIT_UNREACHABLE, EXIT_USAGE
from .output import Output, raw

if TYPE_CHECKING:  # the client (aiohttp) is imported only by commands that talk to the daemon
    from instaclone.client import Client, ClientError

__all__ = ["CliError", "Ctx", "cli_error", "kv", "raw", "translated"]


class CliError(Exception):
    """A failure to report as one line, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # the API's error code, when the daemon answered with one


def _permission_hint(rule: object) -> str:
    """What to do about a 403, by the rule that refused it (an older daemon names none: its groups)."""
    if rule in (None, "access.write_groups", "access.read_groups"):
        group = "access.read_groups" if rule == "access.read_groups" else "access.write_groups"
        return (f"this is a permission problem: ask an admin to add your user to a group in the daemon's "
                f"{group} (then log in again)")
    if rule == "access.sources":
        return ("this is a permission problem (rule access.sources): your groups may not use this source; "
                "ask an admin to add it to their patterns in the daemon's access.sources")
    return f"this is a permission problem (rule {rule}): ask the owner or an admin"


def cli_error(exc: ClientError) -> CliError:
    """The CliError (message and exit status) of one of the client's errors."""
    from instaclone.client import ApiError, DaemonUnreachable, PermissionDenied

    if isinstance(exc, PermissionDenied):
        return CliError(f"{exc}", EXIT_PERMISSION)
    if isinstance(exc, DaemonUnreachable):
        return CliError(str(exc), EXIT_UNREACHABLE)
    if isinstance(exc, ApiError):
        if exc.code == "forbidden" or exc.status == 403:
            return CliError(f"{exc}; {_permission_hint(exc.details.get('rule'))}", EXIT_PERMISSION, exc.code)
        return CliError(str(exc), EXIT_FAILED, exc.code)
    return CliError(str(exc), EXIT_FAILED)


@contextmanager
def translated() -> Iterator[None]:
    """Raise the client's errors as CliError (for code that talks to the client directly)."""
    try:
        yield
    except Exception as exc:
        # A client error means the client is imported; a command that never used it (help,
        # completion) must not import it (nor aiohttp) here.
        client = sys.modules.get("instaclone.client")
        if client is not None and isinstance(exc, client.ClientError):
            raise cli_error(exc) from None
        raise


class Ctx:
    """What every command gets: the client on the daemon's socket, the output options, the root parser.

    The client is made on first use: commands that need no daemon (help, completion) never import
    aiohttp.
    """

    def __init__(self, socket: str, out: Output, parser: argparse.ArgumentParser) -> None:
        self.socket, self.out, self.parser = socket, out, parser
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The client on ``socket`` (it connects on its first request)."""
        if self._client is None:
            from instaclone.client import Client

            self._client = Client(self.socket)
        return self._client

    async def close(self) -> None:
        """Close the client's session, if one was opened."""
        if self._client is not None:
            await self._client.close()


def kv(pairs: list[str], option: str = "--config") -> dict[str, str]:
    """``KEY=VALUE`` options to a dict; a malformed one is a usage error."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise CliError(f"{option} wants KEY=VALUE, got {p!r}", EXIT_USAGE)
        out[key] = value
    return out
