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

Only domains whose instaclone metadata names a ``ram`` file below
``<ramdir>/instaclone/`` are touched; every other domain passes untouched.
Uses only the standard library: it runs with the system Python, inside
libvirtd's start path, so it must be quick.
"""

import os
import sys
import xml.etree.ElementTree as ET

IC_NS = "https://instaclone.dev/xmlns/clone/1"
SHORT_NAME_MAX = 20  # libvirt's VIR_DOMAIN_SHORT_NAME_MAX


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "start" or argv[3] != "begin":
        return 0
    data = sys.stdin.read()
    if IC_NS not in data:
        return 0
    root = ET.fromstring(data)
    meta = root.find(f"./metadata/{{{IC_NS}}}clone")
    ram_attr = meta.get("ram") if meta is not None else None
    if meta is None or not ram_attr:
        return 0
    ram = os.path.realpath(ram_attr)
    ramdir = os.path.realpath(meta.get("ramdir", "/var/lib/libvirt/qemu/ram"))
    if not ram.startswith(os.path.join(ramdir, "instaclone") + os.sep):
        print(f"instaclone hook: refusing RAM file {ram} outside {ramdir}/instaclone", file=sys.stderr)
        return 1
    dom_id = root.get("id")
    name = root.findtext("name") or ""
    target_dir = os.path.join(ramdir, f"{dom_id}-{name[:SHORT_NAME_MAX]}")
    target = os.path.join(target_dir, meta.get("alias", "pc.ram"))
    if not os.path.isdir(target_dir):
        print(f"instaclone hook: libvirt did not create {target_dir}", file=sys.stderr)
        return 1
    try:
        if os.path.lexists(target):
            os.unlink(target)
        os.link(ram, target)
    except OSError as exc:
        print(f"instaclone hook: cannot link {ram} to {target}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
