"""Which samples each device trains on at each local step: one schedule for every engine.

Every device shuffles its own indices each epoch and walks them in mini-batches of ``B``; the
last batch of an epoch is smaller, so no sample is dropped and a device with fewer samples
simply takes fewer steps (it idles while larger devices finish: no over-training). The shuffle
keys are drawn per (round, epoch) over the concatenation of all devices' index arrays, so a
shard of devices (Ray) or a single device (node runtime) gets exactly the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from p2pl.core.rng import torch_generator


@dataclass(frozen=True)
class Partition:
    """Devices' local data as index arrays into the one shared training set."""

    indices: tuple[np.ndarray, ...]  # per device, int64
    device_ids: tuple[int, ...]  # global ids of these devices (a shard may hold a subset)
    offsets: tuple[int, ...]  # where each device's indices start in the global concatenation
    total: int  # length of the global concatenation of all devices' indices

    @staticmethod
    def full(parts: list[np.ndarray]) -> Partition:
        sizes = [len(p) for p in parts]
        offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        return Partition(tuple(np.asarray(p, dtype=np.int64) for p in parts), tuple(range(len(parts))),
                         offsets, int(sum(sizes)))  # fmt: skip

    def subset(self, devices: list[int]) -> Partition:
        """The partition restricted to some devices (same global shuffle keys)."""
        pos = {d: i for i, d in enumerate(self.device_ids)}
        rows = [pos[d] for d in devices]
        return Partition(tuple(self.indices[r] for r in rows), tuple(devices),
                         tuple(self.offsets[r] for r in rows), self.total)  # fmt: skip

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(p) for p in self.indices], dtype=np.int64)


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of mini-batches for a batch of devices, padded to a rectangle.

    ``order[n, j]`` is device n's j-th sample (a global training index) in this epoch, valid
    where ``j < sizes[n]``; step t uses columns ``[t*B, (t+1)*B)``.
    """

    order: torch.Tensor  # int64 [N, max_size]
    sizes: torch.Tensor  # int64 [N]
    batch_size: int

    @property
    def steps(self) -> torch.Tensor:
        """Mini-batch steps per device in this epoch."""
        return (self.sizes + self.batch_size - 1) // self.batch_size

    @property
    def max_steps(self) -> int:
        return int(self.steps.max()) if len(self.sizes) else 0

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample indices ``[N, b]`` and validity mask ``[N, b]`` for step t."""
        lo = t * self.batch_size
        hi = min(lo + self.batch_size, self.order.shape[1])
        cols = torch.arange(lo, hi)
        mask = cols.unsqueeze(0) < self.sizes.unsqueeze(1)
        return self.order[:, lo:hi], mask


def epoch_plan(partition: Partition, seed: int, round_index: int, epoch: int, batch_size: int) -> EpochPlan:
    keys = torch.rand(partition.total, generator=torch_generator(seed, "shuffle", round_index, epoch))
    sizes = partition.sizes
    n_dev, total = len(sizes), int(sizes.sum())
    max_size = int(sizes.max()) if n_dev else 0
    order = torch.zeros(n_dev, max_size, dtype=torch.int64)
    if total == 0:
        return EpochPlan(order, torch.from_numpy(sizes), batch_size)
    local_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    within = np.arange(total) - np.repeat(local_starts, sizes)  # position inside each device's array
    global_pos = np.repeat(np.asarray(partition.offsets), sizes) + within
    segment = torch.from_numpy(np.repeat(np.arange(n_dev), sizes))
    # One stable sort orders every device's samples by its own keys (segments never interleave).
    rank = torch.argsort(segment.double() * 2 + keys[torch.from_numpy(global_pos)].double(), stable=True)
    samples = torch.from_numpy(np.concatenate(partition.indices))
    order[segment, torch.from_numpy(within)] = samples[rank]
    return EpochPlan(order, torch.from_numpy(sizes), batch_size)


def steps_per_round(sizes: np.ndarray, batch_size: int, epochs: int) -> np.ndarray:
    return np.asarray([epochs * math.ceil(int(s) / batch_size) for s in sizes], dtype=np.int64)
