"""The result files of a run, written atomically: metrics.csv, rounds.csv, devices.csv, summary.json."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from p2pl import atomic
from p2pl.metrics import History, finite_or_none, oscillation, rounds_to_accuracy, spread

ACCURACY_TARGETS = (0.8, 0.9)


def _csv(rows: list[list[Any]], header: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.6g}"


def _local_by_round(h: History) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Accuracy/loss after local training, keyed by round (evaluated rounds after round 0)."""
    if not h.local_accuracy:
        return {}
    pairs = zip(h.local_accuracy, h.local_loss, strict=True)
    return dict(zip(h.eval_rounds[1:], pairs, strict=False))


def metrics_csv(h: History) -> str:
    """One row per evaluated round and device (round 0 = after initialization/sync)."""
    local_by_round = _local_by_round(h)
    header = ["round", "device", "accuracy", "loss"]
    if local_by_round:
        header += ["local_accuracy", "local_loss"]
    rows: list[list[Any]] = []
    for r, acc, loss in zip(h.eval_rounds, h.accuracy, h.loss, strict=True):
        local = local_by_round.get(r)
        for d in range(len(acc)):
            row: list[Any] = [r, d, _fmt(acc[d]), _fmt(loss[d])]
            if local_by_round:
                row += [_fmt(local[0][d]), _fmt(local[1][d])] if local is not None else ["", ""]
            rows.append(row)
    return _csv(rows, header)


ROUND_COLUMNS = [
    "round", "accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean", "loss_min", "loss_max",
    "local_accuracy_mean", "consensus_distance", "bytes_sent_mean", "bytes_sent_total", "live_links",
    "active_devices", "train_loss_mean", "wall_time_s",
]  # fmt: skip


# The system model's columns (p2pl.system; only when [system] is enabled): the simulated round,
# the mean device's finish in it, simulated time so far, joules per device in the round (mean,
# max, all devices) and so far (mean and max device).
SYSTEM_COLUMNS = [
    "sim_round_s", "sim_device_s_mean", "sim_time_s", "energy_j_mean", "energy_j_max", "energy_j_total",
    "energy_j_cum_mean", "energy_j_cum_max",
]  # fmt: skip


def _system_cumulative(h: History) -> tuple[np.ndarray, np.ndarray]:
    """(simulated seconds, [rounds + 1, N] joules per device) up to the end of each round 0..K."""
    seconds = np.concatenate([[0.0], np.cumsum(h.system_round_s)])
    n = len(h.system_energy_j[0]) if h.system_energy_j else 0
    joules = (
        np.concatenate([np.zeros((1, n)), np.cumsum(np.stack(h.system_energy_j), axis=0)]) if n else np.zeros((1, 0))
    )
    return seconds, joules


def _system_row(h: History, r: int, seconds: np.ndarray, joules: np.ndarray) -> dict[str, Any]:
    row: dict[str, Any] = {"sim_time_s": _fmt(seconds[r])}
    if r > 0:
        energy = h.system_energy_j[r - 1]
        row |= {
            "sim_round_s": _fmt(h.system_round_s[r - 1]),
            "sim_device_s_mean": _fmt(h.system_finish_s_mean[r - 1]),
            "energy_j_mean": _fmt(float(energy.mean())),
            "energy_j_max": _fmt(float(energy.max())),
            "energy_j_total": _fmt(float(energy.sum())),
        }
    row |= {"energy_j_cum_mean": _fmt(float(joules[r].mean())), "energy_j_cum_max": _fmt(float(joules[r].max()))}
    return row


def honest_only(values: np.ndarray, honest: np.ndarray | None) -> np.ndarray:
    """The values of honest devices (all values when the run had no attackers)."""
    return values if honest is None or len(honest) != len(values) else values[honest]


def rounds_csv(h: History, honest: np.ndarray | None = None) -> str:
    """One row per round: spread of accuracy/loss (honest devices), consensus distance, bytes,
    links, time."""
    evals = {r: i for i, r in enumerate(h.eval_rounds)}
    local_by_round = _local_by_round(h)
    rows: list[list[Any]] = []
    elapsed = 0.0
    system = bool(h.system_energy_j) and len(h.system_energy_j) == len(h.round_time_s)
    columns = ROUND_COLUMNS + (SYSTEM_COLUMNS if system else [])
    seconds, joules = _system_cumulative(h) if system else (np.zeros(0), np.zeros(0))
    for r in range(len(h.round_time_s) + 1):
        row: dict[str, Any] = dict.fromkeys(columns, "")
        row["round"] = r
        if r in evals:
            for metric, values in (("accuracy", h.accuracy[evals[r]]), ("loss", h.loss[evals[r]])):
                for stat, value in spread(honest_only(values, honest)).items():
                    row[f"{metric}_{stat}"] = _fmt(value)
        if r in local_by_round:
            row["local_accuracy_mean"] = _fmt(float(np.mean(honest_only(local_by_round[r][0], honest))))
        if r > 0:
            k = r - 1
            elapsed += h.round_time_s[k]
            train = h.train_loss[k]
            row |= {
                "consensus_distance": _fmt(h.consensus_distance[k]),
                "bytes_sent_mean": _fmt(float(h.bytes_sent[k].mean())),
                "bytes_sent_total": int(h.bytes_sent[k].sum()),
                "live_links": h.live_links[k],
                "active_devices": h.active_devices[k],
                "train_loss_mean": _fmt(float(np.nanmean(train))) if np.isfinite(train).any() else "nan",
            }
        row["wall_time_s"] = f"{elapsed:.3f}"
        if system:
            row |= _system_row(h, r, seconds, joules)
        rows.append([row[c] for c in columns])
    return _csv(rows, columns)


