"""Local-only baseline: devices train on their own data and never communicate."""

from __future__ import annotations

import numpy as np
import torch

from p2pl.algorithms.base import Algorithm, Setting, no_sync
from p2pl.core.cooperate import Cooperation
from p2pl.core.sync import SyncOutcome


class Local(Algorithm):
    name = "local"

    def start(self, norms: torch.Tensor, setting: Setting) -> SyncOutcome:
        return no_sync(np.arange(norms.shape[0]), norms.shape[0])

    def cooperation(self, setting: Setting) -> Cooperation:
        return Cooperation()
