"""P2PL: max norm synchronization, then local training and consensus with live neighbours."""

from __future__ import annotations

from p2pl.algorithms.base import GraphAlgorithm, gossip_stages
from p2pl.config import ConsensusConfig
from p2pl.core.cooperate import Cooperation


class P2PL(GraphAlgorithm):
    name = "p2pl"

    def cooperation_for(self, consensus: ConsensusConfig) -> Cooperation:
        return Cooperation(gossip_stages(consensus), consensus.affinity, consensus.max_norm_ratio)
