"""Run the robustness grid into ``DIR/runs/<scenario>/<rule>/``: resumable, failure-tolerant, parallel.

* A run whose folder holds ``summary.json`` for all its rounds next to a ``config.toml`` equal to
  the config it would run now is finished and is not rerun (``fresh`` forces a rerun).
* A run interrupted midway resumes from its checkpoint (the simulator's own resume); a folder
  holding another config is rerun from scratch, so stale numbers never stand for a new setup.
* An exception in one run is written to its ``error.txt`` and reported; the grid goes on.
* ``workers > 1`` runs that many runs at once in worker processes; a worker only runs and
  reports a status, every number is read back from the run's files in this process.

The honest devices of a grid are the same in every attacked run (placement depends on the seed
and graph, not the attack), so the attack-free run is read over those same devices: every delta
compares one set of devices.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2pl import atomic, sweeps
from p2pl.config import ExperimentConfig
from p2pl.errors import P2PLError
from p2pl.robustness.grid import NO_ATTACK, GridSettings, RunSpec
from p2pl.sweeps import FAILED, RAN, REUSED

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class Measured:
    """What a finished run left on disk."""

    summary: dict[str, Any]
    final_accuracy: np.ndarray  # float64 [N]: every device's accuracy after the last round
    honest: np.ndarray  # bool [N]: the run's own honest devices (devices.csv role)


@dataclass
class RunOutcome:
    spec: RunSpec
    directory: Path
    status: str  # ran | reused | failed
    seconds: float  # wall time spent on it in this invocation
    error: str | None = None  # one line (the traceback is in error.txt)
    measured: Measured | None = None


@dataclass
class GridResult:
    out: Path
    settings: GridSettings
    outcomes: dict[str, RunOutcome]  # by run key, in grid order
    seconds: float  # wall time of this invocation

    @property
    def failures(self) -> list[RunOutcome]:
        return [o for o in self.outcomes.values() if o.status == FAILED]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())

    def outcome(self, scenario: str, rule: str) -> RunOutcome | None:
        return self.outcomes.get(f"{scenario}/{rule}")

    def reference_honest(self) -> np.ndarray | None:
        """The devices honest in the attacked runs (None when no attacked run finished)."""
        for o in self.outcomes.values():
            m = o.measured
            if m is not None and o.spec.scenario.key != NO_ATTACK and not m.honest.all():
                return m.honest
        return None

    def honest_accuracy(self, scenario: str, rule: str) -> tuple[float, float] | None:
        """(mean, worst) final accuracy of the grid's honest devices in one run, or None."""
        o = self.outcome(scenario, rule)
        if o is None or o.measured is None:
            return None
        m = o.measured
        honest = m.honest
        reference = self.reference_honest()
        if m.honest.all() and reference is not None and len(reference) == len(m.honest):
            honest = reference  # the attack-free run, over the devices honest under attack
        values = m.final_accuracy[honest]
        return float(values.mean()), float(values.min())


# ---------------------------------------------------------------------------------------------
# reading a finished run back


def load_measured(directory: Path) -> Measured:
    summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    with (directory / "devices.csv").open(newline="", encoding="utf-8") as handle:
        honest = np.array([row["role"] == "honest" for row in csv.DictReader(handle)], dtype=bool)
    final = np.full(len(honest), np.nan)
    with (directory / "metrics.csv").open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["round"]) == summary["rounds_done"]]
    for r in rows:
        final[int(r["device"])] = float(r["accuracy"])
    if np.isnan(final).any():
        raise P2PLError(f"{directory}/metrics.csv lacks the last round's accuracy of some devices; rerun with --fresh")
    return Measured(summary, final, honest)


# ---------------------------------------------------------------------------------------------
# running


def execute(cfg: ExperimentConfig, directory: Path, fresh: bool) -> tuple[str, str | None]:
    """Reuse, resume or run one experiment: (status, one-line error); never raises for a failing
    run. The sweep's own runner (``p2pl.sweeps``), so both decide "finished" the same way."""
    outcome = sweeps.execute(sweeps.Job(directory, cfg), fresh)
    return outcome.status, outcome.error


