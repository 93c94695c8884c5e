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
