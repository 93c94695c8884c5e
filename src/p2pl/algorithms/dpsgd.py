"""D-PSGD (Lian et al. 2017): one gossip step with the neighbours after every local SGD step.

``x <- W (x - lr g)`` at each step, with W the configured consensus weights over the live
links. Devices with fewer samples run out of local steps first; they keep mixing at every step
the network still takes (their rows move only through their neighbours).
"""

from __future__ import annotations

from dataclasses import replace

from p2pl.algorithms.base import GraphAlgorithm, gossip_stages
from p2pl.config import ConsensusConfig
from p2pl.core.cooperate import Cooperation
from p2pl.errors import P2PLError


class DPSGD(GraphAlgorithm):
    name = "dpsgd"

    def check(self, consensus: ConsensusConfig, engine: str) -> None:
        if engine != "vectorized":
            raise P2PLError(
                f"algorithm 'dpsgd' mixes between local steps, on the vectorized engine; drop engine = {engine!r}"
            )

    def cooperation_for(self, consensus: ConsensusConfig) -> Cooperation:
        stages = gossip_stages(consensus)
        return replace(Cooperation(stages, consensus.affinity, consensus.max_norm_ratio), every_local_step=True)
