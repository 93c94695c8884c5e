"""``p2pl robustness``: a tiny grid end to end (once, shared), the table, resume, failures, bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from p2pl.cli import main as cli_main
from p2pl.config import load_config
from p2pl.errors import P2PLError
from p2pl.robustness import grid_settings, run_grid, write_report
from p2pl.robustness import suite as S
from p2pl.robustness.grid import SCENARIOS, GridSettings, RunSpec
from p2pl.robustness.report import accuracy_table, best_rule, reading
from p2pl.sim.simulator import run_experiment

PNG = b"\x89PNG\r\n\x1a\n"
# 10 devices (one attacker), 2 rounds of 1 local epoch: a run takes about a second.
TINY = ("devices=10", "rounds=2", "training.local_epochs=1", "topology.radius=0.6")
TINY_ARGS = [w for o in TINY for w in ("--set", o)]
GRID_ARGS = ["--attacks", "scale,sync-hijack", "--rules", "mean,median", "--quiet"]
ROWS = ("none", "sync-hijack-verified", "sync-hijack-flood", "scale")


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("robustness") / "grid"
    assert cli_main(["robustness", *TINY_ARGS, *GRID_ARGS, "--out", str(out)]) == 0
    return out


def results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def final_accuracy(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(every device's last-round accuracy, honest mask) read straight from the run's files."""
    with (run / "metrics.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["round"] == "2"]
    with (run / "devices.csv").open(newline="") as handle:
        honest = np.array([r["role"] == "honest" for r in csv.DictReader(handle)])
    return np.array([float(r["accuracy"]) for r in sorted(rows, key=lambda r: int(r["device"]))]), honest


# ---------------------------------------------------------------------------------------------
# the command, end to end


def test_grid_writes_one_tidy_row_per_run_with_the_run_configs(tiny_grid: Path) -> None:
    rows = results(tiny_grid)
    assert [(r["scenario"], r["aggregation"]) for r in rows] == [(s, a) for s in ROWS for a in ("mean", "median")]
    assert {r["status"] for r in rows} == {"ran"}
    for r in rows:
        cfg = load_config(tiny_grid / r["folder"] / "config.toml")
        scenario = SCENARIOS[r["scenario"]]
        assert (cfg.adversary.attack, cfg.sync.mode, cfg.consensus.aggregation) == (
            scenario.attack, scenario.sync_mode, r["aggregation"],
        )  # fmt: skip
        assert cfg.adversary.fraction == 0.1 and cfg.devices == 10
        assert r["attackers"] == ("0" if r["scenario"] == "none" else "1")


def test_attacked_rows_match_each_runs_summary_and_deltas_use_the_same_devices(tiny_grid: Path) -> None:
    rows = {(r["scenario"], r["aggregation"]): r for r in results(tiny_grid)}
    for (scenario, rule), r in rows.items():
        run = tiny_grid / r["folder"]
        acc, honest = final_accuracy(run)
        if scenario != "none":
            summary = json.loads((run / "summary.json").read_text())["final"]["accuracy"]
            assert float(r["honest_mean"]) == pytest.approx(summary["mean"], abs=1e-6)
            assert float(r["honest_worst"]) == pytest.approx(summary["min"], abs=1e-6)
            # the attack-free run of the same rule, over the devices that are honest here
            free, _ = final_accuracy(tiny_grid / rows[("none", rule)]["folder"])
            assert float(r["delta_mean"]) == pytest.approx(acc[honest].mean() - free[honest].mean(), abs=1e-6)
            assert float(r["delta_worst"]) == pytest.approx(acc[honest].min() - free[honest].min(), abs=1e-6)
        else:
            assert honest.all() and float(r["delta_mean"]) == 0.0


def test_report_table_figure_and_reading(tiny_grid: Path) -> None:
    report = (tiny_grid / "report.md").read_text()
    rows = {(r["scenario"], r["aggregation"]): r for r in results(tiny_grid)}
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0] == "| attack | default scale | mean | median |"
    labels = [line.split(" | ")[0][2:] for line in table[1:5]]
    assert labels == [SCENARIOS[k].label for k in ROWS]
    scale_row = table[1 + ROWS.index("scale")]
    r = rows[("scale", "median")]
    expected = f"{100 * float(r['honest_mean']):.1f} / {100 * float(r['honest_worst']):.1f} ("
    assert expected in scale_row.split(" | ")[3]
    assert "## Reading" in report and "**scaling**: plain mean" in report
    # exposure, recomputed from the run's graph and its attacker
    from p2pl.graph.topology import build_topology

    cfg = load_config(tiny_grid / "runs" / "scale" / "mean" / "config.toml")
    edges = np.asarray(build_topology(cfg.topology, cfg.devices, cfg.seed).edges)
    _, honest = final_accuracy(tiny_grid / "runs" / "scale" / "mean")
    (attacker,) = np.flatnonzero(~honest)
    hearing = len({int(v) for u, v in edges if u == attacker} | {int(u) for u, v in edges if v == attacker})
    assert f"**Exposure** (base graph): {hearing} of 9 honest devices hear an attacker" in report
    assert "--attacks scale,sync-hijack" in report  # the command that made it
    assert (tiny_grid / "robustness.png").read_bytes().startswith(PNG)
    assert "(robustness.png)" in report


