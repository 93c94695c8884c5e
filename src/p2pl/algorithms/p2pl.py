"""P2PL: max norm synchronization, then local training and consensus with live neighbours."""

from __future__ import annotations

import numpy as np
import torch

from p2pl.algorithms.base import Algorithm, Exchange, RoundLinks, Setting, Start, no_bytes
from p2pl.core.consensus import MixingOperator, consensus
from p2pl.core.sync import max_norm_owner, sync_bytes_per_device
from p2pl.graph.weights import mixing_weights


class P2PL(Algorithm):
    name = "p2pl"
    uses_graph = True

    def __init__(self) -> None:
        self._cached: tuple[bytes, MixingOperator] | None = None

    def start(self, inits: torch.Tensor, setting: Setting) -> Start:
        n = inits.shape[0]
        if not setting.sync.enabled:
            return Start(inits.clone(), 0, no_bytes(n))
        result = max_norm_owner(inits.double().norm(dim=1), setting.base_edges, setting.sync.steps)
        sent = sync_bytes_per_device(setting.base_edges, n, result.steps, setting.model_bytes)
        return Start(inits[result.owner].clone(), result.steps, sent)

    def operator(self, live_edges: np.ndarray, n: int, setting: Setting) -> MixingOperator:
        """Each device's row of W from the links up this round (cached while they do not change)."""
        key = live_edges.tobytes()
        if self._cached is None or self._cached[0] != key:
            weights = mixing_weights(n, live_edges, setting.weights, setting.data_sizes)
            self._cached = (key, MixingOperator.of(weights))
        return self._cached[1]

    def exchange(self, params: torch.Tensor, links: RoundLinks, setting: Setting) -> Exchange:
        n = params.shape[0]
        if not links.cooperate:
            return Exchange(params, no_bytes(n))
        op = self.operator(links.live_edges, n, setting)
        mixed = consensus(params, op, setting.consensus.steps, setting.consensus.affinity)
        # An absent device neither trains nor mixes (its links are already down; keep it exact).
        if not links.active.all():
            absent = torch.from_numpy(~links.active)
            mixed[absent] = params[absent]
        degree = np.bincount(links.live_edges.ravel(), minlength=n)
        sent = degree * setting.consensus.steps * setting.model_bytes
        return Exchange(mixed, sent.astype(np.int64))