def devices_csv(
    sizes: np.ndarray, histograms: np.ndarray, honest: np.ndarray | None = None, status: list[str] | None = None
) -> str:
    """One row per device; ``status`` (networked runs: done, failed, missing, ...) adds a column."""
    header = ["device", "role", "samples", *(f"label_{c}" for c in range(histograms.shape[1]))]
    role = ["honest" if honest is None or honest[d] else "attacker" for d in range(len(sizes))]
    rows: list[list[Any]] = [[d, role[d], int(sizes[d]), *(int(v) for v in histograms[d])] for d in range(len(sizes))]
    if status is not None:
        header.append("status")
        rows = [[*row, s] for row, s in zip(rows, status, strict=True)]
    return _csv(rows, header)


def summary(h: History, facts: dict[str, Any], honest: np.ndarray | None = None) -> dict[str, Any]:
    """Run-level results; accuracy and loss are over honest devices only (attackers apart)."""
    last = len(h.eval_rounds) - 1
    accuracy = [honest_only(a, honest) for a in h.accuracy]
    # nan-aware: a networked run reports NaN for a device that never reached a round.
    mean_acc = [float(np.nanmean(a)) for a in accuracy]
    min_acc = [float(np.nanmin(a)) for a in accuracy]
    local_mean = [float(np.mean(honest_only(a, honest))) for a in h.local_accuracy]
    after_mean = mean_acc[-len(local_mean) :] if local_mean else []
    total_bytes = np.sum(h.bytes_sent, axis=0) if h.bytes_sent else np.zeros(1)
    out: dict[str, Any] = dict(facts)
    out |= {
        "rounds_done": len(h.round_time_s),
        "final": {"accuracy": spread(accuracy[last]), "loss": spread(honest_only(h.loss[last], honest))},
        "best_mean_accuracy": max(mean_acc[1:] or mean_acc),
        "rounds_to_mean_accuracy": {str(t): rounds_to_accuracy(h.eval_rounds, mean_acc, t) for t in ACCURACY_TARGETS},
        "rounds_to_min_accuracy": {str(t): rounds_to_accuracy(h.eval_rounds, min_acc, t) for t in ACCURACY_TARGETS},
        "consensus_distance_final": finite_or_none(h.consensus_distance[-1] if h.consensus_distance else None),
        "bytes_sent_per_device": float(np.mean(total_bytes)) + float(facts.get("sync_bytes_per_device", 0)),
        "round_time_s_mean": float(np.mean(h.round_time_s)) if h.round_time_s else None,
        "oscillation": oscillation(local_mean, after_mean) if local_mean else None,
    }
    out["attackers"] = 0
    if honest is not None and not honest.all():
        out["attackers"] = int(np.sum(~honest))
        out["final_attackers"] = {"accuracy": spread(h.accuracy[last][~honest])}
    if h.system_energy_j and len(h.system_energy_j) == len(h.round_time_s):
        out |= system_summary(h, mean_acc)
    return out


def system_summary(h: History, mean_acc: list[float]) -> dict[str, Any]:
    """Simulated seconds and joules (p2pl.system): totals, per device, and to each accuracy target."""
    seconds, joules = _system_cumulative(h)
    reached = {str(t): rounds_to_accuracy(h.eval_rounds, mean_acc, t) for t in ACCURACY_TARGETS}
    return {
        "simulated_time_s": float(seconds[-1]),
        "energy_j_per_device": spread(joules[-1]),
        "energy_j_total": float(joules[-1].sum()),
        "time_to_mean_accuracy_s": {t: None if r is None else float(seconds[r]) for t, r in reached.items()},
        "energy_to_mean_accuracy_j": {t: None if r is None else float(joules[r].mean()) for t, r in reached.items()},
    }


def write_results(
    directory: Path,
    h: History,
    facts: dict[str, Any],
    sizes: np.ndarray,
    histograms: np.ndarray,
    honest: np.ndarray | None = None,
    status: list[str] | None = None,
) -> dict[str, Any]:
    """All result files; ``honest`` (bool [N]) marks the devices that are not attackers."""
    atomic.write_text(directory / "metrics.csv", metrics_csv(h))
    atomic.write_text(directory / "rounds.csv", rounds_csv(h, honest))
    atomic.write_text(directory / "devices.csv", devices_csv(sizes, histograms, honest, status))
    result = summary(h, facts, honest)
    atomic.write_text(directory / "summary.json", json.dumps(result, indent=2, default=_json_default) + "\n")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
