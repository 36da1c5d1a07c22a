#!/usr/bin/python3
"""libvirt QEMU hook of instaclone's ``filecow`` memory backend.

Installed by scripts/setup.sh as /etc/libvirt/hooks/qemu.d/instaclone.

Why a hook: a filecow clone must map the source's frozen RAM file privately,
but libvirt chooses the clone's RAM file path itself:
``<memory_backing_dir>/<domain id>-<name>/pc.ram``, and the domain id is only
known once libvirt starts the domain. Predicting the id would race with every
other domain started meanwhile. libvirt runs this hook at "start begin": the
id is assigned, libvirt has created the per-domain RAM directory, and QEMU
has not been launched yet. The hook hard-links the frozen file into place, so
QEMU opens it (share=off: copy-on-write) instead of creating an empty one.
The daemon then checks, by inode, that the clone really maps the frozen file.

What may be linked is not read from the domain's definition (anyone who may
define a domain may write its metadata): the daemon writes a *grant* for the
domain's UUID in ``/run/instaclone/hook/<uuid>`` (root's, 0600) just before
it starts the clone and removes it afterwards. The grant names the frozen
file, its device and inode, libvirt's RAM directory and the alias (the RAM
file's name in the per-domain directory). The hook checks the grant (a
root-owned regular file in a root-owned directory, no link), the alias (a
plain name: no '/', no '..'), opens the frozen file without following links
and checks its inode, opens the per-domain directory without following links,
and replaces the alias there with a hard link to the opened inode: nothing
else is ever unlinked or linked. A domain marked as ours without a grant is
refused (its start would wait forever for an incoming migration anyway);
every other domain passes untouched. Uses only the standard library: it runs
with the system Python, inside libvirtd's start path, so it must be quick.
"""

import contextlib
import json
import os
import re
import stat
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

IC_NS = "https://instaclone.dev/xmlns/clone/1"
SHORT_NAME_MAX = 20  # libvirt's VIR_DOMAIN_SHORT_NAME_MAX
#: Where the daemon writes a grant per domain UUID (instaclone_plugins.filecow.write_grant).
GRANTS_DIR = Path("/run/instaclone/hook")
#: A RAM file's name in libvirt's per-domain directory: a plain name.
ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Refused(Exception):
    """The hook will not link: the message says why (libvirt shows it and refuses the start)."""


def read_grant(grants: Path, uuid: str) -> dict[str, Any]:
    """The daemon's grant for ``uuid``: checked to be root's alone, never through a link."""
    if not UUID.match(uuid):
        raise Refused(f"domain UUID {uuid!r} is not a UUID")
    try:
        dfd = os.open(grants, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"no grant directory {grants}: {exc.strerror}") from None
    try:
        _root_only(os.fstat(dfd), grants)
        try:
            fd = os.open(uuid, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        except OSError as exc:
            raise Refused(f"no grant for domain {uuid} in {grants}: {exc.strerror}") from None
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise Refused(f"grant {grants}/{uuid} is not a regular file")
            _root_only(st, grants / uuid)
            grant = json.loads(f.read(65536))
    finally:
        os.close(dfd)
    if not isinstance(grant, dict) or not all(isinstance(grant.get(k), str) for k in ("ram", "ramdir", "alias")) \
            or not all(isinstance(grant.get(k), int) for k in ("dev", "inode")):
        raise Refused(f"grant {grants}/{uuid} is malformed")
    return grant


def _root_only(st: os.stat_result, path: Path) -> None:
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise Refused(f"{path} is not root's alone (uid {st.st_uid}, mode {stat.filemode(st.st_mode)})")


def link_ram(root: ET.Element, grant: dict[str, Any]) -> None:
    """Link the granted RAM file into the started domain's per-domain RAM directory, as the grant's alias."""
    alias = grant["alias"]
    if not ALIAS.match(alias) or alias in (".", ".."):
        raise Refused(f"alias {alias!r} is not a plain file name")
    ramdir = grant["ramdir"]
    dom_id, name = root.get("id") or "", root.findtext("name") or ""
    if not dom_id.isdigit() or not name or "/" in name or name.startswith("."):
        raise Refused(f"unexpected domain id {dom_id!r} or name {name!r}")
    target_dir = os.path.join(ramdir, f"{dom_id}-{name[:SHORT_NAME_MAX]}")
    try:
        ram = os.open(grant["ram"], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise Refused(f"cannot open RAM file {grant['ram']}: {exc.strerror}") from None
    try:
        st = os.fstat(ram)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (grant["dev"], grant["inode"]):
            raise Refused(f"{grant['ram']} is not the frozen RAM file the daemon granted")
        try:
            dfd = os.open(target_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise Refused(f"libvirt did not create {target_dir}: {exc.strerror}") from None
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(alias, dir_fd=dfd)  # the name itself, never what a link points to
            os.link(f"/proc/self/fd/{ram}", alias, dst_dir_fd=dfd, follow_symlinks=True)
        except OSError as exc:
            raise Refused(f"cannot link {grant['ram']} to {target_dir}/{alias}: {exc.strerror}") from None
        finally:
            os.close(dfd)
    finally:
        os.close(ram)


def main(argv: list[str], grants: Path = GRANTS_DIR) -> int:
    if len(argv) < 4 or argv[2] != "start" or argv[3] != "begin":
        return 0
    data = sys.stdin.read()
    if IC_NS not in data:
        return 0
    root = ET.fromstring(data)
    meta = root.find(f"./metadata/{{{IC_NS}}}clone")
    if meta is None or not meta.get("ram"):
        return 0
    try:
        link_ram(root, read_grant(grants, (root.findtext("uuid") or "").strip().lower()))
    except Refused as exc:
        print(f"instaclone hook: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
