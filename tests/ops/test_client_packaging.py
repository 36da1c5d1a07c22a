"""instaclone.client installs and imports without the daemon: only the stdlib and aiohttp."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Run in a fresh interpreter: the daemon's dependencies made unimportable, then the client imported.
_BLOCKED_IMPORT = r"""
import importlib.abc, json, sys
BLOCKED = {"libvirt", "libvirt_qemu", "libvirtaio", "structlog", "prometheus_client", "pydantic", "yaml"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
import instaclone.client as ic
assert ic.Client and ic.SyncClient and ic.ApiError
mods = sorted(m for m in sys.modules if m == "instaclone" or m.startswith(("instaclone.", "instaclone_plugins")))
print(json.dumps(mods))
"""


def test_client_imports_without_the_daemon_dependencies():
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}{os.pathsep}{REPO / 'plugins'}"}
    out = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    mods = __import__("json").loads(out.stdout)
    assert all(m == "instaclone" or m == "instaclone.client" or m.startswith("instaclone.client.") for m in mods), mods


def test_instacloned_says_the_daemon_extra_is_missing():
    """With libvirt unimportable, the daemon's entry point says which extra to install (no traceback)."""
    code = _BLOCKED_IMPORT.split("import instaclone.client")[0] + "from instaclone.daemon import main\n"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}{os.pathsep}{REPO / 'plugins'}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "pip install 'instaclone[daemon]'" in out.stderr and "Traceback" not in out.stderr, out.stderr


def _pip_failure_is_network(text: str) -> bool:
    return any(s in text for s in ("Failed to establish", "Could not find a version", "No matching distribution",
                                   "Temporary failure in name resolution", "Network is unreachable",
                                   "Read timed out", "ConnectionError"))


def test_base_install_has_the_client_and_no_libvirt(tmp_path):
    """``pip install instaclone`` (no extra) in a fresh venv: the client and CLI import, libvirt is absent."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # A copy of the sources: the build must not write into the worktree (build/, *.egg-info).
    src = tmp_path / "src"
    for name in ("daemon", "plugins"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True,
                          timeout=540)
    if inst.returncode != 0 and _pip_failure_is_network(inst.stdout + inst.stderr):
        pytest.skip(f"the package index is unreachable: {(inst.stdout + inst.stderr).strip()[-300:]}")
    assert inst.returncode == 0, inst.stdout + inst.stderr
    check = subprocess.run([str(py), "-c", (
        "import importlib.util, instaclone.client as ic, instaclone.cli\n"
        "assert ic.Client\n"
        "for m in ('libvirt', 'structlog', 'prometheus_client', 'pydantic'):\n"
        "    assert importlib.util.find_spec(m) is None, m\n"
        "print('ok')")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert check.stdout.strip() == "ok", check.stdout + check.stderr
    daemon = subprocess.run([str(env_dir / "bin" / "instacloned"), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert daemon.returncode == 1 and "instaclone[daemon]" in daemon.stderr, daemon.stderr
