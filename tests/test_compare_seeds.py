"""``p2pl compare --seeds K``: every algorithm over K seeds, intervals in the table, the CI band drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pl.cli import main
from p2pl.cli.compare import figure_caption, figure_title
from p2pl.config import load_config

TINY = ["devices=6", "rounds=2", "model.hidden=[8]", "training.local_epochs=1", "topology.name=ring"]


def test_compare_over_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    sets = [a for s in TINY for a in ("--set", s)]
    args = ["compare", "--seeds", "2", "--seed", "4", "--quiet", "--out", str(out), *sets]
    assert main(args) == 0
    finals = {}
    for name in ("p2pl", "fedavg", "centralized", "local"):
        for seed in (4, 5):
            summary = json.loads((out / name / f"seed-{seed}" / "summary.json").read_text())
            assert (summary["algorithm"], summary["seed"]) == (name, seed)
            finals[name, seed] = summary["final"]["accuracy"]
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    err = capsys.readouterr().out  # results go to stdout, progress to stderr
    assert "mean ± 95% CI over 2 seeds" in err
    gap = sum(finals["p2pl", s]["mean"] - finals["fedavg", s]["mean"] for s in (4, 5)) / 2
    assert f"P2PL vs FedAvg (mean ± 95% CI over 2 seeds): mean {100 * gap:+.1f} ±" in " ".join(err.split())


def test_the_figure_says_what_was_run_and_what_the_bands_are() -> None:
    cfg = load_config(None, ["devices=50", "consensus.weights=metropolis", 'partition.scheme="dirichlet"',
                             "topology.radius=0.25"])  # fmt: skip
    title = figure_title(cfg, 3)
    for text in ("50 devices", "digits (dirichlet a=0.5)", "random-geometric r=0.25", "metropolis weights",
                 "sync on", "seeds 0-2"):  # fmt: skip
        assert text in title
    assert "seed 0" in figure_title(cfg, 1)
    assert "min-max over devices" in figure_caption(1)
    assert "95% confidence interval over seeds" in figure_caption(3)
