"""Reading disk images with qemu-img without ever letting it guess a format (docs/operations/security.md).

A guest owns every byte of a raw disk. Left to probe, ``qemu-img`` takes a
qcow2 header the guest wrote there for the real thing: the root daemon then
opens whatever backing file that header names (a host path, an NBD or HTTP
URL) and believes the virtual size it claims. So:

* every call names the format (``-f``), the one libvirt recorded for the disk
  (``<driver type=...>``) or the one instaclone created (its qcow2 overlays);
* a chain is walked one image at a time (``qemu-img info`` opens one image,
  never its backing file); a backing name and its format are read only from
  the header of a qcow2 layer, whose header is the container's and not the
  guest's; a raw layer has no backing file, whatever its bytes say;
* a backing name must be a plain absolute local path with a named format:
  ``json:`` names, protocols (``nbd:``, ``http:``, ...), relative names, a
  missing backing format, a loop and a chain past the bound are refused
  (:class:`UnsafeImage`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instaclone.plugin_api import StorageError, UnsafeImage

from ._proc import run

#: The formats whose backing files instaclone can name: a raw image has none,
#: a qcow2 image names its own in its header. Others are refused rather than
#: read (a vmdk descriptor, for one, names further files of its own).
FORMATS = ("raw", "qcow2")


@dataclass(frozen=True)
class Layer:
    """One image of a chain and the format it is opened with."""

    path: Path
    format: str


def _local(path: Path | str, what: str) -> Path:
    """``path`` if it is a plain absolute local path qemu-img cannot read as a protocol or a json: name."""
    text = str(path)
    if text.startswith("json:"):
        raise UnsafeImage(f"{what} is a json: name ({text[:80]!r}); instaclone opens only plain local paths")
    if not text.startswith("/"):
        # "nbd://h/x", "http:...", "ssh:..." and relative names alike: qemu
        # reads "proto:" before the first "/" as a protocol.
        raise UnsafeImage(f"{what} is not an absolute local path ({text[:80]!r}); instaclone opens "
                          "no protocol (nbd:, http:, ...) and no relative name")
    if any(ord(c) < 0x20 for c in text):
        raise UnsafeImage(f"{what} has control characters ({text[:80]!r})")
    return Path(text)


def _format(fmt: str | None, what: str) -> str:
    if fmt not in FORMATS:
        raise UnsafeImage(f"{what} has format {fmt!r}; instaclone reads only {' and '.join(FORMATS)} images")
    return fmt


async def info(qemu_img: str, path: Path, fmt: str) -> dict[str, Any]:
    """``qemu-img info`` of the one image ``path`` opened as ``fmt`` (its backing file is not opened)."""
    path = _local(path, f"image {path}")
    fmt = _format(fmt, f"image {path}")
    # --force-share: the image is open in running QEMUs.
    out = await run(qemu_img, "info", "--force-share", "-f", fmt, "--output=json", str(path))
    try:
        data = json.loads(out)
    except ValueError:
        raise StorageError(f"{qemu_img} info of {path} gave no JSON: {out[:200]!r}") from None
    if not isinstance(data, dict):
        raise StorageError(f"{qemu_img} info of {path} gave {type(data).__name__}, not an object")
    return data


async def virtual_size(qemu_img: str, path: Path, fmt: str) -> int:
    """The guest-visible size of ``path`` read as ``fmt`` (a raw image: its file's size)."""
    data = await info(qemu_img, path, fmt)
    size = data.get("virtual-size")
    if not isinstance(size, int) or size < 0:
        raise StorageError(f"{qemu_img} info of {path} gave no virtual size")
    return size


def backing_of(layer: Layer, data: dict[str, Any]) -> Layer | None:
    """The layer below ``layer`` as its header (``qemu-img info`` answer ``data``) names it, or None."""
    if layer.format == "raw":
        return None  # a raw image has no header: the bytes are the guest's
    name = data.get("backing-filename")
    if name is None:
        return None
    what = f"backing file of {layer.path}"
    if not str(name).startswith(("/", "json:")) and ":" not in str(name).split("/", 1)[0]:
        raise UnsafeImage(f"{what} is the relative name {str(name)[:80]!r}; instaclone follows only absolute "
                          f"local paths (make it one with: qemu-img rebase -u -f {layer.format} "
                          f"-b /ABSOLUTE/PATH -F <format> {layer.path})")
    path = _local(str(name), what)
    fmt = data.get("backing-filename-format")
    if not fmt:
        raise UnsafeImage(f"{layer.path} names its backing file {path} without its format; instaclone "
                          f"never lets qemu guess one (rebase it with: qemu-img rebase -u -f {layer.format} "
                          f"-b {path} -F <format> {layer.path})")
    return Layer(path, _format(str(fmt), what))


class Backings:
    """What each layer's header names below it, remembered while its file is unchanged.

    One ``qemu-img info`` per layer costs ~8 ms here, and garbage collection
    walks every domain's chains, which share their lower layers. An answer is
    kept under the file's identity and change times (device, inode, size,
    mtime, ctime): a rewritten header (a block pull's rebase) changes them and
    is read again. A file changed less than :data:`SETTLED_NS` ago is read
    every time and not kept (timestamps are coarser than the writes: a
    rewrite in the same tick would look unchanged). Forgotten wholesale past
    ``limit`` entries.
    """

    SETTLED_NS = 1_000_000_000

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._known: dict[tuple[str, str, int, int, int, int, int], Layer | None] = {}

    async def below(self, qemu_img: str, layer: Layer) -> Layer | None:
        """The layer below ``layer`` (None at the bottom); UnsafeImage, StorageError as :func:`chain`."""
        try:
            st = await asyncio.to_thread(os.stat, layer.path)
        except OSError as exc:
            raise StorageError(f"cannot read image {layer.path}: {exc.strerror or exc}") from None
        key = (str(layer.path), layer.format, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in self._known:
            return self._known[key]
        found = backing_of(layer, await info(qemu_img, layer.path, layer.format))
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < self.SETTLED_NS:
            return found  # may change again within the same timestamp
        if len(self._known) >= self.limit:
            self._known.clear()
        self._known[key] = found
        return found


async def chain(qemu_img: str, top: Path, fmt: str, *, max_images: int,
                backings: Backings | None = None) -> list[Layer]:
    """The chain whose top is ``top`` (recorded as ``fmt``), top first, one image at a time.

    Raises UnsafeImage for a json:/protocol/relative backing name, a missing
    or unknown backing format, a loop or more than ``max_images`` images;
    StorageError if qemu-img cannot read a layer. ``backings`` remembers
    unchanged layers' answers between walks.
    """
    layer: Layer | None = Layer(_local(top, f"image {top}"), _format(fmt, f"image {top}"))
    out: list[Layer] = []
    seen: set[str] = set()
    while layer is not None:
        key = await asyncio.to_thread(os.path.realpath, layer.path)
        if key in seen:
            raise UnsafeImage(f"the backing chain of {top} loops: {layer.path} is in it twice")
        if len(out) >= max_images:
            raise UnsafeImage(f"the backing chain of {top} has more than {max_images} images "
                              "(storage.qcow2.max_chain_images)")
        seen.add(key)
        out.append(layer)
        if layer.format == "raw":
            break  # nothing to read: a raw layer is the bottom whatever its bytes say
        if backings is not None:
            layer = await backings.below(qemu_img, layer)
        else:
            layer = backing_of(layer, await info(qemu_img, layer.path, layer.format))
    return out
