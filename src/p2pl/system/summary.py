"""One line for the console: what a run cost in simulated seconds and joules."""

from __future__ import annotations

from typing import Any


def cost_line(summary: dict[str, Any]) -> str | None:
    """``simulated 12.3 s, 45.6 J per device (mean; max 50.1), 90% in 11.5 s / 31.5 J`` or None
    when the run did not use the system model."""
    if "simulated_time_s" not in summary:
        return None
    energy = summary["energy_j_per_device"]
    seconds = summary["simulated_time_s"]
    line = f"simulated {seconds:.4g} s, {energy['mean']:.4g} J per device (mean; max {energy['max']:.4g})"
    reached = [
        f"{100 * float(t):.0f}% in {s:.4g} s / {summary['energy_to_mean_accuracy_j'][t]:.4g} J"
        for t, s in summary["time_to_mean_accuracy_s"].items()
        if s is not None
    ]
    return line + (f"; mean accuracy {', '.join(reached)}" if reached else "")
