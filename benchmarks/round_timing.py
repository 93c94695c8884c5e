"""Round time of several config variants at N devices, side by side in one process (shared by
bench_compression and bench_robustness): one backend per variant on the same network, every
round of every variant timed in turn, rotating which variant goes first."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Timings:
    rounds: dict[str, list[float]]  # variant -> seconds of each timed round (training + cooperation)
    exchange: dict[str, list[float]]  # variant -> seconds of each timed round's cooperation
    header: str  # what was timed: devices, degree, parameters, epochs, threads, repeats
    cpu: float  # process CPU seconds over the timed and warm-up rounds


def time_variants(devices: int, variants: dict[str, list[str]], common: list[str], repeats: int) -> Timings:
    """Build each variant (config overrides on ``common``) at ``devices`` devices with ~20
    neighbours and 16 samples each, then time ``repeats`` rounds of each after a warm-up."""
    import time

    from p2pl.algorithms.base import RoundLinks
    from p2pl.config import load_config
    from p2pl.core.train import choose_strategy
    from p2pl.experiment import build_experiment
    from p2pl.sim.simulator import LocalBackend, configure_threads

    radius = math.sqrt(20.0 / (math.pi * devices))  # ~20 neighbours per device at any N
    base = [f"devices={devices}", "partition.samples_per_device=16", f"topology.radius={radius:.4f}", *common]
    names = tuple(variants)
    backends: dict[str, Any] = {}
    links: dict[str, RoundLinks] = {}
    for name in names:
        exp = build_experiment(load_config(None, [*base, *variants[name]]))
        backend = LocalBackend(exp)
        backend.start()
        net = exp.dynamics().next_round()
        backends[name], links[name] = backend, RoundLinks(net.live_edges, net.active, net.cooperate)
    exp = backends[names[0]].exp
    strategy = choose_strategy(exp.model, "auto", exp.dataset.input_shape)
    threads = configure_threads(exp.cfg.threads, devices, exp.spec.total, strategy)
    degree = 2 * len(exp.topology.edges) / devices
    header = (f"{devices} devices (mean degree {degree:.1f}, {exp.spec.total} parameters, "
              f"{exp.cfg.training.local_epochs} local epochs, {threads} thread(s)); "
              f"{repeats} interleaved repeats")  # fmt: skip
    rounds: dict[str, list[float]] = {m: [] for m in names}
    exchange: dict[str, list[float]] = {m: [] for m in names}
    cpu0 = time.process_time()
    for k in range(1, repeats + 2):  # the first pass warms up and is not counted
        order = names[k % len(names) :] + names[: k % len(names)]  # rotate who goes first
        for name in order:
            backend = backends[name]
            t0 = time.perf_counter()
            backend.train(k, None)
            t1 = time.perf_counter()
            backend.exchange(links[name], k)
            t2 = time.perf_counter()
            if k > 1:
                rounds[name].append(t2 - t0)
                exchange[name].append(t2 - t1)
    return Timings(rounds, exchange, header, time.process_time() - cpu0)
