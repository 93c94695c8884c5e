"""Split a training set across devices: IID, Dirichlet label skew, label shards, quantity skew.

Every partitioner returns one sorted int64 index array (into the training set) per device; no
index appears twice. Everything random comes from ``numpy.random.default_rng(seed)``, so the same
labels, device count, config and seed give identical partitions.

Schemes (``PartitionConfig.scheme``):

* ``iid``: a random permutation cut into ``num_devices`` near-equal parts (sizes differ by at
  most 1); every sample is used.
* ``dirichlet``: label skew as in Hsu et al. (2019): for each class, the device shares are drawn
  from ``Dir(alpha, ..., alpha)`` and that class's (shuffled) samples are cut accordingly; smaller
  ``alpha`` means more skew. If some device gets fewer than ``min_size`` samples, the whole draw
  is repeated (up to ``DIRICHLET_TRIES`` times); after that, samples are moved one at a time from
  the currently largest device (lowest id on ties) to the short ones. Every sample is used.
* ``shards``: McMahan et al. (2017): samples are sorted by label and cut into
  ``num_devices * shards_per_device`` shards, and each device gets ``shards_per_device`` random
  shards. Shards never straddle two classes (each class is cut into a number of shards
  proportional to its size), so a device holds at most ``shards_per_device`` classes. If there
  are fewer shards than classes, the smallest classes get no shard and are not used.
* ``quantity``: device sizes proportional to log-normal(0, ``quantity_sigma``) draws (at least
  ``min_size`` each), labels IID within a device; every sample is used.

Every device receives at least ``max(1, min_size)`` samples (``shards``: at least one shard).

Overlapping draws (``PartitionConfig.samples_per_device = k > 0``): instead of splitting the
training set, each device draws ``k`` distinct samples of its own, independently of the other
devices (so devices overlap and ``num_devices * k`` may far exceed the training set: 10,000
devices on digits' 1,437 samples). The scheme still decides *which* samples:

* ``iid``: ``k`` samples uniformly at random.
* ``dirichlet``: the device draws label shares ``p ~ Dir(alpha)`` and then ``k`` distinct
  samples with probability proportional to ``p[label] / count[label]``.
* ``shards``: the device picks ``min(shards_per_device, classes)`` distinct labels and draws
  ``k`` samples among those labels' samples (so it holds at most that many labels).
* ``quantity``: the device's size is ``k * w / mean(w)`` rounded, ``w ~ log-normal(0,
  quantity_sigma)``, clipped to ``[max(1, min_size), training samples]``; samples uniform.

Devices are drawn one after the other from the one seeded generator, so the same config and seed
give identical index arrays.
"""

from __future__ import annotations

import numpy as np

from p2pl.config import PartitionConfig
from p2pl.errors import P2PLError, choose

PARTITIONS = ("iid", "dirichlet", "shards", "quantity")
DIRICHLET_TRIES = 100


