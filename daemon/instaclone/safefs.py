"""Symlink-safe file operations for a root daemon working beside QEMU (issue 21, item 4).

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

The removal side lives beside these (a separate set of functions); the
creation side's functions are kept together below.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "PUNCH_HOLE", "Owner", "copy_file", "create_file", "link_file", "make_dir", "open_dir",
    "open_file", "opened_dir", "punch", "sparse_copy",
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
            off = 0
            while off < size:
                try:
                    start = os.lseek(fin, off, os.SEEK_DATA)
                except OSError:  # ENXIO: no data past off
                    break
                end = os.lseek(fin, start, os.SEEK_HOLE)
                pos = start
                while pos < end:
                    n = os.copy_file_range(fin, fout, end - pos, pos, pos)
                    if n == 0:
                        raise OSError(f"short copy of {src} at {pos}")
                    pos += n
                off = end
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
