"""System model overhead: what costing every round in seconds and joules adds to a round.

One run of P2PL at ``--devices`` (default 10,000) devices with the system model on, in its most
expensive form (Shannon rates from metre distances, shared medium, log-normal device spread);
every call of :meth:`SystemModel.cost` is timed inside the same run, so the ratio (model seconds
per round / simulator seconds per round) is measured side by side. The one-time setup (counting
the model's FLOPs, building the device arrays) is timed too. Workload as ``bench_scale.py``:
digits MLP 64, ``--samples`` samples per device, ~20 neighbours, 1 local epoch.

    OMP_NUM_THREADS=1 python benchmarks/bench_system.py --devices 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import time

from p2pl.config import load_config
from p2pl.sim.simulator import run_experiment
from p2pl.system import model as system_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    area_m = 1000.0
    radius = math.sqrt(20.0 / (math.pi * args.devices))  # ~20 neighbours on average at any N
    cfg = load_config(None, [
        f"devices={args.devices}", f"rounds={args.rounds}", "training.local_epochs=1",
        f"partition.samples_per_device={args.samples}", f"topology.area_m={area_m}",
        f"topology.range_m={radius * area_m:.3f}", "eval.every=100000", "output.checkpoint_every=0",
        "system.enabled=true", "system.link_model='shannon'", "system.shared_medium=true",
        "system.heterogeneity=0.5",
    ])  # fmt: skip

    timings: dict[str, list[float]] = {"setup": [], "cost": []}
    build, cost = system_model.SystemModel.for_experiment, system_model.SystemModel.cost

    def timed_build(exp):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = build(exp)
        timings["setup"].append(time.perf_counter() - t)
        return out

    def timed_cost(self, net, sent):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = cost(self, net, sent)
        timings["cost"].append(time.perf_counter() - t)
        return out

    system_model.SystemModel.for_experiment = timed_build  # type: ignore[method-assign,assignment]
    system_model.SystemModel.cost = timed_cost  # type: ignore[method-assign]
    result = run_experiment(cfg)
    s = result.summary
    round_s = s["round_time_s_mean"]
    cost_s = sum(timings["cost"]) / len(timings["cost"])
    out = {
        "devices": s["devices"], "edges": s["edges"], "rounds": s["rounds_done"], "round_s": round_s,
        "system_cost_s_per_round": cost_s, "system_share_of_round": cost_s / round_s,
        "system_setup_s": timings["setup"][0], "setup_share_of_run": timings["setup"][0] / s["wall_time_s"],
        "simulated_time_s": s["simulated_time_s"], "energy_j_per_device": s["energy_j_per_device"],
    }  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
