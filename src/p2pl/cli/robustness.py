"""``p2pl robustness``: attacks x aggregation rules, honest accuracy, DIR/report.md."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from p2pl.config import AGGREGATIONS  # a plain tuple: importing it loads no torch

if TYPE_CHECKING:
    from p2pl.robustness.grid import GridSettings

# Only argparse-level names here: the grid, the simulator and matplotlib load when the command runs.
SCENARIO_NAMES = (
    "sync-hijack (both rows), sync-hijack-verified, sync-hijack-flood, scale, sign-flip, gaussian, alie, "
    "label-flip, silent, data-size"
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "robustness",
        help="Byzantine attacks x aggregation rules: honest accuracy, report and figure",
        description="Runs every attack against every aggregation rule (plus the attack-free run of each "
        "rule) into OUT/runs/<attack>/<rule>/ and writes OUT/results.csv, OUT/report.md and "
        "OUT/robustness.png. Default: digits, 100 devices, random geometric graph, 10 % of the devices "
        "attacking, placed at random. Finished runs are reused on a rerun, interrupted ones resume. "
        "Exit code 1 if a run failed (the report still covers the rest and names the failure).",
    )
    parser.add_argument("config", nargs="?", help="experiment TOML file (default: the built-in default experiment)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value of every run, e.g. --set adversary.fraction=0.2 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="40 devices, 12 rounds: a few minutes on 2 cores")
    parser.add_argument("--out", default=None, help="output directory (default: runs/robustness[-quick])")
    parser.add_argument("--attacks", default="", help=f"comma-separated rows to run (default: all but data-size): "
                        f"{SCENARIO_NAMES}")  # fmt: skip
    parser.add_argument("--rules", default="", help=f"comma-separated rules (default: {','.join(AGGREGATIONS)})")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, in worker processes (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of every run (default: the config's)")
    parser.add_argument("--fresh", action="store_true", help="rerun every run instead of reusing results")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from p2pl.errors import P2PLError
    from p2pl.report import console, progress_console
    from p2pl.robustness import grid_settings, run_grid, write_report

    if args.workers < 1:
        raise P2PLError(f"--workers must be a positive integer, got {args.workers}")
    overrides = [*args.overrides, *([f"seed={args.seed}"] if args.seed is not None else [])]
    out = Path(args.out or ("runs/robustness-quick" if args.quick else "runs/robustness"))
    settings = grid_settings(args.config, overrides, args.quick, args.attacks, args.rules, _command(args, out))
    specs = settings.specs()
    t0 = time.perf_counter()
    if not args.quiet:
        c = settings.base
        progress_console.print(f"robustness: {len(settings.scenarios)} attack rows x {len(settings.rules)} rules = "
                      f"{len(specs)} runs ({c.devices} devices, {c.rounds} rounds, {args.workers} worker(s)), "
                      f"results in {out}/")  # fmt: skip

    def log(line: str) -> None:
        progress_console.print(line, markup=False, highlight=False)  # error texts may hold [brackets]

    _preflight(settings)
    result = run_grid(out, settings, workers=args.workers, fresh=args.fresh, log=None if args.quiet else log)
    path = write_report(result)
    console.print(f"report: {path} ({time.perf_counter() - t0:.0f} s)")
    if result.failures:
        progress_console.print(f"{len(result.failures)} run(s) failed; see the report's list of runs")
        return 1
    return 0


def _command(args: argparse.Namespace, out: Path) -> str:
    """The command line that reproduces this grid, for the report."""
    words = ["p2pl", "robustness", *([args.config] if args.config else []), *(["--quick"] if args.quick else [])]
    words += ["--out", str(out)]
    words += [w for flag in ("attacks", "rules") if getattr(args, flag) for w in (f"--{flag}", getattr(args, flag))]
    words += [w for o in args.overrides for w in ("--set", o)]
    words += ["--seed", str(args.seed)] if args.seed is not None else []
    return " ".join(shlex.quote(w) for w in words)


def _preflight(settings: GridSettings) -> None:
    """Bad input common to every run (an unknown name, a missing data file, a disconnected graph)
    is one line and exit 2, not a grid of identical failures: build one attacked run's
    experiment before running anything."""
    from p2pl.experiment import build_experiment

    specs = settings.specs()
    attacked = [s for s in specs if s.scenario.attack != "none"] or specs
    build_experiment(settings.config(attacked[0]))
