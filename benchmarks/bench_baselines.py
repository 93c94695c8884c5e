"""The decentralized baselines beside P2PL, side by side in one run.

1. **Accuracy and bytes**: ``--devices`` devices (100) on digits, IID, the default random geometric
   graph and settings, ``--rounds`` rounds (20) with 1 local epoch, for p2pl, dpsgd, gossip and
   push-sum (undirected), and push-sum on the directed random geometric graph. Prints each one's
   final mean / worst device accuracy and MB sent per device, and the bytes as a ratio to P2PL's.
2. **Round time**: one round (local training + cooperation) of each algorithm at ``--devices``,
   interleaved (one round of each in turn, ``--repeats`` times), medians and the ratio to P2PL.
3. **Who-hears-whom per round at scale**: building one round's neighbourhoods at
   ``--scale-devices`` devices (10,000) for P2PL's W (built once per set of live links), gossip's
   random pick and push-sum's shares (both rebuilt every round), interleaved, medians.

    python benchmarks/bench_baselines.py                      # ~2-3 min on 2 busy cores
    python benchmarks/bench_baselines.py --rounds 10 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from p2pl.algorithms.base import RoundLinks
from p2pl.config import load_config
from p2pl.core.cooperate import Gossip, PushSum
from p2pl.core.rounds import StagePlanner
from p2pl.experiment import build_experiment
from p2pl.sim.simulator import LocalBackend, run_experiment

ALGORITHMS = ("p2pl", "dpsgd", "gossip", "push-sum")
DIRECTED = ("topology.name='directed-random-geometric'",)


def accuracy(args: argparse.Namespace) -> None:
    print(f"1. accuracy and bytes: {args.devices} devices, {args.rounds} rounds x 1 local epoch")
    base = [f"devices={args.devices}", f"rounds={args.rounds}", "training.local_epochs=1", "output.progress=false"]
    runs = [(name, [f"algorithm='{name}'"]) for name in ALGORITHMS]
    runs.append(("push-sum directed", ["algorithm='push-sum'", *DIRECTED]))
    reference = 0.0
    print(f"  {'run':<18} {'acc mean':>9} {'acc min':>8} {'MB/dev':>8} {'x p2pl':>7} {'wall s':>7}")
    for label, extra in runs:
        t0 = time.perf_counter()
        summary = run_experiment(load_config(None, [*base, *extra])).summary
        sent = summary["bytes_sent_per_device"] / 1e6
        reference = reference or sent
        final = summary["final"]["accuracy"]
        print(f"  {label:<18} {100 * final['mean']:8.1f}% {100 * final['min']:7.1f}% {sent:8.2f} "
              f"{sent / reference:7.2f} {time.perf_counter() - t0:7.1f}", flush=True)  # fmt: skip


def round_time(args: argparse.Namespace) -> None:
    print(f"\n2. one round (train + cooperate) at {args.devices} devices, 1 local epoch, {args.repeats} repeats")
    backends = {}
    for name in ALGORITHMS:
        cfg = load_config(None, [f"devices={args.devices}", "training.local_epochs=1", f"algorithm='{name}'"])
        backend = LocalBackend(build_experiment(cfg))
        backend.start()
        backends[name] = backend
    links = {n: b.exp.dynamics().next_round() for n, b in backends.items()}
    times: dict[str, list[float]] = {n: [] for n in ALGORITHMS}
    for k in range(1, args.repeats + 1):
        for name, backend in backends.items():
            net = links[name]
            rl = RoundLinks(net.live_edges, net.active, net.cooperate)
            t0 = time.perf_counter()
            backend.train(k, None, rl)
            backend.exchange(rl, k)
            times[name].append(time.perf_counter() - t0)
    p2pl = statistics.median(times["p2pl"])
    for name in ALGORITHMS:
        med = statistics.median(times[name])
        print(f"  {name:<9} {1e3 * med:8.1f} ms   x{med / p2pl:5.2f} of p2pl", flush=True)


def neighbourhoods(args: argparse.Namespace) -> None:
    n = args.scale_devices
    print(f"\n3. one round's neighbourhoods at {n} devices (random geometric, automatic radius), "
          f"{args.repeats} repeats")  # fmt: skip
    cfg = load_config(None, [f"devices={n}", "algorithm='push-sum'", "partition.samples_per_device=16"])
    exp = build_experiment(cfg)
    live = exp.topology.edges
    facts = exp.setting.facts()
    stages = {"p2pl W": Gossip(), "gossip pick": Gossip(peers="one-random"), "push-sum": PushSum()}
    coop = exp.algorithm.cooperation(exp.setting)
    times: dict[str, list[float]] = {s: [] for s in stages}
    for k in range(1, args.repeats + 1):
        for label, stage in stages.items():
            planner = StagePlanner(replace(coop, stages=(stage,)), facts, cfg.seed, n)  # a fresh cache: W built
            t0 = time.perf_counter()
            planner.neighbourhoods(stage, live, k, 0)
            times[label].append(time.perf_counter() - t0)
    print(f"  {len(live)} links, mean degree {2 * len(live) / n:.1f}")
    w = statistics.median(times["p2pl W"])
    for label in stages:
        med = statistics.median(times[label])
        print(f"  {label:<12} {1e3 * med:8.1f} ms   x{med / w:5.2f} of building W", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale-devices", type=int, default=10_000)
    parser.add_argument("--only", nargs="*", default=["accuracy", "round", "hoods"])
    args = parser.parse_args()
    t0 = time.perf_counter()
    if "accuracy" in args.only:
        accuracy(args)
    if "round" in args.only:
        round_time(args)
    if "hoods" in args.only:
        neighbourhoods(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; seeds fixed, so the accuracy numbers repeat exactly")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
