"""The one exception type users see: a clear, one-line message about bad input."""


class P2PLError(Exception):
    """Bad input (a wrong name, a bad number, a malformed file or message).

    The CLI prints ``str(error)`` on one line to stderr and exits with code 2, so the message
    must say what is wrong *and* how to fix it.
    """


def choose(kind: str, name: str, choices: "list[str] | tuple[str, ...]") -> str:
    """Validate ``name`` against ``choices`` or raise a P2PLError listing the valid ones."""
    if name not in choices:
        raise P2PLError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}")
    return name
