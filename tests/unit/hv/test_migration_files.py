"""How a save or load reaches its file, per QEMU version: the monitor commands, recorded (no libvirt)."""

from __future__ import annotations

from typing import Any

import pytest

from instaclone.errors import LibvirtError
from instaclone.hv import QemuFacts, migration

OLD, MID, NEW = QemuFacts((7, 2, 22), "tcg"), QemuFacts((8, 2, 0), "tcg"), QemuFacts((10, 0, 2), "tcg")


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """The QMP commands sent, in order; ``add-fd`` answers fdset 7."""
    sent: list[tuple[str, Any]] = []

    def qmp(dom: object, command: str, arguments: dict[str, Any] | None = None,
            files: list[int] | None = None) -> Any:
        sent.append((command, arguments))
        return {"fdset-id": 7, "fd": 42} if command == "add-fd" else {}

    monkeypatch.setattr(migration, "qmp", qmp)
    return sent


def test_qemu_8_2_and_later_migrate_to_an_fdset_and_remove_it(monitor) -> None:
    with migration._stream_uri(object(), 3, MID, "instaclone-out") as uri:
        assert uri == "file:/dev/fdset/7"
    assert [c for c, _ in monitor] == ["add-fd", "remove-fd"]
    assert monitor[-1][1] == {"fdset-id": 7}


def test_the_fdset_is_removed_when_the_migration_fails(monitor) -> None:
    with pytest.raises(LibvirtError), migration._stream_uri(object(), 3, NEW, "instaclone-in"):
        raise LibvirtError("QEMU migrate-incoming: broken")
    assert [c for c, _ in monitor] == ["add-fd", "remove-fd"]


def test_older_qemus_get_a_named_fd(monitor) -> None:
    with migration._stream_uri(object(), 3, OLD, "instaclone-out") as uri:
        assert uri == "fd:instaclone-out"
    assert monitor == [("getfd", {"fdname": "instaclone-out"})]


def caps(sent: list[tuple[str, Any]]) -> dict[str, bool]:
    (args,) = [a for c, a in sent if c == "migrate-set-capabilities"]
    return {c["capability"]: c["state"] for c in args["capabilities"]}


def test_mapped_ram_sets_both_sides_alike_and_is_switched_off_after(monitor) -> None:
    migration._file_caps(object(), NEW, False, 4, outgoing=True)
    assert caps(monitor) == {"x-ignore-shared": False, "pause-before-switchover": False, "auto-converge": False,
                             "mapped-ram": True, "multifd": True}
    assert ("migrate-set-parameters", {"max-bandwidth": 1 << 40, "multifd-channels": 4}) in monitor
    monitor.clear()
    migration._reset_file_caps(object(), NEW, 4)
    assert caps(monitor)["mapped-ram"] is False and caps(monitor)["multifd"] is False


def test_a_stream_on_qemu_10_switches_mapped_ram_off(monitor) -> None:
    # Left on by an earlier save, it would turn this save into mapped-ram.
    migration._file_caps(object(), NEW, True, 0, outgoing=True)
    assert caps(monitor)["mapped-ram"] is False and caps(monitor)["x-ignore-shared"] is True


def test_older_qemus_never_hear_of_mapped_ram(monitor) -> None:
    migration._file_caps(object(), OLD, True, 0, outgoing=False)
    assert "mapped-ram" not in caps(monitor) and "multifd" not in caps(monitor)
    assert "migrate-set-parameters" not in [c for c, _ in monitor]  # a load of a stream has none to set
    with pytest.raises(LibvirtError, match=r"needs QEMU 9\.0"):
        migration._file_caps(object(), MID, False, 4, outgoing=True)


class Dom:
    def __init__(self, ident: int) -> None:
        self.ident = ident

    def UUIDString(self) -> str:  # noqa: N802
        return "00000000-0000-0000-0000-0000000000aa"

    def ID(self) -> int:  # noqa: N802
        return self.ident


def test_facts_are_asked_once_per_qemu_process(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def qmp(dom: object, command: str, arguments: object = None, files: object = None) -> Any:
        asked.append(command)
        return {"qemu": {"major": 10, "minor": 0, "micro": 2}} if command == "query-version" else {"enabled": False}

    monkeypatch.setattr(migration, "qmp", qmp)
    hv = migration.Migration.__new__(migration.Migration)
    hv._facts_seen = {}
    assert hv._facts_of(Dom(5)) == NEW and hv._facts_of(Dom(5)) == NEW
    assert asked == ["query-version", "query-kvm"]
    hv._facts_of(Dom(6))  # restarted: another QEMU, perhaps another emulator
    assert len(asked) == 4
