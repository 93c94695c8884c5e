"""``p2pl robustness``: Byzantine attacks x aggregation rules, as a grid of runs and a report.

* :mod:`p2pl.robustness.grid` - the scenarios (attack, sync mode), the rules, each run's config;
* :mod:`p2pl.robustness.suite` - runs the grid, resumable, in worker processes, failures captured;
* :mod:`p2pl.robustness.report` - ``results.csv``, ``report.md`` and ``robustness.png``.
"""

from __future__ import annotations

from p2pl.robustness.grid import SCENARIOS, GridSettings, RunSpec, Scenario, grid_settings
from p2pl.robustness.report import write_report
from p2pl.robustness.suite import GridResult, RunOutcome, run_grid

__all__ = [
    "SCENARIOS",
    "GridResult",
    "GridSettings",
    "RunOutcome",
    "RunSpec",
    "Scenario",
    "grid_settings",
    "run_grid",
    "write_report",
]
