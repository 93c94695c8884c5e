"""FedAvg baseline: a server averages the device models weighted by |D_n| and broadcasts."""

from __future__ import annotations

import numpy as np
import torch

from p2pl.algorithms.base import Algorithm, Setting, no_sync
from p2pl.core.cooperate import Cooperation, GlobalMean
from p2pl.core.sync import SyncOutcome, largest_norm


class FedAvg(Algorithm):
    name = "fedavg"

    def start(self, norms: torch.Tensor, setting: Setting) -> SyncOutcome:
        # One common init from the server: the largest-norm device init, i.e. the same start
        # as synchronized P2PL, so the two differ only in how they cooperate.
        n = norms.shape[0]
        return no_sync(np.full(n, largest_norm(norms)), n)

    def cooperation(self, setting: Setting) -> Cooperation:
        # Absent devices keep their model and get the new one when they come back.
        return Cooperation((GlobalMean(),), max_norm_ratio=setting.consensus.max_norm_ratio)
