"""Scale benchmark: seconds per round, peak memory and the consensus share of a round,
for the single-process engine and the Ray backend with 2 actors, at 1,000 and 10,000 devices.

Each (backend, devices) point runs in a fresh child process so its peak RSS is its own.
Workload: digits, MLP 64 hidden, each device draws ``--samples`` samples (overlapping,
``partition.samples_per_device``), random geometric graph with ~20 neighbours per device,
max-norm sync, uniform weights, ``--epochs`` local epochs of batch 8, ``--rounds`` rounds.
Evaluation every round: ``--eval-devices`` devices (``eval.devices``: a subset drawn from seed and
round) on the rounds before the last, every device on the last (and after sync: round 0 is
evaluated like the others). ``--eval-devices 0`` evaluates every device every round.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --devices 1000 10000 --out benchmarks/scale.json
    python benchmarks/bench_scale.py --devices 10000 --backends local --rounds 4 --eval-devices 1000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median


def overrides(devices: int, rounds: int, epochs: int, samples: int, eval_devices: int, threads: int = 0) -> list[str]:
    radius = math.sqrt(20.0 / (math.pi * devices))  # ~20 neighbours on average at any N
    return [
        f"devices={devices}", f"rounds={rounds}", f"training.local_epochs={epochs}",
        f"partition.samples_per_device={samples}", f"topology.radius={radius:.4f}",
        "eval.every=1", f"eval.devices={eval_devices}", "output.checkpoint_every=0", f"threads={threads}",
    ]  # fmt: skip


def child(args: argparse.Namespace) -> None:
    from p2pl.config import load_config
    from p2pl.sim.simulator import run_experiment

    if args.backend == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    cfg = load_config(
        None, overrides(args.devices, args.rounds, args.epochs, args.samples, args.eval_devices, args.threads)
    )
    cpu_marks = [time.process_time()]  # this process's CPU time (the local backend's, not Ray actors')
    t0 = time.perf_counter()
    result = run_experiment(
        cfg, backend=args.backend, shards=2, progress=lambda k, t, m: cpu_marks.append(time.process_time())
    )
    times = result.history.round_time_s
    cpu = [b - a for a, b in itertools.pairwise(cpu_marks)][1:]  # round 1 also pays start-up
    total = time.perf_counter() - t0
    s = result.summary
    rounds = s["rounds_done"]
    phases = {k: v / rounds for k, v in result.phase_time_s.items()}
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    actors_mb = s.get("ray", {}).get("actor_peak_rss_mb", [])
    params_mb = s["devices"] * s["parameters"] * 4 / 2**20
    out = {
        "backend": args.backend, "devices": s["devices"], "parameters": s["parameters"], "edges": s["edges"],
        "threads": s["threads"], "rounds": rounds, "total_s": total,
        "round_s": s["round_time_s_mean"], "phase_s_per_round": phases,
        "round_s_each": times, "round_cpu_s_each": cpu, "eval_devices": args.eval_devices,
        "consensus_share": phases["exchange"] / s["round_time_s_mean"],
        "peak_rss_mb": driver_mb + sum(actors_mb), "driver_peak_rss_mb": driver_mb, "actor_peak_rss_mb": actors_mb,
        "params_mb": params_mb, "acc_mean": s["final"]["accuracy"]["mean"], "ray": s.get("ray"),
    }  # fmt: skip
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--backends", nargs="+", default=["local", "ray"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--eval-devices", type=int, default=1000, help="eval.devices (0 = all, every round)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: OMP_NUM_THREADS, default 1)")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="local", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.devices = args.devices[0]
        child(args)
        return
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for n in args.devices:
        for backend in args.backends:
            cmd = [sys.executable, __file__, "--child", "--backend", backend, "--devices", str(n),
                   "--rounds", str(args.rounds), "--epochs", str(args.epochs),
                   "--samples", str(args.samples), "--eval-devices", str(args.eval_devices),
                   "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{backend} x{n} failed")
            r = json.loads(lines[-1][7:])
            results.append(r)
            steady = r["round_s_each"][1:-1] or r["round_s_each"]  # rounds 2..R-1: a subset evaluated
            steady_cpu = r["round_cpu_s_each"][:-1] or r["round_cpu_s_each"]
            last = len(r["round_s_each"]) - 1
            print(f"{backend:5s} N={n:6d}  steady rounds (2..{last}) median {median(steady):.2f} s "
                  f"(CPU {median(steady_cpu):.2f}); last round (every device evaluated) {r['round_s_each'][-1]:.2f} s "
                  f"(CPU {r['round_cpu_s_each'][-1]:.2f}); {r['threads']} torch thread(s)", flush=True)  # fmt: skip
            each = " ".join(f"{t:.2f}" for t in r["round_s_each"])
            each += "; CPU of rounds 2..: " + " ".join(f"{t:.2f}" for t in r["round_cpu_s_each"])
            ph = r["phase_s_per_round"]
            print(f"{backend:5s} N={n:6d}  {r['round_s']:8.2f} s/round (rounds: {each}; last = all devices "
                  f"evaluated)  train {ph['train']:.2f} / exchange {ph['exchange']:.2f} / evaluate "
                  f"{ph['evaluate']:.2f} s  peak {r['peak_rss_mb']:8.0f} MB (params {r['params_mb']:.0f} MB)  "
                  f"acc {r['acc_mean']:.3f}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
