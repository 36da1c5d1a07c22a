"""``SyncClient``: the async :class:`Client`, blocking.

Not a second implementation: every method is the async one run on a private
event loop in a background thread (so it also works where the caller's
thread already runs a loop). Async iterators become plain iterators and the
claim a plain context manager.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from ._async import ClaimHandle, Client
from ._transport import DEFAULT_TIMEOUT_S
from .models import Claim, Clone

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


_Method = Callable[Concatenate["Client", P], Coroutine[Any, Any, R]]


def _blocking(method: _Method[P, R]) -> Callable[Concatenate[SyncClient, P], R]:
    """``Client.method`` as a blocking method of SyncClient."""
    @functools.wraps(method)
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))
    return call


def _iterating(method: Callable[Concatenate[Client, P], AsyncIterator[T]]) -> Callable[Concatenate[SyncClient, P],
                                                                                      Iterator[T]]:
    """``Client.method`` (an async iterator) as a SyncClient method giving a plain iterator."""
    @functools.wraps(method)
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._iterate(method(self._client, *args, **kwargs))
    return call


async def _next(it: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await it.__anext__()
    except StopAsyncIteration:
        return False, None


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


class SyncClaim:
    """A claimed pool member (claimed when ``SyncClient.claim`` returned); ``with`` releases it on exit.

    ``with c.claim("ci") as vm:`` -- ``vm`` is the Claim. Without ``with``,
    ``.claim`` is the Claim and ``c.release(...)`` gives it back. Exit rules
    as the async claim's: a failed release is raised unless the body raised.
    """

    def __init__(self, client: SyncClient, handle: ClaimHandle) -> None:
        self._client, self._handle = client, handle
        self.claim: Claim = client._run(handle.__aenter__())

    @property
    def name(self) -> str:
        return self.claim.name

    @property
    def clone(self) -> Clone:
        return self.claim.clone

    def __enter__(self) -> Claim:
        return self.claim

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._client._run(self._handle.__aexit__(exc_type, exc, tb))


class SyncClient:
    """A blocking client of instacloned: ``with SyncClient() as c: job = c.clone("tmpl", name="ci", wait=True)``.

    Same methods, arguments, results and errors as :class:`Client`.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._client = Client(socket, timeout_s=timeout_s)
        self.socket = self._client.socket
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="instaclone-client", daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this SyncClient is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # e.g. KeyboardInterrupt while waiting: stop the call on the loop too
            raise

    def _iterate(self, it: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                more, item = self._run(_next(it))
                if not more:
                    return
                yield item  # type: ignore[misc]  # more=True: an item
        finally:
            if not self._loop.is_closed():
                self._run(_aclose(it))

    def close(self) -> None:
        """Close the session and stop the client's loop and thread (idempotent)."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed() and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)

    def claim(self, pool: str, *, ttl_s: float | None = None, config: dict[str, str] | None = None,
              wait_s: float | None = None) -> SyncClaim:
        """Claim an idle clone of ``pool`` now; ``with`` the result releases it on exit (see Client.claim)."""
        return SyncClaim(self, self._client.claim(pool, ttl_s=ttl_s, config=config, wait_s=wait_s))

    request = _blocking(Client.request)
    health = _blocking(Client.health)
    openapi = _blocking(Client.openapi)
    clone = _blocking(Client.clone)
    job = _blocking(Client.job)
    jobs = _blocking(Client.jobs)
    watch = _iterating(Client.watch)
    clones = _blocking(Client.clones)
    destroy = _blocking(Client.destroy)
    freeze = _blocking(Client.freeze)
    unfreeze = _blocking(Client.unfreeze)
    frozen = _blocking(Client.frozen)
    check = _blocking(Client.check)
    prepare = _blocking(Client.prepare)
    gc = _blocking(Client.gc)
    events = _iterating(Client.events)
    pools = _blocking(Client.pools)
    pool = _blocking(Client.pool)
    create_pool = _blocking(Client.create_pool)
    update_pool = _blocking(Client.update_pool)
    resize_pool = _blocking(Client.resize_pool)
    delete_pool = _blocking(Client.delete_pool)
    release = _blocking(Client.release)
    webhooks = _blocking(Client.webhooks)
    enable_webhook = _blocking(Client.enable_webhook)
    deliveries = _blocking(Client.deliveries)
    replay = _blocking(Client.replay)
    exec_stream = _iterating(Client.exec_stream)
    exec = _blocking(Client.exec)
    put_file = _blocking(Client.put_file)
    get_file = _blocking(Client.get_file)
