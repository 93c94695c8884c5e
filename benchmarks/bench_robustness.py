"""Robustness acceptance: Byzantine attackers against the aggregation rules, side by side in one run.

Setting (the ``p2pl robustness`` default): digits, ``--devices`` devices (100), IID, random
geometric graph, 10 % of the devices attacking, placed at random, ``--rounds`` rounds (50).

1. Sync: the sync hijack (claims its init's norm x 1e6) under verified sync changes honest
   accuracy by under 1 point; under the paper's flooding sync it collapses.
2. Scaling x1e6, sign flip and ALIE: the best robust rule keeps honest mean within 3 points and
   honest worst within 6 points of its attack-free run; plain mean beside it.
3. No attack: each robust rule within 1.5 points of plain mean's mean accuracy (IID digits), and
   its round (local training + cooperation) at most 2x the plain-mean round at
   ``--timing-devices`` devices (1,000; ~20 neighbours each, 16 samples per device), timed
   interleaved in this process: one round of each rule in turn, ``--repeats`` times, medians.

The accuracy runs are the ``p2pl robustness`` grid (attack-free, sync-hijack verified / flood,
scale, sign-flip, ALIE x every rule) in ``--out``/ (resumable: a rerun reuses finished runs;
``report.md`` there is the command's own report).

    python benchmarks/bench_robustness.py --out runs/bench-robustness --workers 2
    python benchmarks/bench_robustness.py --rounds 12 --devices 40   # quicker
    python benchmarks/bench_robustness.py --only timing --repeats 7
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

from p2pl.robustness import GridResult, grid_settings, run_grid, write_report
from p2pl.robustness.grid import NO_ATTACK, RULES
from p2pl.robustness.report import best_rule

ROBUST = tuple(r for r in RULES if r != "mean")
ROW_ATTACKS = ("scale", "sign-flip", "alie")
SYNC_LIMIT, HOLD_MEAN, HOLD_WORST, COST_LIMIT, ROUND_RATIO = 0.01, 0.03, 0.06, 0.015, 2.0


def pts(x: float) -> str:
    return f"{100 * x:+6.1f}"


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def accuracy(args: argparse.Namespace) -> GridResult:
    overrides = [f"rounds={args.rounds}", f"devices={args.devices}", *args.set]
    settings = grid_settings(None, overrides, attacks="sync-hijack," + ",".join(ROW_ATTACKS),
                             command="python benchmarks/bench_robustness.py")  # fmt: skip
    t0 = time.perf_counter()
    result = run_grid(args.out, settings, workers=args.workers, log=lambda line: print("  " + line, flush=True))
    write_report(result)
    print(f"  grid: {len(result.outcomes)} runs in {time.perf_counter() - t0:.0f} s "
          f"({result.count('reused')} reused), report {Path(args.out) / 'report.md'}\n")  # fmt: skip
    return result


def acc_or_nan(result: GridResult, scenario: str, rule: str) -> tuple[float, float]:
    return result.honest_accuracy(scenario, rule) or (math.nan, math.nan)


def delta(result: GridResult, scenario: str, rule: str) -> tuple[float, float]:
    a, b = acc_or_nan(result, scenario, rule), acc_or_nan(result, NO_ATTACK, rule)
    return a[0] - b[0], a[1] - b[1]


def report_sync(result: GridResult) -> None:
    print("1. Sync hijack (scale 1e6): change of honest accuracy vs the attack-free run, points (mean / worst)")
    print(f"  {'rule':>12} | {'verified sync':>15} | {'flooding sync':>15}")
    for rule in RULES:
        v, f = delta(result, "sync-hijack-verified", rule), delta(result, "sync-hijack-flood", rule)
        print(f"  {rule:>12} | {pts(v[0])} / {pts(v[1])} | {pts(f[0])} / {pts(f[1])}")
    v, f = delta(result, "sync-hijack-verified", "mean"), delta(result, "sync-hijack-flood", "mean")
    ok = abs(v[0]) < SYNC_LIMIT
    print(f"  verified sync, plain mean: |change| {100 * abs(v[0]):.2f} pts (target < 1): {mark(ok)}; "
          f"flooding sync: {pts(f[0]).strip()} pts (collapse shown)\n")  # fmt: skip


def report_attacks(result: GridResult) -> None:
    print("2. Row attacks, honest accuracy % (mean / worst) and change vs the same rule's attack-free run (pts)")
    plain_free = acc_or_nan(result, NO_ATTACK, "mean")
    for attack in ROW_ATTACKS:
        print(f"  {attack}:")
        for rule in RULES:
            a, d = acc_or_nan(result, attack, rule), delta(result, attack, rule)
            print(f"    {rule:>12} | {100 * a[0]:5.1f} / {100 * a[1]:5.1f} | {pts(d[0])} / {pts(d[1])} | "
                  f"vs plain mean attack-free {pts(a[0] - plain_free[0])} / {pts(a[1] - plain_free[1])}")  # fmt: skip
        best = best_rule(result, attack, ROBUST)
        d = delta(result, attack, best)
        ok = d[0] >= -HOLD_MEAN and d[1] >= -HOLD_WORST
        print(f"    best robust rule {best}: {pts(d[0]).strip()} / {pts(d[1]).strip()} pts "
              f"(targets within 3 / 6): {mark(ok)}")  # fmt: skip
    print()


def report_cost(result: GridResult) -> None:
    print("3a. No attack: mean accuracy against plain mean (IID digits)")
    plain = acc_or_nan(result, NO_ATTACK, "mean")
    print(f"  {'mean':>12} | {100 * plain[0]:5.1f} / {100 * plain[1]:5.1f}")
    for rule in ROBUST:
        a = acc_or_nan(result, NO_ATTACK, rule)
        ok = a[0] - plain[0] >= -COST_LIMIT
        print(f"  {rule:>12} | {100 * a[0]:5.1f} / {100 * a[1]:5.1f} | {pts(a[0] - plain[0])} pts "
              f"(target >= -1.5): {mark(ok)}")  # fmt: skip
    print()


#: One call of each compiled-kernel rule on a ring of 64 rows (large enough for the kernels), timed
#: from before numba is imported.
FIRST_CALL = """
import time, numpy as np, torch
from p2pl.core.cooperate import Gossip, Neighbourhoods, aggregate
rows = torch.randn(64, 20000)
ids = np.arange(64)
hoods = Neighbourhoods.from_edges(64, ids, (ids + 1) % 64, np.full(64, 0.5), np.full(64, 0.5))
t0 = time.perf_counter()
for rule in ("trimmed-mean", "redescending"):
    aggregate(rows, rows, hoods, Gossip(rule))
