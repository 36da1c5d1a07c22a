"""Session-wide rules: every test is marked by its tier (its top folder), unit tests never need libvirtd.

Tiers (docs/development/testing.md): ``unit`` (fakes, no libvirtd), ``integration`` (real libvirtd,
QEMU and the test guests), ``contract`` (the backend contract suite), ``hostile`` (hostile guests and
many users), ``ops`` (install, service, packaging, the ops kit, docs). A test that needs libvirtd
carries the ``integration`` marker wherever it lives, so ``-m integration`` / ``-m "not integration"``
split every tier by that need; a test in ``tests/integration/`` always has it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
#: Top folders of tests/ that are tiers; each is also a marker (pyproject.toml declares them).
TIERS = ("unit", "integration", "contract", "hostile", "ops")


def tier_of(path: Path) -> str | None:
    """The tier a test file belongs to (its top folder under tests/), or None outside a tier."""
    try:
        top = path.resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return top if top in TIERS else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier; a unit test that needs libvirtd is a collection error."""
    misplaced = []
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            misplaced.append(f"{item.nodeid}: not under a tier folder ({', '.join(TIERS)})")
            continue
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "unit" and item.get_closest_marker("integration") is not None:
            misplaced.append(f"{item.nodeid}: needs libvirtd (marker integration) but is a unit test: "
                             "move it to tests/integration/")
    if misplaced:
        raise pytest.UsageError("tests in the wrong tier:\n  " + "\n  ".join(misplaced))


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    """Fail a test that leaves asyncio tasks running."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"test leaked tasks: {leaked}"
