"""How ``instaclone`` prints what it got: ``-o table|wide|json|yaml`` and ``-q`` on every command.

One rule for every list (``jobs ls``, ``clones ls``, ``frozen``, ``pool ls``, ``webhooks ls``,
``webhooks deliveries ls``): ``table`` (the default) and ``wide`` (more columns) are for people,
``json`` and ``yaml`` give the API's items as they are, and ``-q`` prints one id or name a line,
nothing else (for ``xargs`` and shell loops). Single objects (a job, a pool, a check report) follow
the same ``-o``: ``json``/``yaml`` give the object, ``table``/``wide`` the human view.

YAML is written by a small emitter of our own (the API's JSON values only: maps, lists, strings,
numbers, booleans, null): the CLI needs no YAML library, and what it prints is plain YAML 1.2
(every string that could be read as something else is double-quoted, JSON style).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: The values of ``-o``.
FORMATS = ("table", "wide", "json", "yaml")


@dataclass(frozen=True)
class Column:
    """One column of a list: its header, how an item gives its cell, and whether only ``-o wide`` shows it."""

    header: str
    cell: Callable[[dict[str, Any]], str]
    wide: bool = False


@dataclass(frozen=True)
class Listing:
    """How one kind of item is listed: its columns and the field ``-q`` prints."""

    columns: tuple[Column, ...]
    key: str

    def headers(self, wide: bool) -> list[str]:
        return [c.header for c in self.columns if wide or not c.wide]

    def row(self, item: dict[str, Any], wide: bool) -> list[str]:
        return [c.cell(item) for c in self.columns if wide or not c.wide]


@dataclass(frozen=True)
class Output:
    """The output options of one command line: ``-o FORMAT`` and ``-q``."""

    format: str = "table"
    quiet: bool = False

    @property
    def machine(self) -> bool:
        """True for ``json`` and ``yaml``: the data, no human text."""
        return self.format in ("json", "yaml")

    def emit(self, data: Any) -> None:
        """Print one API object in the machine format (json unless yaml was asked for)."""
        print(to_yaml(data) if self.format == "yaml" else json.dumps(data, indent=2, sort_keys=True), end="")
        if self.format != "yaml":
            print()

    def show(self, data: Any, human: Callable[[], None], quiet: Sequence[str] = ()) -> None:
        """One object: the data (json/yaml), ``quiet``'s lines (-q), or ``human()`` (table/wide)."""
        if self.quiet:
            for line in quiet:
                print(line)
        elif self.machine:
            self.emit(data)
        else:
            human()

    def listing(self, items: list[dict[str, Any]], spec: Listing) -> None:
        """A list from the API, the same way for every list command."""
        if self.quiet:
            for item in items:
                print(item.get(spec.key, ""))
        elif self.machine:
            self.emit(items)
        else:
            wide = self.format == "wide"
            table([spec.row(i, wide) for i in items], spec.headers(wide))


def raw(item: Any) -> dict[str, Any]:
    """The API's JSON of one of the client's results (its ``.raw``), or the dict itself."""
    return dict(getattr(item, "raw", item))


def table(rows: list[list[str]], header: list[str]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip())


def hms(ts: float | None) -> str:
    return "-" if not ts else time.strftime("%H:%M:%S", time.localtime(ts))


def when(ts: float | None) -> str:
    """A timestamp with its date, for the wide columns."""
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# -- YAML -----------------------------------------------------------------------------------------

#: A string YAML reads back as the same string when written plain (no quotes).
_PLAIN = re.compile(r"[A-Za-z_/.][A-Za-z0-9_./@+-]*( [A-Za-z0-9_./@+()-]+)*")
#: Plain strings YAML readers (1.1 ones like PyYAML too) take for booleans, null or special floats.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", ".inf", ".nan"}


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return json.dumps(v)
    s = str(v)
    if _PLAIN.fullmatch(s) and s.lower() not in _RESERVED:
        return s
    # A JSON string is a valid YAML double-quoted scalar (its escapes are a subset of YAML's).
    return json.dumps(s)


def _yaml_lines(v: Any, indent: str) -> list[str]:
    if isinstance(v, dict) and v:
        out: list[str] = []
        for key in sorted(v):
            k, item = _scalar(str(key)), v[key]
            if isinstance(item, dict | list) and item:
                out.append(f"{indent}{k}:")
                out.extend(_yaml_lines(item, indent + "  "))
            else:
                out.append(f"{indent}{k}: {_flow(item)}")
        return out
    if isinstance(v, list) and v:
        out = []
        for item in v:
            if isinstance(item, dict | list) and item:
                inner = _yaml_lines(item, indent + "  ")
                out.append(f"{indent}- {inner[0].lstrip()}")
                out.extend(inner[1:])
            else:
                out.append(f"{indent}- {_flow(item)}")
        return out
    return [f"{indent}{_flow(v)}"]


def _flow(v: Any) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return "[]"
    return _scalar(v)


def to_yaml(data: Any) -> str:
    """``data`` (JSON values) as a YAML document ending in a newline; keys sorted like ``-o json``."""
    return "\n".join(_yaml_lines(data, "")) + "\n"
