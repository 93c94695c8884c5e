"""The ``p2pl`` command: one sub-command module each, errors as one line and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from p2pl import __version__
from p2pl.errors import P2PLError

# Sub-command modules, each with ``register(subparsers)`` setting ``func(args) -> int``.
COMMANDS = ("run", "compare", "sweep", "topology", "reproduce", "node", "launch", "certs")

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus exit code 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2pl", description="Peer-to-peer deep learning with no server (P2PL).")
    parser.add_argument("--version", action="version", version=f"p2pl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"p2pl.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except P2PLError as err:
        print(f"p2pl: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("p2pl: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line unless asked for the trace
        if os.environ.get("P2PL_DEBUG"):
            raise
        print(f"p2pl: internal error: {type(err).__name__}: {err} (set P2PL_DEBUG=1 for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


def entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())
