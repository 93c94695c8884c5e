"""Cost of writing metrics.csv and rounds.csv after every round, side by side in one run.

A run rewrites both files atomically as each round ends (a crash loses nothing, a watcher sees
progress). Timed per round, on a synthetic history of N devices (no training):

* ``incremental``: :class:`p2pl.results.ResultFiles` formats only the new round's rows and
  rewrites the files from kept text (what the simulator does);
* ``re-render``: formatting every round so far again, then writing (the naive way).

Printed: milliseconds per round at the first, middle and last round, and their ratio.

    python benchmarks/bench_result_files.py                       # N = 1,000, 30 rounds (~1 min)
    python benchmarks/bench_result_files.py --devices 1000 10000 --rounds 50   # ~9 min on a busy box
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from p2pl import atomic
from p2pl.metrics import History
from p2pl.results import ResultFiles


def grow(h: History, rng: np.random.Generator, n: int, k: int) -> None:
    """Append round ``k`` (evaluated) to ``h``, as the simulator does."""
    h.consensus_distance.append(float(rng.random()))
    h.bytes_sent.append(np.full(n, 92352, dtype=np.int64))
    h.live_links.append(3 * n)
    h.active_devices.append(n)
    h.train_loss.append(rng.random(n))
    h.eval_rounds.append(k)
    h.accuracy.append(rng.random(n))
    h.loss.append(rng.random(n))
    h.round_time_s.append(0.5)
    for phase in (h.train_time_s, h.exchange_time_s, h.evaluate_time_s):
        phase.append(0.1)


def measure(n: int, rounds: int, folder: Path) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(0)
    h = History(eval_rounds=[0], accuracy=[rng.random(n)], loss=[rng.random(n)])
    files = ResultFiles(folder / "incremental")
    incremental, rerender = [], []
    for k in range(1, rounds + 1):
        grow(h, rng, n, k)
        t = time.perf_counter()
        files.update(h)
        incremental.append(time.perf_counter() - t)
        t = time.perf_counter()
        metrics, rows = ResultFiles.render(h)
        atomic.write_text(folder / "rerender" / "metrics.csv", metrics)
        atomic.write_text(folder / "rerender" / "rounds.csv", rows)
        rerender.append(time.perf_counter() - t)
    return incremental, rerender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1000])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; ms per round (median of 3 rounds around each point)")
    print(f"{'devices':>8} {'round':>6} {'incremental':>12} {'re-render':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.devices:
            inc, full = measure(n, args.rounds, Path(tmp) / str(n))
            for k in (2, args.rounds // 2, args.rounds - 1):
                a = 1000 * statistics.median(inc[k - 1 : k + 2])
                b = 1000 * statistics.median(full[k - 1 : k + 2])
                print(f"{n:>8} {k:>6} {a:>12.1f} {b:>10.1f} {b / a:>6.1f}x")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
