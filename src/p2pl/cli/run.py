"""``p2pl run``: one experiment, results written atomically to --out, resumable."""

from __future__ import annotations

import argparse

from p2pl.cli.common import add_config_arguments, add_output_arguments, config_from_args, out_dir


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    parser = sub.add_parser("run", help="run one experiment (default: P2PL, 100 devices, digits)")
    add_config_arguments(parser)
    add_output_arguments(parser, "runs/default")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: all devices in this process (default); ray: shards on Ray actors")  # fmt: skip
    parser.add_argument("--address", default=None, help="Ray cluster address host:port (default: a local Ray)")
    parser.add_argument("--shards", type=int, default=0, help="Ray actors (default 0: one per cluster CPU)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    directory = out_dir(args, cfg)
    # Imported once the config is known to be good: torch takes seconds to import.
    from p2pl.report import console, round_progress, summary_table
    from p2pl.sim.simulator import run_experiment
    from p2pl.system.summary import cost_line

    enabled = cfg.output.progress and not args.quiet
    with round_progress(f"{cfg.algorithm} x{cfg.devices}", cfg.rounds, enabled) as update:
        result = run_experiment(
            cfg, directory, progress=update, resume=not args.fresh,
            backend=args.backend, address=args.address, shards=args.shards,
        )  # fmt: skip
    console.print(summary_table({cfg.algorithm: result.summary}))
    if (cost := cost_line(result.summary)) is not None:  # [system] on
        console.print(cost)
    console.print(f"results in {directory}/ (metrics.csv, rounds.csv, summary.json, config.toml)")
    return 0
