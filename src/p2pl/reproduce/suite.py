"""Run the claims' experiments into ``DIR/runs/<claim>/<name>/``: resumable, failure-tolerant.

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

import contextlib
import csv
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pl import atomic
from p2pl.config import ExperimentConfig, dumps_config
from p2pl.reproduce.claims import (
    Claim,
    Curves,
    Measured,
    RunSpec,
    SuiteSettings,
    build_claims,
    run_config,
    runs_needed,
)
from p2pl.sim.simulator import run_experiment

RAN, REUSED, FAILED = "ran", "reused", "failed"
LogFn = Callable[[str], None]


@dataclass
class RunOutcome:
    spec: RunSpec
    directory: Path
    status: str  # ran | reused | failed
    seconds: float  # wall time spent on it in this invocation
    error: str | None = None  # one line, for the report (the traceback is in error.txt)
    measured: Measured | None = None


@dataclass
class SuiteResult:
    out: Path
    settings: SuiteSettings
    claims: tuple[Claim, ...]
    outcomes: dict[str, RunOutcome]  # by run key, in the order they ran
    seconds: float  # wall time of this invocation

    def data(self) -> dict[str, Measured | None]:
        return {key: o.measured for key, o in self.outcomes.items()}

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


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"


def run_one(spec: RunSpec, settings: SuiteSettings, runs_dir: Path, fresh: bool = False) -> RunOutcome:
    """Reuse, resume or run one experiment; never raises for a failing experiment."""
    directory = runs_dir / spec.key
    t0 = time.perf_counter()
    try:
        cfg = run_config(spec, settings)
        text = dumps_config(cfg)
        config_file = directory / "config.toml"
        same = config_file.is_file() and config_file.read_text(encoding="utf-8") == text
        if same and not fresh and (directory / "summary.json").is_file():
            measured = load_measured(directory, cfg)
            if measured.summary.get("rounds_done") == cfg.rounds:  # not a run stopped early on purpose
                return RunOutcome(spec, directory, REUSED, time.perf_counter() - t0, None, measured)
        # A stale summary must not survive a rerun that fails midway (it would be reused next time).
        (directory / "summary.json").unlink(missing_ok=True)
        (directory / "error.txt").unlink(missing_ok=True)
        run_experiment(cfg, directory, resume=same and not fresh)
        return RunOutcome(spec, directory, RAN, time.perf_counter() - t0, None, load_measured(directory, cfg))
    except Exception as err:  # one experiment's failure is a finding of the suite, not its end
        message = _one_line(err)
        with contextlib.suppress(OSError):  # the report still carries the message
            atomic.write_text(directory / "error.txt", message + "\n\n" + traceback.format_exc())
        return RunOutcome(spec, directory, FAILED, time.perf_counter() - t0, message)


def _describe(outcome: RunOutcome) -> str:
    m = outcome.measured
    if outcome.status == FAILED or m is None:
        return f"FAILED ({outcome.error})"
    acc = m.summary["final"]["accuracy"]
    return f"{outcome.status} in {outcome.seconds:.1f} s, final accuracy mean {acc['mean']:.3f} min {acc['min']:.3f}"


def run_suite(
    out: str | Path,
    settings: SuiteSettings,
    claims: tuple[Claim, ...] | None = None,
    fresh: bool = False,
    log: LogFn | None = None,
) -> SuiteResult:
    """Run every experiment the claims need (each shared run once) into ``out/runs``."""
    out = Path(out)
    claims = build_claims() if claims is None else claims
    specs = runs_needed(claims)
    t0 = time.perf_counter()
    outcomes: dict[str, RunOutcome] = {}
    for i, spec in enumerate(specs, 1):
        if log is not None:
            log(f"[{i}/{len(specs)}] {spec.key} ...")
        outcome = run_one(spec, settings, out / "runs", fresh)
        outcomes[spec.key] = outcome
        if log is not None:
            log(f"[{i}/{len(specs)}] {spec.key}: {_describe(outcome)}")
    return SuiteResult(out, settings, claims, outcomes, time.perf_counter() - t0)
