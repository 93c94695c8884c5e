"""The Python API for notebooks and scripts: ``p2pl.run``, ``p2pl.sweep``, ``p2pl.load``.

A config is given as an :class:`~p2pl.config.ExperimentConfig`, a dict shaped like the TOML file,
a path to a TOML file, or nothing (the default experiment); keyword arguments override it the
same way, sections as dicts::

    result = p2pl.run("my.toml", devices=20, rounds=10, training={"lr": 0.1})
    result.summary["final"]["accuracy"]      # summary.json, as a dict
    result.rounds                            # one row per round (rounds.csv)

Tables are ``pandas.DataFrame`` when pandas is installed, otherwise lists of dicts (one per row,
numbers as int/float, empty cells as None), with the same columns either way. Nothing heavy (torch)
is imported until a run starts.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pl.config import ExperimentConfig, config_from_dict, config_to_dict, dumps_config, load_config, read_toml
from p2pl.errors import P2PLError

Config = ExperimentConfig | Mapping[str, Any] | str | Path | None
Table = Any  # pandas.DataFrame, or list[dict[str, Any]] without pandas


# ---------------------------------------------------------------------------------------------
# tables


def _value(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _records(csv_text: str) -> list[dict[str, Any]]:
    return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(csv_text))]


def _frame(records: list[dict[str, Any]]) -> Table:
    try:
        import pandas as pd
    except ImportError:
        return records
    return pd.DataFrame.from_records(records)


def _devices(devices_csv: str, metrics_csv: str) -> list[dict[str, Any]]:
    """devices.csv plus each device's final test accuracy and loss."""
    metrics = _records(metrics_csv)
    last = max((r["round"] for r in metrics), default=0)
    final = {r["device"]: r for r in metrics if r["round"] == last}
    rows = []
    for row in _records(devices_csv):
        f = final.get(row["device"], {})
        rows.append({"device": row["device"], "final_accuracy": f.get("accuracy"), "final_loss": f.get("loss"),
                     **{k: v for k, v in row.items() if k != "device"}})  # fmt: skip
    return rows


@dataclass
class Result:
    """One finished run: its summary and its tables (see the module doc for the table type)."""

    summary: dict[str, Any]  # summary.json
    config: ExperimentConfig
    directory: Path | None  # where its files are (None: run with out=None, nothing written)
    _csv: dict[str, str] = field(default_factory=dict, repr=False)  # rounds / metrics / devices CSV texts

    @property
    def rounds(self) -> Table:
        """One row per round: accuracy/loss mean, min, max over devices, consensus distance, bytes, time."""
        return _frame(_records(self._csv["rounds"]))

    @property
    def metrics(self) -> Table:
        """One row per evaluated round and device: accuracy, loss (and after-local values if measured)."""
        return _frame(_records(self._csv["metrics"]))

    @property
    def devices(self) -> Table:
        """One row per device: final accuracy and loss, local samples, label counts."""
        return _frame(_devices(self._csv["devices"], self._csv["metrics"]))

    @property
    def final_accuracy(self) -> dict[str, float]:
        """mean / min / max test accuracy over devices after the last round."""
        return dict(self.summary["final"]["accuracy"])


@dataclass
class SweepResult:
    """A finished sweep: one row per setting x seed, and one per setting over seeds."""

    directory: Path
    keys: list[str]  # the swept config keys
    _results_csv: str = field(repr=False)
    _summary_csv: str = field(repr=False)

    @property
    def results(self) -> Table:
        """results.csv: swept values, seed, status and final numbers of every run."""
        return _frame(_records(self._results_csv))

    @property
    def summary(self) -> Table:
        """summary.csv: per setting, each metric's mean and 95 % CI (Student t) over seeds."""
        return _frame(_records(self._summary_csv))

    def run(self, name: str) -> Result:
        """One run of the sweep by its folder name, e.g. ``"topology.name=ring/seed-0"``."""
        return load_run(self.directory / name)


# ---------------------------------------------------------------------------------------------
# configs


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def config_dict(config: Config = None, **overrides: Any) -> dict[str, Any]:
    """The config as a TOML-shaped dict, with keyword overrides merged in (sections as dicts)."""
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, ExperimentConfig):
        data = config_to_dict(config)
    elif isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
    elif isinstance(config, (str, Path)):
        data = read_toml(config)
    else:
        raise P2PLError(f"config must be an ExperimentConfig, a dict, a TOML path or None, got {type(config).__name__}")
    return _merge(data, overrides)


