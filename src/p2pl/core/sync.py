"""Max norm synchronization: every device adopts the largest-norm parameters it can see.

Each step a device replaces its parameters by those with the largest L2 norm among itself and
its neighbours (ties: lowest device id). On a connected static graph every device holds the
globally largest-norm initialization after at most diam(G) steps, with no coordinator.

Two forms (``sync.mode``):

* ``verified`` (default): a device's initial parameters are a public function of (seed, device
  id), so devices flood only (norm, owner) claims; a receiver recomputes the claimed owner's
  init and ignores a claim whose norm does not match. No parameters travel: each device builds
  the winner's init itself. A lying device cannot take the network over.
* ``flood``: the paper's form: parameters travel with every step, and a device that claims a
  larger norm (with parameters to match) is adopted by everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pl.core.adversary import Adversary

#: Bytes of one verified-sync claim: the norm (float64) and the owner's device id (int64).
CLAIM_BYTES = 16


@dataclass(frozen=True)
class SyncResult:
    owner: torch.Tensor  # int64 [N]: whose initial parameters each device ends with
    steps: int  # steps in which some device changed (communication rounds used)


def better_claim(a: tuple[float, int], b: tuple[float, int]) -> bool:
    """The sync order on (norm, device id) pairs: larger norm wins, ties go to the lower id."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def norm_order(norms: torch.Tensor) -> np.ndarray:
    """Device ids best first in the sync order (:func:`better_claim`)."""
    return np.lexsort((np.arange(norms.shape[0]), -norms.double().numpy()))


def largest_norm(norms: torch.Tensor) -> int:
    """The device whose initialization wins max-norm sync (largest norm, ties: lowest id)."""
    return int(norm_order(norms)[0])


def max_norm_owner(norms: torch.Tensor, edges: np.ndarray, max_steps: int = 0) -> SyncResult:
    """Run the max-norm flood over undirected ``edges`` [E, 2]; ``max_steps`` 0 = until stable."""
    n = norms.shape[0]
    # Rank devices in the sync order: "largest norm, ties to the lowest id" becomes "smallest rank".
    order = torch.from_numpy(norm_order(norms))
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


def sync_bytes_per_device(edges: np.ndarray, num_devices: int, steps: int, message_bytes: int) -> np.ndarray:
    """Each sync step every device sends one message (a model, or a claim) to each neighbour."""
    degree = np.bincount(np.asarray(edges, dtype=np.int64).ravel(), minlength=num_devices)
    return (degree * steps * message_bytes).astype(np.int64)


@dataclass(frozen=True)
class SyncOutcome:
    owner: np.ndarray  # int64 [N]: whose initial parameters each device ends with
    scale: np.ndarray  # float64 [N]: factor on that init (not 1 only where a flood was hijacked)
    steps: int
    bytes_sent: np.ndarray  # int64 [N]


def synchronize(
    norms: torch.Tensor, edges: np.ndarray, max_steps: int, mode: str, adversary: Adversary, model_bytes: int
) -> SyncOutcome:
    """Max norm sync of ``mode`` over ``edges`` with this run's attackers.

    A ``sync-hijack`` attacker claims its norm x scale: verified sync refuses the claim (and so
    hears nothing from it), the paper's flood adopts it and hands out its init x scale. Silent
    attackers send nothing. Attackers themselves keep their own init."""
    n = norms.shape[0]
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    claimed = norms.double().clone()
    liars = adversary.ids[adversary.ids < n] if adversary.is_("sync-hijack") or adversary.is_("silent") else None
    flood_edges = edges
    if liars is not None and len(liars):
        if mode == "flood" and adversary.is_("sync-hijack"):
            claimed[torch.from_numpy(liars)] *= adversary.scale
        else:  # a refused claim, or silence: those links carry nothing during sync
            flood_edges = edges[~np.isin(edges, liars).any(axis=1)]
    result = max_norm_owner(claimed, flood_edges, max_steps)
    owner = result.owner.numpy().copy()
    scale = np.ones(n, dtype=np.float64)
    if liars is not None and len(liars):
        owner[liars] = liars
        if mode == "flood" and adversary.is_("sync-hijack"):
            scale[np.isin(owner, liars) & ~np.isin(np.arange(n), liars)] = adversary.scale
    message = model_bytes if mode == "flood" else CLAIM_BYTES
    sent = sync_bytes_per_device(edges, n, result.steps, message)
    if adversary.is_("silent"):
        sent[adversary.ids[adversary.ids < n]] = 0
    return SyncOutcome(owner, scale, result.steps, sent)
