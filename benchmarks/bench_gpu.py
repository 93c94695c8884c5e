"""Rounds per second of the single-process engine on a CUDA GPU at 1e2, 1e4 and 1e5 devices.

Workload as ``bench_scale.py`` (digits, MLP 64 hidden, momentum SGD, batch 8, 1 local epoch,
each device ``--samples`` samples, random geometric graph with ~20 neighbours, max-norm sync,
uniform weights), ``device = "cuda"``, evaluation every round: ``--eval-devices`` devices on
rounds before the last, all on the last. The cooperation step runs on the CPU copy of the rows
(see the simulator's LocalBackend.exchange), so its share is printed too. Where there is no
CUDA GPU the script says so and exits 0.

    python benchmarks/bench_gpu.py                       # N = 100, 10,000, 100,000
    python benchmarks/bench_gpu.py --devices 100 10000 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--eval-devices", type=int, default=1000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device here, nothing to measure")
        return 0
    from bench_scale import overrides  # the same workload as the CPU scale benchmark

    from p2pl.config import load_config
    from p2pl.sim.simulator import run_experiment

    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    for n in args.devices:
        sets = overrides(n, args.rounds, 1, args.samples, args.eval_devices)
        cfg = load_config(None, [*sets, "device='cuda'", "output.progress=false"])
        torch.cuda.reset_peak_memory_stats()
        result = run_experiment(cfg)
        steady = result.history.round_time_s[1:] or result.history.round_time_s
        per_round = statistics.median(steady)
        phases = {k: v / cfg.rounds for k, v in result.phase_time_s.items()}
        acc = result.summary["final"]["accuracy"]
        print(
            f"N={n:>7}: {1 / per_round:8.2f} rounds/s ({per_round:.3f} s per round; train {phases['train']:.3f} / "
            f"exchange {phases['exchange']:.3f} / evaluate {phases['evaluate']:.3f} s)  peak GPU memory "
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB  final accuracy mean {acc['mean']:.3f} "
            f"min {acc['min']:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
