"""The system model's documentation figure: accuracy against simulated seconds and joules for
P2PL and for FedAvg at two edge uplink rates, from real runs (100 devices, digits).

    python benchmarks/system_figure.py --out docs/figures/system-accuracy-vs-time.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from p2pl.config import load_config
from p2pl.sim.simulator import run_experiment
from p2pl.system.plots import plot_accuracy_vs_cost, read_cost_curves

# C7's setting (p2pl reproduce): Raspberry Pi 4-class devices, Wi-Fi D2D in a 1 km square.
SYSTEM = [
    "system.enabled=true", "system.device_profile='rpi4'", "system.link_model='shannon'",
    "topology.area_m=1000.0", "topology.range_m=250.0", "system.shared_medium=true", "system.max_rate_mbps=72.2",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/system-accuracy-vs-time.png"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rates", type=float, nargs=2, default=[1.0, 100.0], help="edge uplink Mbit/s")
    args = parser.parse_args()
    runs = {"P2PL (Wi-Fi D2D)": ["algorithm='p2pl'"]}
    for rate in args.rates:
        runs[f"FedAvg, edge uplink {rate:g} Mbit/s"] = ["algorithm='fedavg'", f"system.edge_uplink_mbps={rate}"]
    curves = {}
    facts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(runs.items()):
            cfg = load_config(None, [f"rounds={args.rounds}", "output.progress=false", *SYSTEM, *extra])
            result = run_experiment(cfg, Path(tmp) / str(i))
            curve = read_cost_curves(Path(tmp) / str(i))
            assert curve is not None
            curves[name] = curve
            s = result.summary
            facts[name] = {k: s[k] for k in ("simulated_time_s", "energy_j_per_device", "time_to_mean_accuracy_s",
                                              "energy_to_mean_accuracy_j", "rounds_to_mean_accuracy")}  # fmt: skip
            facts[name]["final_mean_accuracy"] = s["final"]["accuracy"]["mean"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = f"100 Raspberry Pi 4-class devices, digits, {args.rounds} rounds: P2PL vs FedAvg through an edge server"
    plot_accuracy_vs_cost(curves, args.out, title)
    print(json.dumps(facts, indent=1))
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
