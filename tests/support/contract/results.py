"""The contract cases run in this session and their reports, for tests/contract/conftest.py's summary."""

from __future__ import annotations

from .cases import Report
from .plans import Case

#: (case id, report) of every case run in this session, for the summary.
RESULTS: list[tuple[Case, Report]] = []


def record(case: Case, report: Report) -> None:
    """Keep a case's report for the summary at the end of the session."""
    RESULTS.append((case, report))


def failure_message(case: Case, report: Report) -> str:
    """A failed case's id, outcome and violations, one per line."""
    return f"{case.id} (outcome {report.outcome}{', ' + report.note if report.note else ''}):\n  " + \
        "\n  ".join(report.violations)
