"""Small file operations of the jobs layer; blocking ones are meant for ``asyncio.to_thread``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import safefs
from ..plugin_api import remove_path

__all__ = ["copy_private", "give", "make_dir", "owner_of", "read_json", "remove_path", "write_json"]


def owner_of(path: Path | None) -> tuple[int, int] | None:
    """(uid, gid) of ``path``, or None if there is none."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_uid, st.st_gid


def make_dir(path: Path, *, mode: int = 0o700, gid: int = -1, exist_ok: bool = False) -> None:
    """Create ``path`` (unless ``exist_ok``, it must not exist), root's, with ``mode`` and group ``gid``.

    Root's: nothing can be planted in it (``safefs``). libvirt gives QEMU the
    files it needs (disks, NVRAM) and makes the sockets and logs a
    definition names itself. Missing parents (root's tree) are made first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    safefs.make_dir(path, mode=mode, owner=(-1, gid), exist_ok=exist_ok)


def give(path: Path, owner: tuple[int, int]) -> None:
    """Give the regular file ``path`` (not a link) to ``owner``, mode 0600, by descriptor."""
    fd = safefs.open_file(path)
    try:
        os.fchown(fd, *owner)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def copy_private(src: Path, dst: Path) -> None:
    """Copy ``src`` (a regular file, not a link, only read) to a new file ``dst`` (O_EXCL, no link followed).

    ``dst`` gets ``src``'s owner (the user libvirt runs QEMU as) and mode 0600.
    """
    safefs.copy_file(src, dst)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to a new file ``path`` (0600, O_EXCL: never through a link)."""
    fd = safefs.create_file(path)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data))


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
