"""``p2pl compare``: P2PL, FedAvg, centralized and local (or the algorithms asked for, such as the
decentralized baselines dpsgd, gossip and push-sum) on the same data, model and seeds."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from p2pl.cli.common import add_config_arguments, add_output_arguments, config_from_args, out_dir
from p2pl.config import ALGORITHM_NAMES as ALGORITHMS
from p2pl.config import ExperimentConfig, OutputConfig
from p2pl.report import accuracy_curves, console, plot_accuracy, progress_console, round_progress, summary_table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("compare", help="run p2pl, fedavg, centralized and local (or --algorithms) side by side")
    add_config_arguments(parser)
    add_output_arguments(parser, "runs/compare")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run each algorithm with seeds SEED..SEED+K-1 (into OUT/<algorithm>/seed-<s>/) and "
                        "report mean ± 95%% CI over seeds (default 1)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel processes (with --seeds > 1)")
    parser.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS), metavar="A,B,...",
                        help=f"comma-separated algorithms to run, from {', '.join(ALGORITHMS)} "
                        f"(default {','.join(DEFAULT_ALGORITHMS)})")  # fmt: skip
    parser.add_argument("--compress", default="", metavar="METHODS",
                        help="also run P2PL with each compression method (comma-separated: top-k, random-k, "
                        "quantize, choco; their [compression] settings from the config), as p2pl-METHOD")  # fmt: skip
    parser.set_defaults(func=main)


#: what ``p2pl compare`` runs unless --algorithms says otherwise: the paper's comparison
DEFAULT_ALGORITHMS = ("p2pl", "fedavg", "centralized", "local")


def chosen_algorithms(text: str) -> tuple[str, ...]:
    """The --algorithms list, checked: known names, each once, at least one."""
    from p2pl.errors import P2PLError

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown or not names:
        raise P2PLError(
            f"--algorithms {text!r}: {'unknown ' + repr(unknown[0]) if unknown else 'names no algorithm'}; "
            f"choose from {', '.join(ALGORITHMS)} (comma-separated)"
        )
    return names


def main(args: argparse.Namespace) -> int:
    from p2pl.errors import P2PLError

    base = config_from_args(args)
    if args.seeds < 1:
        raise P2PLError(f"--seeds must be a positive integer, got {args.seeds}")
    methods = compressed_methods(args.compress)
    if methods and args.seeds > 1:
        raise P2PLError("--compress runs one seed; drop --seeds, or compare methods over seeds with p2pl sweep "
                        "--grid compression.method=...")  # fmt: skip
    # A config's own output.dir wins over the compare default; --out wins over both.
    directory = out_dir(args, base) if args.out or base.output.dir != OutputConfig().dir else Path("runs/compare")
    names = chosen_algorithms(args.algorithms)
    if args.seeds == 1:
        curves, finals = _one_seed(base, directory, args, names, methods)
    else:
        curves, finals = _many_seeds(base, directory, args, names)
    plot_accuracy(curves, directory / "accuracy.png", title=figure_title(base, args.seeds, names),
                  caption=figure_caption(args.seeds))  # fmt: skip
    if "p2pl" in finals and "fedavg" in finals:
        p2pl, fedavg = finals["p2pl"], finals["fedavg"]
        from p2pl.stats import paired_difference

        mean_gap = paired_difference(p2pl["mean"], fedavg["mean"]).format(100, sign=True)
        min_gap = paired_difference(p2pl["min"], fedavg["mean"]).format(100, sign=True)
        over = f" (mean ± 95% CI over {args.seeds} seeds)" if args.seeds > 1 else ""
        console.print(f"P2PL vs FedAvg{over}: mean {mean_gap} points, min {min_gap} points")
    if args.seeds == 1:
        from p2pl.system.plots import plot_compare_costs

        if plot_compare_costs(directory, names) is not None:  # [system] on: accuracy vs seconds and joules
            console.print(f"accuracy against simulated seconds and joules: {directory}/cost.png")
    console.print(f"results in {directory}/ (one folder per algorithm, accuracy.png)")
    return 0


Finals = dict[str, dict[str, list[float]]]  # algorithm -> mean/min -> final accuracy per seed


def compressed_methods(text: str) -> list[str]:
    """The ``--compress`` list, each name checked (one-line error naming the valid ones)."""
    from p2pl.config import COMPRESSION_METHODS
    from p2pl.errors import choose

    names = [m.strip() for m in text.split(",") if m.strip()]
    return [choose("--compress", m, tuple(n for n in COMPRESSION_METHODS if n != "none")) for m in names]


def compare_runs(base: ExperimentConfig, names: tuple[str, ...], methods: list[str]) -> dict[str, ExperimentConfig]:
    """Run name -> config: every chosen algorithm (only P2PL keeps the config's compression: the
    others are compared uncompressed), then P2PL once per compression method."""
    plain = replace(base.compression, method="none")
    runs = {name: replace(base, algorithm=name) for name in names}
    runs |= {name: replace(cfg, compression=plain) for name, cfg in runs.items() if name != "p2pl"}
    for method in methods:
        runs[f"p2pl-{method}"] = replace(base, algorithm="p2pl", compression=replace(base.compression, method=method))
    return runs


def _one_seed(
    base: ExperimentConfig, directory: Path, args: argparse.Namespace, names: tuple[str, ...], methods: list[str]
) -> tuple[dict[str, Any], Finals]:
    from p2pl.report import bytes_curves, plot_accuracy_bytes
    from p2pl.sim.simulator import run_experiment

    summaries: dict[str, dict[str, Any]] = {}
    curves, per_byte = {}, {}
    enabled = base.output.progress and not args.quiet
    for name, cfg in compare_runs(base, names, methods).items():
        with round_progress(name, cfg.rounds, enabled) as update:
            result = run_experiment(cfg, directory / name, progress=update, resume=not args.fresh)
        summaries[name] = result.summary
        curves[name] = accuracy_curves(result.history)
        per_byte[name] = bytes_curves(result.history, float(result.summary.get("sync_bytes_per_device", 0.0)))
    console.print(summary_table(summaries, title=f"{base.devices} devices, {base.data.name}, {base.rounds} rounds"))
    plot_accuracy_bytes(per_byte, directory / "bytes.png", title=bytes_title(base), caption=BYTES_CAPTION)
    console.print(f"accuracy against rounds and MB sent per device: {directory}/bytes.png")
    finals = {n: {w: [s["final"]["accuracy"][w]] for w in ("mean", "min")} for n, s in summaries.items()}
    return curves, finals


def bytes_title(cfg: ExperimentConfig) -> str:
    c = cfg.compression
    return (f"Accuracy per byte: {cfg.devices} devices, {cfg.data.name} ({cfg.partition.scheme}), "
            f"{cfg.topology.name} graph, {cfg.rounds} rounds; compression ratio {c.ratio:g}, "
            f"bits {c.bits or 'default'}, choco gamma {c.gamma:g}")  # fmt: skip


BYTES_CAPTION = (
    "Mean device accuracy on the common test set against rounds (left) and megabytes each device sent, max-norm "
    "sync included (right; mean over devices). Centralized and local send nothing and appear on the left only."
)


def _many_seeds(
    base: ExperimentConfig, directory: Path, args: argparse.Namespace, names: tuple[str, ...]
) -> tuple[dict[str, Any], Finals]:
    from rich.table import Table

    from p2pl.reproduce.suite import read_curves
    from p2pl.stats import mean_ci
    from p2pl.sweeps import FAILED, Job, run_jobs, seed_list

    jobs = []
    for name in names:
        for seed in seed_list(base.seed, args.seeds):
            cfg = replace(base, algorithm=name, seed=seed, output=replace(base.output, progress=False))
            jobs.append(Job(directory / name / f"seed-{seed}", cfg, seed=seed, label=f"{name}/seed-{seed}"))

    def log(line: str) -> None:
        progress_console.print(line, markup=False, highlight=False, soft_wrap=True)

    outcomes = run_jobs(jobs, args.workers, fresh=args.fresh, log=None if args.quiet else log)
    failed = [o for o in outcomes if o.status == FAILED]
    if failed:
        from p2pl.errors import P2PLError

        raise P2PLError(f"{failed[0].job.name} failed: {failed[0].error} (see its error.txt; rerun to retry)")
    table = Table(title=f"{base.devices} devices, {base.data.name}, {base.rounds} rounds: mean ± 95% CI over "
                  f"{args.seeds} seeds", padding=(0, 1))  # fmt: skip
    for col in ("run", "acc mean %", "acc min %", "MB/dev"):
        table.add_column(col, justify="right" if col != "run" else "left", no_wrap=True)
    curves: dict[str, Any] = {}
    finals: Finals = {}
    for name in names:
        mine = [o for o in outcomes if o.job.config.algorithm == name]
        summaries = [o.summary for o in mine if o.summary is not None]
        finals[name] = {w: [s["final"]["accuracy"][w] for s in summaries] for w in ("mean", "min")}
        sent = mean_ci(s["bytes_sent_per_device"] for s in summaries)
        table.add_row(name, mean_ci(finals[name]["mean"]).format(100), mean_ci(finals[name]["min"]).format(100),
                      sent.format(1e-6, 2))  # fmt: skip
        per_seed = [read_curves(o.job.directory) for o in mine]
        curves[name] = _seed_curves(per_seed)
    console.print(table)
    return curves, finals


def _seed_curves(per_seed: list[Any]) -> dict[str, np.ndarray]:
    """Mean / min / max device accuracy averaged over seeds; the band: 95 % CI over seeds of the mean."""
    from p2pl.stats import mean_ci

    mean = np.stack([c.mean for c in per_seed])
    cis = [mean_ci(mean[:, i]) for i in range(mean.shape[1])]
    return {
        "round": per_seed[0].round, "mean": mean.mean(0),
        "min": np.stack([c.min for c in per_seed]).mean(0), "max": np.stack([c.max for c in per_seed]).mean(0),
        "band_low": np.array([c.low for c in cis]), "band_high": np.array([c.high for c in cis]),
    }  # fmt: skip


def figure_title(cfg: ExperimentConfig, seeds: int, names: tuple[str, ...] = DEFAULT_ALGORITHMS) -> str:
    """What was run, in one or two lines: algorithms, N, data, graph, weights, rounds, seeds."""
    seed_text = f"seed {cfg.seed}" if seeds == 1 else f"seeds {cfg.seed}-{cfg.seed + seeds - 1}"
    radius = f" r={cfg.topology.radius:g}" if cfg.topology.radius > 0 else " (automatic radius)"
    graph = cfg.topology.name + (radius if cfg.topology.name == "random-geometric" else "")
    partition = cfg.partition.scheme + (f" a={cfg.partition.alpha:g}" if cfg.partition.scheme == "dirichlet" else "")
    who = "P2PL vs FedAvg, centralized, local" if names == DEFAULT_ALGORITHMS else ", ".join(names)
    on = "P2PL" if names == DEFAULT_ALGORITHMS else "graph algorithms"
    return (f"{who}: {cfg.devices} devices, {cfg.data.name} ({partition}), "
            f"{cfg.model.factory or cfg.model.name}\n{on} on {graph} graph, {cfg.consensus.weights} weights, "
            f"sync {'on' if cfg.sync.enabled else 'off'}; {cfg.rounds} rounds x {cfg.training.local_epochs} "
            f"local epochs; {seed_text}")  # fmt: skip


def figure_caption(seeds: int) -> str:
    if seeds == 1:
        return ("Test accuracy on the common test set. Solid: mean device; dashed: worst device; shaded: min-max "
                "over devices. FedAvg and centralized hold one model, so their mean = min = max.")  # fmt: skip
    return (f"Test accuracy on the common test set, averaged over {seeds} seeds. Solid: mean device; dashed: worst "
            f"device; shaded: 95% confidence interval over seeds of the mean device (Student t).")  # fmt: skip
