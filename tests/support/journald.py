"""journald's native protocol, decoded (what instaclone.systemd sends to journald)."""

from __future__ import annotations

import re
import struct


def parse_journal(data: bytes) -> dict[str, list[str]]:
    """Decode a native-protocol entry (text and binary field forms); field -> values."""
    fields: dict[str, list[str]] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            i = nl + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n", "binary field not newline-terminated"
            i = nl + 10 + size
        assert re.fullmatch(rb"[A-Z][A-Z0-9_]{0,63}", name), name
        fields.setdefault(name.decode(), []).append(value.decode())
    return fields
