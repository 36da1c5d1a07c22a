"""The Protocol instaclone.hv.Hypervisor holds both implementations, checked by mypy.

Also: the layer's pure parts import no libvirt, and the old module names
still export what they did.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
MYPY = Path(sys.executable).parent / "mypy"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for both checks: the second reads the modules the first analysed."""
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(target: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    # --follow-imports=silent: only the check module is judged; the modules it
    # imports are read for their types (their own errors are lint.sh's business).
    return subprocess.run(
        [str(MYPY), "--strict", "--follow-imports=silent", "--cache-dir", str(cache), str(target)],
        cwd=REPO, capture_output=True, text=True, env={"MYPYPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def test_real_and_fake_hypervisors_satisfy_the_protocol(cache: Path):
    r = mypy(REPO / "tests" / "support" / "hv_protocol_check.py", cache)
    assert r.returncode == 0, r.stdout + r.stderr


DRIFTED = '''
from instaclone.hv import Hypervisor
from tests.support.fakes import FakeHypervisor


class Drifted(FakeHypervisor):
    async def replace_nic(self, name: str, mac: str, *, link_up: bool) -> None:  # type: ignore[override]
        return None


def drifted(hv: Drifted) -> Hypervisor:
    return hv
'''


def test_the_check_fails_on_a_drifted_fake(tmp_path: Path, cache: Path):
    """The check above is not vacuous: a fake that lost a parameter fails it, naming the method."""
    check = tmp_path / "drift_check.py"
    check.write_text(DRIFTED)
    r = mypy(check, cache)
    assert r.returncode == 1 and "replace_nic" in r.stdout and "Hypervisor" in r.stdout, r.stdout + r.stderr


def test_pure_modules_import_no_libvirt():
    code = ("import sys\n"
            "from instaclone.hv import Hypervisor, DomainInfo, Disk, file_disks\n"
            "from instaclone.hv import domxml, protocol, records, vmstate\n"
            "assert not {'libvirt', 'libvirt_qemu', 'libvirtaio'} & set(sys.modules), sorted(sys.modules)\n"
            "from instaclone.hv import LibvirtHypervisor\n"
            "assert 'libvirt' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_shim_imports_libvirt():
    libvirt = {"libvirt", "libvirt_qemu", "libvirtaio"}
    importers = sorted(str(p.relative_to(REPO)) for p in (REPO / "daemon").rglob("*.py") if _imported(p) & libvirt)
    assert importers == ["daemon/instaclone/hv/_libvirt.py"]
