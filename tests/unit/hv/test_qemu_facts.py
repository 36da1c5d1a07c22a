"""QemuFacts: which QEMU and accelerator need what (pure)."""

from __future__ import annotations

import pytest

from instaclone.hv import QemuFacts


@pytest.mark.parametrize(("version", "accel", "loses"), [
    ((7, 2, 22), "tcg", True),
    ((8, 2, 0), "tcg", True),
    ((9, 0, 0), "tcg", False),
    ((10, 0, 2), "tcg", False),
    ((7, 2, 22), "kvm", False),
])
def test_only_tcg_before_9_0_loses_writes(version: tuple[int, int, int], accel: str, loses: bool) -> None:
    assert QemuFacts(version, accel).loses_tcg_writes is loses


def test_migration_features_follow_the_version() -> None:
    old, mid, new = QemuFacts((7, 2, 22), "tcg"), QemuFacts((8, 2, 1), "tcg"), QemuFacts((10, 0, 2), "kvm")
    assert (old.file_migration, mid.file_migration, new.file_migration) == (False, True, True)
    assert (old.mapped_ram, mid.mapped_ram, new.mapped_ram) == (False, False, True)
    assert new.text == "10.0.2"
