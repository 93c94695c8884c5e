"""What distinguishes P2PL from its baselines: how devices start, and how they communicate.

Local training is the same for all of them (``p2pl.core.train``); an algorithm only chooses the
initial parameters and the cooperation step after local training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from p2pl.config import ConsensusConfig, SyncConfig


@dataclass(frozen=True)
class RoundLinks:
    """The network in one round, as the algorithm sees it."""

    live_edges: np.ndarray  # int64 [E, 2] undirected links up this round
    active: np.ndarray  # bool [N] devices present this round
    cooperate: bool  # False when sparse communication skips this round


@dataclass(frozen=True)
class Start:
    params: torch.Tensor  # [N, P]
    sync_steps: int
    bytes_sent: np.ndarray  # [N] bytes each device sent to get there


@dataclass(frozen=True)
class Exchange:
    params: torch.Tensor  # [N, P] after cooperation
    bytes_sent: np.ndarray  # [N] bytes each device sent this round


@dataclass(frozen=True)
class Setting:
    """Fixed facts of an experiment an algorithm may use."""

    data_sizes: np.ndarray  # [N] local dataset sizes
    base_edges: np.ndarray  # [E, 2] the topology's links (before failures)
    weights: str  # mixing rule name
    consensus: ConsensusConfig
    sync: SyncConfig
    model_bytes: int


def max_norm_device(inits: torch.Tensor) -> int:
    """The device whose initialization has the largest norm (ties: lowest id)."""
    norms = inits.double().norm(dim=1)
    return int(torch.nonzero(norms == norms.max())[0, 0])


class Algorithm(ABC):
    name: str
    uses_graph: bool = False

    def num_devices(self, devices: int) -> int:
        return devices

    @abstractmethod
    def start(self, inits: torch.Tensor, setting: Setting) -> Start:
        """Initial parameters from each device's own init ``inits [N, P]``."""

    @abstractmethod
    def exchange(self, params: torch.Tensor, links: RoundLinks, setting: Setting) -> Exchange:
        """The cooperation phase after local training."""


def no_bytes(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)
