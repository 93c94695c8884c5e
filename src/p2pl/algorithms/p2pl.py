"""P2PL: max norm synchronization, then local training and consensus with live neighbours."""

from __future__ import annotations

import numpy as np
import torch

from p2pl.algorithms.base import Algorithm, Setting, gossip_stages, no_sync
from p2pl.core.cooperate import Cooperation
from p2pl.core.sync import SyncOutcome, synchronize


class P2PL(Algorithm):
    name = "p2pl"
    uses_graph = True

    def start(self, norms: torch.Tensor, setting: Setting) -> SyncOutcome:
        n = norms.shape[0]
        if not setting.sync.enabled:
            return no_sync(np.arange(n), n)
        return synchronize(
            norms, setting.base_edges, setting.sync.steps, setting.sync.mode, setting.adversary, setting.model_bytes
        )

    def cooperation(self, setting: Setting) -> Cooperation:
        return Cooperation(
            gossip_stages(setting.consensus), setting.consensus.affinity, setting.consensus.max_norm_ratio,
            compression=setting.compression,
        )  # fmt: skip