print(time.perf_counter() - t0)
"""


def first_call_cost() -> tuple[float, float]:
    """Seconds of a fresh process's first robust-rule calls (numba import + kernels): with an empty
    compilation cache (a new install), then with the cache the first call wrote."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        run = [sys.executable, "-c", FIRST_CALL]
        cold, warm = (float(subprocess.run(run, env=env, check=True, capture_output=True, text=True).stdout)
                      for _ in range(2))  # fmt: skip
        return cold, warm


def timing(args: argparse.Namespace) -> None:
    from round_timing import time_variants

    variants = {rule: [f"consensus.aggregation={rule}"] for rule in RULES}
    t = time_variants(args.timing_devices, variants, args.set, args.repeats)
    print(f"3b. Round time at {t.header}")
    rounds, exchange = t.rounds, t.exchange
    cpu = t.cpu
    plain = statistics.median(rounds["mean"])
    # Local training is the same work under every rule: its median over all rules' rounds, plus
    # each rule's cooperation, gives a ratio that a burst of load on one rule's rounds moves less.
    training = statistics.median(r - e for rule in RULES for r, e in zip(rounds[rule], exchange[rule], strict=True))
    plain_pooled = training + statistics.median(exchange["mean"])
    print(f"  {'rule':>12} | round s (median) | cooperation s | round / plain-mean round | same, pooled training")
    for rule in RULES:
        r, e = statistics.median(rounds[rule]), statistics.median(exchange[rule])
        verdict = "" if rule == "mean" else f"  (target <= {ROUND_RATIO:g}x): {mark(r / plain <= ROUND_RATIO)}"
        pooled = (training + e) / plain_pooled
        print(f"  {rule:>12} | {r:16.3f} | {e:13.3f} | {r / plain:23.2f}x | {pooled:20.2f}x{verdict}")
    wall = sum(sum(v) for v in rounds.values())
    print(f"  process CPU time {cpu:.1f} s over the timed and warm-up rounds (timed wall {wall:.1f} s); "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    cold, warm = first_call_cost()
    print(f"  first robust-rule call of a fresh process (numba import + kernels): {cold:.1f} s compiling "
          f"(empty cache), {warm:.1f} s from the on-disk cache; paid once per process, not per round\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-robustness", help="where the grid's runs and report go")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1, help="grid runs at once (worker processes)")
    parser.add_argument("--timing-devices", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=("accuracy", "timing"), default=["accuracy", "timing"])
    parser.add_argument("--set", action="append", default=[], help="config override for every run (repeatable)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    if "accuracy" in args.only:
        print(f"Accuracy grid: digits, {args.devices} devices, {args.rounds} rounds, 10% attackers at random\n")
        result = accuracy(args)
        report_sync(result)
        report_attacks(result)
        report_cost(result)
    if "timing" in args.only:
        timing(args)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
