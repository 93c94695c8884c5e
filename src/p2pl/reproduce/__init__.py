"""``p2pl reproduce``: the paper's claims as a suite of experiments and a readable report.

* :mod:`p2pl.reproduce.claims` - what each claim runs (config overrides) and how it is judged;
* :mod:`p2pl.reproduce.suite` - runs the experiments, resumable, one failure never stops the rest;
* :mod:`p2pl.reproduce.report` - ``report.md`` with tables and figures.
"""

from __future__ import annotations

from p2pl.reproduce.claims import CLAIMS, Claim, Finding, RunSpec, SuiteSettings, build_claims, suite_settings
from p2pl.reproduce.report import write_report
from p2pl.reproduce.suite import RunOutcome, SuiteResult, run_suite

__all__ = [
    "CLAIMS",
    "Claim",
    "Finding",
    "RunOutcome",
    "RunSpec",
    "SuiteResult",
    "SuiteSettings",
    "build_claims",
    "run_suite",
    "suite_settings",
    "write_report",
]
