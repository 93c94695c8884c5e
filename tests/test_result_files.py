"""rounds.csv names its times unambiguously and carries the phase times; metrics.csv and
rounds.csv are on disk after every round, not only at the end of a run."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from p2pl.config import ExperimentConfig
from p2pl.results import ROUND_COLUMNS, SYSTEM_COLUMNS, ResultFiles, metrics_csv, rounds_csv
from p2pl.sim.simulator import run_experiment


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_rounds_csv_has_round_phase_and_elapsed_times(
    tiny_config: Callable[..., ExperimentConfig], tmp_path: Path
) -> None:
    result = run_experiment(tiny_config("rounds=4"), tmp_path)
    rows = _rows(tmp_path / "rounds.csv")
    assert list(rows[0]) == ROUND_COLUMNS and "wall_time_s" not in rows[0]
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["round_time_s"] == "" and float(rows[0]["elapsed_s"]) == 0.0
    round_times = np.array([float(r["round_time_s"]) for r in rows[1:]])
    elapsed = np.array([float(r["elapsed_s"]) for r in rows[1:]])
    np.testing.assert_allclose(elapsed, np.cumsum(round_times), atol=0.003)  # 3 decimals each
    np.testing.assert_allclose(round_times, result.history.round_time_s, atol=0.0006)
    for row in rows[1:]:
        phases = [float(row[c]) for c in ("train_time_s", "exchange_time_s", "evaluate_time_s")]
        assert all(p >= 0 for p in phases)
        assert sum(phases) <= float(row["round_time_s"]) + 0.002  # phases are parts of the round
    assert float(rows[1]["train_time_s"]) > 0
    # the per-phase totals the simulator reports are the sums of these columns
    for phase in ("train", "exchange", "evaluate"):
        total = sum(float(r[f"{phase}_time_s"]) for r in rows[1:])
        assert total == pytest.approx(result.phase_time_s[phase], abs=0.003)


def test_result_files_are_written_as_each_round_ends(
    tiny_config: Callable[..., ExperimentConfig], tmp_path: Path
) -> None:
    """What a watcher (or a crash) sees after round k: rounds 0..k in both files."""
    cfg = tiny_config("rounds=3", "eval.every=2")
    seen: list[tuple[int, int, int]] = []

    def watch(k: int, total: int, metrics: dict[str, float]) -> None:
        rounds = _rows(tmp_path / "rounds.csv")
        metric_rows = _rows(tmp_path / "metrics.csv")
        seen.append((k, len(rounds), len(metric_rows)))

    run_experiment(cfg, tmp_path, progress=watch)
    # rounds.csv: one row per round so far plus round 0; metrics.csv: 10 devices per evaluation
    # (round 0, round 2, and the last round 3)
    assert seen == [(1, 2, 10), (2, 3, 20), (3, 4, 30)]


def test_incremental_files_equal_a_render_of_the_whole_history(
    tiny_config: Callable[..., ExperimentConfig], tmp_path: Path
) -> None:
    """Rows formatted round by round are the rows of the finished run, byte for byte, including
    the local-accuracy columns that appear with the first evaluation after local training."""
    cfg = tiny_config("rounds=4", "eval.every=2", "eval.after_local=true")
    result = run_experiment(cfg, tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == metrics_csv(result.history)
    assert (tmp_path / "rounds.csv").read_text() == rounds_csv(result.history)
    assert _rows(tmp_path / "metrics.csv")[0].keys() >= {"local_accuracy", "local_loss"}
    assert ResultFiles.render(result.history) == (metrics_csv(result.history), rounds_csv(result.history))


def test_system_model_columns_are_written_round_by_round(
    tiny_config: Callable[..., ExperimentConfig], tmp_path: Path
) -> None:
    """With [system] on, its columns appear from the first costed round and the file written as
    the run went equals a render of the finished history."""
    seen: list[list[str]] = []

    def watch(k: int, total: int, metrics: dict[str, float]) -> None:
        seen.append(list(_rows(tmp_path / "rounds.csv")[0]))

    result = run_experiment(tiny_config("rounds=3", "system.enabled=true"), tmp_path, progress=watch)
    assert all(header == ROUND_COLUMNS + SYSTEM_COLUMNS for header in seen)
    assert (tmp_path / "rounds.csv").read_text() == rounds_csv(result.history)
    rows = _rows(tmp_path / "rounds.csv")
    sim = np.array([float(r["sim_round_s"]) for r in rows[1:]])
    np.testing.assert_allclose([float(r["sim_time_s"]) for r in rows[1:]], np.cumsum(sim), rtol=1e-5)
