"""Figures of the system model: accuracy against simulated seconds and joules; the edge crossover.

Curves are read back from a run's ``rounds.csv`` (its system columns), so a figure can be drawn
from any finished run, fresh or reused, and ``p2pl compare`` needs only one call.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pl import atomic


@dataclass(frozen=True)
class CostCurves:
    """Per evaluated round: simulated seconds and mean joules per device so far, mean/min accuracy."""

    seconds: np.ndarray
    joules: np.ndarray
    mean: np.ndarray
    min: np.ndarray


def read_cost_curves(run_dir: Path) -> CostCurves | None:
    """The run's cost curves, or None if it ran without the system model (or is not there)."""
    path = Path(run_dir) / "rounds.csv"
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "sim_time_s" not in rows[0]:
        return None
    rows = [r for r in rows if r["accuracy_mean"] != ""]

    def column(name: str) -> np.ndarray:
        return np.array([float(r[name]) for r in rows], dtype=np.float64)

    return CostCurves(
        column("sim_time_s"), column("energy_j_cum_mean"), column("accuracy_mean"), column("accuracy_min")
    )


def _png(fig: object) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # type: ignore[attr-defined]
    return buf.getvalue()


def plot_accuracy_vs_cost(curves: dict[str, CostCurves], path: Path, title: str = "") -> None:
    """Two panels: mean device accuracy (solid; worst device dashed) against simulated seconds and
    against joules per device (mean over devices), both cumulative, log-scaled axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, attr, label in ((axes[0], "seconds", "simulated time (s)"),
                            (axes[1], "joules", "energy per device, mean (J)")):  # fmt: skip
        for i, (name, c) in enumerate(curves.items()):
            x = getattr(c, attr)
            keep = x > 0  # round 0 (before any training) has no cost: it cannot sit on a log axis
            ax.plot(x[keep], 100 * c.mean[keep], color=f"C{i}", label=f"{name} mean")
            ax.plot(x[keep], 100 * c.min[keep], color=f"C{i}", linestyle="--", linewidth=1, label=f"{name} min")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic.write_bytes(path, _png(fig))


def plot_compare_costs(directory: Path, names: Iterable[str]) -> Path | None:
    """``p2pl compare``'s cost figure (``DIR/cost.png``) from the runs under ``directory`` that
    used the system model; centralized training is left out (it has no devices to cost)."""
    curves = {n: c for n in names if n != "centralized" and (c := read_cost_curves(directory / n)) is not None}
    if not curves:
        return None
    path = directory / "cost.png"
    plot_accuracy_vs_cost(curves, path, "test accuracy against simulated seconds and joules")
    return path


def plot_crossover(
    rates_mbps: np.ndarray,
    fedavg: tuple[np.ndarray, np.ndarray],
    p2pl: tuple[float, float],
    bottleneck_mbps: float,
    crossover: tuple[float | None, float | None],
    path: Path,
    target: float,
) -> None:
    """FedAvg's seconds and joules to the target against the edge uplink rate, P2PL's as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    units = ("simulated seconds", "joules per device, mean")
    for ax, fed, own, cross, unit in zip(axes, fedavg, p2pl, crossover, units, strict=True):
        ax.plot(rates_mbps, fed, color="C1", label="FedAvg (edge server)")
        ax.axhline(own, color="C0", label="P2PL (no server)")
        ax.axvline(
            bottleneck_mbps, color="grey", linestyle=":", label=f"configured edge uplink {bottleneck_mbps:g} Mbit/s"
        )
        if cross is not None:
            ax.axvline(cross, color="C3", linestyle="--", label=f"FedAvg wins above {cross:.3g} Mbit/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("edge uplink rate (Mbit/s, shared by the devices)")
        ax.set_ylabel(f"{unit} to {100 * target:.0f}% mean accuracy")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic.write_bytes(path, _png(fig))
