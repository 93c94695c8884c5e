"""Peer-to-peer cooperation: θ_n ← Σ_{m ∈ N_n ∪ {n}} W_nm θ_m, as a dense or edge-list product.

Small or dense graphs use one dense matmul; large sparse graphs gather the senders' rows and
scatter-add them into the receivers' (in chunks, to bound memory), which is what the edge list
of a real network is. Both compute the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pl.errors import choose
from p2pl.graph.weights import MixingWeights

MIX_STRATEGIES = ("auto", "dense", "edges")
_CHUNK_ELEMENTS = 1 << 24  # floats gathered at once by the edge-list product


@dataclass(frozen=True)
class MixingOperator:
    """W in torch form, restricted to ``rows`` (receivers) of a possibly larger device set."""

    self_weight: torch.Tensor  # float32 [N]
    dst: torch.Tensor  # int64 [M]
    src: torch.Tensor  # int64 [M]
    weight: torch.Tensor  # float32 [M]
    dense: torch.Tensor | None  # float32 [N, N] when the dense strategy is used

    @staticmethod
    def of(weights: MixingWeights, strategy: str = "auto") -> MixingOperator:
        choose("mixing strategy", strategy, MIX_STRATEGIES)
        n, m = weights.num_devices, len(weights.dst)
        if strategy == "auto":
            strategy = "dense" if n <= 256 or m * 8 >= n * n else "edges"
        dense = torch.from_numpy(weights.dense()).float() if strategy == "dense" else None
        return MixingOperator(
            torch.from_numpy(np.asarray(weights.self_weight)).float(),
            torch.from_numpy(np.asarray(weights.dst, dtype=np.int64)),
            torch.from_numpy(np.asarray(weights.src, dtype=np.int64)),
            torch.from_numpy(np.asarray(weights.weight)).float(),
            dense,
        )

    def apply(self, params: torch.Tensor) -> torch.Tensor:
        """One consensus step: returns W @ params."""
        if self.dense is not None:
            return self.dense @ params
        out = params * self.self_weight.unsqueeze(1)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, params.shape[1]))
        for lo in range(0, len(self.dst), chunk):
            hi = lo + chunk
            contrib = params[self.src[lo:hi]] * self.weight[lo:hi].unsqueeze(1)
            out.index_add_(0, self.dst[lo:hi], contrib)
        return out


def consensus(params: torch.Tensor, operator: MixingOperator, steps: int, affinity: float = 1.0) -> torch.Tensor:
    """C consensus steps, then the affinity blend (1-α) θ_own + α W^C θ (α = 1: plain P2PL)."""
    mixed = params
    for _ in range(steps):
        mixed = operator.apply(mixed)
    if affinity >= 1.0:
        return mixed
    return torch.lerp(params, mixed, affinity)


def weighted_average(params: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w_n θ_n / Σ w_n over devices (FedAvg's server step) as a [P] vector."""
    w = weights.to(params.dtype)
    return (w / w.sum()) @ params


def consensus_distance(params: torch.Tensor) -> float:
    """(1/N) Σ_n ||θ_n − θ̄||², how far the devices are from agreement."""
    mean = params.double().mean(0, keepdim=True)
    return float(((params.double() - mean) ** 2).sum(1).mean())
