"""Sweep throughput: the same grid x seeds run in one process vs in W worker processes, side by side.

Both sweeps run fresh into temporary folders, one after the other (interleaved over --repeats);
the script prints wall time per sweep and the speed-up. On a shared 2-core box the speed-up is
bounded by the free cores (`uptime` is printed before and after).

    python benchmarks/bench_sweep.py                  # 2 settings x 3 seeds, 100 devices, 10 rounds
    python benchmarks/bench_sweep.py --workers 2 --repeats 1 --set rounds=5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from p2pl.sweeps import parse_grid, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", action="append", default=None, help="KEY=V1,V2 (default consensus.weights)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    grid = parse_grid(args.grid or ["consensus.weights=uniform,metropolis"])
    overrides = ["rounds=10", "output.progress=false", "output.checkpoint_every=0", *args.overrides]
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    times: dict[int, list[float]] = {1: [], args.workers: []}
    for _ in range(args.repeats):
        for workers in times:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = run_sweep(Path(tmp), None, overrides, grid, args.seeds, workers)
                times[workers].append(time.perf_counter() - t0)
                assert not result.failures, result.failures[0].error
    runs = len(result.outcomes)
    one, many = statistics.median(times[1]), statistics.median(times[args.workers])
    print(f"{runs} runs ({' x '.join(f'{len(a.values)} {a.key}' for a in grid)} x {args.seeds} seeds), "
          f"median of {args.repeats}:")  # fmt: skip
    print(f"  1 process:           {one:7.1f} s  ({one / runs:.1f} s per run)")
    print(f"  {args.workers} worker processes:  {many:7.1f} s  ({many / runs:.1f} s per run)")
    print(f"  speed-up: {one / many:.2f}x")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
