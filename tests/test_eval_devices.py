"""Evaluation of a device subset on rounds before the last (``eval.devices``), and the
``device`` key (where the vectorized engine computes)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pl.config import ExperimentConfig
from p2pl.errors import P2PLError
from p2pl.sim.simulator import eval_devices, run_experiment


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_subset_is_keyed_by_seed_and_round_and_the_last_round_evaluates_all(
    tiny_config: Callable[..., ExperimentConfig],
) -> None:
    cfg = tiny_config("rounds=5", "eval.devices=4")
    picks = [eval_devices(cfg, k, 10) for k in range(5)]
    assert all(p is not None and len(p) == 4 and len(set(p.tolist())) == 4 for p in picks)
    assert all(np.array_equal(p, eval_devices(cfg, k, 10)) for k, p in enumerate(picks))  # keyed, not drawn
    assert len({tuple(p.tolist()) for p in picks if p is not None}) > 1  # a different subset per round
    assert eval_devices(cfg, 5, 10) is None  # the last round: every device
    assert eval_devices(tiny_config("eval.devices=0"), 1, 10) is None
    assert eval_devices(tiny_config("eval.devices=10"), 1, 10) is None


def test_subset_rounds_report_only_the_evaluated_devices(
    tiny_config: Callable[..., ExperimentConfig], tmp_path: Path
) -> None:
    full = run_experiment(tiny_config("rounds=3"), tmp_path / "full")
    part = run_experiment(tiny_config("rounds=3", "eval.devices=4", "eval.after_local=true"), tmp_path / "part")
    # Evaluation does not change training: the evaluated devices hold the full run's numbers.
    assert torch.equal(full.params, part.params)
    for k, (acc_full, acc_part) in enumerate(zip(full.history.accuracy, part.history.accuracy, strict=True)):
        seen = ~np.isnan(acc_part)
        assert seen.sum() == (10 if k == 3 else 4)
        assert np.array_equal(acc_part[seen], acc_full[seen])
    metrics = _rows(tmp_path / "part" / "metrics.csv")
    assert [sum(r["round"] == str(k) for r in metrics) for k in range(4)] == [4, 4, 4, 10]
    rounds = {int(r["round"]): r for r in _rows(tmp_path / "part" / "rounds.csv")}
    for k in range(4):
        acc = part.history.accuracy[k]
        evaluated = acc[~np.isnan(acc)]
        assert float(rounds[k]["accuracy_min"]) == pytest.approx(evaluated.min(), abs=1e-6)
        assert float(rounds[k]["accuracy_mean"]) == pytest.approx(evaluated.mean(), abs=1e-6)
    assert rounds[1]["local_accuracy_mean"] != "nan"
    assert part.summary["final"] == full.summary["final"]


def test_an_absent_device_is_one_clear_error(tiny_config: Callable[..., ExperimentConfig]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(P2PLError, match="no cuda device; use --set device=cpu"):
        run_experiment(tiny_config("device='cuda'"))
    with pytest.raises(P2PLError, match="unknown device 'tpu'"):
        run_experiment(tiny_config("device='tpu'"))
    with pytest.raises(P2PLError, match="reference engine runs on the CPU"):
        run_experiment(tiny_config("device='cuda'", "engine='reference'"))
    assert run_experiment(tiny_config("rounds=1", "device='cpu'")).summary["rounds_done"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_default_experiment_on_cuda_matches_the_cpu() -> None:
    from p2pl.config import load_config

    cpu = run_experiment(load_config(None, ["rounds=5", "device='cpu'", "output.progress=false"]))
    gpu = run_experiment(load_config(None, ["rounds=5", "device='cuda'", "output.progress=false"]))
    for a, b in zip(cpu.history.accuracy, gpu.history.accuracy, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    for a, b in zip(cpu.history.loss, gpu.history.loss, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cpu.params, gpu.params, rtol=1e-4, atol=1e-4)


def test_auto_picks_cuda_only_where_torch_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pl.core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(P2PLError, match="'mps' is not supported yet"):
        resolve_device("mps")
