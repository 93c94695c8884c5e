"""Deterministic seeds derived from the run seed, so every random draw is keyed, not ordered.

Keying draws by (seed, purpose, round, device, ...) instead of drawing from one stream keeps the
numbers independent of how devices are batched or sharded: the vectorized engine, the reference
engine, a Ray shard and a real node all draw the same values.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` keyed by integers (round, device, epoch, ...)."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *(int(k) & 0xFFFFFFFF for k in keys)]
    high, low = (int(v) for v in np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32))
    return ((high << 32) | low) & 0x7FFF_FFFF_FFFF_FFFF


def numpy_generator(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, *keys))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer over uint64 values: a fast, well-mixed 64-bit hash (arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def keyed_uniform(seed: int, purpose: str, keys: tuple[int, ...], devices: np.ndarray) -> np.ndarray:
    """One uniform draw in [0, 1) per device, keyed by (seed, purpose, keys, device): a device
    computes its own draw alone (a real node) and gets exactly the simulator's value."""
    base = np.uint64(derive_seed(seed, purpose, *keys))
    with np.errstate(over="ignore"):
        dev = mix64(np.asarray(devices, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    bits = mix64(base ^ dev) >> np.uint64(11)  # 53 bits: exactly representable in float64
    return bits.astype(np.float64) * (1.0 / (1 << 53))
