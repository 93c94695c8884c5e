"""Which samples each device trains on at each local step: one schedule for every engine.

Every device shuffles its own samples each epoch and walks them in mini-batches of ``B``; the
last batch of an epoch is smaller, so no sample is dropped and a device with fewer samples
simply takes fewer steps (it idles while larger devices finish: no over-training). A sample's
shuffle key is a hash of (seed, round, epoch, device id, position in the device's own data), so
the order depends on nothing but the device itself: the simulator, a Ray shard and a real node
holding only its own data all walk exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

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

    @cached_property
    def _layout(self) -> _SampleLayout:
        """What every epoch's plan reuses (computed once per partition: a plan is built every
        local epoch of every round, and these parts were half of its cost)."""
        return _SampleLayout.of(self)


@dataclass(frozen=True)
class _SampleLayout:
    """Every device's samples in its row of a padded ``[N, max_size]`` rectangle, with the part of
    each sample's shuffle key that does not depend on the round or epoch."""

    sizes: np.ndarray  # int64 [N]
    samples: np.ndarray  # int64 [N, max_size]: global training indices, 0 on padding
    fixed_key: np.ndarray  # uint64 [N, max_size]: hash(device id) ^ hash(position), see shuffle_keys
    padding: np.ndarray | None  # bool [N, max_size], None when every device has max_size samples
    valid: torch.Tensor  # float32 [N, max_size]: 1 on a real sample, 0 on padding

    @staticmethod
    def of(partition: Partition) -> _SampleLayout:
        sizes = partition.sizes
        n_dev, width = len(sizes), int(sizes.max()) if len(sizes) else 0
        position = np.broadcast_to(np.arange(width), (n_dev, width))
        real = position < sizes[:, None]
        samples = np.zeros((n_dev, width), dtype=np.int64)
        if real.any():
            samples[real] = np.concatenate(partition.indices)
        device = np.broadcast_to(np.asarray(partition.device_ids, dtype=np.int64)[:, None], (n_dev, width))
        valid = torch.from_numpy(real.astype(np.float32))
        return _SampleLayout(sizes, samples, _fixed_keys(device, position), None if real.all() else ~real, valid)


def _fixed_keys(device: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The round- and epoch-independent part of :func:`shuffle_keys`."""
    with np.errstate(over="ignore"):
        dev = mix64(device.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        return dev ^ mix64(position.astype(np.uint64))


def _keys(seed: int, round_index: int, epoch: int, fixed_key: np.ndarray) -> np.ndarray:
    base = np.uint64(derive_seed(seed, "shuffle", round_index, epoch))
    with np.errstate(over="ignore"):
        return mix64(base ^ fixed_key)


def shuffle_keys(seed: int, round_index: int, epoch: int, device: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Sort keys for samples at ``position`` of ``device``'s data in this (round, epoch)."""
    return _keys(seed, round_index, epoch, _fixed_keys(device, position))


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of mini-batches for a batch of devices, padded to a rectangle.

    ``order[n, j]`` is device n's j-th sample (a global training index) in this epoch, valid
    where ``j < sizes[n]``; step t uses columns ``[t*B, (t+1)*B)``.
    """

    order: torch.Tensor  # int64 [N, max_size]
    sizes: torch.Tensor  # int64 [N]
    batch_size: int
    valid: torch.Tensor  # float32 [N, max_size]: 1 where ``order`` holds a real sample, 0 on padding

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
    return epoch_plans(partition, seed, round_index, [epoch], batch_size)[0]


def epoch_plans(
    partition: Partition, seed: int, round_index: int, epochs: Sequence[int], batch_size: int
) -> list[EpochPlan]:
    """:func:`epoch_plan` of each of ``epochs`` of a round, computed together: one hash and one
    sort over every epoch's keys (a plan's own numpy calls were most of its cost)."""
    layout = partition._layout
    sizes = torch.from_numpy(layout.sizes.copy())
    if not layout.samples.size or not epochs:
        return [EpochPlan(torch.from_numpy(layout.samples.copy()), sizes, batch_size, layout.valid) for _ in epochs]
    bases = np.array([derive_seed(seed, "shuffle", round_index, epoch) for epoch in epochs], dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = mix64(bases[:, None, None] ^ layout.fixed_key)  # [epochs, N, max_size]: _keys of each epoch
    if layout.padding is not None:  # padding sorts after every real sample (stable on ties)
        keys[:, layout.padding] = np.iinfo(np.uint64).max
    # A stable sort of each device's row of keys: equal keys keep their positions' order.
    order = np.take_along_axis(layout.samples[None], np.argsort(keys, axis=2, kind="stable"), axis=2)
    return [EpochPlan(torch.from_numpy(rows), sizes, batch_size, layout.valid) for rows in order]
