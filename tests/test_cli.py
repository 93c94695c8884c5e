"""The ``p2pl`` command: run / compare / topology write their files, and every bad input is one
line on stderr with exit code 2 and no traceback (in-process, and a few as real processes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p2pl.cli import main
from p2pl.config import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("p2pl")
    return lines[0]


def test_run_writes_the_result_files(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    rc = main(["run", "--quiet", "--out", str(out), "--seed", "3", "--engine", "vectorized",
               *_sets([*tiny_overrides, "training.lr=0.1"])])  # fmt: skip
    assert rc == 0
    for name in ("config.toml", "metrics.csv", "rounds.csv", "devices.csv", "summary.json"):
        assert (out / name).is_file(), name
    cfg = load_config(out / "config.toml")
    assert (cfg.seed, cfg.training.lr, cfg.devices) == (3, 0.1, 10)  # --seed and --set applied
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == 10 and summary["rounds"] == 2
    assert "results in" in capsys.readouterr().out  # results on stdout


def test_run_from_a_config_file_with_overrides_and_fresh(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "exp.toml"
    config.write_text('algorithm = "fedavg"\n[training]\noptimizer = "adam"\nlr = 0.01\n')
    out = tmp_path / "out"
    assert main(["run", str(config), "--quiet", "--out", str(out), *_sets(tiny_overrides)]) == 0
    cfg = load_config(out / "config.toml")
    assert (cfg.algorithm, cfg.training.optimizer, cfg.devices) == ("fedavg", "adam", 10)
    # another config into the same directory is refused, --fresh starts over
    capsys.readouterr()
    args = ["run", str(config), "--quiet", "--out", str(out), *_sets([*tiny_overrides, "training.lr=0.02"])]
    assert main(args) == 2
    assert "different config" in _one_line_error(capsys.readouterr().err)
    assert main([*args, "--fresh"]) == 0
    assert load_config(out / "config.toml").training.lr == 0.02


def test_compare_writes_four_runs_and_a_plot(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--quiet", "--out", str(out), *_sets([*tiny_overrides, "rounds=3"])]) == 0
    for name in ("p2pl", "fedavg", "centralized", "local"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["algorithm"] == name and summary["rounds"] == 3
    assert (out / "accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert "P2PL vs FedAvg" in capsys.readouterr().out


def test_topology_prints_stats_and_draws(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "graph.png"
    assert main(["topology", "--png", str(png), *_sets([*tiny_overrides, "topology.name=ring"])]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert "topology ring" in printed and "diameter" in printed.lower()
    edges = tmp_path / "edges.txt"
    edges.write_text("# a triangle and a tail\n0 1\n1 2\n2 0\n2 3\n")
    assert main(["topology", "--set", "devices=4", "--set", "topology.name='edge-list'",
                 "--set", f"topology.path='{edges}'", "--set", "consensus.weights='data-size'"]) == 0  # fmt: skip
    assert "edge-list" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# bad input: exit code 2, exactly one line on stderr, no traceback


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    garbled = tmp_path / "garbled.toml"
    garbled.write_text("devices = [\n[training\n")
    bad_edges = tmp_path / "bad_edges.txt"
    bad_edges.write_text("0 1\n1 two\n")
    far_edges = tmp_path / "far_edges.txt"
    far_edges.write_text("0 1\n1 99\n")
    return {"garbled": garbled, "bad_edges": bad_edges, "far_edges": far_edges, "missing": tmp_path / "nope.toml"}


BAD_SETS = {
    "unknown dataset": (["data.name='imagenet'"], "unknown dataset 'imagenet'"),
    "unknown model": (["model.name='vgg'"], "unknown model 'vgg'"),
    "unknown topology": (["topology.name='hypercube'"], "unknown topology 'hypercube'"),
    "unknown weights": (["consensus.weights='equal'"], "unknown weights 'equal'"),
    "unknown optimizer": (["training.optimizer='rmsprop'"], "unknown optimizer 'rmsprop'"),
    "unknown algorithm": (["algorithm='flood'"], "unknown algorithm 'flood'"),
    "unknown partition": (["partition.scheme='zipf'"], "unknown partition scheme 'zipf'"),
    "zero devices": (["devices=0"], "devices must be a positive integer"),
    "zero rounds": (["rounds=0"], "rounds must be a positive integer"),
    "zero batch": (["training.batch_size=0"], "training.batch_size must be a positive integer"),
    "zero epochs": (["training.local_epochs=0"], "training.local_epochs must be a positive integer"),
    "negative lr": (["training.lr=-0.1"], "training.lr must be > 0"),
    "zero lr": (["training.lr=0"], "training.lr must be > 0"),
    "zero alpha": (["partition.scheme='dirichlet'", "partition.alpha=0"], "partition.alpha must be > 0"),
    "negative alpha": (["partition.alpha=-2"], "partition.alpha must be > 0"),
    "disconnected": (["topology.radius=0.05"], "disconnected.*topology.radius"),
    "too many devices": (["devices=5000"], "5000 devices but only 1437 training samples"),
    "unknown key": (["training.learning_rate=0.1"], "unknown config key 'training.learning_rate'.*valid keys"),
    "bad type": (["devices='many'"], "devices must be an integer"),
    "bad --set": (["devices"], "--set expects section.key=value"),
    "bad factory": (["model.factory='nocolon'"], "model.factory must look like"),
    "missing edge list": (["topology.name='edge-list'", "topology.path='/nonexistent/edges.txt'"], "not found"),
}


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_bad_settings_exit_2_with_one_line(
    case: str, tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    overrides, message = BAD_SETS[case]
    rc = main(["run", "--quiet", "--out", str(tmp_path / "out"), *_sets([*tiny_overrides, *overrides])])
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith("p2pl: error: ")
    assert re.search(message, line), line


@pytest.mark.parametrize(
    ("file_case", "message"),
    [
        ("garbled", "is not valid TOML"),
        ("missing", "not found; pass an existing TOML file"),
    ],
)
def test_bad_config_files(file_case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _bad_files(tmp_path)[file_case]
    assert main(["run", str(path), "--quiet", "--out", str(tmp_path / "out")]) == 2
    assert message in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("file_case", "message"),
    [("bad_edges", r"bad_edges.txt:2: .*'1 two'"), ("far_edges", "99")],
)
def test_bad_edge_list_files(
    file_case: str, message: str, tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _bad_files(tmp_path)[file_case]
    overrides = [*tiny_overrides, "topology.name='edge-list'", f"topology.path='{path}'"]
    for command in (["run", "--quiet", "--out", str(tmp_path / "out")], ["topology"]):
        assert main([*command, *_sets(overrides)]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert re.search(message, line), line


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["fly"], ["run", "--seed", "x"], []])
def test_usage_errors_are_one_line_too(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    _one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# real processes


def _p2pl_command() -> list[str]:
    exe = shutil.which("p2pl")
    return [exe] if exe else [sys.executable, "-c", "from p2pl.cli import entry; entry()"]


def _run_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("P2PL_DEBUG", None)
    return subprocess.run([*_p2pl_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.integration
def test_run_as_a_real_process(tmp_path: Path, tiny_overrides: list[str]) -> None:
    proc = _run_process(["run", "--quiet", "--out", "out", *_sets(tiny_overrides)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("config.toml", "metrics.csv", "rounds.csv", "devices.csv", "summary.json"):
        assert (tmp_path / "out" / name).is_file(), name


@pytest.mark.integration
def test_bad_inputs_as_real_processes(tmp_path: Path, tiny_overrides: list[str]) -> None:
    files = _bad_files(tmp_path)
    cases = [
        (["run", str(files["garbled"])], "is not valid TOML"),
        (["run", *_sets([*tiny_overrides, "topology.radius=0.05"])], "disconnected"),
        (["topology", *_sets(["topology.name='edge-list'", f"topology.path='{files['bad_edges']}'"])], "1 two"),
    ]
    for args, message in cases:
        proc = _run_process([*args, "--quiet"] if args[0] == "run" else args, tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in _one_line_error(proc.stderr), proc.stderr