def test_rerun_reuses_finished_runs_and_reruns_only_the_missing_one(
    tiny_grid: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = results(tiny_grid)
    (tiny_grid / "runs" / "scale" / "median" / "summary.json").unlink()
    assert cli_main(["robustness", *TINY_ARGS, *GRID_ARGS[:-1], "--out", str(tiny_grid)]) == 0
    log = capsys.readouterr().err
    assert "scale/median: ran" in log and log.count(": reused") == len(before) - 1
    after = results(tiny_grid)
    assert {r["status"] for r in after if r["folder"] != "runs/scale/median"} == {"reused"}
    # same config and seed: the rerun run gives the same numbers
    assert [r["honest_mean"] for r in after] == [r["honest_mean"] for r in before]


# ---------------------------------------------------------------------------------------------
# one run: resume, stale folders, failures


def tiny_settings(attacks: str = "scale", rules: str = "mean") -> GridSettings:
    return grid_settings(None, list(TINY), attacks=attacks, rules=rules)


def test_an_interrupted_run_resumes_and_a_stale_folder_is_rerun(tmp_path: Path) -> None:
    settings = tiny_settings()
    spec = RunSpec(SCENARIOS["scale"], "mean")
    cfg = settings.config(spec)
    run_experiment(cfg, tmp_path / "a", stop_after=1)  # interrupted after round 1
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["rounds_done"] == 1
    assert S.execute(cfg, tmp_path / "a", fresh=False) == (S.RAN, None)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["rounds_done"] == 2
    assert S.execute(cfg, tmp_path / "a", fresh=False) == (S.REUSED, None)
    # a folder holding another config's run (another seed) is rerun, not reported
    other = load_config(None, [*TINY, "seed=7"])
    run_experiment(other, tmp_path / "b")
    assert S.execute(cfg, tmp_path / "b", fresh=False) == (S.RAN, None)
    assert load_config(tmp_path / "b" / "config.toml").seed == cfg.seed


def test_a_failing_run_is_reported_and_the_grid_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import p2pl.sim.simulator as simulator

    real = simulator.run_experiment

    def flaky(cfg, directory, **kwargs):  # type: ignore[no-untyped-def]
        if cfg.adversary.attack == "scale" and cfg.consensus.aggregation == "median":
            raise RuntimeError("simulated crash\nwith two lines")
        return real(cfg, directory, **kwargs)

    monkeypatch.setattr(simulator, "run_experiment", flaky)
    result = run_grid(tmp_path, tiny_settings(rules="mean,median"))
    assert [o.status for o in result.outcomes.values()] == ["ran", "ran", "ran", "failed"]
    failed = result.failures[0]
    assert failed.error == "RuntimeError: simulated crash with two lines"
    assert "Traceback" in (tmp_path / "runs" / "scale" / "median" / "error.txt").read_text()
    report = write_report(result).read_text()
    assert "| scaling | 1e+06 | " in report and report.count("failed") >= 2
    assert "`runs/scale/median/`: RuntimeError: simulated crash with two lines" in report
    row = next(r for r in results(tmp_path) if r["folder"] == "runs/scale/median")
    assert row["status"] == "failed" and row["honest_mean"] == "" and "simulated crash" in row["error"]


def test_worker_processes_give_the_same_numbers(tiny_grid: Path, tmp_path: Path) -> None:
    result = run_grid(tmp_path, tiny_settings(), workers=2)
    write_report(result)
    parallel = {(r["scenario"], r["aggregation"]): r["honest_mean"] for r in results(tmp_path)}
    serial = {(r["scenario"], r["aggregation"]): r["honest_mean"] for r in results(tiny_grid)}
    assert parallel == {k: serial[k] for k in parallel} and len(parallel) == 2


# ---------------------------------------------------------------------------------------------
# settings and the reading


def test_grid_settings_defaults_aliases_and_the_users_attackers() -> None:
    s = grid_settings(None, [])
    assert (s.base.devices, s.base.data.name, s.base.topology.name) == (100, "digits", "random-geometric")
    assert s.base.adversary.fraction == 0.1 and s.base.adversary.placement == "random"
    assert [x.key for x in s.scenarios] == [k for k in SCENARIOS if k != "data-size"]
    assert len(s.specs()) == 9 * 5
    s = grid_settings(None, ["adversary.count=3"], quick=True, attacks="alie", rules="median")
    assert (s.base.adversary.count, s.base.adversary.fraction, s.base.devices) == (3, 0.0, 40)
    assert [x.key for x in s.scenarios] == ["none", "alie"]  # the attack-free row is always there
    s = grid_settings(None, ["devices=60"], quick=True, attacks="sync-hijack")
    assert s.base.devices == 60  # --set wins over --quick
    assert [x.key for x in s.scenarios] == ["none", "sync-hijack-verified", "sync-hijack-flood"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attacks": "scale,bogus"}, "unknown attack 'bogus'"),
        ({"rules": "krum"}, "unknown rule 'krum'"),
        ({"overrides": ["algorithm=fedavg"]}, "runs P2PL's gossip"),
        ({"overrides": ["adversary.fraction=2"]}, "adversary.fraction must be in [0, 1)"),
        ({"overrides": ["devices=9"]}, "adversary.fraction 0.1 of 9 devices is no attacker"),
    ],
)
def test_grid_settings_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(P2PLError, match=re.escape(message)):
        grid_settings(None, **kwargs)


