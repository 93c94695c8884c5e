"""Max norm synchronization: every device adopts the largest-norm parameters it can see.

Each step a device replaces its parameters by those with the largest L2 norm among itself and
its neighbours (ties: lowest device id). On a connected static graph every device holds the
globally largest-norm initialization after at most diam(G) steps, with no coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SyncResult:
    owner: torch.Tensor  # int64 [N]: whose initial parameters each device ends with
    steps: int  # steps in which some device changed (communication rounds used)


def max_norm_owner(norms: torch.Tensor, edges: np.ndarray, max_steps: int = 0) -> SyncResult:
    """Run the max-norm flood over undirected ``edges`` [E, 2]; ``max_steps`` 0 = until stable."""
    n = norms.shape[0]
    # Rank devices by (-norm, id): "largest norm, ties to the lowest id" becomes "smallest rank".
    order = torch.from_numpy(np.lexsort((np.arange(n), -norms.double().numpy())))
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n)
    e = torch.from_numpy(np.asarray(edges, dtype=np.int64).reshape(-1, 2))
    dst = torch.cat([e[:, 0], e[:, 1]])
    src = torch.cat([e[:, 1], e[:, 0]])
    held = rank.clone()
    steps = 0
    while max_steps <= 0 or steps < max_steps:
        best = held.clone()
        best.scatter_reduce_(0, dst, held[src], reduce="amin")
        if torch.equal(best, held):
            break
        held = best
        steps += 1
    return SyncResult(order[held], steps)


def sync_bytes_per_device(edges: np.ndarray, num_devices: int, steps: int, model_bytes: int) -> np.ndarray:
    """Each sync step every device sends its current model to each neighbour."""
    degree = np.bincount(np.asarray(edges, dtype=np.int64).ravel(), minlength=num_devices)
    return degree * steps * model_bytes
