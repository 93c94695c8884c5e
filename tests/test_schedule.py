"""The mini-batch schedule (p2pl.core.schedule): one per-device plan every engine walks."""

from __future__ import annotations

import math

import numpy as np
import torch

from p2pl.core.schedule import Partition, epoch_plan


def _parts(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """Disjoint, shuffled index arrays of the given sizes into one training set."""
    perm = np.random.default_rng(seed).permutation(sum(sizes))
    return np.split(perm, np.cumsum(sizes)[:-1])


def _device_batches(partition: Partition, device: int, seed: int, round_index: int, epoch: int, b: int):
    plan = epoch_plan(partition, seed, round_index, epoch, b)
    row = partition.device_ids.index(device)
    out = []
    for t in range(int(plan.steps[row])):
        idx, mask = plan.batch(t)
        out.append(idx[row][mask[row]].tolist())
    return out


SIZES = [13, 8, 1, 24, 5]


def test_every_sample_exactly_once_per_epoch_and_last_batch_smaller() -> None:
    parts = _parts(SIZES)
    partition = Partition.full(parts)
    b = 4
    for epoch in range(3):
        plan = epoch_plan(partition, seed=7, round_index=2, epoch=epoch, batch_size=b)
        assert plan.steps.tolist() == [math.ceil(s / b) for s in SIZES]
        assert plan.max_steps == math.ceil(max(SIZES) / b)
        for n, part in enumerate(parts):
            batches = _device_batches(partition, n, 7, 2, epoch, b)
            walked = [i for batch in batches for i in batch]
            assert sorted(walked) == sorted(part.tolist())  # every sample once, none dropped
            assert all(len(batch) == b for batch in batches[:-1])
            assert len(batches[-1]) == SIZES[n] - b * (len(batches) - 1)  # 13 -> 4,4,4,1


def test_padding_is_masked_and_past_a_device_end_the_mask_is_empty() -> None:
    partition = Partition.full(_parts(SIZES))
    plan = epoch_plan(partition, 0, 1, 0, 4)
    last = plan.max_steps - 1
    _, mask = plan.batch(last)
    assert mask.sum(1).tolist() == [0, 0, 0, 4, 0]  # only the 24-sample device still has a batch
    _, mask0 = plan.batch(0)
    assert mask0.sum(1).tolist() == [4, 4, 1, 4, 4]


def test_order_is_shuffled_per_epoch_and_round_but_reproducible() -> None:
    partition = Partition.full(_parts([64, 64]))
    a = epoch_plan(partition, 3, 1, 0, 8).order
    assert torch.equal(a, epoch_plan(partition, 3, 1, 0, 8).order)
    assert not torch.equal(a, epoch_plan(partition, 3, 1, 1, 8).order)  # another epoch
    assert not torch.equal(a, epoch_plan(partition, 3, 2, 0, 8).order)  # another round
    assert not torch.equal(a, epoch_plan(partition, 4, 1, 0, 8).order)  # another seed
    assert not torch.equal(a[0], torch.from_numpy(partition.indices[0]))  # actually shuffled


def test_shard_subset_walks_identical_batches() -> None:
    parts = _parts(SIZES, seed=1)
    full = Partition.full(parts)
    shard = full.subset([3, 0])
    assert shard.device_ids == (3, 0)
    for device in (3, 0):
        for epoch in range(2):
            assert _device_batches(shard, device, 5, 4, epoch, 3) == _device_batches(full, device, 5, 4, epoch, 3)


def test_a_device_batches_depend_only_on_its_own_data() -> None:
    """A real node holding only its own data walks the same batches as in the simulator."""
    parts = _parts(SIZES, seed=2)
    alone = Partition((parts[3],), (3,))
    others_changed = Partition.full([parts[0][:3], parts[1], parts[4], parts[3], parts[2]])
    reference = _device_batches(Partition.full(parts), 3, 9, 1, 0, 5)
    assert _device_batches(alone, 3, 9, 1, 0, 5) == reference
    assert _device_batches(others_changed, 3, 9, 1, 0, 5) == reference
