"""Grids of settings x seeds: expand, run in parallel (processes or Ray), resume, tabulate.

* Every point of the grid (one value per swept key) runs once per seed, in its own folder
  ``OUT/<setting>/seed-<s>/`` with the simulator's own result files and checkpoint.
* A run whose folder holds ``summary.json`` next to a ``config.toml`` equal to the config it would
  run now is finished and never rerun; one stopped midway resumes from its checkpoint; one that
  holds another config starts over (stale numbers are never reported under a new setup).
* One run's failure is written to its ``error.txt`` and reported; the others go on. Ctrl-C stops
  the workers; rerunning the same command continues where it stopped.
* ``OUT/results.csv`` (and ``results.parquet`` when pyarrow is importable): one row per setting x
  seed; ``OUT/summary.csv``: one row per setting, every metric as mean and 95 % CI over seeds.

This module imports nothing heavy at import time (the CLI and ``import p2pl`` stay fast); torch
is imported where a run starts, in the worker that runs it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pl import atomic
from p2pl.config import ExperimentConfig, config_from_dict, config_to_dict, dumps_config, load_config, parse_override
from p2pl.errors import P2PLError
from p2pl.stats import Interval, mean_ci

RAN, REUSED, FAILED = "ran", "reused", "failed"
BACKENDS = ("local", "ray")
MANIFEST = "sweep.json"
LogFn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Axis:
    """One swept key and its values, each as the TOML text a ``--set`` would take."""

    key: str
    values: tuple[str, ...]


def _split_values(raw: str) -> list[str]:
    """Split ``V1,V2`` on the commas that are not inside brackets or quotes (``[8,8]`` is one value)."""
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_grid(texts: Iterable[str]) -> list[Axis]:
    """``KEY=V1,V2`` per swept key (values read as TOML like ``--set``, else as bare strings)."""
    axes: list[Axis] = []
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        values = _split_values(raw) if sep else []
        if not key or not values or any(not v for v in values):
            raise P2PLError(f"--grid expects KEY=V1,V2 (e.g. --grid topology.name=ring,grid), got {text!r}")
        if any(a.key == key for a in axes):
            raise P2PLError(f"--grid {key} is given twice; list all its values once: --grid {key}=V1,V2")
        axes.append(Axis(key, tuple(values)))
    return axes


@dataclass(frozen=True)
class Job:
    """One run of a sweep: a full config and the folder it writes to."""

    directory: Path
    config: ExperimentConfig
    setting: dict[str, Any] = field(default_factory=dict)  # swept key -> value of this point
    seed: int = 0
    label: str = ""  # how progress lines name it (default: <setting>/seed-<s>)

    @property
    def name(self) -> str:
        return self.label or f"{self.directory.parent.name}/{self.directory.name}"


def _slug(setting: Mapping[str, Any]) -> str:
    """A folder name that says which setting it holds (long ones shortened with a hash)."""
    if not setting:
        return "base"
    text = "__".join(f"{k}={_show(v)}" for k, v in setting.items())
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")
    if len(slug) > 100:
        import hashlib

        slug = slug[:80] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return slug


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def seed_list(base_seed: int, seeds: int) -> list[int]:
    if seeds < 1:
        raise P2PLError(f"--seeds must be a positive integer, got {seeds}")
    return [base_seed + i for i in range(seeds)]


def expand(
    config: str | Path | None,
    overrides: Sequence[str],
    grid: Sequence[Axis],
    seeds: int,
    out: str | Path,
) -> list[Job]:
    """Every setting x seed as a validated job (a bad value anywhere fails before anything runs)."""
    base = load_config(config, list(overrides))
    if any(a.key == "seed" for a in grid) and seeds > 1:
        raise P2PLError("--grid seed=... and --seeds K both choose seeds; use one of the two")
    points: list[list[tuple[str, str]]] = [[]]
    for axis in grid:
        points = [[*p, (axis.key, v)] for p in points for v in axis.values]
    jobs: list[Job] = []
    for point in points:
        setting = {key: parse_override(f"{key}={raw}")[1] for key, raw in point}
        folder = Path(out) / _slug(setting)
        for seed in seed_list(base.seed, seeds):
            texts = [*overrides, *(f"{k}={raw}" for k, raw in point), f"seed={seed}"]
            if any(k == "seed" for k, _ in point):
                texts.pop()  # the grid chose the seed
            cfg = load_config(config, texts)
            cfg.output.progress = False
            jobs.append(Job(folder / f"seed-{cfg.seed}", cfg, setting, cfg.seed))
    names = [j.directory for j in jobs]
    if len(set(names)) != len(names):
        raise P2PLError("two grid points map to the same folder; give each swept value a distinct spelling")
    return jobs


# ---------------------------------------------------------------------------------------------
# running one job (in this process, a worker process or a Ray task)


@dataclass
class JobOutcome:
    job: Job
    status: str  # ran | reused | failed
    seconds: float  # wall time spent on it in this invocation
    error: str | None = None  # one line (the traceback is in error.txt)
    summary: dict[str, Any] | None = None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"


def finished_summary(cfg: ExperimentConfig, directory: Path) -> dict[str, Any] | None:
    """The run's summary if ``directory`` holds this exact config, run to its last round."""
    config_file, summary_file = directory / "config.toml", directory / "summary.json"
    if not (config_file.is_file() and summary_file.is_file()):
        return None
    if config_file.read_text(encoding="utf-8") != dumps_config(cfg):
        return None
    summary: dict[str, Any] = json.loads(summary_file.read_text(encoding="utf-8"))
    return summary if summary.get("rounds_done") == cfg.rounds else None  # not a run stopped on purpose