def _as_labels(labels: object) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise P2PLError(f"labels must be a 1-D array, got shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise P2PLError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise P2PLError(f"labels must be >= 0, got {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _check_sizes(n: int, num_devices: int, min_size: int) -> None:
    if num_devices <= 0:
        raise P2PLError(f"the number of devices must be positive, got {num_devices}")
    if n < num_devices:
        raise P2PLError(f"{num_devices} devices but only {n} training samples; use fewer devices")
    if n < num_devices * min_size:
        raise P2PLError(
            f"{num_devices} devices with partition.min_size = {min_size} need {num_devices * min_size} "
            f"training samples but there are only {n}; use fewer devices or a smaller partition.min_size"
        )


def partition_indices(labels: np.ndarray, num_devices: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Assign training samples to ``num_devices`` devices by ``cfg.scheme`` (see module doc)."""
    scheme = choose("partition scheme", cfg.scheme, PARTITIONS)
    y = _as_labels(labels)
    n = int(y.size)
    min_size = max(1, int(cfg.min_size))
    if cfg.samples_per_device != 0:
        return _finish(_overlapping(y, num_devices, scheme, cfg, np.random.default_rng(seed)))
    _check_sizes(n, num_devices, min_size)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return _finish(np.array_split(rng.permutation(n), num_devices))
    if scheme == "dirichlet":
        if not cfg.alpha > 0:
            raise P2PLError(f"partition.alpha must be > 0, got {cfg.alpha}")
        return _finish(_dirichlet(y, num_devices, float(cfg.alpha), min_size, rng))
    if scheme == "shards":
        return _finish(_shards(y, num_devices, int(cfg.shards_per_device), rng))
    if not cfg.quantity_sigma > 0:
        raise P2PLError(f"partition.quantity_sigma must be > 0, got {cfg.quantity_sigma}")
    return _finish(_quantity(n, num_devices, float(cfg.quantity_sigma), min_size, rng))


def _dirichlet_draw(y: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator) -> list[list[np.ndarray]]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(num_devices, alpha))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # extreme alpha underflow: all mass on one
            p = np.zeros(num_devices)
            p[rng.integers(num_devices)] = 1.0
        cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
        for d, part in enumerate(np.split(idx, cuts)):
            chunks[d].append(part)
    return chunks


def _dirichlet(
    y: np.ndarray, num_devices: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[np.ndarray] = []
    for _ in range(DIRICHLET_TRIES):
        chunks = _dirichlet_draw(y, num_devices, alpha, rng)
        parts = [np.concatenate(c) if c else np.empty(0, np.int64) for c in chunks]
        if min(p.size for p in parts) >= min_size:
            return parts
    # Bounded re-draws failed: move samples from the largest devices to the short ones.
    # Each device's array is in random (drawn) order, so taking its last samples is a random pick.
    lists = [list(p) for p in parts]
    sizes = np.array([len(p) for p in lists])
    for d in range(num_devices):
        while sizes[d] < min_size:
            donor = int(np.argmax(sizes))  # lowest id among the largest
            lists[d].append(lists[donor].pop())
            sizes[donor] -= 1
            sizes[d] += 1
    return [np.asarray(p, dtype=np.int64) for p in lists]


def _apportion(total: int, weights: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Integers ``lower <= s <= upper`` summing to ``total``, close to ``total * weights``."""
    quota = total * weights / weights.sum()
    s = np.clip(np.floor(quota).astype(np.int64), lower, upper)
    while s.sum() < total:
        room = np.flatnonzero(s < upper)
        s[room[np.argmax((quota - s)[room])]] += 1
    while s.sum() > total:
        room = np.flatnonzero(s > lower)
        s[room[np.argmin((quota - s)[room])]] -= 1
    return s


def _shards(y: np.ndarray, num_devices: int, per_device: int, rng: np.random.Generator) -> list[np.ndarray]:
    if per_device <= 0:
        raise P2PLError(f"partition.shards_per_device must be positive, got {per_device}")
    n = y.size
    num_shards = num_devices * per_device
    if n < num_shards:
        raise P2PLError(
            f"shards: {num_devices} devices x {per_device} shards need at least {num_shards} training "
            f"samples but there are only {n}; use fewer devices or a smaller partition.shards_per_device"
        )
    classes, counts = np.unique(y, return_counts=True)
    if num_shards >= classes.size:
        per_class = _apportion(num_shards, counts.astype(float), np.ones_like(counts), counts)
    else:  # fewer shards than classes: one shard for each of the largest classes
        per_class = np.zeros_like(counts)
        per_class[np.argsort(-counts, kind="stable")[:num_shards]] = 1
    shards: list[np.ndarray] = []
    for c, k in zip(classes, per_class, strict=True):
        if k:
            shards.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), int(k)))
    order = rng.permutation(num_shards)
    return [
        np.concatenate([shards[s] for s in order[d * per_device : (d + 1) * per_device]]) for d in range(num_devices)
    ]


