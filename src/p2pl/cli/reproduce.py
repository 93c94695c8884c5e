"""``p2pl reproduce``: run the suite that tests the paper's claims and write DIR/report.md."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from p2pl.reproduce.claims import CLAIMS, build_claims, suite_settings
from p2pl.reproduce.report import write_report
from p2pl.reproduce.suite import run_suite


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "reproduce",
        help="test the paper's claims (C1-C6) and write a report with tables and figures",
        description="Runs the experiments behind each claim into OUT/runs/ (finished runs are reused "
        "on a rerun) and writes OUT/report.md with OUT/figures/*.png. Exit code 1 if an experiment failed "
        "(the report still covers the rest and names the failure).",
    )
    parser.add_argument("--quick", action="store_true", help="digits, 24 rounds: a few minutes on 2 cores")
    parser.add_argument("--out", default=None, help="output directory (default: runs/reproduce[-quick])")
    parser.add_argument("--data-root", default="data", help="where MNIST is looked for without --quick (data/)")
    parser.add_argument("--seed", type=int, default=0, help="first random seed of every run (default 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="repeat every run with seeds SEED..SEED+K-1: numbers become mean ± 95%% CI and "
                        "verdicts are judged on the intervals (default 1)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=0,
                        help="runs in parallel processes (default 0: one per CPU core)")  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per run (default: 24 quick, 90 digits or 48 MNIST full)"
    )
    parser.add_argument("--only", default="", help=f"comma-separated claims to test, from {','.join(CLAIMS)}")
    parser.add_argument("--fresh", action="store_true", help="rerun every experiment instead of reusing results")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from p2pl.errors import P2PLError
    from p2pl.report import console

    if args.rounds is not None and args.rounds < 1:
        raise P2PLError(f"--rounds must be a positive integer, got {args.rounds}")
    if args.seeds < 1:
        raise P2PLError(f"--seeds must be a positive integer, got {args.seeds}")
    if args.workers < 0:
        raise P2PLError(f"--workers must be >= 0 (0: one per CPU core), got {args.workers}")
    workers = args.workers or os.cpu_count() or 1
    only = tuple(c.strip().upper() for c in args.only.split(",") if c.strip()) or None
    claims = build_claims(only)
    out = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    settings = suite_settings(args.quick, args.data_root, args.seed, args.rounds, seeds=args.seeds)
    t0 = time.perf_counter()
    if not args.quiet:
        console.print(f"reproduce: {len(claims)} claims on {settings.dataset} ({settings.dataset_note}), "
                      f"{settings.rounds} rounds, {args.seeds} seed(s), {workers} worker(s), "
                      f"results in {out}/")  # fmt: skip

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # error texts may hold [brackets]

    result = run_suite(out, settings, claims, fresh=args.fresh, log=None if args.quiet else log, workers=workers)
    path = write_report(result)
    console.print(f"report: {path} ({time.perf_counter() - t0:.0f} s)")
    if result.failures:
        console.print(f"{len(result.failures)} experiment(s) failed; see the report's list of runs")
        return 1
    return 0
