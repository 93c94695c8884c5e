"""Where the devices live during a simulation: the :class:`Backend` protocol every backend follows.

The simulator's round loop (``p2pl.sim.simulator``) talks only to this protocol; the local
backend holds all rows in one process, the Ray backend (``p2pl.sim.ray_backend``) splits them
over actors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from p2pl.algorithms.base import RoundLinks

T = TypeVar("T")


@dataclass(frozen=True)
class Started:
    sync_steps: int
    sync_bytes_per_device: float  # mean over devices


class Backend(Protocol):
    """Where the devices' parameters and optimizer state live, and how a round runs on them.

    Every method is synchronous (returns when the work is done) and speaks in global device
    order ``0..N-1``; arrays are ``[N]``.
    """

    strategy: str  # the local-training strategy in use

    def start(self) -> Started:
        """Each device's own init, then the algorithm's start (e.g. max norm sync)."""

    def restore(self, params: torch.Tensor, optimizer: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's full ``[N, P]`` parameters and optimizer state."""

    def train(self, round_index: int, work: np.ndarray | None, links: RoundLinks | None = None) -> np.ndarray:
        """This round's local epochs; returns each device's mean training loss (float64). With a
        cooperation that runs after every local step (D-PSGD), it mixes over ``links`` there and
        :meth:`exchange` then only reports the bytes those mixes sent."""

    def evaluate(self, devices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every device's (accuracy, loss) on the common test set, ``[N]``; with ``devices``
        (sorted global ids), only those are evaluated and the others hold NaN."""

    def exchange(self, links: RoundLinks, round_index: int) -> np.ndarray:
        """The algorithm's cooperation step; returns the bytes each device sent."""

    def consensus_distance(self) -> float: ...

    def params(self) -> torch.Tensor:
        """All devices' parameters ``[N, P]`` (gathered: for checkpoints and the result)."""

    def optimizer_state(self) -> dict[str, torch.Tensor]: ...

    def guarded(self, step: Callable[[], T]) -> T:
        """Run one whole round; a backend that can lose workers restores and reruns it."""

    def facts(self) -> dict[str, Any]:
        """Backend facts for summary.json (empty for the local backend)."""

    def close(self) -> None: ...
