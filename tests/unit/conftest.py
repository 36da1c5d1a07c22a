"""Fixtures shared by the unit tests: fakes only, never libvirtd (tests/conftest.py enforces it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fakes import fake_engine, fake_world


@pytest.fixture(autouse=True)
def no_libvirtd(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test that opens a libvirt connection fails: the unit tier runs where no libvirtd is."""
    try:
        import libvirt
    except ImportError:  # the client-only install: nothing could connect anyway
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a unit test opened a libvirt connection: use the fakes (tests/support/fakes.py) "
                             "or move the test to tests/integration/")

    for name in ("open", "openAuth", "openReadOnly"):
        monkeypatch.setattr(libvirt, name, refuse)


@pytest.fixture
async def env(tmp_path: Path):
    """An engine on the fake hypervisor: (engine, virt, store, config); shut down afterwards."""
    c, store, virt = await fake_world(tmp_path, clone={"stun_deadline_ms": 500, "step_timeout_s": 5})
    engine = fake_engine(c, store, virt)
    yield engine, virt, store, c
    await engine.shutdown(5)
    await store.close()
