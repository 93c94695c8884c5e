"""Push-sum (Kempe et al. 2003; stochastic gradient push, Assran et al. 2019) over one-way links.

Every device splits ``(w x, w)`` equally among itself and its live out-neighbours each
consensus step; devices train the de-biased model ``z = x / w``. The mixing matrix is column
stochastic, so it needs no reverse links: it runs on a directed topology
(``directed-random-geometric``) as on an undirected one (both directions of every link).
"""

from __future__ import annotations

from p2pl.algorithms.base import GraphAlgorithm
from p2pl.config import ConsensusConfig
from p2pl.core.cooperate import Cooperation, PushSum
from p2pl.errors import P2PLError


class PushSumAlgorithm(GraphAlgorithm):
    name = "push-sum"
    directed = True
    own_weights = "push-sum"

    def check(self, consensus: ConsensusConfig, engine: str) -> None:
        if consensus.aggregation != "mean":
            raise P2PLError(
                f"push-sum mixes by its own column-stochastic weights; consensus.aggregation = "
                f"{consensus.aggregation!r} does not apply to it: set consensus.aggregation = 'mean'"
            )

    def cooperation_for(self, consensus: ConsensusConfig) -> Cooperation:
        stages = (PushSum(consensus.max_norm_ratio),) * consensus.steps
        return Cooperation(stages, consensus.affinity, consensus.max_norm_ratio)
