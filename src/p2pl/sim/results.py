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


def metrics_csv(h: History) -> str:
    """One row per evaluated round and device (round 0 = after initialization/sync)."""
    has_local = bool(h.local_accuracy)
    header = ["round", "device", "accuracy", "loss"] + (["local_accuracy", "local_loss"] if has_local else [])
    rows: list[list[Any]] = []
    local_by_round = dict(zip(h.eval_rounds[1:], zip(h.local_accuracy, h.local_loss, strict=True), strict=False))
    for r, acc, loss in zip(h.eval_rounds, h.accuracy, h.loss, strict=True):
        local = local_by_round.get(r) if has_local else None
        for d in range(len(acc)):
            row: list[Any] = [r, d, _fmt(acc[d]), _fmt(loss[d])]
            if has_local:
                row += [_fmt(local[0][d]), _fmt(local[1][d])] if local is not None else ["", ""]
            rows.append(row)
    return _csv(rows, header)


def rounds_csv(h: History) -> str:
    """One row per round: spread of accuracy/loss, consensus distance, bytes, links, time."""
    evals = {r: i for i, r in enumerate(h.eval_rounds)}
    header = ["round", "accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean", "loss_min", "loss_max",
              "local_accuracy_mean", "consensus_distance", "bytes_sent_mean", "bytes_sent_total",
              "live_links", "active_devices", "train_loss_mean", "wall_time_s"]  # fmt: skip
    rows: list[list[Any]] = []
    elapsed = 0.0
    has_local = bool(h.local_accuracy)
    for r in range(0, len(h.round_time_s) + 1):
        i = evals.get(r)
        acc = spread(h.accuracy[i]) if i is not None else None
        loss = spread(h.loss[i]) if i is not None else None
        local = ""
        if has_local and i is not None and r > 0:
            local = _fmt(float(np.mean(h.local_accuracy[i - 1])))
        if r == 0:
            rows.append([0, *(_fmt(v) for v in acc.values()), *(_fmt(v) for v in loss.values()), "", "", "", "",
                         "", "", "", 0.0] if acc and loss else [0] + [""] * 14)  # fmt: skip
            continue
        k = r - 1
        elapsed += h.round_time_s[k]
        sent = h.bytes_sent[k]
        train = h.train_loss[k]
        rows.append([
            r,
            *((_fmt(v) for v in acc.values()) if acc else [""] * 3),
            *((_fmt(v) for v in loss.values()) if loss else [""] * 3),
            local,
            _fmt(h.consensus_distance[k]),
            _fmt(float(sent.mean())),
            int(sent.sum()),
            h.live_links[k],
            h.active_devices[k],
            _fmt(float(np.nanmean(train))) if np.isfinite(train).any() else "nan",
            f"{elapsed:.3f}",
        ])  # fmt: skip
    return _csv(rows, header)


def devices_csv(sizes: np.ndarray, histograms: np.ndarray) -> str:
    header = ["device", "samples", *(f"label_{c}" for c in range(histograms.shape[1]))]
    rows = [[d, int(sizes[d]), *(int(v) for v in histograms[d])] for d in range(len(sizes))]
    return _csv(rows, header)


def summary(h: History, facts: dict[str, Any]) -> dict[str, Any]:
    last = len(h.eval_rounds) - 1
    mean_acc = [float(np.mean(a)) for a in h.accuracy]
    min_acc = [float(np.min(a)) for a in h.accuracy]
    local_mean = [float(np.mean(a)) for a in h.local_accuracy]
    after_mean = mean_acc[-len(local_mean) :] if local_mean else []
    total_bytes = np.sum(h.bytes_sent, axis=0) if h.bytes_sent else np.zeros(1)
    out: dict[str, Any] = dict(facts)
    out |= {
        "rounds_done": len(h.round_time_s),
        "final": {"accuracy": spread(h.accuracy[last]), "loss": spread(h.loss[last])},
        "best_mean_accuracy": max(mean_acc[1:] or mean_acc),
        "rounds_to_mean_accuracy": {
            str(t): rounds_to_accuracy(h.eval_rounds, mean_acc, t) for t in ACCURACY_TARGETS
        },
        "rounds_to_min_accuracy": {
            str(t): rounds_to_accuracy(h.eval_rounds, min_acc, t) for t in ACCURACY_TARGETS
        },
        "consensus_distance_final": finite_or_none(h.consensus_distance[-1]) if h.consensus_distance else None,
        "bytes_sent_per_device": float(np.mean(total_bytes)) + float(facts.get("sync_bytes_per_device", 0.0)),
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
    return json.loads((directory / "summary.json").read_text())  # type: ignore[no-any-return]