def make_config(config: Config = None, **overrides: Any) -> ExperimentConfig:
    """A validated ExperimentConfig from any accepted form (see the module doc)."""
    return config_from_dict(config_dict(config, **overrides)).validate()


def _toml_value(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """A TOML-shaped dict as ``--set`` texts (``section.key=value``)."""
    out = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_toml_value(value)}")
    return out


# ---------------------------------------------------------------------------------------------
# the three entry points


def run(
    config: Config = None,
    out: str | Path | None = None,
    *,
    backend: str = "local",
    fresh: bool = False,
    progress: bool = False,
    **overrides: Any,
) -> Result:
    """Run (or resume, when ``out`` holds its checkpoint) one experiment and return its Result.

    With ``out`` the usual files are written there (config.toml, metrics.csv, rounds.csv,
    devices.csv, summary.json) and ``p2pl.load(out)`` reads them back; without, nothing is written.
    """
    cfg = make_config(config, **overrides)
    from p2pl.results import devices_csv, metrics_csv, rounds_csv
    from p2pl.sim.simulator import run_experiment

    update = None
    if progress:
        from p2pl.report import round_progress

        with round_progress(f"{cfg.algorithm} x{cfg.devices}", cfg.rounds) as update:
            result = run_experiment(cfg, out, progress=update, resume=not fresh, backend=backend)
    else:
        result = run_experiment(cfg, out, resume=not fresh, backend=backend)
    exp = result.experiment
    honest = exp.honest()  # the run's own tables leave attackers out of the spreads
    tables = {
        "rounds": rounds_csv(result.history, honest),
        "metrics": metrics_csv(result.history),
        "devices": devices_csv(exp.setting.data_sizes, exp.label_histograms(), honest),
    }
    return Result(result.summary, cfg, None if out is None else Path(out), tables)


def sweep(
    config: Config = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    seeds: int = 1,
    out: str | Path = "runs/sweep",
    *,
    workers: int = 1,
    backend: str = "local",
    fresh: bool = False,
    log: bool = False,
    **overrides: Any,
) -> SweepResult:
    """Every combination of ``grid`` values (``{"topology.name": ["ring", "grid"]}``) x ``seeds``.

    Resumable like ``p2pl sweep``: finished runs under ``out`` are reused. With ``workers`` > 1
    (or ``backend="ray"``) runs go to worker processes: call it under ``if __name__ == "__main__":``
    in a script.
    """
    from p2pl.sweeps import Axis, run_sweep

    axes = [Axis(key, tuple(_toml_value(v) for v in values)) for key, values in (grid or {}).items()]
    texts = _flatten(config_dict(config, **overrides))
    result = run_sweep(out, None, texts, axes, seeds, workers, backend, None, fresh, print if log else None)
    return load_sweep(result.out)


def load_run(directory: str | Path) -> Result:
    folder = Path(directory)
    names = {"rounds": "rounds.csv", "metrics": "metrics.csv", "devices": "devices.csv"}
    missing = [n for n in ("summary.json", "config.toml", *names.values()) if not (folder / n).is_file()]
    if missing:
        raise P2PLError(f"{folder} is not a finished run (no {missing[0]}); run it first, e.g. p2pl run --out {folder}")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    cfg = load_config(folder / "config.toml")
    tables = {k: (folder / name).read_text(encoding="utf-8") for k, name in names.items()}
    return Result(summary, cfg, folder, tables)


def load_sweep(directory: str | Path) -> SweepResult:
    from p2pl.sweeps import MANIFEST

    folder = Path(directory)
    if not (folder / "results.csv").is_file():
        raise P2PLError(f"{folder} holds no results.csv; run the sweep to the end first (rerunning resumes it)")
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    return SweepResult(folder, list(manifest["grid"]), (folder / "results.csv").read_text(encoding="utf-8"),
                       (folder / "summary.csv").read_text(encoding="utf-8"))  # fmt: skip


def load(directory: str | Path) -> Result | SweepResult:
    """Read a finished run (``p2pl run --out``) or sweep (``p2pl sweep --out``) back."""
    from p2pl.sweeps import MANIFEST

    folder = Path(directory)
    if not folder.is_dir():
        raise P2PLError(f"{folder} does not exist; pass the --out folder of a finished run or sweep")
    return load_sweep(folder) if (folder / MANIFEST).is_file() else load_run(folder)


__all__ = ["Result", "SweepResult", "config_dict", "dumps_config", "load", "make_config", "run", "sweep"]
