"""Symlink-safe file operations for a root daemon working beside QEMU.

The daemon runs as root; QEMU runs as another user (libvirt's ``libvirt-qemu``)
and a guest that breaks out of it can write wherever that user can: libvirt's
per-domain RAM directories, a source's disk directory, and any directory the
daemon gives QEMU. A link planted there must never make root create, chown,
copy, read or punch a file the daemon did not choose.

The rules every function here keeps (blocking: run them in a thread):

* a directory is opened once, ``O_DIRECTORY | O_NOFOLLOW``, and everything
  below happens relative to that descriptor (``dir_fd``): a directory swapped
  for a link after the check is never entered;
* a file is created ``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing name, a
  link included, is an error (``FileExistsError``), never followed or reused;
* an existing file is opened ``O_NOFOLLOW`` and must be a regular file (a
  FIFO or a device is refused before it is read);
* owner and mode change through the descriptor (``fchown``/``fchmod``), never
  through a name; copies and hole punching go from descriptor to descriptor.

Only the last component of a path is guarded: its ancestors are trusted not
to be swapped. The state directory's tree is root's. libvirt's RAM directory
is QEMU's user's: ``<ramdir>/instaclone`` is therefore made and opened here
(never a link, never someone else's directory), and files are linked through
the descriptor opened, never by name. The daemon also keeps the directories
it fills root's (``make_dir``), so that nothing can be planted there in the
first place.

Removal (the second half of this module) goes further: a path is never
handed to the kernel whole. Its directory is reached from a trusted
*anchor* (one of instaclone's configured directories, resolved once:
the configuration is trusted, what lies below it is not) one component at a
time with ``O_DIRECTORY | O_NOFOLLOW``, and the last component is looked at
and removed relative to that opened directory (``fstatat`` without following,
``unlinkat``). A symlink anywhere below the anchor stops the operation; a
name whose inode is not the one recorded when instaclone made it is left
alone. All calls block: run them in a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "PUNCH_HOLE", "Identity", "Owner", "Removal", "UnsafePath", "anchor_of", "copy_file", "create_file",
    "data_ranges", "identity", "link_file", "lstat", "make_dir", "open_dir", "open_file", "open_parent",
    "opened_dir", "punch", "remove_made", "sparse_copy",
]

#: (uid, gid); -1 keeps that part.
Owner = tuple[int, int]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
PUNCH_HOLE = 0x01 | 0x02


def open_dir(path: Path) -> int:
    """A descriptor of the directory ``path``; OSError (ELOOP, ENOTDIR) if it is a link or no directory."""
    return os.open(path, _DIR_FLAGS)


@contextlib.contextmanager
def opened_dir(path: Path) -> Iterator[int]:
    """:func:`open_dir` as a context manager that closes it."""
    fd = open_dir(path)
    try:
        yield fd
    finally:
        os.close(fd)


def make_dir(path: Path, *, mode: int = 0o700, owner: Owner | None = None, exist_ok: bool = False) -> None:
    """Create the directory ``path`` in its (existing) parent, never through a link; then set owner and mode.

    The mode is set with fchmod (the umask does not narrow it). With
    ``exist_ok``, an existing *directory* (not a link to one) gets the owner
    and mode as well; without it an existing name raises FileExistsError.
    """
    with opened_dir(path.parent) as parent:
        made = True
        try:
            os.mkdir(path.name, 0o700, dir_fd=parent)
        except FileExistsError:
            if not exist_ok:
                raise
            made = False
        fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
    try:
        st = os.fstat(fd)
        if not made and (st.st_uid != os.geteuid() or st.st_mode & 0o022):
            # Someone else's (QEMU's user may write the parent of a RAM
            # image directory): whatever it holds may be planted.
            raise PermissionError(errno.EPERM, f"{path} exists and is not this daemon's alone "
                                  f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})")
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def create_file(path: Path, *, mode: int = 0o600, owner: Owner | None = None) -> int:
    """A new file ``path`` opened for writing (O_EXCL, O_NOFOLLOW, relative to its opened parent).

    FileExistsError if the name exists, a link included. The caller closes
    the descriptor. ``owner`` is set by fchown before anything is written.
    """
    with opened_dir(path.parent) as parent:
        fd = os.open(path.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                     dir_fd=parent)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: Path, flags: int = os.O_RDONLY) -> int:
    """An existing regular file opened with ``flags`` and O_NOFOLLOW; OSError for a link or anything else."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def copy_file(src: Path, dst: Path, *, owner: Owner | None = None, mode: int = 0o600) -> None:
    """Copy the regular file ``src`` (not a link; only read) to a new file ``dst``.

    ``dst`` gets ``owner`` (default: ``src``'s) and ``mode``; its data is
    synced before it is closed.
    """
    fin = open_file(src)
    try:
        st = os.fstat(fin)
        fout = create_file(dst, mode=mode, owner=owner if owner is not None else (st.st_uid, st.st_gid))
        try:
            left = st.st_size
            while left > 0:
                n = os.sendfile(fout, fin, None, min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the allocated ranges of ``fd`` below ``size`` (SEEK_DATA/SEEK_HOLE)."""
    out, off = [], 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past off
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end - start))
        off = end
    return out


def sparse_copy(src: Path, dst: Path, *, mode: int = 0o600) -> None:
    """Copy the regular file ``src`` to a new file ``dst``, data ranges only (holes stay holes).

    ``dst`` gets ``src``'s owner (QEMU's user, for a RAM file) and ``mode``.
    The kernel copies (copy_file_range): no data passes through this process.
    """
    fin = open_file(src)
    try:
        st = os.fstat(fin)
        size = st.st_size
        fout = create_file(dst, mode=mode, owner=(st.st_uid, st.st_gid))
        try:
            os.ftruncate(fout, size)
            for start, length in data_ranges(fin, size):
                pos, end = start, start + length
                while pos < end:
                    n = os.copy_file_range(fin, fout, end - pos, pos, pos)
                    if n == 0:
                        raise OSError(f"short copy of {src} at {pos}")
                    pos += n
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def link_file(src: Path, dst: Path, *, mode: int | None = 0o600) -> None:
    """Hard-link the regular file ``src`` (not a link) as a new name ``dst``; the inode gets ``mode`` first.

    The inode linked is the one opened: ``src`` is opened O_NOFOLLOW and
    linked through its descriptor, so a name swapped in between is not. QEMU
    makes its RAM files 0644: the image kept under a new name is made private
    (None keeps the mode).
    """
    fd = open_file(src)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with opened_dir(dst.parent) as parent:
            os.link(f"/proc/self/fd/{fd}", dst.name, dst_dir_fd=parent, follow_symlinks=True)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch(fd: int, offset: int, length: int) -> None:
    """Punch a hole at ``offset`` (``length`` bytes) of the open file ``fd``, keeping its size."""
    if _libc.fallocate(fd, PUNCH_HOLE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


# -- removal: only what instaclone made, reached from an anchor without following links --

_WALK_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


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
    fd = os.open(os.path.realpath(anchor), _WALK_FLAGS)
    try:
        for comp in rel[:-1]:
            try:
                nxt = os.open(comp, _WALK_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
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
