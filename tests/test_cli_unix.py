"""The command behaves like a Unix tool: results on stdout, progress on stderr, a closed pipe
ends quietly, bad output paths are one-line errors, and cheap commands do not import torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from p2pl.cli import EXIT_CLOSED_PIPE, main
from p2pl.report import round_progress

HEAVY = ("torch", "ray", "grpc", "matplotlib")


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in err and lines[0].startswith("p2pl: error: ")
    return lines[0]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("P2PL_DEBUG", None)
    return env


_IMPORTS_AFTER = """
import sys
from p2pl.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:  # --version / --help / usage errors exit from argparse
    code = stop.code
print("EXIT", code, "HEAVY", [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--version"], 0),
        (["--help"], 0),
        (["run", "--help"], 0),
        (["launch", "--help"], 0),
        (["node", "--help"], 0),
        (["certs", "--help"], 0),
        (["topology", "--help"], 0),
        (["compare", "--help"], 0),
        (["reproduce", "--help"], 0),
        (["sweep", "--help"], 0),
        (["robustness", "--help"], 0),
        (["run", "--no-such-flag"], 2),
        (["no-such-command"], 2),
        (["run", "--set", "devices=0"], 2),  # a config error
        (["run", "--set", "training.lr='fast'"], 2),
        (["topology", "--set", "devices=12"], 0),  # topology-only work
        (["launch", "--devices", "0"], 2),
    ],
)
def test_cheap_commands_do_not_import_torch_ray_or_grpc(argv: list[str], code: int, tmp_path: Path) -> None:
    script = _IMPORTS_AFTER.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"EXIT {code} HEAVY []", proc.stderr


def test_results_go_to_stdout_and_progress_lines_to_stderr(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["run", "--out", str(out), *_sets([*tiny_overrides, "rounds=3", "output.progress=true"])]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "acc" in captured.out and f"results in {out}/" in captured.out  # the table and where
    # stderr is not a terminal here: plain progress lines, one per round at 3 rounds
    lines = captured.err.strip().splitlines()
    assert [re.sub(r"acc mean .*", "", line) for line in lines] == [f"p2pl x10: round {k}/3, " for k in (1, 2, 3)]
    assert all(re.search(r"acc mean 0\.\d{3} min 0\.\d{3}, \d+\.\d s$", line) for line in lines), lines
    # --quiet: no progress at all, results still on stdout
    assert main([*args, "--quiet", "--fresh"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "results in" in captured.out


def test_plain_progress_prints_every_few_rounds_and_the_last(capsys: pytest.CaptureFixture[str]) -> None:
    with round_progress("p2pl x100", 25) as update:
        assert update is not None
        for k in range(1, 26):
            update(k, 25, {"acc_mean": 0.5, "acc_min": 0.25})
    rounds = [int(m) for m in re.findall(r"round (\d+)/25", capsys.readouterr().err)]
    assert rounds == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]
    with round_progress("x", 3, enabled=False) as update:
        assert update is None


def test_an_out_that_is_a_file_or_under_a_file_is_one_line(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "results.txt"
    file.write_text("not a directory")
    for command in ("run", "compare", "launch"):
        assert main([command, "--out", str(file), *_sets(tiny_overrides)]) == 2
        assert "is a file, not a directory" in _one_line(capsys.readouterr().err)
        assert main([command, "--out", str(file / "sub"), *_sets(tiny_overrides)]) == 2
        assert f"cannot create --out directory {file / 'sub'}" in _one_line(capsys.readouterr().err)
    assert file.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_is_one_line(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["run", "--out", str(locked), *_sets(tiny_overrides)]) == 2
        assert "not writable" in _one_line(capsys.readouterr().err)
    finally:
        locked.chmod(0o700)


def test_a_write_error_during_a_run_is_one_line_not_an_internal_error(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import p2pl.sim.simulator as simulator

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "metrics.csv"))

    monkeypatch.setattr(simulator, "run_experiment", refuse)
    assert main(["run", "--out", str(tmp_path / "run"), *_sets(tiny_overrides)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"Permission denied: {tmp_path / 'run' / 'metrics.csv'}; choose a writable location" in line


def test_png_into_a_missing_folder_is_refused_without_creating_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    assert main(["topology", "--set", "devices=10", "--png", str(missing / "x.png")]) == 2
    assert f"folder {missing} does not exist" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "no").exists()
    assert main(["topology", "--set", "devices=10", "--png", str(tmp_path)]) == 2
    assert "is a directory" in _one_line(capsys.readouterr().err)


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # The reader is gone before p2pl writes anything (it needs ~0.5 s to start): like `| head -0`.
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pl", "topology", "--set", "devices=30"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_CLOSED_PIPE
    assert err == ""


def test_topology_says_which_radius_it_chose(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "--set", "devices=10"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("topology random-geometric, radius 0.559 (automatic: ")
    assert "connected" in first
    assert main(["topology", "--set", "devices=10", "--set", "topology.radius=0.6"]) == 0
    assert capsys.readouterr().out.startswith("topology random-geometric, radius 0.6, weights uniform")


@pytest.mark.parametrize("devices", [4, 16])
def test_the_default_experiment_runs_with_few_devices(
    devices: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Few devices used to leave the default graph (radius 0.25) disconnected: now it connects."""
    args = ["run", "--quiet", "--out", str(tmp_path), *_sets([f"devices={devices}", "rounds=1"])]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["devices"] == devices and summary["edges"] >= devices - 1


def test_certificate_messages_name_the_command_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    assert main(["certs", "issue", "dev-1", "--ca", str(pki), "--out", str(tmp_path / "c")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"p2pl certs init --dir {pki}" in line and "init_ca" not in line
    assert main(["certs", "init", "--dir", str(pki)]) == 0
    capsys.readouterr()
    assert main(["certs", "init", "--dir", str(pki)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--force" in line and "force=True" not in line
    assert main(["certs", "issue", "dev-1", "--ca", str(pki), "--out", str(tmp_path / "c")]) == 0
    assert f'tls.cert_dir = "{tmp_path / "c"}"' in capsys.readouterr().out
