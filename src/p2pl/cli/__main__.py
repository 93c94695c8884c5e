"""``python -m p2pl.cli``: the same as the ``p2pl`` command."""

from p2pl.cli import entry

entry()
