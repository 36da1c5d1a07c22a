"""Contract suite: cases are made at collection from clean runs (support/contract/plans.py); a summary at the end."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.contract.cases import Report
from tests.support.contract.plans import Case
from tests.support.contract.results import RESULTS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fake_case" in metafunc.fixturenames:
        from tests.support.contract.plans import fake_cases

        cases = fake_cases()
        metafunc.parametrize("fake_case", cases, ids=[c.id for c in cases])
    if "libvirt_case" in metafunc.fixturenames:
        from tests.support.contract.realplans import libvirt_params

        metafunc.parametrize("libvirt_case", libvirt_params(metafunc.config))


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.support.contract.realplans import cleanup

    cleanup()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("contract suite")
    combos: dict[str, list[tuple[Case, Report]]] = {}
    for case, report in RESULTS:
        combos.setdefault(case.combo, []).append((case, report))
    for combo, items in combos.items():
        bad = [(c, r) for c, r in items if r.violations]
        notes: dict[str, int] = {}
        for _, r in items:
            if r.not_reached:
                r.note = "not reached"
            if r.note:
                notes[r.note] = notes.get(r.note, 0) + 1
        extra = "".join(f", {n} {k}" for k, n in sorted(notes.items()))
        tr.write_line(f"{combo}: {len(items)} cases, {len(bad)} failed{extra}")
        for c, r in bad:
            tr.write_line(f"  FAIL {c.id}: {r.violations[0][:300]}")
        for c, r in items:
            if r.note and not r.violations:
                tr.write_line(f"  {r.note}: {c.id}")
