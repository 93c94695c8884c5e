"""``p2pl sweep``: grid expansion, tidy tables with intervals over seeds, resuming after Ctrl-C."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pl.cli import main
from p2pl.errors import P2PLError
from p2pl.sweeps import FAILED, RAN, REUSED, Axis, expand, parse_grid, run_sweep, summary_rows

TINY = ["devices=6", "rounds=2", "model.hidden=[8]", "training.local_epochs=1", 'topology.name="ring"',
        "output.progress=false"]  # fmt: skip


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_grid_values_split_on_top_level_commas_only() -> None:
    axes = parse_grid(["model.hidden=[8,8],[16]", 'topology.name=ring,"grid"', "training.lr=0.1"])
    assert axes == [Axis("model.hidden", ("[8,8]", "[16]")), Axis("topology.name", ("ring", '"grid"')),
                    Axis("training.lr", ("0.1",))]  # fmt: skip
    for bad in ("topology.name", "=ring", "topology.name=", "topology.name=ring,"):
        with pytest.raises(P2PLError, match="--grid expects KEY=V1,V2"):
            parse_grid([bad])
    with pytest.raises(P2PLError, match="given twice"):
        parse_grid(["seed=1", "seed=2"])


def test_expand_is_every_setting_times_every_seed(tmp_path: Path) -> None:
    grid = parse_grid(["topology.name=ring,complete", "model.hidden=[8],[8,8]"])
    jobs = expand(None, [*TINY, "seed=5"], grid, 3, tmp_path)
    assert len(jobs) == 12 and len({j.directory for j in jobs}) == 12
    assert sorted({j.seed for j in jobs}) == [5, 6, 7]  # the config's seed and the next ones
    job = next(j for j in jobs if j.setting == {"topology.name": "complete", "model.hidden": [8, 8]} and j.seed == 6)
    assert (job.config.topology.name, job.config.model.hidden, job.config.seed) == ("complete", [8, 8], 6)
    assert job.directory == tmp_path / "topology.name=complete__model.hidden=8-8" / "seed-6"
    # every point is validated before anything runs
    with pytest.raises(P2PLError, match=r"training\.lr must be > 0"):
        expand(None, TINY, parse_grid(["training.lr=0.1,-1"]), 1, tmp_path)
    with pytest.raises(P2PLError, match="unknown config key"):
        expand(None, TINY, parse_grid(["training.lrr=0.1"]), 1, tmp_path)
    with pytest.raises(P2PLError, match="use one of the two"):
        expand(None, TINY, parse_grid(["seed=1,2"]), 2, tmp_path)
    with pytest.raises(P2PLError, match="--seeds must be a positive integer"):
        expand(None, TINY, [], 0, tmp_path)


def test_summary_rows_are_mean_and_t_interval_over_the_seeds_that_finished() -> None:
    def row(name: str, acc: float, status: str = RAN, reached: int | None = 5) -> dict[str, object]:
        out: dict[str, object] = {"topology.name": name, "status": status, "final_accuracy_mean": acc,
                                  "rounds_to_mean_accuracy_0.9": reached}  # fmt: skip
        for metric in ("final_accuracy_min", "final_accuracy_max", "final_loss_mean", "rounds_to_min_accuracy_0.9",
                       "bytes_sent_per_device", "consensus_distance_final", "oscillation", "wall_time_s"):  # fmt: skip
            out.setdefault(metric, None)
        return out

    table = [row("ring", 0.80), row("ring", 0.90, reached=None), row("ring", 0.85), row("ring", 0.1, FAILED),
             row("grid", 0.7)]  # fmt: skip
    ring, grid = summary_rows(table, ["topology.name"])
    assert (ring["seeds"], ring["failed"]) == (3, 1)
    assert ring["final_accuracy_mean_mean"] == pytest.approx(0.85)
    half = 4.302652729911275 * 0.05 / 3**0.5  # t(0.975, 2) * std / sqrt(3)
    assert ring["final_accuracy_mean_ci95_low"] == pytest.approx(0.85 - half)
    assert ring["final_accuracy_mean_ci95_high"] == pytest.approx(0.85 + half)
    assert ring["rounds_to_mean_accuracy_0.9_n"] == 2  # one seed never reached it
    assert grid["final_accuracy_mean_ci95_low"] == grid["final_accuracy_mean_mean"] == 0.7  # one seed: no width
    assert ring["oscillation_mean"] is None  # not measured: an empty cell, not a number


def test_sweep_writes_results_and_summary_and_reuses_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    first = run_sweep(out, None, TINY, parse_grid(["consensus.weights=uniform,metropolis"]), seeds=2)
    assert [o.status for o in first.outcomes] == [RAN] * 4
    table = rows(out / "results.csv")
    assert [(r["consensus.weights"], r["seed"]) for r in table] == [
        ("uniform", "0"), ("uniform", "1"), ("metropolis", "0"), ("metropolis", "1")]  # fmt: skip
    for r in table:
        summary = json.loads((out / r["run"] / "summary.json").read_text())
        assert float(r["final_accuracy_mean"]) == pytest.approx(summary["final"]["accuracy"]["mean"])
        assert int(r["rounds_done"]) == 2 and r["status"] == RAN
    summary = rows(out / "summary.csv")
    assert [s["consensus.weights"] for s in summary] == ["uniform", "metropolis"]
    assert all(s["seeds"] == "2" for s in summary)
    stamp = (out / table[0]["run"] / "summary.json").stat().st_mtime_ns
    again = run_sweep(out, None, TINY, parse_grid(["consensus.weights=uniform,metropolis"]), seeds=2)
    assert [o.status for o in again.outcomes] == [REUSED] * 4
    assert (out / table[0]["run"] / "summary.json").stat().st_mtime_ns == stamp
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["grid"] == {"consensus.weights": ["uniform", "metropolis"]} and manifest["seeds"] == [0, 1]


def test_parquet_when_pyarrow_is_there(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    run_sweep(tmp_path, None, TINY, parse_grid(["training.lr=0.05,0.1"]), seeds=1)
    table = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert [r["training.lr"] for r in table] == [0.05, 0.1]


def test_a_failing_run_is_a_row_not_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pl.sim import simulator

    real = simulator.run_experiment

    def flaky(cfg, directory, **kwargs):  # type: ignore[no-untyped-def]
        if cfg.training.lr > 0.08:
            raise RuntimeError("simulated crash")
        return real(cfg, directory, **kwargs)

    monkeypatch.setattr(simulator, "run_experiment", flaky)
    result = run_sweep(tmp_path, None, TINY, parse_grid(["training.lr=0.05,0.1"]), seeds=1)
    assert [o.status for o in result.outcomes] == [RAN, FAILED]
    table = rows(tmp_path / "results.csv")
    assert table[1]["status"] == FAILED and "simulated crash" in table[1]["error"]
    assert table[1]["final_accuracy_mean"] == ""
    assert "simulated crash" in (tmp_path / table[1]["run"] / "error.txt").read_text()


def test_cli_bad_grid_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--grid", "topology.name", "--out", str(tmp_path)]) == 2
    assert main(["sweep", "--grid", "topology.name=ring", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert main(["sweep", "--workers", "0", "--out", str(tmp_path), "--set", "devices=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "Traceback" not in "".join(err)
    assert "--grid expects KEY=V1,V2" in err[0] and "--seeds must be" in err[1] and "--workers must be" in err[2]


@pytest.mark.integration
def test_ctrl_c_then_rerun_continues_without_rerunning_finished_runs(tmp_path: Path) -> None:
    """2 settings x 3 seeds in 2 worker processes; SIGINT after the first run finishes; rerun."""
    out = tmp_path / "sweep"
    # ~1 s of training per run: SIGINT follows the first finished run within 50 ms, with 4+ runs to go
    sets = ["devices=6", "rounds=20", "model.hidden=[8]", "training.local_epochs=1", "topology.name=ring"]
    cmd = [sys.executable, "-m", "p2pl", "sweep", "--grid", "consensus.weights=uniform,metropolis", "--seeds", "3",
           "--workers", "2", "--out", str(out), *(a for s in sets for a in ("--set", s))]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/seed-*/summary.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no run finished in 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    finished = {p.parent: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")}
    assert 1 <= len(finished) < 6, "the sweep must have been stopped midway"
    assert not (out / "results.csv").exists()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    table = rows(out / "results.csv")
    assert len(table) == 6 and {r["status"] for r in table} <= {RAN, REUSED}
    status = {out / r["run"]: r["status"] for r in table}
    for directory, stamp in finished.items():
        assert status[directory] == REUSED  # never rerun ...
        assert (directory / "summary.json").stat().st_mtime_ns == stamp  # ... nor rewritten
    assert sum(s == RAN for s in status.values()) == 6 - len(finished)
    assert all(int(r["rounds_done"]) == 20 for r in table)
