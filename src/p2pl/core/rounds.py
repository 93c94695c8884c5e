"""The cooperation step over every device of a network held in one place (the simulator's view).

:func:`network_neighbourhoods` turns this round's live links into every device's row of W (what
each device hears, silent attackers heard by nobody, claimed data sizes bounded by each
receiver); :class:`NetworkCooperation` runs a :class:`~p2pl.core.cooperate.Cooperation` over all
N rows with :mod:`p2pl.core.cooperate`'s functions and counts the bytes each device sent. The Ray
backend runs the same stages shard by shard, a node for its one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from p2pl.core.adversary import Adversary, SendContext
from p2pl.core.compress import Compressor, compressed_gossip
from p2pl.core.cooperate import (
    Cooperation,
    GlobalMean,
    Gossip,
    Neighbourhoods,
    finish,
    gossip,
    rollback_unsound,
    weighted_average,
)
from p2pl.graph.weights import mixing_weights


@dataclass(frozen=True, eq=False)
class NetworkFacts:
    """What cooperation needs to know about the devices besides their parameters."""

    data_sizes: np.ndarray  # [N] true local dataset sizes
    weights: str  # the mixing rule (consensus.weights)
    max_size_ratio: float  # bound on a neighbour's claimed size (consensus.max_size_ratio)
    model_bytes: int  # one parameter message
    adversary: Adversary
    message_bytes: int = 0  # one gossip message when compressed (its encoded size); 0: model_bytes


def heard_edges(live_edges: np.ndarray, adversary: Adversary) -> np.ndarray:
    """The live links a message really crosses: a silent attacker's links carry nothing."""
    if not adversary.is_("silent") or len(live_edges) == 0:
        return live_edges
    keep = ~adversary.mask(live_edges).any(axis=1)
    return live_edges[keep]


def network_neighbourhoods(num_devices: int, live_edges: np.ndarray, facts: NetworkFacts) -> Neighbourhoods:
    """Every device's neighbourhood and row of W from the links up this round (pool = all rows)."""
    edges = heard_edges(live_edges, facts.adversary)
    w = mixing_weights(
        num_devices,
        edges,
        facts.weights,
        facts.data_sizes,
        claimed_sizes=facts.adversary.claimed_sizes(facts.data_sizes),
        max_size_ratio=facts.max_size_ratio,
    )
    return Neighbourhoods.from_edges(num_devices, w.dst, w.src, w.weight, w.self_weight)


def gossip_bytes(num_devices: int, live_edges: np.ndarray, facts: NetworkFacts) -> np.ndarray:
    """One message per device per live neighbour (silent attackers send none)."""
    degree = np.bincount(np.asarray(live_edges, dtype=np.int64).ravel(), minlength=num_devices)
    if facts.adversary.is_("silent"):
        degree[facts.adversary.ids[facts.adversary.ids < num_devices]] = 0
    return degree.astype(np.int64) * (facts.message_bytes or facts.model_bytes)


def upload_bytes(active: np.ndarray, facts: NetworkFacts) -> np.ndarray:
    """Each present device uploads its model once (FedAvg)."""
    return np.where(np.asarray(active, dtype=bool), facts.model_bytes, 0).astype(np.int64)


class Trainer(Protocol):
    def train(self, params: torch.Tensor, round_index: int, work: np.ndarray | None = None) -> Any: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def train_with_rollback(
    trainer: Trainer, params: torch.Tensor, round_index: int, work: np.ndarray | None, guard: bool, ratio: float
) -> tuple[Any, np.ndarray]:
    """Local training; with ``guard``, a row that came out non-finite or exploding (norm beyond
    ``ratio`` x its pre-training norm: poisoned by what a neighbour sent) is rolled back to its
    pre-training row and its optimizer state reset. Returns the stats and the rolled-back rows."""
    before = params.clone() if guard else None
    stats = trainer.train(params, round_index, work)
    if before is None:
        return stats, np.zeros(params.shape[0], dtype=bool)
    bad = rollback_unsound(params, before, ratio)
    if bool(bad.any()):
        state = {k: v.clone() for k, v in trainer.state_tensors().items()}
        for value in state.values():
            value[bad.to(value.device)] = 0
        trainer.load_state_tensors(state)
    return stats, bad.cpu().numpy()


