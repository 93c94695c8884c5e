"""The cooperation step over every device of a network held in one place (the simulator's view).

:func:`network_neighbourhoods` turns this round's live links into every device's row of W (what
each device hears, silent attackers heard by nobody, claimed data sizes bounded by each
receiver); :class:`NetworkCooperation` runs a :class:`~p2pl.core.cooperate.Cooperation` over all
N rows with :mod:`p2pl.core.cooperate`'s functions and counts the bytes each device sent. The Ray
backend runs the same stages shard by shard, a node for its one row.
"""

from __future__ import annotations

from collections.abc import Callable
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
    PushSum,
    Stage,
    finish,
    gossip,
    rollback_unsound,
    weighted_average,
)
from p2pl.core.neighbours import both_directions, live_arcs, one_peer_neighbourhoods, push_sum_neighbourhoods
from p2pl.graph.weights import mixing_weights


@dataclass(frozen=True, eq=False)
class NetworkFacts:
    """What cooperation needs to know about the devices besides their parameters."""

    data_sizes: np.ndarray  # [N] true local dataset sizes
    weights: str  # the mixing rule (consensus.weights)
    max_size_ratio: float  # bound on a neighbour's claimed size (consensus.max_size_ratio)
    model_bytes: int  # one parameter message
    adversary: Adversary
    arcs: np.ndarray | None = None  # int64 [A, 2] one-way links u -> v (directed topologies); None: both ways
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


#: Key of the push-sum weights among a run's per-device state tensors (checkpointed with the
#: optimizer state, sharded by rows like it).
PUSH_SUM_WEIGHT = "cooperation.push_sum_weight"


class StagePlanner:
    """Who hears whom in each stage over the whole network (the simulator, the Ray driver), and
    the per-device state stages carry across rounds: the push-sum weights.

    ``neighbourhoods`` for a :class:`PushSum` stage also advances the weights, so call it once
    per stage run; ``state_tensors`` / ``load_state_tensors`` checkpoint them."""

    def __init__(self, coop: Cooperation, facts: NetworkFacts, seed: int, num_devices: int) -> None:
        self.facts = facts
        self.seed = seed
        self.num_devices = num_devices
        self._cached: tuple[bytes, Neighbourhoods] | None = None
        pushes = any(isinstance(stage, PushSum) for stage in coop.stages)
        self.push_weight: np.ndarray | None = np.ones(num_devices) if pushes else None

    def neighbourhoods(self, stage: Stage, live_edges: np.ndarray, round_index: int, step: int) -> Neighbourhoods:
        n = self.num_devices
        if isinstance(stage, PushSum):
            assert self.push_weight is not None
            heard = heard_edges(live_edges, self.facts.adversary)
            # undirected: both ways of every link heard; directed: the arcs whose pair is heard
            arcs = both_directions(heard) if self.facts.arcs is None else live_arcs(self.facts.arcs, heard, n)
            hoods, self.push_weight = push_sum_neighbourhoods(n, arcs, self.push_weight)
            return hoods
        if isinstance(stage, Gossip) and stage.peers == "one-random":
            adversary = self.facts.adversary
            mute = adversary.mask(np.arange(n)) if adversary.is_("silent") else None
            return one_peer_neighbourhoods(n, live_edges, self.seed, round_index, step, mute)
        key = live_edges.tobytes()  # W stays put while the live links do
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, network_neighbourhoods(n, live_edges, self.facts))
        return self._cached[1]

    def bytes_sent(self, stage: Stage, live_edges: np.ndarray, hoods: Neighbourhoods) -> np.ndarray:
        """Bytes each device sent in this stage: one model per live neighbour for P2PL's gossip,
        one per receiver it was heard by for the baselines' selections."""
        if isinstance(stage, Gossip) and stage.peers == "all":
            return gossip_bytes(self.num_devices, live_edges, self.facts)
        return np.bincount(hoods.src, minlength=self.num_devices).astype(np.int64) * self.facts.model_bytes

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.push_weight is None:
            return {}
        return {PUSH_SUM_WEIGHT: torch.from_numpy(self.push_weight.copy())}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.push_weight is not None and PUSH_SUM_WEIGHT in tensors:
            self.push_weight = tensors[PUSH_SUM_WEIGHT].double().numpy().copy()