def run_or_reuse(cfg: ExperimentConfig, directory: Path, fresh: bool = False) -> tuple[str, dict[str, Any]]:
    """Reuse a finished run, resume a stopped one, or run it; returns (status, summary)."""
    if not fresh:
        done = finished_summary(cfg, directory)
        if done is not None:
            return REUSED, done
    config_file = directory / "config.toml"
    same = config_file.is_file() and config_file.read_text(encoding="utf-8") == dumps_config(cfg)
    # A stale summary must not survive a rerun that fails midway (it would be reused next time).
    (directory / "summary.json").unlink(missing_ok=True)
    (directory / "error.txt").unlink(missing_ok=True)
    from p2pl.sim.simulator import run_experiment

    result = run_experiment(cfg, directory, resume=same and not fresh)
    return RAN, result.summary


def execute(job: Job, fresh: bool = False) -> JobOutcome:
    """Run one job; a failing experiment is an outcome (with error.txt), never an exception."""
    t0 = time.perf_counter()
    try:
        status, summary = run_or_reuse(job.config, job.directory, fresh)
        return JobOutcome(job, status, time.perf_counter() - t0, None, summary)
    except Exception as err:  # one experiment's failure is a finding, not the end of the sweep
        message = _one_line(err)
        with contextlib.suppress(OSError):
            atomic.write_text(job.directory / "error.txt", message + "\n\n" + traceback.format_exc())
        return JobOutcome(job, FAILED, time.perf_counter() - t0, message)


# Jobs cross process boundaries as plain data (our own worker processes, never a network peer).
Payload = tuple[str, dict[str, Any], bool]


def _payload(job: Job, fresh: bool) -> Payload:
    return (str(job.directory), config_to_dict(job.config), fresh)


def _execute_payload(payload: Payload) -> tuple[str, str, float, str | None, dict[str, Any] | None]:
    directory, cfg, fresh = payload
    outcome = execute(Job(Path(directory), config_from_dict(cfg)), fresh)
    return directory, outcome.status, outcome.seconds, outcome.error, outcome.summary


def _init_worker(threads: int) -> None:
    """Worker processes: Ctrl-C is the parent's to handle, and they share the cores evenly."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the simulator keeps torch's count when this is set
    if "torch" in sys.modules:  # preloaded by the fork server: set it directly
        sys.modules["torch"].set_num_threads(threads)


def _pool_context() -> Any:
    """A fork server that has imported the simulator once, so each worker starts in milliseconds
    instead of importing torch again (spawn where there is no fork server). Forking this process
    instead could deadlock a child if torch had already started threads here."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["p2pl.sweeps", "p2pl.sim.simulator"])
    return ctx


def describe(outcome: JobOutcome) -> str:
    if outcome.status == FAILED or outcome.summary is None:
        return f"FAILED ({outcome.error})"
    acc = outcome.summary["final"]["accuracy"]
    return f"{outcome.status} in {outcome.seconds:.1f} s, final accuracy mean {acc['mean']:.3f} min {acc['min']:.3f}"


