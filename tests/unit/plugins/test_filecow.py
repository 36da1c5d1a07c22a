"""filecow pieces that need no VM: the sparse copy, the XML rewrite, the libvirt hook."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from instaclone.hv import domxml
from instaclone.safefs import sparse_copy
from instaclone_plugins import libvirt_hook
from instaclone_plugins.filecow import FileCowMemory
from tests.support.fakes import SOURCE_XML

HOOK = Path(libvirt_hook.__file__)


def test_sparse_copy_copies_data_and_keeps_holes(tmp_path):
    src = tmp_path / "ram"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        for i in range(4):
            f.seek(i * (16 << 20))
            f.write(bytes([i + 1]) * (1 << 20))
    dst = tmp_path / "copy"
    sparse_copy(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert src.read_bytes() == dst.read_bytes()
    assert dst.stat().st_blocks * 512 <= 8 << 20  # holes stayed holes
    with pytest.raises(FileExistsError):
        sparse_copy(src, dst)  # never overwrites


def test_map_frozen_ram_and_forget():
    xml = SOURCE_XML.format(name="c1", uuid="00000000-0000-0000-0000-000000000001", disk="/d.qcow2")
    mapped = domxml.map_frozen_ram(xml, ram=Path("/r/instaclone/j/pc.ram"), ramdir=Path("/r"), incoming=True)
    assert domxml.file_ram(mapped) == (True, "private")
    assert "/r/instaclone/j/pc.ram" in mapped and "-incoming" in mapped
    clean = domxml.forget_frozen_ram(mapped)
    assert "pc.ram" not in clean and "-incoming" not in clean
    assert domxml.file_ram(clean) == (True, "private")


def test_can_serve_needs_shared_file_ram():
    xml = SOURCE_XML.format(name="s", uuid="00000000-0000-0000-0000-000000000002", disk="/d.qcow2")
    from instaclone.hv import DomainInfo
    mem = FileCowMemory.__new__(FileCowMemory)
    assert "not a shared file" in (mem.can_serve(DomainInfo("s", "u", "running", 0, xml)) or "")
    shared = xml.replace("<devices>", "<memoryBacking><source type='file'/><access mode='shared'/>"
                                      "</memoryBacking><devices>")
    assert mem.can_serve(DomainInfo("s", "u", "running", 0, shared)) is None


def run_hook(xml: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HOOK), *args], input=xml, capture_output=True, text=True)


def hook_in(xml: str, grants: Path, *args: str) -> int:
    """The hook's main() on ``xml``, reading grants from ``grants`` (the installed one reads /run/instaclone/hook)."""
    import io

    stdin = sys.stdin
    sys.stdin = io.StringIO(xml)
    try:
        return libvirt_hook.main(["hook", *args], grants=grants)
    finally:
        sys.stdin = stdin


def grant(tmp_path: Path, frozen: Path, uuid: str = "00000000-0000-0000-0000-000000000003") -> Path:
    from instaclone.plugin_api import MemoryImage
    from instaclone_plugins.filecow import write_grant

    img = MemoryImage("filecow", {"ram": str(frozen), "ramdir": str(tmp_path)})
    return write_grant(uuid, img, grants=tmp_path / "grants")


def domain_for_hook(tmp_path: Path, ram: Path, name: str = "a-very-long-clone-name-beyond-twenty") -> str:
    xml = SOURCE_XML.format(name=name, uuid="00000000-0000-0000-0000-000000000003", disk="/d.qcow2")
    xml = xml.replace("<domain type='qemu'>", "<domain type='qemu' id='42'>")
    return domxml.map_frozen_ram(xml, ram=ram, ramdir=tmp_path, incoming=False)


def test_hook_links_frozen_ram_into_libvirts_path(tmp_path):
    frozen = tmp_path / "instaclone" / "job1" / "pc.ram"
    frozen.parent.mkdir(parents=True)
    frozen.write_bytes(b"memory")
    name = "a-very-long-clone-name-beyond-twenty"
    domdir = tmp_path / f"42-{name[:20]}"
    domdir.mkdir()
    # Without the daemon's grant for its UUID, a domain marked as ours is refused.
    r = run_hook(domain_for_hook(tmp_path, frozen, name), name, "start", "begin", "-")
    assert r.returncode == 1 and "no grant" in r.stderr, r.stderr
    assert not (domdir / "pc.ram").exists()
    grant(tmp_path, frozen)
    assert hook_in(domain_for_hook(tmp_path, frozen, name), tmp_path / "grants", name, "start", "begin", "-") == 0
    assert (domdir / "pc.ram").stat().st_ino == frozen.stat().st_ino


def test_hook_ignores_other_domains_and_phases(tmp_path):
    plain = SOURCE_XML.format(name="x", uuid="00000000-0000-0000-0000-000000000004", disk="/d")
    assert run_hook(plain, "x", "start", "begin", "-").returncode == 0
    assert run_hook("not xml at all", "x", "prepare", "begin", "-").returncode == 0


def test_hook_refuses_files_it_was_not_granted(tmp_path, capsys):
    """The metadata names a file (it may say anything); only the granted inode is linked."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    frozen = tmp_path / "instaclone" / "job1" / "pc.ram"
    frozen.parent.mkdir(parents=True)
    frozen.write_bytes(b"memory")
    (tmp_path / "42-x").mkdir()
    assert hook_in(domain_for_hook(tmp_path, secret, "x"), tmp_path / "grants", "x", "start", "begin", "-") == 1
    assert "no grant" in capsys.readouterr().err
    # A grant for the frozen file, whose name is then swapped for the secret.
    grant(tmp_path, frozen)
    frozen.unlink()
    frozen.symlink_to(secret)
    assert hook_in(domain_for_hook(tmp_path, frozen, "x"), tmp_path / "grants", "x", "start", "begin", "-") == 1
    assert "cannot open RAM file" in capsys.readouterr().err
    assert not (tmp_path / "42-x" / "pc.ram").exists()


def test_can_serve_refuses_free_page_reporting():
    from instaclone.hv import DomainInfo
    xml = SOURCE_XML.format(name="s", uuid="00000000-0000-0000-0000-000000000002", disk="/d.qcow2").replace(
        "<devices>", "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking><devices>")
    mem = FileCowMemory.__new__(FileCowMemory)
    fpr = xml.replace("</devices>", "<memballoon model='virtio' freePageReporting='on'/></devices>")
    assert "free page reporting" in (mem.can_serve(DomainInfo("s", "u", "running", 0, fpr)) or "")
    plain = xml.replace("</devices>", "<memballoon model='virtio'/></devices>")
    assert mem.can_serve(DomainInfo("s", "u", "running", 0, plain)) is None


def test_punch_zero_pages_gives_back_only_zero_pages(tmp_path):
    import os

    from instaclone_plugins.filecow import punch_zero_pages
    f = tmp_path / "ram"
    page = 4096
    with open(f, "wb") as out:
        out.truncate(64 * page)  # a hole of 64 pages...
        out.seek(3 * page)
        out.write(b"\x01" * page)  # data in page 3
        out.write(bytes(10 * page))  # ...10 pages written with zeros
        out.write(b"\x02" * 7 + bytes(page - 7))  # page 14: data
        out.seek(600 * page)
        out.write(bytes(600 * page))  # 2.3 MiB of written zeros past a 2 MiB chunk
    before = f.read_bytes()
    allocated = os.stat(f).st_blocks * 512
    freed = punch_zero_pages(f)
    assert 600 * page <= freed <= 610 * page  # ext4 may keep a block of the zeros next to data
    assert f.read_bytes() == before
    assert os.stat(f).st_blocks * 512 == allocated - freed
