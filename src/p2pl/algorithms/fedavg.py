"""FedAvg baseline: a server averages the device models weighted by |D_n| and broadcasts."""

from __future__ import annotations

import numpy as np
import torch

from p2pl.algorithms.base import Algorithm, Exchange, RoundLinks, Setting, Start, max_norm_device
from p2pl.core.consensus import weighted_average


class FedAvg(Algorithm):
    name = "fedavg"

    def start(self, inits: torch.Tensor, setting: Setting) -> Start:
        # One common init from the server: the largest-norm device init, i.e. the same start
        # as synchronized P2PL, so the two differ only in how they cooperate.
        n = inits.shape[0]
        common = inits[max_norm_device(inits)]
        return Start(common.expand(n, -1).clone(), 0, np.zeros(n, dtype=np.int64))

    def exchange(self, params: torch.Tensor, links: RoundLinks, setting: Setting) -> Exchange:
        n = params.shape[0]
        present = np.flatnonzero(links.active)
        if not links.cooperate or len(present) == 0:
            return Exchange(params, np.zeros(n, dtype=np.int64))
        rows = torch.from_numpy(present)
        sizes = torch.from_numpy(setting.data_sizes[present]).double()
        average = weighted_average(params[rows], sizes)
        out = params.clone()
        out[rows] = average  # absent devices get the model when they come back
        sent = np.where(links.active, setting.model_bytes, 0)  # each device uploads once
        return Exchange(out, sent.astype(np.int64))