def run_jobs(
    jobs: Sequence[Job],
    workers: int = 1,
    backend: str = "local",
    address: str | None = None,
    fresh: bool = False,
    log: LogFn | None = None,
) -> list[JobOutcome]:
    """Run every job (in order of the list when ``workers`` = 1); outcomes in the jobs' order.

    ``workers`` > 1 runs that many worker processes, each with an equal share of the CPU threads;
    ``backend = "ray"`` runs each job as a Ray task (one CPU each) on a local or existing cluster.
    Ctrl-C stops every worker; finished runs stay finished, running ones resume next time.
    """
    if backend not in BACKENDS:
        raise P2PLError(f"unknown sweep backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if workers < 1:
        raise P2PLError(f"--workers must be a positive integer, got {workers}")
    if address is not None and backend != "ray":
        raise P2PLError("--address needs --backend ray")
    by_dir = {str(j.directory): j for j in jobs}
    done: dict[str, JobOutcome] = {}

    def finish(outcome: JobOutcome) -> None:
        done[str(outcome.job.directory)] = outcome
        if log is not None:
            log(f"[{len(done)}/{len(jobs)}] {outcome.job.name}: {describe(outcome)}")

    def from_payload(result: tuple[str, str, float, str | None, dict[str, Any] | None]) -> JobOutcome:
        directory, status, seconds, error, summary = result
        return JobOutcome(by_dir[directory], status, seconds, error, summary)

    if backend == "ray":
        _run_on_ray(jobs, fresh, address, lambda r: finish(from_payload(r)))
    elif workers == 1 or len(jobs) <= 1:
        for job in jobs:
            finish(execute(job, fresh))
    else:
        _run_in_processes(jobs, min(workers, len(jobs)), fresh, finish, from_payload)
    return [done[str(j.directory)] for j in jobs]


def _run_in_processes(
    jobs: Sequence[Job],
    count: int,
    fresh: bool,
    finish: Callable[[JobOutcome], None],
    from_payload: Callable[[Any], JobOutcome],
) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // count)
    executor = ProcessPoolExecutor(count, _pool_context(), _init_worker, (threads,))
    futures = {executor.submit(_execute_payload, _payload(j, fresh)): j for j in jobs}
    try:
        for future in as_completed(futures):
            try:
                finish(from_payload(future.result()))
            except BrokenProcessPool:  # a worker was killed (e.g. out of memory): its jobs fail, not hang
                died = "its worker process died (killed, or out of memory?); rerun the same command to retry"
                finish(JobOutcome(futures[future], FAILED, 0.0, died))
        executor.shutdown()
    except BaseException:
        # Ctrl-C: stop the runs in flight now (their checkpoints resume them). The executor has no
        # public way to stop running workers, so terminate its processes directly.
        for process in list(getattr(executor, "_processes", {}).values()):
            process.terminate()
        executor.shutdown(wait=False, cancel_futures=True)
        raise


def _run_on_ray(jobs: Sequence[Job], fresh: bool, address: str | None, finish: Callable[[Any], None]) -> None:
    import logging

    from p2pl.sim.ray_backend import _check_reachable, _import_ray

    ray = _import_ray()
    owns = False
    if not ray.is_initialized():
        if address is not None:
            _check_reachable(address)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
            raise P2PLError(f"could not start or join {where} ({err}); check --address") from None
        owns = True
    task = ray.remote(num_cpus=1, max_retries=0)(_execute_payload)
    pending = [task.remote(_payload(j, fresh)) for j in jobs]
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            finish(ray.get(ready[0]))
    except BaseException:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        if owns:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# the tables


ROUND_TARGETS = ("0.8", "0.9")


def metric_row(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The numbers of one run that a sweep table holds (None where not measured)."""
    if summary is None:
        return dict.fromkeys(METRICS)
    final = summary["final"]
    row: dict[str, Any] = {}
    for what in ("accuracy", "loss"):
        for stat in ("mean", "min", "max"):
            row[f"final_{what}_{stat}"] = final[what][stat]
    row["best_mean_accuracy"] = summary.get("best_mean_accuracy")
    for which in ("mean", "min"):
        reached = summary.get(f"rounds_to_{which}_accuracy", {})
        for target in ROUND_TARGETS:
            row[f"rounds_to_{which}_accuracy_{target}"] = reached.get(target)
    for key in ("consensus_distance_final", "bytes_sent_per_device", "oscillation", "rounds_done", "wall_time_s"):
        row[key] = summary.get(key)
    return row


METRICS = tuple(metric_row({"final": {"accuracy": dict.fromkeys(("mean", "min", "max"), 0.0),
                                      "loss": dict.fromkeys(("mean", "min", "max"), 0.0)}}))  # fmt: skip
# The metrics summarized over seeds (rounds to a target: over the seeds that reached it, counted in *_n).
SUMMARY_METRICS = (
    "final_accuracy_mean", "final_accuracy_min", "final_accuracy_max", "final_loss_mean",
    "rounds_to_mean_accuracy_0.9", "rounds_to_min_accuracy_0.9", "bytes_sent_per_device", "consensus_distance_final",
    "oscillation", "wall_time_s",
)  # fmt: skip


def result_rows(outcomes: Sequence[JobOutcome], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: its folder, the swept values, the seed, its status and its numbers."""
    rows = []
    for o in outcomes:
        row: dict[str, Any] = {"run": o.job.name}
        row |= {k: _cell(o.job.setting.get(k)) for k in keys}
        row |= {"seed": o.job.seed, "status": o.status, "error": o.error or ""}
        row |= metric_row(o.summary)
        rows.append(row)
    return rows


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def summary_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per setting: how many seeds finished, and each metric's mean and 95 % CI over them."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for values, members in groups.items():
        ok = [r for r in members if r["status"] != FAILED]
        summary: dict[str, Any] = dict(zip(keys, values, strict=True))
        summary |= {"seeds": len(ok), "failed": len(members) - len(ok)}
        for metric in SUMMARY_METRICS:
            ci = mean_ci(_float(r[metric]) for r in ok)
            summary |= {f"{metric}_mean": _num(ci.mean), f"{metric}_ci95_low": _num(ci.low),
                        f"{metric}_ci95_high": _num(ci.high)}  # fmt: skip
            if metric.startswith("rounds_to"):
                summary[f"{metric}_n"] = ci.n
        out.append(summary)
    return out


def intervals(row: Mapping[str, Any], metric: str) -> Interval:
    """A summary row's metric back as an Interval (for printing)."""
    mean, low, high = (row[f"{metric}_{s}"] for s in ("mean", "ci95_low", "ci95_high"))
    n = int(row.get(f"{metric}_n", row["seeds"]))
    nan = float("nan")
    if mean is None:
        return Interval(nan, nan, nan, 0, nan)
    return Interval(float(mean), float(low), float(high), n, nan)


def _float(x: Any) -> float:
    return float("nan") if x is None or x == "" else float(x)


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else x


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def write_tables(out: Path, rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]]) -> list[Path]:
    """results.csv (+ results.parquet when pyarrow is importable) and summary.csv, atomically."""
    written = [out / "results.csv", out / "summary.csv"]
    atomic.write_text(written[0], csv_text(rows))
    atomic.write_text(written[1], csv_text(summary))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    buf = io.BytesIO()
    columns = {k: [row[k] for row in rows] for k in rows[0]} if rows else {}
    pq.write_table(pa.table(columns), buf)
    atomic.write_bytes(out / "results.parquet", buf.getvalue())
    return [*written, out / "results.parquet"]


