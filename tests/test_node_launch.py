"""``p2pl launch`` and ``p2pl certs``: real node processes on loopback equal the simulator."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from p2pl.cli import main as cli
from p2pl.config import load_config
from p2pl.node import certs, checkpoint

OVERRIDES = [
    "devices=5", "rounds=3", "topology.radius=0.8", "consensus.weights='metropolis'",
    "model.hidden=[16]", "training.local_epochs=1", "output.progress=false",
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_launched_nodes_equal_the_simulator(tmp_path: Path) -> None:
    """No faults, same seeds: every node's parameters after K rounds equal the simulator's."""
    from p2pl.sim.simulator import run_experiment

    out = tmp_path / "run"
    args = ["launch", "--out", str(out), "--quiet", "--timeout", "240"]
    for o in OVERRIDES:
        args += ["--set", o]
    assert cli(args) == 0
    cfg = load_config(None, OVERRIDES)
    sim = run_experiment(cfg)
    ids = json.loads((out / "launch.json").read_text())["devices"]
    assert len(ids) == 5
    worst = 0.0
    for i, dev in enumerate(ids):
        ckpt = checkpoint.load(out / "nodes" / dev)
        assert ckpt is not None and ckpt.round == cfg.rounds
        worst = max(worst, float((ckpt.params - sim.params[i]).abs().max()))
        assert len(ckpt.history.mixed[-1]) == int((sim.experiment.topology.edges == i).any(1).sum())
    print(f"max |node - simulator| = {worst:.3g}")
    assert worst <= 1e-5
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algorithm", "devices", "rounds", "final", "sync_steps", "wall_time_s"):
        assert key in summary
    assert summary["sync_steps"] == sim.summary["sync_steps"]
    for stat in ("mean", "min", "max"):
        assert summary["final"]["accuracy"][stat] == pytest.approx(sim.summary["final"]["accuracy"][stat], abs=1e-3)
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["round", "device", "accuracy", "loss"]
    assert {(int(r["round"]), int(r["device"])) for r in rows} == {(k, d) for k in range(4) for d in range(5)}
    assert (out / "rounds.csv").exists() and (out / "devices.csv").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm='fedavg'", "runs P2PL nodes"),
        ("links.model='bernoulli'", "real links"),
        ("links.dropout=0.1", "real links"),
    ],
)
def test_launch_refuses_what_nodes_do_not_do(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
                                             message: str) -> None:  # fmt: skip
    assert cli(["launch", "--devices", "3", "--out", str(tmp_path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "nodes").exists()


def test_certs_cli_makes_a_ca_and_device_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "pki"
    assert cli(["certs", "init", "--dir", str(ca)]) == 0
    assert cli(["certs", "init", "--dir", str(ca)]) == 2  # never orphan existing certificates silently
    assert "--force" in capsys.readouterr().err
    out = tmp_path / "dev-07"
    assert cli(["certs", "issue", "dev-07", "--ca", str(ca), "--out", str(out), "--host", "10.0.0.7"]) == 0
    tls = certs.load_tls_config(out, "dev-07")
    assert tls.device_id == "dev-07" and not (out / "ca.key").exists()
    assert cli(["certs", "issue", "bad id", "--ca", str(ca), "--out", str(out)]) == 2
    assert cli(["certs", "issue", "dev-08", "--ca", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_node_cli_reports_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text('id = "dev-1"\nindex = 1\nrounds = 0\n[data]\ntrain = "a.npz"\ntest = "b.npz"\n')
    assert cli(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rounds must be a positive integer" in err and err.count("\n") == 1
    assert cli(["node", "--config", str(tmp_path / "missing.toml")]) == 2
