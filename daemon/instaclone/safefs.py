"""Symlink-safe file operations in directories that others (QEMU's user, a guest that escaped) may write.

A path is never handed to the kernel whole: its directory is reached from a
trusted *anchor* (one of instaclone's configured directories, resolved once:
the configuration is trusted, what lies below it is not) one component at a
time with ``O_DIRECTORY | O_NOFOLLOW``, and the last component is looked at
and removed relative to that opened directory (``fstatat`` without following,
``unlinkat``). A symlink anywhere below the anchor stops the operation; a
name whose inode is not the one recorded when instaclone made it is left
alone. All calls block: run them in a thread.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from typing import NamedTuple

__all__ = ["Identity", "Removal", "UnsafePath", "anchor_of", "identity", "lstat", "open_parent", "remove_made"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafePath(Exception):
    """The path is outside every anchor, or a component below the anchor is a symlink or not a directory."""


class Identity(NamedTuple):
    """Which file a name held when instaclone made it: (st_dev, st_ino) and its type (the S_IFMT bits).

    The type catches an inode number reused at once for a symlink put in
    the name's place; a regular file given the very inode number of the one
    it replaced is not told apart (Linux has no stable birth stamp in stat).
    """

    dev: int
    ino: int
    ftype: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode))


class Removal(enum.StrEnum):
    """What :func:`remove_made` did."""

    REMOVED = "removed"
    ABSENT = "absent"  # nothing at that name (already gone)
    REPLACED = "replaced"  # another inode (a new file, a symlink) holds the name: kept
    NOT_EMPTY = "not empty"  # a directory holding something: kept
    UNSAFE = "unsafe path"  # outside the anchors, or a symlinked directory on the way: kept


def _norm(path: str) -> str:
    return os.path.normpath(path)


def anchor_of(path: str, anchors: Iterable[str]) -> str | None:
    """The longest anchor ``path`` lies strictly below (both normalized), or None."""
    p = _norm(path)
    best: str | None = None
    for a in anchors:
        a = _norm(a)
        if p.startswith(a.rstrip("/") + "/") and (best is None or len(a) > len(best)):
            best = a
    return best


@contextlib.contextmanager
def open_parent(path: str, anchors: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(fd of the directory holding ``path``, its last component), reached without following links.

    The anchor itself is resolved (configured by the administrator); each
    component below it is opened with ``O_NOFOLLOW``. Raises UnsafePath, or
    FileNotFoundError if a directory on the way is gone.
    """
    anchor = anchor_of(path, anchors)
    if anchor is None:
        raise UnsafePath(f"{path} is under none of instaclone's directories")
    rel = os.path.relpath(_norm(path), anchor).split("/")
    if any(c in ("", ".", "..") for c in rel):
        raise UnsafePath(f"{path}: not a plain path below {anchor}")
    fd = os.open(os.path.realpath(anchor), _DIR_FLAGS)
    try:
        for comp in rel[:-1]:
            try:
                nxt = os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{path}: {comp!r} is a symlink or not a directory") from None
                raise
            os.close(fd)
            fd = nxt
        yield fd, rel[-1]
    finally:
        os.close(fd)


def _lstat_at(fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def lstat(path: str, anchors: Iterable[str]) -> os.stat_result | None:
    """What ``path`` names now (a symlink itself, not its target), or None if nothing; UnsafePath as above."""
    try:
        with open_parent(path, anchors) as (fd, name):
            return _lstat_at(fd, name)
    except FileNotFoundError:
        return None


def identity(path: str, anchors: Iterable[str]) -> Identity | None:
    """The identity of what ``path`` names now (a symlink's own), or None if nothing; UnsafePath as above."""
    st = lstat(path, anchors)
    return None if st is None else Identity.of(st)


def remove_made(path: str, made: Identity, anchors: Iterable[str]) -> Removal:
    """Remove ``path`` if it is still the file or (empty) directory ``made`` identifies; never follows a link.

    A directory goes only if it is empty (``rmdir``): whatever else is in it
    keeps it. Other OSErrors (EPERM, EBUSY, ...) are raised.
    """
    try:
        with open_parent(path, anchors) as (fd, name):
            st = _lstat_at(fd, name)
            if st is None:
                return Removal.ABSENT
            if Identity.of(st) != made:
                return Removal.REPLACED
            if stat.S_ISDIR(st.st_mode):
                try:
                    os.rmdir(name, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        return Removal.NOT_EMPTY
                    raise
            else:
                os.unlink(name, dir_fd=fd)
            return Removal.REMOVED
    except UnsafePath:
        return Removal.UNSAFE
    except FileNotFoundError:
        return Removal.ABSENT
