"""Experiment tracking: every round's metrics to TensorBoard and/or MLflow, as a per-round observer.

``output.tensorboard = true`` writes TensorBoard event files to ``DIR/tensorboard/`` (through
``torch.utils.tensorboard``; needs the ``tensorboard`` package: ``pip install "p2pl[tracking]"``).
``output.mlflow = true`` logs the flattened config as parameters and every round's metrics to the
active MLflow tracking URI (``MLFLOW_TRACKING_URI``, or MLflow's default); needs ``mlflow``.

Logged per round (step = round): accuracy and loss mean / min / max over devices (rounds that
were evaluated), mean accuracy after local training (when measured), consensus distance, bytes
sent per device (mean), live links, active devices and the round's wall time. A resumed run logs
from the round it resumes at; rounds are the step, so the curves continue.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from p2pl.config import ExperimentConfig, config_to_dict
from p2pl.errors import P2PLError
from p2pl.metrics import History, spread


def round_metrics(round_index: int, h: History) -> dict[str, float]:
    """The finished round's numbers, by tag (only finite ones)."""
    out: dict[str, float] = {}
    if h.eval_rounds and h.eval_rounds[-1] == round_index:
        for metric, values in (("accuracy", h.accuracy[-1]), ("loss", h.loss[-1])):
            out |= {f"{metric}/{stat}": v for stat, v in spread(values).items()}
        if h.local_accuracy and len(h.local_accuracy) == len(h.eval_rounds) - 1:
            out["local_accuracy/mean"] = float(np.mean(h.local_accuracy[-1]))
    if h.consensus_distance:
        out["consensus_distance"] = float(h.consensus_distance[-1])
        out["bytes_sent/mean_per_device"] = float(np.mean(h.bytes_sent[-1]))
        out["network/live_links"] = float(h.live_links[-1])
        out["network/active_devices"] = float(h.active_devices[-1])
        out["time/round_s"] = float(h.round_time_s[-1])
    return {k: v for k, v in out.items() if math.isfinite(v)}


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _need(module: str, key: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise P2PLError(f"{key} = true needs the {module} package; install it ({install}) or set {key} = false")


class TensorBoardTracker:
    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a run killed midway keeps every round it finished

    def close(self) -> None:
        self.writer.close()


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = str(value)
    return out


class MLflowTracker:
    def __init__(self, cfg: ExperimentConfig, name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None)
        mlflow.log_params(_flat(config_to_dict(cfg)))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Tracking:
    """The simulator's per-round observer: hands each finished round to every tracker."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def on_round(self, round_index: int, history: History) -> None:
        if self.trackers:
            metrics = round_metrics(round_index, history)
            for tracker in self.trackers:
                tracker.log(round_index, metrics)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def check_tracking(cfg: ExperimentConfig) -> None:
    """Fail before any work if a requested tracker's package is missing."""
    if cfg.output.tensorboard:
        _need("tensorboard", "output.tensorboard", "pip install 'p2pl[tracking]'")
    if cfg.output.mlflow:
        _need("mlflow", "output.mlflow", "pip install mlflow")


def open_tracking(cfg: ExperimentConfig, directory: Path | None) -> Tracking:
    """The trackers ``cfg.output`` asks for (none: a no-op observer)."""
    check_tracking(cfg)
    trackers: list[Tracker] = []
    if cfg.output.tensorboard:
        if directory is None:
            raise P2PLError("output.tensorboard writes into the run's folder; give the run an output directory")
        trackers.append(TensorBoardTracker(directory / "tensorboard"))
    if cfg.output.mlflow:
        trackers.append(MLflowTracker(cfg, directory.name if directory is not None else cfg.algorithm))
    return Tracking(trackers)


__all__ = ["Tracking", "check_tracking", "open_tracking", "round_metrics"]
