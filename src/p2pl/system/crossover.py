"""The edge-link rate at which FedAvg catches up with P2PL, by replaying FedAvg's rounds.

The system model changes nothing that is trained, so FedAvg's rounds up to a target accuracy are
fixed by its run; only their cost depends on the edge link. :func:`fedavg_cost_by_rate` replays
those rounds (who was present, how much each device trained, the bytes the run sent) through the
system model at other edge rates, the downlink scaled with the uplink (same ratio as configured).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from p2pl.config import ExperimentConfig
from p2pl.system.model import SystemModel


def fedavg_cost_by_rate(
    cfg: ExperimentConfig, rounds: int, bytes_sent_mean: np.ndarray, rates_mbps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(simulated seconds, mean joules per device) of FedAvg's first ``rounds`` rounds at each
    uplink rate. ``bytes_sent_mean[k]`` = the run's mean bytes per device in round k+1, spread
    evenly over the devices present then (FedAvg uploads one equal-size message each)."""
    from p2pl.experiment import build_experiment

    exp = build_experiment(cfg)
    model = SystemModel.for_experiment(exp)
    dynamics = exp.dynamics()
    nets = [dynamics.next_round() for _ in range(rounds)]
    n = exp.num_devices
    sent = [
        np.where(net.active, float(bytes_sent_mean[k]) * n / max(int(net.active.sum()), 1), 0.0)
        for k, net in enumerate(nets)
    ]
    base = cfg.system
    seconds, joules = np.zeros(len(rates_mbps)), np.zeros(len(rates_mbps))
    for i, rate in enumerate(rates_mbps):
        scale = float(rate) / base.edge_uplink_mbps
        model.cfg = dataclasses.replace(base, edge_uplink_mbps=float(rate),
                                        edge_downlink_mbps=base.edge_downlink_mbps * scale)  # fmt: skip
        for net, b in zip(nets, sent, strict=True):
            cost = model.cost(net, b)
            seconds[i] += cost.round_s
            joules[i] += float(cost.energy_j.mean())
    return seconds, joules


def crossing_rate(rates_mbps: np.ndarray, fedavg: np.ndarray, p2pl: float) -> float | None:
    """The lowest rate from which FedAvg's cost stays below ``p2pl`` (log-interpolated between grid
    points); None if it never gets there on the grid."""
    below = fedavg < p2pl
    if not below.any() or not below[-1]:
        return None
    first = int(np.flatnonzero(~below)[-1]) + 1 if (~below).any() else 0
    if first == 0:
        return float(rates_mbps[0])
    r0, r1 = math.log(rates_mbps[first - 1]), math.log(rates_mbps[first])
    c0, c1 = math.log(fedavg[first - 1]), math.log(fedavg[first])
    share = (math.log(p2pl) - c0) / (c1 - c0) if c1 != c0 else 1.0
    return float(math.exp(r0 + share * (r1 - r0)))