def fake_result(accuracy: dict[tuple[str, str], tuple[float, float]]) -> S.GridResult:
    """A grid whose runs' honest (mean, worst) are given; 4 devices, device 3 attacks."""
    settings = grid_settings(None, [], attacks="scale", rules="mean,median")
    outcomes = {}
    for spec in settings.specs():
        mean, worst = accuracy[(spec.scenario.key, spec.rule)]
        honest = np.array([True, True, True, spec.scenario.key == "none"])
        final = np.array([worst, 2 * mean - worst, mean, 0.0 if spec.scenario.key != "none" else mean])
        if spec.scenario.key == "none":
            final[3] = 0.99  # a device that attacks elsewhere: never counted, even when honest here
        outcomes[spec.key] = S.RunOutcome(spec, Path(spec.key), S.RAN, 1.0, None, S.Measured({}, final, honest))
    return S.GridResult(Path("."), settings, outcomes, 1.0)


def test_reading_names_collapse_best_rule_and_cost() -> None:
    result = fake_result({
        ("none", "mean"): (0.95, 0.93), ("none", "median"): (0.93, 0.92),
        ("scale", "mean"): (0.20, 0.05), ("scale", "median"): (0.92, 0.89),
    })  # fmt: skip
    assert result.honest_accuracy("none", "mean") == pytest.approx((0.95, 0.93))
    lines = reading(result)
    assert lines[0] == ("**scaling**: plain mean -75.0 / -88.0 pts (collapses); "
                        "best robust rule **median** -1.0 / -3.0 pts (holds).")  # fmt: skip
    assert lines[1] == "**Without attack**, against plain mean (mean accuracy, pts): median -2.0 (costs more than 1.5)."
    assert best_rule(result, "scale", ["mean", "median"]) == "median"
    table = accuracy_table(result)
    assert "| scaling | 1e+06 | 20.0 / 5.0 (-75.0 / -88.0) | 92.0 / 89.0 (-1.0 / -3.0) |" in table


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ["--attacks", "nope"],
        ["--workers", "0"],
        ["--set", "data.name=nope"],  # caught before any run starts, not as a grid of failures
        ["--set", "devices=ten"],
        [str(tmp_path / "missing.toml")],
    ]
    for extra in cases:
        code = cli_main(["robustness", *TINY_ARGS, "--quiet", "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2, extra
        assert len(err.splitlines()) == 1 and err.startswith("p2pl: error: "), err
    assert not (tmp_path / "out" / "runs").exists()
