"""The simulator (p2pl.sim.simulator.run_experiment): determinism, resume, result files."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pl.config import ExperimentConfig, load_config
from p2pl.errors import P2PLError
from p2pl.sim.simulator import run_experiment

# Intermittent links, dropout and stragglers: resuming must replay the network as well.
DYNAMIC = ["links.model='bernoulli'", "links.p_up=0.7", "links.dropout=0.1", "links.straggler_prob=0.2"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _without_times(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "round_time_s_mean")}


def test_same_config_and_seed_give_identical_numbers(tiny_config: Callable[..., ExperimentConfig]) -> None:
    cfg = tiny_config(*DYNAMIC, "partition.scheme='dirichlet'")
    a, b = run_experiment(cfg), run_experiment(cfg)
    assert torch.equal(a.params, b.params)
    for x, y in zip(a.history.accuracy, b.history.accuracy, strict=True):
        assert np.array_equal(x, y)
    assert a.history.live_links == b.history.live_links
    assert _without_times(a.summary) == _without_times(b.summary)
    other = run_experiment(replace(cfg, seed=1))
    assert not torch.equal(a.params, other.params)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_resume_gives_exactly_the_uninterrupted_run(
    optimizer: str, tiny_config: Callable[..., ExperimentConfig], tmp_path: Path
) -> None:
    cfg = tiny_config(*DYNAMIC, f"training.optimizer='{optimizer}'", "rounds=3", "eval.after_local=true")
    whole = run_experiment(cfg, tmp_path / "whole")
    part = run_experiment(cfg, tmp_path / "resumed", stop_after=1)
    assert part.summary["rounds_done"] == 1
    resumed = run_experiment(cfg, tmp_path / "resumed")
    assert torch.equal(whole.params, resumed.params)
    assert (tmp_path / "whole/metrics.csv").read_text() == (tmp_path / "resumed/metrics.csv").read_text()
    strip = [{k: v for k, v in row.items() if not k.endswith("_s")} for row in _rows(tmp_path / "whole/rounds.csv")]
    again = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in _rows(tmp_path / "resumed/rounds.csv")]
    assert strip == again
    assert _without_times(whole.summary) == _without_times(resumed.summary)
    # a finished run resumes to itself without training again
    assert torch.equal(run_experiment(cfg, tmp_path / "whole").params, whole.params)


def test_checkpoint_of_another_config_is_refused_unless_fresh(
    tiny_config: Callable[..., ExperimentConfig], tmp_path: Path
) -> None:
    cfg = tiny_config("rounds=1")
    run_experiment(cfg, tmp_path)
    other = replace(cfg, training=replace(cfg.training, lr=0.01))
    with pytest.raises(P2PLError, match=r"holds a run of a different config.*--fresh"):
        run_experiment(other, tmp_path)
    fresh = run_experiment(other, tmp_path, resume=False)
    assert fresh.summary["rounds_done"] == 1
    # the output location and progress display are not part of the run's identity
    moved = replace(other, output=replace(other.output, dir="elsewhere", progress=True))
    run_experiment(moved, tmp_path)


def test_garbled_checkpoint_is_a_clear_error(tiny_config: Callable[..., ExperimentConfig], tmp_path: Path) -> None:
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(P2PLError, match=r"checkpoint .* is unreadable.*delete it"):
        run_experiment(tiny_config(), tmp_path)


def test_result_files(tiny_config: Callable[..., ExperimentConfig], tmp_path: Path) -> None:
    cfg = tiny_config("rounds=3", "eval.every=2")
    result = run_experiment(cfg, tmp_path)
    for name in ("config.toml", "metrics.csv", "rounds.csv", "devices.csv", "summary.json", "checkpoint.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries

    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("algorithm", "devices", "rounds", "final", "sync_steps", "wall_time_s"):
        assert key in summary, key
    assert (summary["algorithm"], summary["devices"], summary["rounds"]) == ("p2pl", 10, 3)
    for metric in ("accuracy", "loss"):
        spread = summary["final"][metric]
        assert set(spread) >= {"mean", "min", "max"}
        assert spread["min"] <= spread["mean"] <= spread["max"]
    assert summary["final"]["accuracy"]["mean"] == pytest.approx(float(result.history.accuracy[-1].mean()))
    assert isinstance(summary["sync_steps"], int) and summary["sync_steps"] >= 1
    assert summary["wall_time_s"] > 0

    rows = _rows(tmp_path / "metrics.csv")
    assert list(rows[0])[:4] == ["round", "device", "accuracy", "loss"]
    assert result.history.eval_rounds == [0, 2, 3]  # every 2 rounds, and always the last
    assert [(int(r["round"]), int(r["device"])) for r in rows] == [(k, d) for k in (0, 2, 3) for d in range(10)]
    last = [float(r["accuracy"]) for r in rows if r["round"] == "3"]
    assert np.allclose(last, result.history.accuracy[-1], atol=1e-5)

    assert [int(r["round"]) for r in _rows(tmp_path / "rounds.csv")] == [0, 1, 2, 3]
    devices = _rows(tmp_path / "devices.csv")
    assert [int(d["samples"]) for d in devices] == result.experiment.setting.data_sizes.tolist()

    assert load_config(tmp_path / "config.toml") == cfg  # config.toml round-trips


def test_no_out_dir_writes_nothing(
    tiny_config: Callable[..., ExperimentConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_experiment(tiny_config("rounds=1"))
    assert list(tmp_path.iterdir()) == []
    assert result.summary["rounds_done"] == 1


def test_progress_callback_sees_every_round(tiny_config: Callable[..., ExperimentConfig]) -> None:
    seen: list[tuple[int, int]] = []
    run_experiment(tiny_config("rounds=3"), progress=lambda k, total, m: seen.append((k, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_user_model_factory_runs_end_to_end(
    tiny_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.syspath_prepend(str(request.path.parent))
    cfg = tiny_config("model.factory='user_models:small_tanh_mlp'", "rounds=1")
    vec = run_experiment(cfg)
    assert vec.summary["model"] == "user_models:small_tanh_mlp"
    assert vec.summary["training_strategy"] == "vmap"
    assert vec.summary["parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    ref = run_experiment(replace(cfg, engine="reference"))
    assert float((vec.params - ref.params).abs().max()) <= 1e-5
    with pytest.raises(P2PLError, match=r"model.factory must look like"):
        run_experiment(tiny_config("model.factory='user_models'"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.name='imagenet'"], "unknown dataset 'imagenet'"),
        (["model.name='vgg'"], "unknown model 'vgg'"),
        (["topology.name='hypercube'"], "unknown topology 'hypercube'"),
        (["consensus.weights='equal'"], "unknown weights 'equal'"),
        (["training.optimizer='rmsprop'"], "unknown optimizer 'rmsprop'"),
        (["engine='gpu'"], "unknown engine 'gpu'"),
        (["topology.radius=0.05"], "disconnected.*increase topology.radius"),
        (["devices=5000"], "5000 devices but only 1437 training samples"),
    ],
)
def test_bad_experiments_raise_p2pl_errors(
    overrides: list[str], message: str, tiny_config: Callable[..., ExperimentConfig]
) -> None:
    with pytest.raises(P2PLError, match=message):
        run_experiment(tiny_config(*overrides))