def _quantity(n: int, num_devices: int, sigma: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    weights = rng.lognormal(0.0, sigma, size=num_devices)
    extra = n - num_devices * min_size
    upper = np.full(num_devices, extra, dtype=np.int64)
    sizes = min_size + _apportion(extra, weights, np.zeros(num_devices, np.int64), upper)
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def _overlapping(
    y: np.ndarray, num_devices: int, scheme: str, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each device draws its own samples (``samples_per_device`` mode; see the module doc)."""
    n, k = int(y.size), int(cfg.samples_per_device)
    if num_devices <= 0:
        raise P2PLError(f"the number of devices must be positive, got {num_devices}")
    if k < 0:
        raise P2PLError(f"partition.samples_per_device must be >= 0, got {k}")
    if k > n:
        raise P2PLError(
            f"partition.samples_per_device = {k} but the training set has only {n} samples; "
            f"use at most {n} (each device draws distinct samples)"
        )
    classes, counts = np.unique(y, return_counts=True)
    if scheme == "iid":
        return [rng.choice(n, k, replace=False) for _ in range(num_devices)]
    if scheme == "quantity":
        if not cfg.quantity_sigma > 0:
            raise P2PLError(f"partition.quantity_sigma must be > 0, got {cfg.quantity_sigma}")
        w = rng.lognormal(0.0, float(cfg.quantity_sigma), size=num_devices)
        sizes = np.clip(np.rint(k * w / w.mean()), max(1, int(cfg.min_size)), n).astype(np.int64)
        return [rng.choice(n, int(s), replace=False) for s in sizes]
    if scheme == "dirichlet":
        if not cfg.alpha > 0:
            raise P2PLError(f"partition.alpha must be > 0, got {cfg.alpha}")
        slot = np.searchsorted(classes, y)
        shares = rng.dirichlet(np.full(classes.size, float(cfg.alpha)), size=num_devices)
        shares = np.where(np.isfinite(shares), shares, 0.0)
        out: list[np.ndarray] = []
        for lo in range(0, num_devices, 256):
            # A tiny floor keeps k distinct draws possible when shares underflow to zero.
            w = shares[lo : lo + 256][:, slot] / counts[slot] + 1e-12 / n
            # Weighted sampling without replacement (Efraimidis-Spirakis): the k smallest Exp(1)/w.
            keys = rng.exponential(size=w.shape) / w
            out.extend(np.argpartition(keys, k - 1, axis=1)[:, :k])
        return out
    per_device = int(cfg.shards_per_device)
    if per_device <= 0:
        raise P2PLError(f"partition.shards_per_device must be positive, got {per_device}")
    labels_each = min(per_device, classes.size)
    by_class = [np.flatnonzero(y == c) for c in classes]
    picked: list[np.ndarray] = []
    for _ in range(num_devices):
        chosen = rng.choice(classes.size, labels_each, replace=False)
        pool = np.concatenate([by_class[c] for c in chosen])
        if pool.size < k:
            raise P2PLError(
                f"partition.samples_per_device = {k} but {labels_each} label(s) hold only {pool.size} "
                "samples; use fewer samples per device or more partition.shards_per_device"
            )
        picked.append(rng.choice(pool, k, replace=False))
    return picked


def partition_from_assignment(device_of_sample: np.ndarray, num_devices: int) -> list[np.ndarray]:
    """Group training samples by a given device id per sample (natural per-device data)."""
    ids = np.asarray(device_of_sample)
    if ids.ndim != 1:
        raise P2PLError(f"the device assignment must be 1-D (one id per sample), got shape {list(ids.shape)}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise P2PLError(f"device ids must be integers, got dtype {ids.dtype}")
    if num_devices <= 0:
        raise P2PLError(f"the number of devices must be positive, got {num_devices}")
    ids = ids.astype(np.int64, copy=False)
    bad = np.flatnonzero((ids < 0) | (ids >= num_devices))
    if bad.size:
        raise P2PLError(
            f"device id {int(ids[bad[0]])} of training sample {int(bad[0])} is out of range for "
            f"{num_devices} devices (ids must be 0..{num_devices - 1}); set devices to match the assignment"
        )
    counts = np.bincount(ids, minlength=num_devices)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise P2PLError(
            f"device {int(empty[0])} has no training samples in the device assignment "
            f"({empty.size} of {num_devices} devices are empty); every device id 0..{num_devices - 1} "
            "needs at least one training sample"
        )
    order = np.argsort(ids, kind="stable")
    return _finish(np.split(order, np.cumsum(counts)[:-1]))


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-device label counts, shape ``[num_devices, num_classes]``, int64."""
    y = _as_labels(labels)
    if y.size and y.max() >= num_classes:
        raise P2PLError(f"label {int(y.max())} is out of range for {num_classes} classes")
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for d, p in enumerate(parts):
        hist[d] = np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes)
    return hist
