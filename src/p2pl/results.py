"""The result files of a run, written atomically: metrics.csv, rounds.csv, devices.csv, summary.json."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from p2pl import atomic
from p2pl.metrics import History, evaluated_devices, finite_or_none, oscillation, rounds_to_accuracy, spread

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
    """One row per evaluated round and evaluated device (round 0 = after initialization/sync)."""
    local_by_round = _local_by_round(h)
    header = ["round", "device", "accuracy", "loss"]
    if local_by_round:
        header += ["local_accuracy", "local_loss"]
    rows: list[list[Any]] = []
    for r, acc, loss in zip(h.eval_rounds, h.accuracy, h.loss, strict=True):
        local = local_by_round.get(r)
        for d in np.flatnonzero(evaluated_devices(acc)):
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


def rounds_csv(h: History) -> str:
    """One row per round: spread of accuracy/loss (over the devices evaluated that round),
    consensus distance, bytes, links, time."""
    evals = {r: i for i, r in enumerate(h.eval_rounds)}
    local_by_round = _local_by_round(h)
    rows: list[list[Any]] = []
    elapsed = 0.0
    for r in range(len(h.round_time_s) + 1):
        row: dict[str, Any] = dict.fromkeys(ROUND_COLUMNS, "")
        row["round"] = r
        if r in evals:
            seen = evaluated_devices(h.accuracy[evals[r]])
            for metric, values in (("accuracy", h.accuracy[evals[r]]), ("loss", h.loss[evals[r]])):
                for stat, value in spread(values, seen).items():
                    row[f"{metric}_{stat}"] = _fmt(value)
        if r in local_by_round:
            row["local_accuracy_mean"] = _fmt(float(np.nanmean(local_by_round[r][0])))
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
        rows.append([row[c] for c in ROUND_COLUMNS])
    return _csv(rows, ROUND_COLUMNS)


def devices_csv(sizes: np.ndarray, histograms: np.ndarray) -> str:
    header = ["device", "samples", *(f"label_{c}" for c in range(histograms.shape[1]))]
    rows = [[d, int(sizes[d]), *(int(v) for v in histograms[d])] for d in range(len(sizes))]
    return _csv(rows, header)


def summary(h: History, facts: dict[str, Any]) -> dict[str, Any]:
    last = len(h.eval_rounds) - 1
    seen = evaluated_devices(h.accuracy[last])  # all devices, unless the run stopped early
    # nan-aware: rounds that evaluated a subset of devices (eval.devices) hold NaN for the rest
    mean_acc = [float(np.nanmean(a)) for a in h.accuracy]
    min_acc = [float(np.nanmin(a)) for a in h.accuracy]
    local_mean = [float(np.nanmean(a)) for a in h.local_accuracy]
    after_mean = mean_acc[-len(local_mean) :] if local_mean else []
    total_bytes = np.sum(h.bytes_sent, axis=0) if h.bytes_sent else np.zeros(1)
    out: dict[str, Any] = dict(facts)
    out |= {
        "rounds_done": len(h.round_time_s),
        "final": {"accuracy": spread(h.accuracy[last], seen), "loss": spread(h.loss[last], seen)},
        "best_mean_accuracy": max(mean_acc[1:] or mean_acc),
        "rounds_to_mean_accuracy": {str(t): rounds_to_accuracy(h.eval_rounds, mean_acc, t) for t in ACCURACY_TARGETS},
        "rounds_to_min_accuracy": {str(t): rounds_to_accuracy(h.eval_rounds, min_acc, t) for t in ACCURACY_TARGETS},
        "consensus_distance_final": finite_or_none(h.consensus_distance[-1] if h.consensus_distance else None),
        "bytes_sent_per_device": float(np.mean(total_bytes)) + float(facts.get("sync_bytes_per_device", 0)),
        "round_time_s_mean": float(np.mean(h.round_time_s)) if h.round_time_s else None,
        "oscillation": oscillation(local_mean, after_mean) if local_mean else None,
    }
    return out


def write_results(
    directory: Path, h: History, facts: dict[str, Any], sizes: np.ndarray, histograms: np.ndarray
) -> dict[str, Any]:
    atomic.write_text(directory / "metrics.csv", metrics_csv(h))
    atomic.write_text(directory / "rounds.csv", rounds_csv(h))
    atomic.write_text(directory / "devices.csv", devices_csv(sizes, histograms))
    result = summary(h, facts)
    atomic.write_text(directory / "summary.json", json.dumps(result, indent=2, default=_json_default) + "\n")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_summary(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "summary.json").read_text())
