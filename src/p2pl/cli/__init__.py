"""The ``p2pl`` command: one sub-command module each, errors as one line and exit code 2.

Start-up is kept cheap: only the module of the command being run is imported (and each command
module imports torch or Ray inside its ``main``), so ``p2pl --version``, ``--help``, a bad
flag or a bad config answer at once instead of after seconds of importing torch.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from p2pl import __version__
from p2pl.errors import P2PLError

# Sub-command name -> its one-line summary in ``p2pl --help``. The module ``p2pl.cli.<name>``
# (with ``register(subparsers)`` setting ``func(args) -> int``) is imported only when it runs.
COMMANDS: dict[str, str] = {
    "run": "run one experiment (default: P2PL, 100 devices, digits)",
    "compare": "run p2pl, fedavg, centralized and local side by side",
    "sweep": "run a grid of settings x seeds (parallel, resumable) into one results table",
    "topology": "describe the device graph of a config (and draw it)",
    "reproduce": "test the paper's claims (C1-C6) and write a report with tables and figures",
    "robustness": "Byzantine attacks x aggregation rules: honest accuracy, report and figure",
    "node": "run one P2PL device over the network (see p2pl launch for many)",
    "launch": "run an experiment as N real p2pl node processes on this machine (loopback, mTLS)",
    "certs": "create the CA and device certificates for p2pl node",
}

EXIT_BAD_INPUT = 2
# What a process killed by SIGPIPE reports (128 + 13), as `yes | head -1` does.
EXIT_CLOSED_PIPE = 141


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus exit code 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command_in(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line: the first argument that is not an option
    (the top-level parser has only flags, so that is where the command must be)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``p2pl`` parser with ``command`` fully registered (its module imported) and every other
    command as its one-line summary only; ``None`` (``p2pl --help``, ``--version``): summaries only."""
    parser = _Parser(prog="p2pl", description="Peer-to-peer deep learning with no server (P2PL).")
    parser.add_argument("--version", action="version", version=f"p2pl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, summary in COMMANDS.items():
        if name == command:
            importlib.import_module(f"p2pl.cli.{name}").register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _quiet_stdout() -> None:
    """The reader of stdout went away (``p2pl topology | head -1``): point stdout at /dev/null so
    the interpreter's final flush does not complain about the closed pipe either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass
    finally:
        os.close(devnull)


def _describe_os_error(err: OSError) -> str:
    """One line for a file-system error: what failed on which path, and what to do."""
    what = err.strerror or str(err)
    path = err.filename
    if path is None:
        return f"{what}; check the output paths and free disk space"
    hint = {
        errno.EACCES: "choose a writable location",
        errno.EPERM: "choose a writable location",
        errno.EROFS: "choose a location on a writable file system",
        errno.ENOTDIR: "a file is in the way: choose another path",
        errno.EEXIST: "a file is in the way: choose another path",
        errno.ENOSPC: "free some disk space",
    }.get(err.errno or 0, "check the path")
    return f"{what}: {path}; {hint}"


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(arguments))
    args = parser.parse_args(arguments)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at exit
        return code
    except P2PLError as err:
        print(f"p2pl: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_CLOSED_PIPE
    except KeyboardInterrupt:
        print("p2pl: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except OSError as err:  # a file or directory that cannot be written or read: not a bug of ours
        if os.environ.get("P2PL_DEBUG"):
            raise
        print(f"p2pl: error: {_describe_os_error(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # a bug, not bad input: still one line unless asked for the trace
        if os.environ.get("P2PL_DEBUG"):
            raise
        print(f"p2pl: internal error: {type(err).__name__}: {err} (set P2PL_DEBUG=1 for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


def entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())
