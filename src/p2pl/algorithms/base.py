"""What distinguishes P2PL from its baselines: how devices start, and how they cooperate.

Local training is the same for all of them (``p2pl.core.train``). An algorithm only says

* where each device starts: :meth:`Algorithm.start` maps the devices' initial norms to whose
  init each device adopts (max-norm sync for P2PL, the server's common init for FedAvg), and
* what it does after local training: :meth:`Algorithm.cooperation`, a
  :class:`~p2pl.core.cooperate.Cooperation` pipeline that every runtime (simulator, Ray shards,
  real nodes) executes with the same functions.

Nothing here moves parameters, so no runtime needs to know an algorithm by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np
import torch

from p2pl.config import ConsensusConfig, SyncConfig
from p2pl.core.adversary import Adversary
from p2pl.core.compress import Compression, message_layout
from p2pl.core.cooperate import Cooperation, Gossip
from p2pl.core.rounds import NetworkFacts
from p2pl.core.sync import SyncOutcome, synchronize


@dataclass(frozen=True)
class RoundLinks:
    """The network in one round, as the algorithm sees it."""

    live_edges: np.ndarray  # int64 [E, 2] undirected links up this round
    active: np.ndarray  # bool [N] devices present this round
    cooperate: bool  # False when sparse communication skips this round


@dataclass(frozen=True, eq=False)
class Setting:
    """Fixed facts of an experiment an algorithm may use."""

    data_sizes: np.ndarray  # [N] local dataset sizes
    base_edges: np.ndarray  # [E, 2] the topology's links (before failures)
    weights: str  # mixing rule name
    consensus: ConsensusConfig
    sync: SyncConfig
    model_bytes: int
    adversary: Adversary
    base_arcs: np.ndarray | None = None  # [A, 2] one-way links u -> v of a directed topology
    compression: Compression | None = None  # what a gossip message carries (None: the plain row)

    def facts(self) -> NetworkFacts:
        # model_bytes is the float32 row: 4 bytes per parameter
        message = message_layout(self.compression, self.model_bytes // 4).nbytes if self.compression else 0
        return NetworkFacts(
            self.data_sizes, self.weights, self.consensus.max_size_ratio, self.model_bytes, self.adversary,
            self.base_arcs, message_bytes=message,
        )  # fmt: skip


def gossip_stages(consensus: ConsensusConfig) -> tuple[Gossip, ...]:
    """``consensus.steps`` gossip steps by the configured aggregation rule."""
    stage = Gossip(consensus.aggregation, consensus.trim, consensus.clip_quantile, consensus.radius_factor,
                   consensus.max_norm_ratio)  # fmt: skip
    return (stage,) * consensus.steps


def no_sync(owner: np.ndarray | list[int], num_devices: int) -> SyncOutcome:
    """A start that needs no messages: device i adopts ``owner[i]``'s init."""
    return SyncOutcome(np.asarray(owner, dtype=np.int64), np.ones(len(owner)), 0, np.zeros(num_devices, dtype=np.int64))


def graph_start(norms: torch.Tensor, setting: Setting) -> SyncOutcome:
    """P2PL's start: max norm synchronization over the topology's links (or, with
    ``sync.enabled = false``, every device keeps its own init)."""
    n = norms.shape[0]
    if not setting.sync.enabled:
        return no_sync(np.arange(n), n)
    return synchronize(
        norms, setting.base_edges, setting.sync.steps, setting.sync.mode, setting.adversary, setting.model_bytes
    )


class Algorithm(ABC):
    name: str
    uses_graph: bool = False
    directed: bool = False  # runs over one-way links (a directed topology's arcs)
    # the mixing weights it uses when not consensus.weights (for summary.json): "equal", "push-sum"
    own_weights: str | None = None

    def check(self, consensus: ConsensusConfig, engine: str) -> None:  # noqa: B027 (optional hook)
        """Refuse, in one line, a configuration this algorithm cannot run (default: all run)."""

    def num_devices(self, devices: int) -> int:
        """Rows of parameters the algorithm trains for ``devices`` devices."""
        return devices

    @abstractmethod
    def start(self, norms: torch.Tensor, setting: Setting) -> SyncOutcome:
        """Whose init each row starts from, given every device's init norm ``[N]`` (float64)."""

    @abstractmethod
    def cooperation(self, setting: Setting) -> Cooperation:
        """The cooperation phase after local training."""


class GraphAlgorithm(Algorithm):
    """An algorithm over the device graph with no server: it starts as P2PL does (max norm sync),
    and its cooperation depends on the consensus config alone, so a real node builds the same
    pipeline from its own config (:meth:`cooperation_for`)."""

    uses_graph = True

    def start(self, norms: torch.Tensor, setting: Setting) -> SyncOutcome:
        return graph_start(norms, setting)

    def cooperation(self, setting: Setting) -> Cooperation:
        return replace(self.cooperation_for(setting.consensus), compression=setting.compression)

    @abstractmethod
    def cooperation_for(self, consensus: ConsensusConfig) -> Cooperation:
        """The cooperation phase, from the consensus config."""
