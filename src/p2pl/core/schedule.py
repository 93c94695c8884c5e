"""Which samples each device trains on at each local step: one schedule for every engine.

Every device shuffles its own samples each epoch and walks them in mini-batches of ``B``; the
last batch of an epoch is smaller, so no sample is dropped and a device with fewer samples
simply takes fewer steps (it idles while larger devices finish: no over-training). A sample's
shuffle key is a hash of (seed, round, epoch, device id, position in the device's own data), so
the order depends on nothing but the device itself: the simulator, a Ray shard and a real node
holding only its own data all walk exactly the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pl.core.rng import derive_seed, mix64


@dataclass(frozen=True)
class Partition:
    """Devices' local data as index arrays into the one shared training set."""

    indices: tuple[np.ndarray, ...]  # per device, int64
    device_ids: tuple[int, ...]  # global ids of these devices (a shard may hold a subset)

    @staticmethod
    def full(parts: list[np.ndarray]) -> Partition:
        return Partition(tuple(np.asarray(p, dtype=np.int64) for p in parts), tuple(range(len(parts))))

    def subset(self, devices: list[int]) -> Partition:
        """The partition restricted to some devices."""
        pos = {d: i for i, d in enumerate(self.device_ids)}
        return Partition(tuple(self.indices[pos[d]] for d in devices), tuple(devices))

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(p) for p in self.indices], dtype=np.int64)


def shuffle_keys(seed: int, round_index: int, epoch: int, device: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Sort keys for samples at ``position`` of ``device``'s data in this (round, epoch)."""
    base = np.uint64(derive_seed(seed, "shuffle", round_index, epoch))
    with np.errstate(over="ignore"):
        dev = mix64(device.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        return mix64(base ^ dev ^ mix64(position.astype(np.uint64)))


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
    sizes = partition.sizes
    n_dev, total = len(sizes), int(sizes.sum())
    max_size = int(sizes.max()) if n_dev else 0
    order = torch.zeros(n_dev, max_size, dtype=torch.int64)
    if total == 0:
        return EpochPlan(order, torch.from_numpy(sizes), batch_size)
    segment = np.repeat(np.arange(n_dev), sizes)
    within = np.arange(total) - np.repeat(np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
    keys = shuffle_keys(seed, round_index, epoch, np.asarray(partition.device_ids)[segment], within)
    # One sort orders every device's samples by its own keys (segments never interleave).
    rank = np.lexsort((within, keys, segment))
    samples = np.concatenate(partition.indices)
    order[torch.from_numpy(segment), torch.from_numpy(within)] = torch.from_numpy(samples[rank])
    return EpochPlan(order, torch.from_numpy(sizes), batch_size)
