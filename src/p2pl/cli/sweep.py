"""``p2pl sweep``: a grid of settings x seeds, in parallel, resumable, with one tidy results table."""

from __future__ import annotations

import argparse
from typing import Any

from p2pl.cli.common import add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sweep",
        help="run a grid of settings x seeds (parallel, resumable) into one results table",
        description="Runs every combination of the --grid values, each with --seeds seeds (config seed, "
        "seed+1, ...), into OUT/<setting>/seed-<s>/. Finished runs are never rerun: after Ctrl-C, rerun "
        "the same command to continue. Writes OUT/results.csv (one row per setting x seed; also "
        "results.parquet when pyarrow is installed) and OUT/summary.csv (mean and 95%% CI over seeds).",
    )
    add_config_arguments(parser)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a swept config key and its values, e.g. --grid topology.name=ring,grid "
                        "(repeatable: the grid is every combination)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="seeds per setting (default 1)")
    parser.add_argument("--out", required=True, help="output directory of the sweep")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel worker processes (default 1)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: processes on this machine (default); ray: one Ray task per run")  # fmt: skip
    parser.add_argument("--address", default=None, help="Ray cluster address host:port (with --backend ray)")
    parser.add_argument("--fresh", action="store_true", help="rerun every run instead of reusing finished ones")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from p2pl.report import console, progress_console
    from p2pl.sweeps import parse_grid, run_sweep

    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f'engine="{args.engine}"')
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")

    def log(line: str) -> None:  # progress: stderr; the table and where the results are: stdout
        progress_console.print(line, markup=False, highlight=False, soft_wrap=True)

    result = run_sweep(
        args.out, args.config, overrides, parse_grid(args.grid), args.seeds, args.workers, args.backend,
        args.address, args.fresh, None if args.quiet else log,
    )  # fmt: skip
    console.print(summary_table(result.summary, result.keys))
    console.print(f"results in {result.out}/ (results.csv, summary.csv, one folder per setting and seed) "
                  f"in {result.seconds:.0f} s")  # fmt: skip
    if result.failures:
        progress_console.print(f"{len(result.failures)} run(s) failed; see their error.txt and the status column")
        return 1
    return 0


def summary_table(rows: list[dict[str, Any]], keys: list[str]) -> Any:
    """The sweep's settings with mean +- 95 % CI over seeds of the headline numbers."""
    from rich.table import Table

    from p2pl.sweeps import intervals

    table = Table(title="mean ± 95% CI over seeds", padding=(0, 1))
    for key in keys or ["setting"]:
        table.add_column(key)
    for col in ("seeds", "acc mean %", "acc min %", "to 90%", "MB/dev"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        cells = [str(row[k]) for k in keys] or ["base"]
        to90 = intervals(row, "rounds_to_mean_accuracy_0.9")
        reached = f"{to90.format(digits=1)} ({to90.n}/{row['seeds']})" if to90.n else "-"
        cells += [
            str(row["seeds"]),
            intervals(row, "final_accuracy_mean").format(100),
            intervals(row, "final_accuracy_min").format(100),
            reached,
            intervals(row, "bytes_sent_per_device").format(1e-6, 2),
        ]
        table.add_row(*cells)
    return table
