"""Local-only baseline: devices train on their own data and never communicate."""

from __future__ import annotations

import numpy as np
import torch

from p2pl.algorithms.base import Algorithm, Exchange, RoundLinks, Setting, Start


class Local(Algorithm):
    name = "local"

    def start(self, inits: torch.Tensor, setting: Setting) -> Start:
        return Start(inits.clone(), 0, np.zeros(inits.shape[0], dtype=np.int64))

    def exchange(self, params: torch.Tensor, links: RoundLinks, setting: Setting) -> Exchange:
        return Exchange(params, np.zeros(params.shape[0], dtype=np.int64))
