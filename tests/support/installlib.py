"""scripts/install-service.sh run for real into a temporary tree, with a recording fake ``systemctl``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .host import REPO

INSTALLER = REPO / "scripts" / "install-service.sh"

FAKE_SYSTEMCTL = """#!/bin/sh
# Records each call; "is-active -q UNIT" answers from $FAKE_SYSTEMD/active.
echo "$*" >> "$FAKE_SYSTEMD/calls"
case $1 in
    is-active) grep -qx "$3" "$FAKE_SYSTEMD/active" ;;
    start|restart)
        shift
        for u in "$@"; do grep -qx "$u" "$FAKE_SYSTEMD/active" || echo "$u" >> "$FAKE_SYSTEMD/active"; done ;;
esac
"""


class Install:
    """One install tree under ``root`` and a fake systemd; ``run()`` runs the installer into it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.systemd = root / "fake-systemd"
        (self.systemd / "bin").mkdir(parents=True)
        (self.systemd / "run").mkdir()
        exe = self.systemd / "bin" / "systemctl"
        exe.write_text(FAKE_SYSTEMCTL)
        exe.chmod(0o755)
        (self.systemd / "active").write_text("libvirtd.service\n")
        self.env = {**os.environ, "PREFIX": str(root / "opt"), "CONFIG_DIR": str(root / "etc"),
                    "UNIT_DIR": str(root / "units"), "HOOK_DIR": str(root / "hooks"), "BIN_DIR": str(root / "bin"),
                    "MAN_DIR": str(root / "man" / "man8"), "DOC_DIR": str(root / "doc"),
                    "SYSTEMD_RUN_DIR": str(self.systemd / "run"), "FAKE_SYSTEMD": str(self.systemd),
                    "PATH": f"{self.systemd / 'bin'}:{os.environ['PATH']}"}

    def run(self, *args: str) -> tuple[str, list[str]]:
        """The installer's output and the systemctl calls it made."""
        calls = self.systemd / "calls"
        calls.write_text("")
        r = subprocess.run([str(INSTALLER), "--no-packages", *args], env=self.env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout, calls.read_text().splitlines()
