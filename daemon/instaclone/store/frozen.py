"""The frozen registry: sources paused once as templates (``instaclone freeze``).

A row exists from the moment a freeze starts (``freezing``), so that a crash
mid-freeze is found and undone; ``frozen`` once its memory image is made.
"""

from __future__ import annotations

import sqlite3
import time

from .. import events
from ..model import FreezeStatus, FrozenSource, MemoryImage
from .base import Emit, StoreBase


class FrozenMixin(StoreBase):
    async def add_frozen(self, name: str, *, paused_by_us: bool, backend: str) -> None:
        """Register a freeze that starts now (``freezing``); IntegrityError if ``name`` is registered."""

        def do(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO frozen(name, since, status, paused_by_us, backend) VALUES (?,?,?,?,?)",
                       (name, time.time(), FreezeStatus.FREEZING.value, int(paused_by_us), backend))

        await self._db.write(do)

    async def set_frozen_image(self, name: str, image: MemoryImage, *, freeze_ms: float) -> None:
        """The freeze is complete (``frozen``, with its image); emits ``source.frozen``."""
        new = events.source_frozen(name, time.time(), freeze_ms=freeze_ms)

        def do(db: sqlite3.Connection, emit: Emit) -> None:
            db.execute("UPDATE frozen SET status=?, image=? WHERE name=?",
                       (FreezeStatus.FROZEN.value, image.to_json(), name))
            emit(new)

        await self._change(do)

    async def remove_frozen(self, name: str, *, clones: int | None = None) -> None:
        """Forget a frozen source; with ``clones`` (an unfreeze) emits ``source.unfrozen``.

        Without ``clones`` (a freeze rolled back) no event: for the outside
        world the freeze never happened.
        """
        new = None if clones is None else events.source_unfrozen(name, time.time(), clones=clones)

        def do(db: sqlite3.Connection, emit: Emit) -> None:
            db.execute("DELETE FROM frozen WHERE name=?", (name,))
            if new is not None:
                emit(new)

        await self._change(do)

    async def frozen(self) -> dict[str, FrozenSource]:
        """The registered sources (``freezing`` ones too) by name, in name order."""

        def do(db: sqlite3.Connection) -> dict[str, FrozenSource]:
            rows = db.execute(
                "SELECT name, since, status, paused_by_us, backend, image, clones FROM frozen ORDER BY name"
            ).fetchall()
            return {
                n: FrozenSource(n, since, FreezeStatus(status), bool(p), b,
                                MemoryImage.from_json(img, b) if img else None, c)
                for n, since, status, p, b, img, c in rows
            }

        return await self._db.write(do)

    async def count_frozen_clones(self, name: str, n: int) -> None:
        """``n`` more clones were taken from the frozen ``name``."""

        def do(db: sqlite3.Connection) -> None:
            db.execute("UPDATE frozen SET clones = clones + ? WHERE name=?", (n, name))

        await self._db.write(do)
