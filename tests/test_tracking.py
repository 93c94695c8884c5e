"""Experiment tracking: per-round metrics to TensorBoard and MLflow, and clear errors without them."""

from __future__ import annotations

import csv
import importlib.machinery
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pl.cli import main
from p2pl.experiment import config_fingerprint
from p2pl.metrics import History
from p2pl.sim.simulator import run_experiment
from p2pl.tracking import round_metrics

TINY = ("devices=6", "rounds=3", "model.hidden=[8]", "training.local_epochs=1", 'topology.name="ring"',
        "output.progress=false")  # fmt: skip


def test_round_metrics_of_an_evaluated_and_a_skipped_round() -> None:
    h = History(eval_rounds=[0, 1], accuracy=[np.array([0.1, 0.1]), np.array([0.5, 0.7])],
                loss=[np.array([2.0, 2.0]), np.array([1.0, 3.0])], local_accuracy=[np.array([0.9, 0.8])],
                consensus_distance=[0.25], bytes_sent=[np.array([100, 300])], live_links=[1], active_devices=[2],
                round_time_s=[0.5])  # fmt: skip
    got = round_metrics(1, h)
    assert got == pytest.approx({
        "accuracy/mean": 0.6, "accuracy/min": 0.5, "accuracy/max": 0.7, "loss/mean": 2.0, "loss/min": 1.0,
        "loss/max": 3.0, "local_accuracy/mean": 0.85, "consensus_distance": 0.25, "bytes_sent/mean_per_device": 200,
        "network/live_links": 1, "network/active_devices": 2, "time/round_s": 0.5,
    })  # fmt: skip
    assert "accuracy/mean" not in round_metrics(2, h)  # round 2 was not evaluated: no accuracy logged


def test_asking_for_a_missing_tracker_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "mlflow")
                        else real(name, *a))  # fmt: skip
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["run", "--out", str(tmp_path / "a"), *sets, "--set", "output.tensorboard=true"]) == 2
    assert main(["run", "--out", str(tmp_path / "b"), *sets, "--set", "output.mlflow=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "p2pl: error: output.tensorboard = true needs the tensorboard package; install it "
        "(pip install 'p2pl[tracking]') or set output.tensorboard = false",
        "p2pl: error: output.mlflow = true needs the mlflow package; install it (pip install mlflow) "
        "or set output.mlflow = false",
    ]
    assert not any((tmp_path / "a").glob("*"))  # failed before any work: nothing written


def test_tracking_does_not_change_what_a_checkpoint_belongs_to(tiny_config: Any) -> None:
    plain = tiny_config()
    tracked = tiny_config("output.tensorboard=true", "output.mlflow=true")
    assert config_fingerprint(plain) == config_fingerprint(tracked)  # switching it on resumes the same run


def test_tensorboard_event_files_hold_every_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from p2pl.config import load_config

    cfg = load_config(None, [*TINY, "output.tensorboard=true"])
    run_experiment(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rounds = list(csv.DictReader(io.StringIO((tmp_path / "rounds.csv").read_text())))[1:]
    for tag, column in (("accuracy/mean", "accuracy_mean"), ("accuracy/min", "accuracy_min"),
                        ("loss/max", "loss_max"), ("consensus_distance", "consensus_distance"),
                        ("bytes_sent/mean_per_device", "bytes_sent_mean")):  # fmt: skip
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rounds], rel=1e-5)


def test_mlflow_gets_the_config_and_every_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    fake = types.ModuleType("mlflow")
    fake.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    fake.active_run = lambda: None  # type: ignore[attr-defined]
    fake.start_run = lambda run_name=None, nested=False: calls.append(("start", run_name))  # type: ignore[attr-defined]
    fake.log_params = lambda params: calls.append(("params", params))  # type: ignore[attr-defined]
    fake.log_metrics = lambda metrics, step: calls.append(("metrics", (step, metrics)))  # type: ignore[attr-defined]
    fake.end_run = lambda: calls.append(("end", None))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    from p2pl.config import load_config

    cfg = load_config(None, [*TINY, "output.mlflow=true", "training.lr=0.07"])
    result = run_experiment(cfg, tmp_path / "tracked")
    assert calls[0] == ("start", "tracked") and calls[-1] == ("end", None)
    params = dict(calls[1][1])
    assert params["training.lr"] == "0.07" and params["devices"] == "6"
    logged = [c[1] for c in calls if c[0] == "metrics"]
    assert [step for step, _ in logged] == [1, 2, 3]
    assert logged[-1][1]["accuracy/mean"] == pytest.approx(result.summary["final"]["accuracy"]["mean"])
