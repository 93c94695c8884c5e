"""How far the devices are from agreement: the consensus distance (1/N) Σ_n ||θ_n − θ̄||².

The cooperation step itself (the mean and the robust rules) lives in :mod:`p2pl.core.cooperate`.
"""

from __future__ import annotations

import torch


def consensus_distance(params: torch.Tensor, chunk: int = 1024) -> float:
    """(1/N) Σ_n ||θ_n − θ̄||², how far the devices are from agreement (float64, in row chunks so
    10,000 devices need no float64 copy of every parameter)."""
    n = params.shape[0]
    mean = torch.zeros(params.shape[1], dtype=torch.float64)
    for lo in range(0, n, chunk):
        mean += params[lo : lo + chunk].double().sum(0)
    mean /= n
    total = 0.0
    for lo in range(0, n, chunk):
        total += float(((params[lo : lo + chunk].double() - mean) ** 2).sum())
    return total / n
