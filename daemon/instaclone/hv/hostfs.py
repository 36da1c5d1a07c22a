"""Where libvirt keeps file-backed guest RAM on this host, and on what filesystem.

libvirt puts the RAM file of a guest with ``<memoryBacking><source
type='file'/>`` at ``<memory_backing_dir>/<id>-<name>/pc.ram``
(``memory_backing_dir`` in /etc/libvirt/qemu.conf); the filecow memory
backend keeps its frozen images under ``<memory_backing_dir>/instaclone/``.
Those files hold guest RAM and belong on a memory filesystem (tmpfs or
hugetlbfs): on a disk filesystem every page the guest or a copy dirties is
also written back to the disk, and a copy made during a stun competes with
that writeback. :func:`ram_dir` gathers the facts; preflight judges them.

:func:`memory_backing_dir` (parsing qemu.conf) is pure; :func:`ram_dir`
reads the file and calls statfs(2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: libvirt's QEMU driver configuration (qemu:///system) and its default RAM directory.
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_MEMORY_BACKING_DIR = "/var/lib/libvirt/qemu/ram"

#: statfs(2) f_type values (linux/magic.h).
TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
RAMFS_MAGIC = 0x858458F6
MEMORY_FS = {TMPFS_MAGIC: "tmpfs", HUGETLBFS_MAGIC: "hugetlbfs"}
FS_NAMES = {
    **MEMORY_FS, RAMFS_MAGIC: "ramfs", 0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs",
    0x794C7630: "overlay", 0x2FC12FC1: "zfs", 0x6969: "nfs", 0xFF534D42: "cifs", 0x65735546: "fuse",
    0xF2F52010: "f2fs", 0x4D44: "vfat",
}

_ASSIGN = re.compile(r"""^\s*memory_backing_dir\s*=\s*(?:"([^"]*)"|'([^']*)')""")


@dataclass(frozen=True)
class RamDir:
    """The memory backing directory and the filesystem it is on (or why that is unknown)."""

    path: str  # memory_backing_dir as libvirt uses it
    configured: bool  # set in qemu.conf (else libvirt's default)
    fs_type: int | None = None  # statfs f_type of ``checked`` (None: unknown, see ``error``)
    checked: str | None = None  # the path statfs was called on: ``path``, or its nearest existing parent
    error: str | None = None

    @property
    def fs_name(self) -> str:
        if self.fs_type is None:
            return "unknown"
        return FS_NAMES.get(self.fs_type, f"f_type {self.fs_type:#x}")

    @property
    def on_memory_fs(self) -> bool:
        return self.fs_type in MEMORY_FS


def memory_backing_dir(conf_text: str) -> tuple[str, bool]:
    """(``memory_backing_dir`` as set in a qemu.conf text, whether it is set there). Pure.

    Comments (``#``) and unset keys leave libvirt's default; the last
    assignment wins, as in libvirt's own parser.
    """
    found: str | None = None
    for line in conf_text.splitlines():
        m = _ASSIGN.match(line)
        if m:
            found = m.group(1) if m.group(1) is not None else m.group(2)
    if found:
        return found, True
    return DEFAULT_MEMORY_BACKING_DIR, False


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type first (__fsword_t, a long), the rest is not read.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def fs_magic(path: str) -> int:
    """statfs(2) f_type of the filesystem ``path`` is on (OSError if statfs fails)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(buf.f_type) & 0xFFFFFFFF


def ram_dir(conf: Path | None = None) -> RamDir:
    """libvirt's memory backing directory (from ``conf``, default :data:`QEMU_CONF`) and its filesystem.

    A directory that does not exist yet (libvirt makes it when it starts a
    domain) is judged by its nearest existing parent, where it would be made.
    """
    conf = QEMU_CONF if conf is None else conf
    try:
        text = conf.read_text(errors="replace")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        return RamDir(DEFAULT_MEMORY_BACKING_DIR, False, error=f"cannot read {conf}: {exc.strerror or exc}")
    path, configured = memory_backing_dir(text)
    checked = Path(path)
    while not checked.exists() and checked != checked.parent:
        checked = checked.parent
    try:
        magic = fs_magic(str(checked))
    except OSError as exc:
        return RamDir(path, configured, checked=str(checked), error=f"statfs {checked}: {exc.strerror or exc}")
    return RamDir(path, configured, fs_type=magic, checked=str(checked))
