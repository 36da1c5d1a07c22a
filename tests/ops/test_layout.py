"""The tests' own layout (docs/development/testing.md): tiers, helpers in tests/support, no cross-imports.

An AST scan of every module under tests/: a test module or a conftest imports
neither another test module nor a conftest (shared code is in tests/support,
shared fixtures in conftest.py files); every test module is in a tier folder;
tests/support holds no test module; unit tests import none of the real-VM helpers.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.host import REPO

TESTS = REPO / "tests"
TIERS = {"unit", "integration", "contract", "hostile", "ops"}
#: Helpers that drive real libvirtd, QEMU or the test guests: never for a unit test.
REAL_VM_HELPERS = {"tests.support.vmlib", "tests.support.invariants", "tests.support.execlib",
                   "tests.support.guests"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved, names included."""
    pkg = module_name(path).split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def is_test_module(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return name.startswith("tests.") and (last.startswith("test_") or last == "conftest")


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_test_module_imports_another_or_a_conftest() -> None:
    bad = [f"{p.relative_to(REPO)}:{line} imports {name}"
           for p in python_files() for line, name in imported(p) if is_test_module(name)]
    assert not bad, "shared code goes to tests/support, shared fixtures to a conftest.py:\n" + "\n".join(bad)


def test_every_test_module_is_in_a_tier_and_support_has_none() -> None:
    tests = [p.relative_to(TESTS) for p in python_files() if p.name.startswith("test_")]
    assert tests
    bad = [str(p) for p in tests if p.parts[0] not in TIERS]
    assert not bad, f"test modules outside the tiers {sorted(TIERS)}: {bad}"


def test_every_test_folder_is_a_package() -> None:
    # Test files share basenames across tiers (unit/jobs/test_gc.py, hostile/test_gc.py):
    # without __init__.py pytest would import them under one name.
    dirs = {p.parent for p in python_files()}
    missing = [str(d.relative_to(REPO)) for d in sorted(dirs) if not (d / "__init__.py").exists()]
    assert not missing, f"folders without __init__.py: {missing}"


def test_unit_tests_use_no_real_vm_helper() -> None:
    bad = [f"{p.relative_to(REPO)}:{line} imports {name}"
           for p in python_files() if p.relative_to(TESTS).parts[0] == "unit"
           for line, name in imported(p)
           if name.startswith(tuple(REAL_VM_HELPERS)) or name == "tests.support.host.libvirt_ready"]
    assert not bad, "a test that needs real guests belongs in tests/integration/:\n" + "\n".join(bad)


def test_bench_and_scripts_import_test_helpers_that_exist() -> None:
    """bench/ and scripts/ use tests.support helpers; a helper moved or renamed must not strand them."""
    missing = []
    for path in sorted([*(REPO / "bench").glob("*.py"), *(REPO / "scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests"):
                parts = (node.module or "").split(".")
                base = REPO.joinpath(*parts)
                if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                    missing.append(f"{path.relative_to(REPO)}: from {node.module} import ...")
    assert not missing, "imports of test modules that do not exist:\n" + "\n".join(missing)
