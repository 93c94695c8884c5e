"""Arguments shared by the sub-commands that take an experiment config."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pl.config import ExperimentConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="experiment TOML file (default: the built-in default experiment)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.lr=0.1 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--engine", choices=None, help="vectorized (default) or reference")
    parser.add_argument("--seed", type=int, help="random seed (same config + seed = same numbers)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if getattr(args, "engine", None):
        overrides.append(f'engine="{args.engine}"')
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.config, overrides)


def add_output_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--out", default=None, help=f"output directory (default: output.dir, or {default})")
    parser.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def out_dir(args: argparse.Namespace, cfg: ExperimentConfig) -> Path:
    return Path(args.out or cfg.output.dir)
