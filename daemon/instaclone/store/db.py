"""One SQLite database (WAL mode) behind two dedicated threads.

All writes run on one writer thread, one transaction per call: the event
loop never waits on a file sync, and writes are naturally serialized. Reads
for the outbox sender and the event stream go through a second, read-only
connection on its own thread (WAL lets it read while the writer commits), so
webhook traffic never queues behind a clone's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .schema import migrate

T = TypeVar("T")


class Database:
    """Async access to one SQLite file: :meth:`write` transactions and :meth:`read` queries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self._db: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open (creating and migrating if need be) the database; RuntimeError if its schema is newer."""
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer)
        await loop.run_in_executor(self._reader, self._open_reader)

    def _open_writer(self) -> None:
        if not self.path.exists():
            # Made 0600 before SQLite opens it: it gives its -wal and -shm
            # files the database's mode. Every job's script and guest config
            # are in it.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600))
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # A journal made by an older daemon (0644) is made private too.
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        os.fchmod(fd, 0o600)
                    finally:
                        os.close(fd)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            migrate(db, self.path)
        except BaseException:
            db.close()
            raise
        db.isolation_level = "IMMEDIATE"
        self._db = db

    def _open_reader(self) -> None:
        self._rdb = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                    isolation_level=None)

    async def close(self) -> None:
        """Close both connections and stop both threads (after what they are running now)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=True)
        await loop.run_in_executor(self._writer, self._close_writer)
        self._writer.shutdown(wait=True)

    def _close_reader(self) -> None:
        if self._rdb is not None:
            self._rdb.close()
            self._rdb = None

    def _close_writer(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def write(self, fn: Callable[[sqlite3.Connection], T], *,
                    committed: Callable[[T], None] | None = None) -> T:
        """Run ``fn`` in one write transaction; returns its result once committed.

        ``committed(result)`` is called on the event loop after the commit,
        even if the caller was cancelled meanwhile. A cancelled caller waits
        for the transaction to end first: a write must never be half-known.
        """
        def call() -> T:
            assert self._db is not None, "journal is not open"
            with self._db:  # one transaction per call
                return fn(self._db)

        fut = asyncio.get_running_loop().run_in_executor(self._writer, call)
        if committed is not None:
            def done(f: asyncio.Future[T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    committed(f.result())

            fut.add_done_callback(done)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only query on the reader connection."""

        def call() -> T:
            assert self._rdb is not None, "journal is not open"
            return fn(self._rdb)

        return await asyncio.get_running_loop().run_in_executor(self._reader, call)
