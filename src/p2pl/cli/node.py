"""``p2pl node --config node.toml``: run one device of a P2PL network in this process."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    parser = sub.add_parser("node", help="run one P2PL device over the network (see p2pl launch for many)")
    parser.add_argument("--config", required=True, help="node TOML file (id, listen address, peers, data, tls)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a node config value, e.g. --set network.round_timeout=10 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="ignore the checkpoint in the node's dir")
    parser.set_defaults(func=main)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (from p2pl launch or a service manager) stops the node like Ctrl-C: cleanly.
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    from p2pl.node.config import load_node_config

    cfg = load_node_config(args.config, args.overrides)
    from p2pl.node.adversary import build_runtime  # imports torch: only once the config is valid

    signal.signal(signal.SIGTERM, _terminate)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter(f"{cfg.id}: %(levelname)s %(message)s"))
    stderr.addFilter(lambda record: not getattr(record, "reported", False))  # printed once, by the CLI
    logging.getLogger("p2pl").addHandler(stderr)
    history = build_runtime(cfg, fresh=args.fresh).run()
    acc = history.accuracy[-1] if history.accuracy else float("nan")
    print(f"{cfg.id}: finished {cfg.rounds} rounds, test accuracy {acc:.4f}; results in {cfg.dir}")
    return 0
