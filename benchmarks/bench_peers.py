"""p2pl's round against the round a user would write by hand, evaluation included.

Workload (the same for all three): digits, MLP 64-64-10 (``model.hidden=[64]``), plain SGD
lr 0.05, batch 8, 1 local epoch per round, every device evaluated on the whole test set every
round, then the models averaged.

* naive: one ``nn.Module`` + one ``torch.optim.SGD`` per device, a Python loop over devices
  (train, then evaluate), then every device loads the data-size-weighted average;
* p2pl fedavg: ``run_experiment`` with ``algorithm = "fedavg"``;
* p2pl p2pl: ``run_experiment`` with ``algorithm = "p2pl"`` on the complete graph (uniform
  weights: the average each round, from every device's own copy).

p2pl's round is the median of ``round_time_s`` after the first round (what rounds.csv reports);
the naive round the median of its rounds after the first. The three are interleaved (one of
each per repeat) and the script prints their ratios. One torch thread for all (the simulator's
own choice at these sizes, and the best one for a per-device loop).

    python benchmarks/bench_peers.py                      # N = 10, 100, 1000; 3 repeats
    python benchmarks/bench_peers.py --devices 100 --rounds 6 --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from p2pl.config import ExperimentConfig, load_config
from p2pl.experiment import build_experiment
from p2pl.sim.simulator import run_experiment

WORKLOAD = (
    "model.hidden=[64]",
    "training.optimizer='sgd'",
    "training.lr=0.05",
    "training.batch_size=8",
    "training.local_epochs=1",
    "eval.every=1",
    "threads=1",
    "output.progress=false",
)


def config(devices: int, algorithm: str, rounds: int, extra: list[str]) -> ExperimentConfig:
    overrides = [*WORKLOAD, f"devices={devices}", f"rounds={rounds}", f"algorithm='{algorithm}'"]
    if algorithm == "p2pl":
        overrides += ["topology.name='complete'", "consensus.weights='uniform'"]
    return load_config(None, [*overrides, *extra])


Clock = tuple[float, float]  # (wall, this process's CPU) seconds


def _now() -> Clock:
    return time.perf_counter(), time.process_time()


def _laps(marks: list[Clock]) -> list[Clock]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks)]


def naive_rounds(cfg: ExperimentConfig, rounds: int) -> list[Clock]:
    """What a user writes without p2pl: a loop over per-device modules and optimizers."""
    exp = build_experiment(cfg)
    ds = exp.dataset
    models = [exp.make_model() for _ in exp.parts]
    for m in models:  # one common start, as FedAvg
        m.load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=cfg.training.lr) for m in models]
    sizes = torch.tensor([len(p) for p in exp.parts], dtype=torch.float32)
    weights = sizes / sizes.sum()
    rng = np.random.default_rng(cfg.seed)
    batch = cfg.training.batch_size
    marks = [_now()]
    for _ in range(rounds):
        for model, opt, part in zip(models, opts, exp.parts, strict=True):
            order = part[rng.permutation(len(part))]
            for lo in range(0, len(order), batch):
                idx = torch.from_numpy(order[lo : lo + batch])
                opt.zero_grad()
                F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
                opt.step()
        accuracy, loss = [], []
        with torch.no_grad():
            for model in models:
                logits = model(ds.x_test)
                accuracy.append(float((logits.argmax(1) == ds.y_test).float().mean()))
                loss.append(float(F.cross_entropy(logits, ds.y_test)))
            stacked = torch.stack([torch.nn.utils.parameters_to_vector(m.parameters()) for m in models])
            average = weights @ stacked
            for model in models:
                torch.nn.utils.vector_to_parameters(average, model.parameters())
        marks.append(_now())
    return _laps(marks)


def p2pl_rounds(cfg: ExperimentConfig) -> tuple[list[Clock], dict[str, float]]:
    """Per-round (wall, CPU) from the progress callback, which runs at the end of each round."""
    marks: list[Clock] = []
    result = run_experiment(cfg, progress=lambda k, total, m: marks.append(_now()))
    first = result.history.round_time_s[0]
    marks.insert(0, (marks[0][0] - first, float("nan")))  # round 1's start: wall only
    per_round = {k: v / cfg.rounds for k, v in result.phase_time_s.items()}
    return _laps(marks), per_round


def steady(times: list[Clock]) -> Clock:
    """Median wall and CPU time of the rounds after the first (warm-up)."""
    rest = times[1:] if len(times) > 1 else times
    return statistics.median(t[0] for t in rest), statistics.median(t[1] for t in rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"uptime: {os.getloadavg()}")
    print("seconds per round, wall (CPU); ratios from wall and from CPU time")
    print(f"{'N':>6} | {'naive':>15} {'p2pl fedavg':>15} {'p2pl p2pl':>15} | {'naive/fedavg':>13} "
          f"{'naive/p2pl':>13} | p2pl phases ms: train / exchange / evaluate")  # fmt: skip
    for n in args.devices:
        runs: dict[str, list[Clock]] = {"naive": [], "fedavg": [], "p2pl": []}
        phases: list[dict[str, float]] = []
        for _ in range(args.repeats):
            runs["naive"].append(steady(naive_rounds(config(n, "fedavg", args.rounds, args.overrides), args.rounds)))
            runs["fedavg"].append(steady(p2pl_rounds(config(n, "fedavg", args.rounds, args.overrides))[0]))
            times, phase = p2pl_rounds(config(n, "p2pl", args.rounds, args.overrides))
            runs["p2pl"].append(steady(times))
            phases.append(phase)
        med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in runs.items()}
        a, f, p = med["naive"], med["fedavg"], med["p2pl"]
        ph = {k: 1000 * statistics.median(d[k] for d in phases) for k in phases[0]}
        cells = " ".join(f"{w:7.4f} ({c:.4f})" for w, c in (a, f, p))
        ratios = f"{a[0] / f[0]:5.1f}x ({a[1] / f[1]:4.1f}x) {a[0] / p[0]:5.1f}x ({a[1] / p[1]:4.1f}x)"
        print(f"{n:>6} | {cells} | {ratios} | {ph['train']:.1f} / {ph['exchange']:.1f} / {ph['evaluate']:.1f}",
              flush=True)  # fmt: skip
    print(f"uptime: {os.getloadavg()}")


if __name__ == "__main__":
    main()
