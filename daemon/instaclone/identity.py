"""Clone identity: name validation, UUIDs, MAC addresses. Pure functions."""

from __future__ import annotations

import re
import secrets
import uuid as uuidlib

from .errors import InvalidName

# A domain name that is safe as a libvirt name, a file name and a hostname
# label: no path separators, no XML or shell metacharacters, bounded length.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_NAME_LEN = 63


def validate_name(name: object, *, what: str = "clone name") -> str:
    """Return ``name`` if it is a valid domain name, else raise InvalidName."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} must be a non-empty string")
    if len(name) > MAX_NAME_LEN:
        raise InvalidName(f"{what} is {len(name)} characters long; the maximum is {MAX_NAME_LEN}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def clone_names(name: str, count: int) -> list[str]:
    """Names for ``count`` clones: ``name`` itself for one, ``name-1..N`` for more."""
    validate_name(name)
    if count == 1:
        return [name]
    names = [f"{name}-{i}" for i in range(1, count + 1)]
    validate_name(names[-1], what=f"clone name prefix {name!r} with count {count}")
    return names


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def new_mac(prefix: str = "52:54:00") -> str:
    """A random MAC in QEMU's locally administered range 52:54:00:xx:xx:xx."""
    tail = secrets.token_bytes(3)
    return prefix + "".join(f":{b:02x}" for b in tail)


def new_job_id() -> str:
    return uuidlib.uuid4().hex[:16]
