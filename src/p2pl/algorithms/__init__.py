"""P2PL and its baselines (fedavg, centralized, local, dpsgd, gossip, push-sum): small and alike."""

from __future__ import annotations

from collections.abc import Callable

from p2pl.algorithms.base import Algorithm
from p2pl.algorithms.centralized import Centralized
from p2pl.algorithms.dpsgd import DPSGD
from p2pl.algorithms.fedavg import FedAvg
from p2pl.algorithms.gossip import RandomGossip
from p2pl.algorithms.local import Local
from p2pl.algorithms.p2pl import P2PL
from p2pl.algorithms.push_sum import PushSumAlgorithm
from p2pl.config import ALGORITHM_NAMES
from p2pl.errors import choose

#: algorithm name -> builder (``algorithm`` in a config).
ALGORITHMS: dict[str, Callable[[], Algorithm]] = {
    "p2pl": P2PL,
    "fedavg": FedAvg,
    "centralized": Centralized,
    "local": Local,
    "dpsgd": DPSGD,
    "gossip": RandomGossip,
    "push-sum": PushSumAlgorithm,
}


assert tuple(ALGORITHMS) == ALGORITHM_NAMES  # the names the config and the CLI know


def make_algorithm(name: str) -> Algorithm:
    return ALGORITHMS[choose("algorithm", name, tuple(ALGORITHMS))]()
