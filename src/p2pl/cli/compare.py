"""``p2pl compare``: P2PL, FedAvg, centralized and local on the same data, model and seeds."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2pl.algorithms import ALGORITHMS
from p2pl.cli.common import add_config_arguments, add_output_arguments, config_from_args, out_dir
from p2pl.config import OutputConfig
from p2pl.report import accuracy_curves, console, plot_accuracy, round_progress, summary_table
from p2pl.sim.simulator import run_experiment
from p2pl.system.plots import plot_compare_costs


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("compare", help="run p2pl, fedavg, centralized and local side by side")
    add_config_arguments(parser)
    add_output_arguments(parser, "runs/compare")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    base = config_from_args(args)
    # A config's own output.dir wins over the compare default; --out wins over both.
    directory = out_dir(args, base) if args.out or base.output.dir != OutputConfig().dir else Path("runs/compare")
    summaries: dict[str, dict[str, Any]] = {}
    curves = {}
    enabled = base.output.progress and not args.quiet
    for name in ALGORITHMS:
        cfg = replace(base, algorithm=name)
        with round_progress(name, cfg.rounds, enabled) as update:
            result = run_experiment(cfg, directory / name, progress=update, resume=not args.fresh)
        summaries[name] = result.summary
        curves[name] = accuracy_curves(result.history)
    console.print(summary_table(summaries, title=f"{base.devices} devices, {base.data.name}, {base.rounds} rounds"))
    plot_accuracy(curves, directory / "accuracy.png", title="test accuracy per round: mean (solid), min (dashed)")
    p2pl, fedavg = summaries["p2pl"]["final"]["accuracy"], summaries["fedavg"]["final"]["accuracy"]
    console.print(
        f"P2PL vs FedAvg: mean {100 * (p2pl['mean'] - fedavg['mean']):+.1f} points, "
        f"min {100 * (p2pl['min'] - fedavg['min']):+.1f} points"
    )
    if plot_compare_costs(directory, ALGORITHMS) is not None:  # [system] on: accuracy vs seconds and joules
        console.print(f"accuracy against simulated seconds and joules: {directory}/cost.png")
    console.print(f"results in {directory}/ (one folder per algorithm, accuracy.png)")
    return 0
