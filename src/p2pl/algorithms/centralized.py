"""Centralized baseline: one model trained on the union of all devices' data."""

from __future__ import annotations

import torch

from p2pl.algorithms.base import Algorithm, Setting, no_sync
from p2pl.core.cooperate import Cooperation
from p2pl.core.sync import SyncOutcome, largest_norm


class Centralized(Algorithm):
    name = "centralized"

    def num_devices(self, devices: int) -> int:
        return 1

    def start(self, norms: torch.Tensor, setting: Setting) -> SyncOutcome:
        # Start from the same init as FedAvg / synced P2PL.
        return no_sync([largest_norm(norms)], 1)

    def cooperation(self, setting: Setting) -> Cooperation:
        return Cooperation()
