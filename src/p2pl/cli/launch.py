"""``p2pl launch [CONFIG] --devices N --out DIR``: a local network of ``p2pl node`` processes."""

from __future__ import annotations

import argparse
import shutil
import signal
from pathlib import Path
from types import FrameType

from p2pl.cli.common import add_config_arguments, config_from_args, writable_dir
from p2pl.errors import P2PLError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    parser = sub.add_parser(
        "launch", help="run an experiment as N real p2pl node processes on this machine (loopback, mTLS)"
    )
    add_config_arguments(parser)
    parser.add_argument("--devices", type=int, help="number of devices/processes (default: the config's)")
    parser.add_argument("--out", default=None, help="output directory (default: output.dir + '-launch')")
    parser.add_argument("--fresh", action="store_true", help="delete earlier node state in --out and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address the nodes listen on")
    parser.add_argument("--base-port", type=int, default=0, help="first port (default: any free ports)")
    parser.add_argument("--round-timeout", type=float, default=None, help="seconds a node waits for neighbours")
    parser.add_argument("--timeout", type=float, default=None, help="give up (and stop every node) after this")
    parser.add_argument("--throttle-mbps", type=float, default=None,
                        help="pace every node's sends at this rate per link (emulates slow radios)")  # fmt: skip
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.devices is not None:
        overrides.append(f"devices={args.devices}")
    args.overrides = overrides
    cfg = config_from_args(args)
    out = writable_dir(Path(args.out or f"{cfg.output.dir}-launch"), "--out" if args.out else "output.dir")
    # Imported once the arguments are good: torch takes seconds to import.
    from rich.markup import escape

    from p2pl.node.launch import Launcher, prepare_launch
    from p2pl.report import console, progress_console, round_progress, summary_table

    if args.fresh and (out / "nodes").exists():
        shutil.rmtree(out / "nodes")
    network = {} if args.round_timeout is None else {"round_timeout": args.round_timeout}
    if args.throttle_mbps is not None:
        if not args.throttle_mbps > 0:
            raise P2PLError(f"--throttle-mbps must be > 0 (Mbit/s per link), got {args.throttle_mbps}")
        network["throttle_mbps"] = args.throttle_mbps
    if not 0 <= args.base_port <= 65535 - cfg.devices:
        raise P2PLError(f"--base-port {args.base_port} leaves no room for {cfg.devices} ports")
    plan = prepare_launch(cfg, out, host=args.host, base_port=args.base_port, network=network)
    launcher = Launcher(plan)
    # A service manager's SIGTERM stops the run like Ctrl-C: every node process is stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    enabled = cfg.output.progress and not args.quiet
    try:
        launcher.start()
        with round_progress(f"{cfg.algorithm} nodes x{cfg.devices}", cfg.rounds, enabled) as update:
            finished = launcher.wait(progress=update, timeout=args.timeout)
    except KeyboardInterrupt:
        progress_console.print("interrupted: stopping every node process; rerun the same command to resume")
        launcher.stop()
        return 130
    finally:
        launcher.stop()
    failed = {plan.ids[i]: rc for i, rc in launcher.exit_codes.items() if rc != 0}
    try:
        summary = launcher.collect()
    except P2PLError as err:
        progress_console.print(f"[red]run failed[/red]: {escape(str(err))}", highlight=False)
        return 1
    console.print(summary_table({f"{cfg.algorithm} nodes x{cfg.devices}": summary}))
    console.print(f"results in {out}/ (metrics.csv, rounds.csv, summary.json); node logs in {out}/nodes/*/")
    if not finished or failed or summary["rounds_done"] < cfg.rounds:
        progress_console.print(
            f"[red]run failed[/red]: nodes {failed} exited with errors; see their node.log / stderr.log",
            highlight=False,
        )
        return 1
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
