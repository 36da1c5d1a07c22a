"""Small file operations of the jobs layer; blocking ones are meant for ``asyncio.to_thread``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..plugin_api import remove_path

__all__ = ["copy_private", "make_dir", "owner_of", "read_json", "remove_path", "write_json"]


def owner_of(path: Path | None) -> tuple[int, int] | None:
    """(uid, gid) of ``path``, or None if there is none."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_uid, st.st_gid


def make_dir(path: Path, owner: tuple[int, int] | None) -> None:
    """Create ``path`` (it must not exist), owned by ``owner`` unless that is root."""
    path.mkdir(parents=True, exist_ok=False)
    if owner is not None and owner != (0, 0):
        os.chown(path, *owner)


def copy_private(src: Path, dst: Path) -> None:
    """Copy ``src`` (opened read-only: it is never written) to a new file ``dst``.

    ``dst`` gets ``src``'s owner (the user libvirt runs QEMU as) and mode 0600.
    """
    st = src.stat()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fout, open(src, "rb") as fin:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fchown(fout.fileno(), st.st_uid, st.st_gid)
        os.fsync(fout.fileno())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
