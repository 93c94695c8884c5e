"""Arguments shared by the sub-commands that take an experiment config, and output path checks."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from p2pl.config import ExperimentConfig, load_config
from p2pl.errors import P2PLError


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
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def out_dir(args: argparse.Namespace, cfg: ExperimentConfig) -> Path:
    """The run's output directory (``--out``, else ``output.dir``), created and checked writable."""
    return writable_dir(Path(args.out or cfg.output.dir), "--out" if args.out else "output.dir")


def writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (and its parents) if needed; refuse, in one line, one that cannot hold files.

    Checked before the run starts, so a typo costs nothing instead of failing after the first round.
    """
    if path.exists() and not path.is_dir():
        raise P2PLError(f"{what} {path} is a file, not a directory; choose a directory for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise P2PLError(f"cannot create {what} directory {path} ({err.strerror}); choose a writable location") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise P2PLError(f"{what} directory {path} is not writable; choose a writable location")
    return path


def writable_file(path: Path, what: str) -> Path:
    """A file to be (re)written at ``path``: its folder must exist and be writable (nothing is created)."""
    folder = path.parent
    if path.is_dir():
        raise P2PLError(f"{what} {path} is a directory; give a file name, e.g. {path / 'graph.png'}")
    if not folder.is_dir():
        raise P2PLError(f"{what} {path}: folder {folder} does not exist; create it first or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise P2PLError(f"{what} {path}: folder {folder} is not writable; choose a writable location")
    return path
