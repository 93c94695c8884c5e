"""Partitioners: disjoint, covering, sized, seeded, and as skewed as asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2pl.config import PartitionConfig
from p2pl.data.partition import (
    PARTITIONS,
    label_histograms,
    partition_from_assignment,
    partition_indices,
)
from p2pl.data.user import read_device_ids
from p2pl.errors import P2PLError


def balanced_labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % classes)


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    hist = label_histograms(labels, parts, classes).astype(float)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(ent.mean())


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_disjoint_sorted_int64_and_nonempty(scheme: str) -> None:
    y = balanced_labels()
    parts = partition_indices(y, 20, PartitionConfig(scheme=scheme), seed=3)
    assert len(parts) == 20
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # no index twice
    assert allidx.min() >= 0 and allidx.max() < len(y)
    for p in parts:
        assert p.dtype == np.int64 and p.size >= 1
        assert np.all(np.diff(p) > 0)
    if scheme in ("iid", "quantity", "dirichlet"):
        assert len(allidx) == len(y)  # every sample used


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_deterministic_and_seed_dependent(scheme: str) -> None:
    y = balanced_labels()
    cfg = PartitionConfig(scheme=scheme)
    a = partition_indices(y, 10, cfg, seed=7)
    b = partition_indices(y.copy(), 10, cfg, seed=7)
    c = partition_indices(y, 10, cfg, seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    y = balanced_labels(1003)
    parts = partition_indices(y, 10, PartitionConfig(scheme="iid"), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003
    hist = label_histograms(y, parts, 10)
    assert (hist > 0).sum(axis=1).min() >= 8  # ~100 samples of 10 classes: labels mixed


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = balanced_labels(2000)
    ent = [
        mean_label_entropy(y, partition_indices(y, 20, PartitionConfig(scheme="dirichlet", alpha=a), 0), 10)
        for a in (100.0, 1.0, 0.1)
    ]
    assert ent[0] > ent[1] > ent[2]
    assert ent[0] > 0.95 * np.log(10)  # near uniform
    assert ent[2] < 0.5 * np.log(10)  # strongly skewed


def test_dirichlet_min_size_enforced_even_when_redraws_fail() -> None:
    y = balanced_labels(500)
    cfg = PartitionConfig(scheme="dirichlet", alpha=0.01, min_size=10)
    parts = partition_indices(y, 40, cfg, seed=1)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 10 and sizes.sum() == 500
    assert len(np.unique(np.concatenate(parts))) == 500
    again = partition_indices(y, 40, cfg, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


@pytest.mark.parametrize(("per_device", "devices"), [(1, 10), (2, 20), (3, 7)])
def test_shards_limit_classes_per_device(per_device: int, devices: int) -> None:
    y = balanced_labels(1000)
    cfg = PartitionConfig(scheme="shards", shards_per_device=per_device)
    parts = partition_indices(y, devices, cfg, seed=2)
    hist = label_histograms(y, parts, 10)
    assert (hist > 0).sum(axis=1).max() <= per_device
    sizes = np.array([len(p) for p in parts])
    if devices * per_device % 10 == 0:  # each class cut into the same number of shards
        assert sizes.max() - sizes.min() <= per_device  # shards are (near-)equal
    assert sizes.sum() == 1000  # every class got at least one shard here


def test_shards_need_enough_samples() -> None:
    with pytest.raises(P2PLError, match="shards: 10 devices x 3 shards need at least 30"):
        partition_indices(balanced_labels(20, 2), 10, PartitionConfig(scheme="shards", shards_per_device=3), 0)


def test_quantity_sizes_vary_and_respect_min_size() -> None:
    y = balanced_labels(1000)
    parts = partition_indices(y, 20, PartitionConfig(scheme="quantity", quantity_sigma=1.5, min_size=5), 0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 5 and sizes.sum() == 1000
    assert sizes.max() > 3 * sizes.min()
    flat = partition_indices(y, 20, PartitionConfig(scheme="quantity", quantity_sigma=0.01), 0)
    flat_sizes = np.array([len(p) for p in flat])
    assert flat_sizes.max() - flat_sizes.min() <= 3


def test_too_many_devices() -> None:
    y = balanced_labels(50, 5)
    for scheme in PARTITIONS:
        with pytest.raises(P2PLError, match=r"^100 devices but only 50 training samples; use fewer devices$"):
            partition_indices(y, 100, PartitionConfig(scheme=scheme), 0)
    with pytest.raises(P2PLError, match="min_size = 10 need 100 training samples but there are only 50"):
        partition_indices(y, 10, PartitionConfig(scheme="dirichlet", min_size=10), 0)


def test_bad_inputs() -> None:
    with pytest.raises(P2PLError, match="unknown partition scheme 'nope'; choose one of: dirichlet"):
        partition_indices(balanced_labels(), 2, PartitionConfig(scheme="nope"), 0)
    with pytest.raises(P2PLError, match="labels must be integers"):
        partition_indices(np.zeros(10), 2, PartitionConfig(), 0)


def test_partition_from_assignment() -> None:
    ids = np.array([2, 0, 1, 2, 2, 0])
    parts = partition_from_assignment(ids, 3)
    assert [p.tolist() for p in parts] == [[1, 5], [2], [0, 3, 4]]
    assert all(p.dtype == np.int64 for p in parts)
    with pytest.raises(P2PLError, match=r"device id 3 of training sample 0 is out of range for 3 devices"):
        partition_from_assignment(np.array([3, 0, 1]), 3)
    with pytest.raises(P2PLError, match="out of range"):
        partition_from_assignment(np.array([-1, 0, 1]), 3)
    with pytest.raises(P2PLError, match="device 1 has no training samples"):
        partition_from_assignment(np.array([0, 2, 2]), 3)


def test_label_histograms() -> None:
    y = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histograms(y, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert hist.dtype == np.int64
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    with pytest.raises(P2PLError, match="out of range for 2 classes"):
        label_histograms(y, [np.arange(6)], 2)


def test_assignment_file(tmp_path: Path) -> None:
    plain = tmp_path / "a.txt"
    plain.write_text("0\n1\n1\n\n2\n0\n")  # blank lines are skipped
    parts = partition_from_assignment(read_device_ids(plain, 5), 3)
    assert [p.tolist() for p in parts] == [[0, 4], [1, 2], [3]]
    with_header = tmp_path / "b.csv"
    with_header.write_text("sample,device\n10,1\n11,0\n")
    assert read_device_ids(with_header, 2).tolist() == [1, 0]
    single_header = tmp_path / "c.csv"
    single_header.write_text("device\n1\n0\n")
    assert read_device_ids(single_header, 2).tolist() == [1, 0]
    with pytest.raises(P2PLError, match="has 5 device ids but the data has 6 rows"):
        read_device_ids(plain, 6)
    with pytest.raises(P2PLError, match="out of range for 2 devices"):
        partition_from_assignment(read_device_ids(plain, 5), 2)
    bad = tmp_path / "bad.txt"
    bad.write_text("0\nx1\n")
    with pytest.raises(P2PLError, match="line 2: expected one non-negative integer device id, got 'x1'"):
        read_device_ids(bad, 2)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("a,b\n1,2\n")
    with pytest.raises(P2PLError, match="name one 'device'"):
        read_device_ids(nocol, 1)
    with pytest.raises(P2PLError, match="not found"):
        read_device_ids(tmp_path / "missing.txt", 1)
