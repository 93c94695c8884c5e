"""Per-round measurements and the summaries computed from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def spread(values: np.ndarray, evaluated: np.ndarray | None = None) -> dict[str, float]:
    """mean / min / max across devices (the paper's claim is about *all* devices), or across the
    ``evaluated`` ones; NaN marks a device with no value this round (not evaluated under
    ``eval.devices``, or a networked device that never reached the round) and is left out."""
    v = np.asarray(values, dtype=np.float64)
    if evaluated is not None:
        v = v[evaluated]
    v = v[~np.isnan(v)] if np.isnan(v).any() and not np.isnan(v).all() else v
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def evaluated_devices(accuracy: np.ndarray) -> np.ndarray:
    """Which devices a round evaluated: the others hold NaN (a measured accuracy never is)."""
    return ~np.isnan(np.asarray(accuracy, dtype=np.float64))


@dataclass
class History:
    """Everything measured so far in a run; rows are evaluated rounds."""

    eval_rounds: list[int] = field(default_factory=list)
    accuracy: list[np.ndarray] = field(default_factory=list)  # each [N]; NaN = not evaluated
    loss: list[np.ndarray] = field(default_factory=list)
    local_accuracy: list[np.ndarray] = field(default_factory=list)  # after local training
    local_loss: list[np.ndarray] = field(default_factory=list)
    # one entry per finished round (1..k)
    consensus_distance: list[float] = field(default_factory=list)
    bytes_sent: list[np.ndarray] = field(default_factory=list)  # each [N]
    live_links: list[int] = field(default_factory=list)
    active_devices: list[int] = field(default_factory=list)
    round_time_s: list[float] = field(default_factory=list)
    train_loss: list[np.ndarray] = field(default_factory=list)  # each [N], nan where no step
    # seconds of each round spent per phase (the simulator measures them; empty where unknown)
    train_time_s: list[float] = field(default_factory=list)
    exchange_time_s: list[float] = field(default_factory=list)
    evaluate_time_s: list[float] = field(default_factory=list)
    # system model (p2pl.system, only when [system] is enabled): one entry per finished round
    system_round_s: list[float] = field(default_factory=list)  # simulated synchronous round
    system_finish_s_mean: list[float] = field(default_factory=list)  # mean device finish in it
    system_energy_j: list[np.ndarray] = field(default_factory=list)  # each [N] joules


def rounds_to_accuracy(rounds: list[int], mean_accuracy: list[float], target: float) -> int | None:
    """First evaluated round whose mean device accuracy reaches ``target`` (None if never)."""
    for r, acc in zip(rounds, mean_accuracy, strict=True):
        if acc >= target:
            return r
    return None


def oscillation(local_mean: list[float], consensus_mean: list[float]) -> float | None:
    """Mean over rounds of |mean acc after local training − mean acc after consensus|."""
    if not local_mean:
        return None
    return float(np.mean(np.abs(np.asarray(local_mean) - np.asarray(consensus_mean))))


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
