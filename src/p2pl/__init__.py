"""p2pl: peer-to-peer deep learning with no server (P2PL, Pranav & Moura, arXiv 2310.18861).

The Python API (``p2pl.run``, ``p2pl.sweep``, ``p2pl.load``; see :mod:`p2pl.api`) is loaded on
first use, so ``import p2pl`` stays light (no torch until a run starts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from p2pl.api import Result, SweepResult, load, run, sweep

_API = ("Result", "SweepResult", "load", "run", "sweep")


def __getattr__(name: str) -> Any:
    if name in _API:
        from p2pl import api

        return getattr(api, name)
    raise AttributeError(f"module 'p2pl' has no attribute {name!r}")


__all__ = ["Result", "SweepResult", "__version__", "load", "run", "sweep"]