# ---------------------------------------------------------------------------------------------
# the whole sweep


@dataclass
class SweepRun:
    out: Path
    keys: list[str]  # swept keys, in grid order
    outcomes: list[JobOutcome]
    rows: list[dict[str, Any]]  # results.csv
    summary: list[dict[str, Any]]  # summary.csv
    seconds: float

    @property
    def failures(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.status == FAILED]


def run_sweep(
    out: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    grid: Sequence[Axis] = (),
    seeds: int = 1,
    workers: int = 1,
    backend: str = "local",
    address: str | None = None,
    fresh: bool = False,
    log: LogFn | None = None,
) -> SweepRun:
    """Expand, run (resuming), and write the manifest and the tables; see the module doc."""
    out = Path(out)
    jobs = expand(config, overrides, grid, seeds, out)
    keys = [a.key for a in grid]
    manifest = {
        "config": None if config is None else str(config),
        "overrides": list(overrides),
        "grid": {a.key: list(a.values) for a in grid},
        "seeds": sorted({j.seed for j in jobs}),
        "runs": [j.name for j in jobs],
    }
    atomic.write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    t0 = time.perf_counter()
    outcomes = run_jobs(jobs, workers, backend, address, fresh, log)
    rows = result_rows(outcomes, keys)
    summary = summary_rows(rows, keys)
    write_tables(out, rows, summary)
    return SweepRun(out, keys, outcomes, rows, summary, time.perf_counter() - t0)


__all__ = [
    "BACKENDS",
    "FAILED",
    "MANIFEST",
    "RAN",
    "REUSED",
    "SUMMARY_METRICS",
    "Axis",
    "Job",
    "JobOutcome",
    "SweepRun",
    "execute",
    "expand",
    "finished_summary",
    "parse_grid",
    "run_jobs",
    "run_or_reuse",
    "run_sweep",
]
