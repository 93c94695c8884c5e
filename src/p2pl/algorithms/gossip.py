"""Randomized gossip: each round every device sends its model to one random live neighbour.

The neighbour is drawn uniformly with keyed randomness (seed, round, step, device), so a real
node draws exactly the simulator's choice; each receiver averages its own row with the rows it
received, equal weights (``1 / (1 + k)`` for ``k`` rows). One model per sending device per round.
"""

from __future__ import annotations

from dataclasses import replace

from p2pl.algorithms.base import GraphAlgorithm, gossip_stages
from p2pl.config import ConsensusConfig
from p2pl.core.cooperate import Cooperation


class RandomGossip(GraphAlgorithm):
    name = "gossip"
    own_weights = "equal"

    def cooperation_for(self, consensus: ConsensusConfig) -> Cooperation:
        stages = tuple(replace(stage, peers="one-random") for stage in gossip_stages(consensus))
        return Cooperation(stages, consensus.affinity, consensus.max_norm_ratio)
