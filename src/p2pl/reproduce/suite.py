"""Run the claims' experiments into ``DIR/runs/<claim>/<name>/seed-<s>/``: resumable, failure-tolerant.

Every run is repeated over the suite's seeds; the runs go through :mod:`p2pl.sweeps` (in parallel
worker processes with ``workers`` > 1), so resuming and reuse follow the sweep's rules:

* A run whose folder holds ``summary.json`` next to a ``config.toml`` equal to the config it would
  run now is finished: it is reused, not rerun (``fresh`` forces a rerun).
* A run interrupted midway resumes from its last checkpoint (the simulator's own resume).
* A folder holding another config (e.g. the quick suite's, now running the full one) is rerun
  from scratch, so stale numbers are never reported under a new setup.
* Any exception in one experiment is caught, written to its ``error.txt`` and reported; the suite
  goes on. (Ctrl-C is not caught: the next invocation resumes.)

Every number the report uses is read back from the run's result files, so a reused run and a
fresh one are treated the same way.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pl.config import ExperimentConfig
from p2pl.reproduce.claims import (
    Claim,
    Curves,
    Measured,
    Runs,
    RunSpec,
    SuiteSettings,
    build_claims,
    run_config,
    runs_needed,
)
from p2pl.sweeps import FAILED, RAN, REUSED, Job, JobOutcome, execute, run_jobs

LogFn = Callable[[str], None]
__all__ = ["FAILED", "RAN", "REUSED", "RunOutcome", "SuiteResult", "load_measured", "run_one", "run_suite"]


@dataclass
class RunOutcome:
    spec: RunSpec
    directory: Path
    status: str  # ran | reused | failed
    seconds: float  # wall time spent on it in this invocation
    error: str | None = None  # one line, for the report (the traceback is in error.txt)
    measured: Measured | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        """Its folder under ``runs/``: ``C1/p2pl/seed-0``."""
        return f"{self.spec.key}/seed-{self.seed}"


@dataclass
class SuiteResult:
    out: Path
    settings: SuiteSettings
    claims: tuple[Claim, ...]
    outcomes: dict[str, RunOutcome]  # by folder under runs/ (C1/p2pl/seed-0), in the suite's order
    seconds: float  # wall time of this invocation

    def data(self) -> dict[str, Runs | None]:
        """Run key -> its runs over the seeds; None if any seed failed (the claim is not measured)."""
        grouped: dict[str, list[Measured | None]] = {}
        for o in self.outcomes.values():
            grouped.setdefault(o.spec.key, []).append(o.measured)
        return {key: None if any(m is None for m in ms) else Runs(tuple(m for m in ms if m is not None))
                for key, ms in grouped.items()}  # fmt: skip

    @property
    def failures(self) -> list[RunOutcome]:
        return [o for o in self.outcomes.values() if o.status == FAILED]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())


# ---------------------------------------------------------------------------------------------
# reading a finished run back


def _number(text: str | None) -> float:
    return float(text) if text not in (None, "") else float("nan")


def read_curves(directory: Path) -> Curves:
    """Accuracy spread per evaluated round and network facts per round, from rounds.csv."""
    with (directory / "rounds.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    evaluated = [r for r in rows if r["accuracy_mean"] != ""]
    later = [r for r in rows if int(r["round"]) >= 1]

    def column(rs: list[dict[str, str]], name: str) -> np.ndarray:
        return np.array([_number(r.get(name)) for r in rs], dtype=np.float64)

    return Curves(
        round=np.array([int(r["round"]) for r in evaluated], dtype=np.int64),
        mean=column(evaluated, "accuracy_mean"),
        min=column(evaluated, "accuracy_min"),
        max=column(evaluated, "accuracy_max"),
        local_mean=column(evaluated, "local_accuracy_mean"),
        live_links=column(later, "live_links"),
        bytes_sent_mean=column(later, "bytes_sent_mean"),
    )


def _device_facts(directory: Path) -> tuple[float, tuple[int, int]]:
    """(mean number of labels present on a device, (smallest, largest) local dataset)."""
    with (directory / "devices.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    sizes = [int(r["samples"]) for r in rows]
    labels = [sum(int(v) > 0 for k, v in r.items() if k.startswith("label_")) for r in rows]
    return float(np.mean(labels)), (min(sizes), max(sizes))


def load_measured(directory: Path, cfg: ExperimentConfig) -> Measured:
    summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    classes, sizes = _device_facts(directory)
    return Measured(summary, read_curves(directory), cfg, classes, sizes)


# ---------------------------------------------------------------------------------------------
# running


def run_dir(runs_dir: Path, spec: RunSpec, seed: int) -> Path:
    return runs_dir / spec.key / f"seed-{seed}"


def _outcome(spec: RunSpec, job: JobOutcome) -> RunOutcome:
    """A sweep outcome read back as the suite's (the numbers from the run's files)."""
    out = RunOutcome(spec, job.job.directory, job.status, job.seconds, job.error, None, job.job.seed)
    if job.status != FAILED:
        try:
            out.measured = load_measured(job.job.directory, job.job.config)
        except (OSError, ValueError, KeyError) as err:  # unreadable files: a failed run, not a crash
            out.status, out.error = FAILED, f"{type(err).__name__}: {err}"
    return out


def run_one(
    spec: RunSpec, settings: SuiteSettings, runs_dir: Path, fresh: bool = False, seed: int | None = None
) -> RunOutcome:
    """Reuse, resume or run one experiment (one seed); never raises for a failing experiment."""
    seed = settings.seed if seed is None else seed
    cfg = run_config(spec, settings, seed)
    return _outcome(spec, execute(Job(run_dir(runs_dir, spec, seed), cfg, seed=seed, label=spec.key), fresh))


def run_suite(
    out: str | Path,
    settings: SuiteSettings,
    claims: tuple[Claim, ...] | None = None,
    fresh: bool = False,
    log: LogFn | None = None,
    workers: int = 1,
) -> SuiteResult:
    """Run every experiment the claims need over every seed (each shared run once) into ``out/runs``."""
    out = Path(out)
    claims = build_claims() if claims is None else claims
    t0 = time.perf_counter()
    jobs: list[Job] = []
    specs: dict[str, RunSpec] = {}
    for spec in runs_needed(claims):
        for seed in settings.seed_values:
            directory = run_dir(out / "runs", spec, seed)
            jobs.append(Job(directory, run_config(spec, settings, seed), seed=seed, label=f"{spec.key}/seed-{seed}"))
            specs[str(directory)] = spec
    results = run_jobs(jobs, workers, fresh=fresh, log=log)
    outcomes = {}
    for job in results:
        outcome = _outcome(specs[str(job.job.directory)], job)
        outcomes[outcome.name] = outcome
    return SuiteResult(out, settings, claims, outcomes, time.perf_counter() - t0)
