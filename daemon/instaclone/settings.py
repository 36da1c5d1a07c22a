"""Typed config sections: a field declares its default, bounds and help once; reading and the reference use it.

A section is a frozen dataclass whose fields are made with :func:`setting`
(the core's in :mod:`instaclone.config`, a backend's on its class, see
``Backend.settings_class``). :func:`read_section` turns one TOML table into
an instance of it, refusing an unknown key, a wrong type or a value out of
bounds with a :class:`ConfigError` that starts with the key
(``clone.stun_deadline_ms: must be between 50 and 600000, got 10``).
:func:`describe` lists the keys for the generated config reference
(``scripts/gen-config-reference.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: The metadata key under which a field keeps its :class:`Setting`.
META = "instaclone"

#: A value parser: (the key as users write it, the TOML value) -> the field's value; raises ConfigError.
Parser = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Setting:
    """What a config key declares besides its type and default."""

    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    #: Replaces the type's own check (a table, a group name that must exist, ...).
    parse: Parser | None = None
    #: TOML text shown commented out in the example config instead of ``key = default``.
    example: str | None = None
    #: How the default reads in the reference, when the field's own value would mislead (host-dependent).
    default_text: str | None = None
    #: The TOML spelling of the default, when ``repr`` is not it (``0o660``).
    toml: str | None = None


def setting(default: Any = MISSING, *, help: str, factory: Callable[[], Any] | None = None,
            min: float | None = None, max: float | None = None,
            choices: tuple[str, ...] = (), parse: Parser | None = None, example: str | None = None,
            default_text: str | None = None, toml: str | None = None) -> Any:
    """A dataclass field for a config key: its default (or ``factory``), help and bounds.

    ``min``/``max`` bound numbers (inclusive), ``choices`` strings; ``parse``
    replaces the check by type. Every key must have a default: a config file
    may leave out any key.
    """
    meta = {META: Setting(help, min, max, choices, parse, example, default_text, toml)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is MISSING:
        raise TypeError("a config setting needs a default")
    return dataclasses.field(default=default, metadata=meta)


def setting_of(f: dataclasses.Field[Any]) -> Setting:
    """The :class:`Setting` of field ``f``; TypeError if the field was not made with :func:`setting`."""
    s = f.metadata.get(META)
    if not isinstance(s, Setting):
        raise TypeError(f"config field {f.name!r} has no help: make it with instaclone.settings.setting()")
    return s


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(key: str, value: Any, hint: Any, default: Any) -> Any:
    """``value`` as a value of type ``hint``, or ConfigError naming ``key``."""
    if hint in (Path, Path | None):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string")
        if not Path(value).is_absolute():
            raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
        return Path(value)
    if hint == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: must be a list of non-empty strings, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or (not value and default != ""):
            raise ConfigError(f"{key}: must be a non-empty string, got {value!r}")
        return value
    raise TypeError(f"{key}: config fields of type {hint!r} need a parse= function")


def coerce(key: str, value: Any, f: dataclasses.Field[Any], hint: Any) -> Any:
    """Check one TOML value against field ``f`` (type, bounds, choices); ConfigError starts with ``key``."""
    s = setting_of(f)
    if s.parse is not None:
        return s.parse(key, value)
    value = _check_type(key, value, hint, f.default)
    if s.min is not None and s.max is not None and not s.min <= value <= s.max:
        raise ConfigError(f"{key}: must be between {s.min:g} and {s.max:g}, got {value!r}")
    if s.choices and value not in s.choices:
        raise ConfigError(f"{key}: must be one of {', '.join(s.choices)}, got {value!r}")
    return value


def read_section(section: str, cls: type[Any], table: Any) -> Any:
    """An instance of the section class ``cls`` from its TOML ``table``; ConfigError names ``section.key``."""
    if not isinstance(table, dict):
        raise ConfigError(f"{section}: must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(known)})")
        values[key] = coerce(f"{section}.{key}", value, known[key], hints[key])
    return cls(**values)


def check_section_class(cls: type[Any]) -> None:
    """TypeError unless ``cls`` is a frozen dataclass whose every field is a :func:`setting` with a default."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: a config section must be a frozen dataclass")
    for f in dataclasses.fields(cls):
        setting_of(f)
        if f.default is MISSING and f.default_factory is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a config setting needs a default")
    cls()  # every default is valid together


# -- the reference ----------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One key of a section, as the reference shows it."""

    name: str
    type: str
    default: Any  # the value
    default_text: str  # how the reference shows it
    toml: str  # ``name = value`` as in the example config
    bounds: str  # "50 to 600000", "one of: a, b", ""
    setting: Setting


def section_help(cls: type[Any]) -> str:
    """The section class's docstring (what the section is for), or ""."""
    doc = cls.__dict__.get("__doc__") or ""
    # A dataclass without a docstring gets its signature as one: not help.
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


_TYPE_NAMES: Mapping[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string",
                                  Path: "absolute path", Path | None: "absolute path",
                                  tuple[str, ...]: "list of strings"}


def toml_value(value: Any) -> str:
    """``value`` written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


def _number(n: float, s: Setting) -> str:
    # Permission bits read best in octal, as the default is written.
    return oct(int(n)) if (s.toml or "").startswith("0o") else f"{n:g}"


def describe(cls: type[Any]) -> list[Key]:
    """Every key of the section class ``cls``, in declaration order."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        s = setting_of(f)
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[operator]
        shown = s.toml or (toml_value(default) if default is not None else "")
        bounds = (f"{_number(s.min, s)} to {_number(s.max, s)}" if s.min is not None and s.max is not None
                  else "one of: " + ", ".join(s.choices) if s.choices else "")
        type_name = _TYPE_NAMES.get(hints[f.name], "table")
        text = s.default_text or (shown if default is not None else "(none)")
        out.append(Key(f.name, type_name, default, text, f"{f.name} = {shown}", bounds, s))
    return out
