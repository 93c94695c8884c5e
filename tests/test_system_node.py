"""The system model against reality: ``p2pl launch`` with throttled links, predicted vs measured."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from p2pl.cli import main as cli
from p2pl.config import load_config
from p2pl.experiment import build_experiment
from p2pl.graph.links import RoundNetwork
from p2pl.node import checkpoint
from p2pl.system.model import SystemModel

THROTTLE_MBPS = 0.1  # ~1.6 s per 20 kB model message: the exchange dominates, as on a slow radio
OVERRIDES = [
    "devices=4", "rounds=5", "topology.name='ring'", "model.hidden=[64]", "training.local_epochs=2",
    "eval.every=5", "output.progress=false", "system.enabled=true", "system.link_model='fixed'",
    f"system.link_rate_mbps={THROTTLE_MBPS}",
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_predicted_round_time_matches_throttled_nodes(tmp_path: Path) -> None:
    """4 real node processes on a ring, sends paced at 0.1 Mbit/s per link: the system model,
    given each node's measured training speed and the bytes it really sent, predicts the measured
    round time (training + exchange, the slowest node) within 25 %."""
    out = tmp_path / "run"
    args = ["launch", "--out", str(out), "--quiet", "--timeout", "240", "--throttle-mbps", str(THROTTLE_MBPS)]
    for o in OVERRIDES:
        args += ["--set", o]
    assert cli(args) == 0
    cfg = load_config(None, OVERRIDES)
    exp = build_experiment(cfg)
    model = SystemModel.for_experiment(exp)
    ids = json.loads((out / "launch.json").read_text())["devices"]
    hist = [checkpoint.load(out / "nodes" / dev).history for dev in ids]  # type: ignore[union-attr]
    compute = np.array([h.compute_s for h in hist])  # [N, K]
    comm = np.array([h.comm_s for h in hist])
    sent = np.array([h.bytes_sent for h in hist])
    assert compute.shape == (4, cfg.rounds) and (comm > 0).all()
    # Calibrate each device's FLOP/s from its own measured training time (the part the test does
    # not control); the exchange is then predicted from the bytes and the link rate alone.
    train_flops, _ = model.training(np.ones(4))
    model.devices = dataclasses.replace(model.devices, flops=train_flops / np.median(compute, 1))
    edges = exp.topology.edges
    predicted, measured = [], []
    for k in range(1, cfg.rounds):  # round 1 starts right after sync, at staggered times
        net = RoundNetwork(k + 1, edges, np.ones(4, bool), np.ones(4), True, None, edges)
        cost = model.cost(net, sent[:, k])
        predicted.append(cost.round_s)
        measured.append(float((compute[:, k] + comm[:, k]).max()))
    ratio = float(np.mean(predicted) / np.mean(measured))
    print(f"predicted {np.mean(predicted):.3f} s, measured {np.mean(measured):.3f} s per round (ratio {ratio:.3f})")
    assert 0.75 <= ratio <= 1.25