class NetworkCooperation:
    """Runs an algorithm's cooperation over all N rows (caches W while the live links stay put)."""

    def __init__(self, coop: Cooperation, facts: NetworkFacts, seed: int, num_params: int = 0) -> None:
        self.coop = coop
        self.facts = facts
        self.seed = seed
        self._cached: tuple[bytes, Neighbourhoods] | None = None
        # Every device's sender state for compressed gossip (start it with start_compression).
        self.compressor = Compressor(coop.compression, num_params, seed) if coop.compression else None

    def start_compression(self, rows: torch.Tensor) -> None:
        """The compressors' state at the start of training (the devices' start rows)."""
        if self.compressor is not None:
            self.compressor.start(rows)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Per-device cooperation state to checkpoint (compression: error feedback, choco copies)."""
        return {} if self.compressor is None else self.compressor.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.compressor is not None:
            self.compressor.load_state_tensors(tensors)

    def neighbourhoods(self, num_devices: int, live_edges: np.ndarray) -> Neighbourhoods:
        key = live_edges.tobytes()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, network_neighbourhoods(num_devices, live_edges, self.facts))
        return self._cached[1]

    def sent_rows(self, rows: torch.Tensor, hoods: Neighbourhoods, round_index: int, step: int) -> torch.Tensor:
        """What every device sends: its row, or its attack on it."""
        adversary = self.facts.adversary
        if not adversary.rewrites_rows:
            return rows
        ids = np.arange(rows.shape[0], dtype=np.int64)
        bad = np.flatnonzero(adversary.mask(ids))
        ctx = SendContext(rows, hoods.subset(bad), self.seed, round_index, step)
        out = rows.clone()
        index = torch.from_numpy(bad).to(rows.device)
        out[index] = adversary.send(rows[index], ids[bad], ctx)
        return out

    def run(
        self, params: torch.Tensor, live_edges: np.ndarray, active: np.ndarray, round_index: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The cooperation step; returns the new [N, P] rows and the bytes each device sent."""
        n = params.shape[0]
        sent = np.zeros(n, dtype=np.int64)
        rows = params
        for step, stage in enumerate(self.coop.stages):
            if isinstance(stage, Gossip):
                hoods = self.neighbourhoods(n, live_edges)
                sent_rows = self.sent_rows(rows, hoods, round_index, step)
                if self.compressor is None:
                    rows = gossip(rows, sent_rows, hoods, stage)
                else:
                    ids = np.arange(n, dtype=np.int64)
                    senders = gossip_bytes(n, live_edges, self.facts) > 0  # a device heard by nobody sends nothing
                    pool, mask = self.compressor.publish(sent_rows, ids, round_index, step, senders)
                    rows = compressed_gossip(rows, pool, mask, hoods, stage, self.compressor)
                sent += gossip_bytes(n, live_edges, self.facts)
            elif isinstance(stage, GlobalMean):
                rows = self.global_mean(rows, active, round_index, step)
                sent += upload_bytes(active, self.facts)
        if not self.coop.stages:
            return params, sent
        return finish(self.coop, rows, params, active), sent

    def global_mean(self, rows: torch.Tensor, active: np.ndarray, round_index: int, step: int) -> torch.Tensor:
        present = np.flatnonzero(active)
        if len(present) == 0:
            return rows
        empty = Neighbourhoods.from_edges(rows.shape[0], np.zeros(0), np.zeros(0), np.zeros(0), np.ones(rows.shape[0]))
        uploads = self.sent_rows(rows, empty, round_index, step)
        index = torch.from_numpy(present).to(rows.device)
        sizes = torch.from_numpy(self.facts.data_sizes[present]).double()
        out = rows.clone()
        out[index] = weighted_average(uploads[index], sizes).to(rows.dtype)
        return out


__all__ = [
    "NetworkCooperation",
    "NetworkFacts",
    "gossip_bytes",
    "heard_edges",
    "network_neighbourhoods",
    "train_with_rollback",
    "upload_bytes",
]