def _outcome(spec: RunSpec, directory: Path, status: str, error: str | None, seconds: float) -> RunOutcome:
    if status == FAILED:
        return RunOutcome(spec, directory, status, seconds, error)
    try:
        return RunOutcome(spec, directory, status, seconds, None, load_measured(directory))
    except (OSError, ValueError, KeyError, P2PLError) as err:
        return RunOutcome(spec, directory, FAILED, seconds, f"unreadable results: {type(err).__name__}: {err}")


def run_grid(
    out: str | Path, settings: GridSettings, workers: int = 1, fresh: bool = False, log: LogFn | None = None
) -> GridResult:
    """Run every (scenario, rule) of the grid into ``out/runs`` (in ``workers`` processes, by the
    sweep runner: resumable, a failing run is an outcome) and read the results back."""
    out = Path(out)
    specs = settings.specs()
    t0 = time.perf_counter()
    jobs = [sweeps.Job(out / "runs" / s.key, settings.config(s), label=s.key) for s in specs]
    done = sweeps.run_jobs(jobs, workers=workers, fresh=fresh, log=log)
    outcomes = {
        s.key: _outcome(s, o.job.directory, o.status, o.error, o.seconds) for s, o in zip(specs, done, strict=True)
    }
    return GridResult(out, settings, outcomes, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# results.csv

RESULT_COLUMNS = [
    "scenario", "attack", "sync_mode", "aggregation", "status", "devices", "attackers", "rounds",
    "honest_mean", "honest_worst", "delta_mean", "delta_worst", "attackers_mean", "round_time_s",
    "run_wall_s", "bytes_per_device", "sync_bytes_per_device", "folder", "error",
]  # fmt: skip


def _f(x: float | None, digits: int = 6) -> str:
    return "" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def result_rows(result: GridResult) -> list[dict[str, str]]:
    """One tidy row per run; deltas are against the attack-free run of the same rule."""
    rows = []
    for key, o in result.outcomes.items():
        spec, m = o.spec, o.measured
        acc = result.honest_accuracy(spec.scenario.key, spec.rule)
        base = result.honest_accuracy(NO_ATTACK, spec.rule)
        row = dict.fromkeys(RESULT_COLUMNS, "")
        row |= {
            "scenario": spec.scenario.key, "attack": spec.scenario.attack, "sync_mode": spec.scenario.sync_mode,
            "aggregation": spec.rule, "status": o.status, "folder": f"runs/{key}", "error": o.error or "",
        }  # fmt: skip
        if m is not None and acc is not None:
            s = m.summary
            attackers = s.get("final_attackers", {}).get("accuracy", {}).get("mean")
            row |= {
                "devices": str(s["devices"]), "attackers": str(s.get("attackers", 0)), "rounds": str(s["rounds_done"]),
                "honest_mean": _f(acc[0]), "honest_worst": _f(acc[1]), "attackers_mean": _f(attackers),
                "round_time_s": _f(s.get("round_time_s_mean"), 4), "run_wall_s": _f(s.get("wall_time_s"), 4),
                "bytes_per_device": _f(s.get("bytes_sent_per_device")),
                "sync_bytes_per_device": _f(s.get("sync_bytes_per_device")),
            }  # fmt: skip
            if base is not None:
                row |= {"delta_mean": _f(acc[0] - base[0]), "delta_worst": _f(acc[1] - base[1])}
        rows.append(row)
    return rows


def write_results_csv(result: GridResult) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result_rows(result))
    path = result.out / "results.csv"
    atomic.write_text(path, buf.getvalue())
    return path


__all__ = [
    "FAILED",
    "RAN",
    "RESULT_COLUMNS",
    "REUSED",
    "GridResult",
    "Measured",
    "RunOutcome",
    "execute",
    "load_measured",
    "result_rows",
    "run_grid",
    "write_results_csv",
]