class Trainer(Protocol):
    def train(
        self,
        params: torch.Tensor,
        round_index: int,
        work: np.ndarray | None = None,
        *,
        span: list[tuple[int, int]] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> Any: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def train_with_rollback(
    trainer: Trainer,
    params: torch.Tensor,
    round_index: int,
    work: np.ndarray | None,
    guard: bool,
    ratio: float,
    span: list[tuple[int, int]] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> tuple[Any, np.ndarray]:
    """Local training; with ``guard``, a row that came out non-finite or exploding (norm beyond
    ``ratio`` x its pre-training norm: poisoned by what a neighbour sent) is rolled back to its
    pre-training row and its optimizer state reset. Returns the stats and the rolled-back rows.
    ``span`` and ``after_step`` go to the trainer (D-PSGD mixes after every local step)."""
    before = params.clone() if guard else None
    if span is None and after_step is None:
        stats = trainer.train(params, round_index, work)
    else:
        stats = trainer.train(params, round_index, work, span=span, after_step=after_step)
    return stats, roll_back_training(trainer, params, before, ratio)


def roll_back_training(trainer: Trainer, params: torch.Tensor, before: torch.Tensor | None, ratio: float) -> np.ndarray:
    """Restore the unsound rows of ``params`` from ``before`` (None: no guard) and reset their
    optimizer state; returns the rolled-back rows."""
    if before is None:
        return np.zeros(params.shape[0], dtype=bool)
    bad = rollback_unsound(params, before, ratio)
    if bool(bad.any()):
        state = {k: v.clone() for k, v in trainer.state_tensors().items()}
        for value in state.values():
            value[bad.to(value.device)] = 0
        trainer.load_state_tensors(state)
    return bad.cpu().numpy()


class NetworkCooperation:
    """Runs an algorithm's cooperation over all N rows (a :class:`StagePlanner` says who hears whom)."""

    def __init__(
        self, coop: Cooperation, facts: NetworkFacts, seed: int, num_devices: int | None = None, num_params: int = 0
    ) -> None:
        self.coop = coop
        self.facts = facts
        self.seed = seed
        self.planner = StagePlanner(coop, facts, seed, len(facts.data_sizes) if num_devices is None else num_devices)
        # Every device's sender state for compressed gossip (start it with start_compression).
        self.compressor = Compressor(coop.compression, num_params, seed) if coop.compression else None

    def start_compression(self, rows: torch.Tensor) -> None:
        """The compressors' state at the start of training (the devices' start rows)."""
        if self.compressor is not None:
            self.compressor.start(rows)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Per-device cooperation state to checkpoint (push-sum weights; compression: error
        feedback, choco copies)."""
        state = self.planner.state_tensors()
        return state if self.compressor is None else state | self.compressor.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.planner.load_state_tensors(tensors)
        if self.compressor is not None:
            self.compressor.load_state_tensors(tensors)

    def neighbourhoods(self, num_devices: int, live_edges: np.ndarray) -> Neighbourhoods:
        """Every device's row of W over the live links (P2PL's gossip)."""
        return self.planner.neighbourhoods(Gossip(), live_edges, 0, 0)

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
        self, params: torch.Tensor, live_edges: np.ndarray, active: np.ndarray, round_index: int, first_step: int = 0
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The cooperation step; returns the new [N, P] rows and the bytes each device sent.
        ``first_step`` numbers the stages after the ones already run this round (D-PSGD)."""
        n = params.shape[0]
        sent = np.zeros(n, dtype=np.int64)
        rows = params
        for step, stage in enumerate(self.coop.stages, start=first_step):
            if isinstance(stage, (Gossip, PushSum)):
                hoods = self.planner.neighbourhoods(stage, live_edges, round_index, step)
                mix = stage.as_gossip() if isinstance(stage, PushSum) else stage
                sent_rows = self.sent_rows(rows, hoods, round_index, step)
                if self.compressor is None:
                    rows = gossip(rows, sent_rows, hoods, mix)
                else:  # only gossip with every live neighbour (compress.incompressible)
                    ids = np.arange(n, dtype=np.int64)
                    senders = gossip_bytes(n, live_edges, self.facts) > 0  # a device heard by nobody sends nothing
                    pool, mask = self.compressor.publish(sent_rows, ids, round_index, step, senders)
                    rows = compressed_gossip(rows, pool, mask, hoods, mix, self.compressor)
                sent += self.planner.bytes_sent(stage, live_edges, hoods)
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
    "PUSH_SUM_WEIGHT",
    "NetworkCooperation",
    "NetworkFacts",
    "StagePlanner",
    "gossip_bytes",
    "heard_edges",
    "network_neighbourhoods",
    "roll_back_training",
    "train_with_rollback",
    "upload_bytes",
]
