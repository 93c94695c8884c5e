"""Centralized baseline: one model trained on the union of all devices' data."""

from __future__ import annotations

import numpy as np
import torch

from p2pl.algorithms.base import Algorithm, Exchange, RoundLinks, Setting, Start, max_norm_device


class Centralized(Algorithm):
    name = "centralized"

    def num_devices(self, devices: int) -> int:
        return 1

    def start(self, inits: torch.Tensor, setting: Setting) -> Start:
        # ``inits`` holds every device's init; start from the same one as FedAvg / synced P2PL.
        return Start(inits[max_norm_device(inits)].unsqueeze(0).clone(), 0, np.zeros(1, dtype=np.int64))

    def exchange(self, params: torch.Tensor, links: RoundLinks, setting: Setting) -> Exchange:
        return Exchange(params, np.zeros(1, dtype=np.int64))
