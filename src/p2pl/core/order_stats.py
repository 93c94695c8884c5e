"""Compiled kernels for the robust aggregation rules on CPU: per-coordinate order statistics of a
neighbourhood, and distances between rows, without materialising a gathered block.

A robust rule (trimmed mean, median) needs, for every receiver and every coordinate, a few order
statistics of the ``n = d + 1`` values its neighbourhood holds. Sorting each coordinate's values
one after the other is branchy, short and slow. Here a receiver's values are copied, a
cache-sized block of coordinates at a time, into a small ``[n, block]`` buffer and ordered by a
*sorting network* (a fixed sequence of compare-exchanges, Batcher's odd-even merge sort): every
compare-exchange is a ``min``/``max`` of two rows of the buffer, which the compiler turns into
vector instructions over the whole block. The network only keeps the compare-exchanges that can
reach the positions the rule reads (the median reads one or two), so a median costs fewer than a
full sort. Memory is the buffer and nothing else, whatever the number of devices.

Each receiver's result depends only on its own values, so a node computing its one row gets the
same bits as the simulator computing all of them. The kernels release the GIL: callers spread
chunks of receivers over threads. Compilation is cached on disk (``cache=True``); the first call
of a fresh install compiles once (about a second, measured in benchmarks/bench_robustness.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar, cast

import numba
import numpy as np

F = TypeVar("F", bound=Callable[..., object])

#: Stands in for "no sent mask" (one compiled signature for both cases).
_NO_MASK = np.ones((1, 1), dtype=np.bool_)
#: Values one receiver's buffer holds (8k float32 = 32 kB: stays in the core's L1 cache).
BUFFER_VALUES = 1 << 13
#: Most coordinates ordered together (the vector loops' length; 256 measured fastest, 512 25 %
#: slower).
MAX_BLOCK = 256


def compiled(fastmath: bool | set[str] = False) -> Callable[[F], F]:
    """``numba.njit(nogil=True, cache=True)``; where numba finds no writable place for its cache
    (a read-only install and home), compiled anew in each process instead of failing."""

    def wrap(fn: F) -> F:
        try:
            return cast(F, numba.njit(nogil=True, cache=True, fastmath=fastmath)(fn))
        except RuntimeError:
            return cast(F, numba.njit(nogil=True, fastmath=fastmath)(fn))

    return wrap


@lru_cache(maxsize=1024)
def sorting_network(size: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``size`` values as compare-exchange pairs ``(i, j)``,
    ``i < j``, after which position ``i`` holds the smaller value. Built for the next power of
    two and pruned: a pair that reaches past ``size`` would only compare with +inf padding."""
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


@lru_cache(maxsize=1024)
def selection_network(size: int, lo: int, hi: int) -> np.ndarray:
    """The compare-exchanges of :func:`sorting_network` that can change what ends in sorted
    positions ``lo..hi-1`` (int64 [K, 2]): walking the network backwards, a pair is kept when it
    touches a position still needed, and then both of its positions are needed."""
    needed = np.zeros(size, dtype=bool)
    needed[lo:hi] = True
    kept: list[tuple[int, int]] = []
    for i, j in reversed(sorting_network(size)):
        if needed[i] or needed[j]:
            kept.append((i, j))
            needed[i] = needed[j] = True
    kept.reverse()
    return np.array(kept, dtype=np.int64).reshape(-1, 2)


@compiled()
def _middle_mean_kernel(own, pool, rows, neighbours, pairs, lo, hi, block, out, sent, masked):
    # Loops run over 1-D row views: indexing a 2-D array inside them kept the compiler from
    # using vector lanes (measured 3x slower loads).
    size = neighbours.shape[1] + 1
    width = own.shape[1]
    buf = np.empty((size, block), dtype=own.dtype)
    spare = np.empty(block, dtype=own.dtype)
    acc = np.empty(block, dtype=np.float64)
    scale = 1.0 / (hi - lo)
    for i in range(rows.shape[0]):
        for start in range(0, width, block):
            w = min(block, width - start)
            # NaN is ordered as +inf (numpy's sort puts it last): a compare-exchange needs a total
            # order, and a surviving non-finite value makes the row unsound either way.
            mine = own[rows[i], start : start + w]
            for k in range(size):
                values = mine if k == 0 else pool[neighbours[i, k - 1], start : start + w]
                slot = buf[k]
                if masked and k > 0:  # compressed messages: a coordinate not sent is the receiver's own
                    heard = sent[neighbours[i, k - 1], start : start + w]
                    for c in range(w):
                        v = values[c] if heard[c] else mine[c]
                        slot[c] = v if v == v else np.inf
                else:
                    for c in range(w):
                        v = values[c]
                        slot[c] = v if v == v else np.inf
            for q in range(pairs.shape[0]):
                low = buf[pairs[q, 0]]
                high = buf[pairs[q, 1]]
                # Through ``spare``: the compiler cannot tell the two rows apart, and a loop that
                # writes only one of them runs in vector lanes (measured 4x faster).
                for c in range(w):
                    x = low[c]
                    y = high[c]
                    smaller = x < y
                    spare[c] = y if smaller else x
                    low[c] = x if smaller else y
                for c in range(w):
                    high[c] = spare[c]
            acc[:w] = 0.0
            for k in range(lo, hi):
                slot = buf[k]
                for c in range(w):
                    acc[c] += slot[c]
            result = out[rows[i], start : start + w]
            for c in range(w):
                result[c] = acc[c] * scale


def middle_mean(
    own: np.ndarray,
    pool: np.ndarray,
    rows: np.ndarray,
    neighbours: np.ndarray,
    lo: int,
    hi: int,
    out: np.ndarray,
    sent: np.ndarray | None = None,
) -> None:
    """For each receiver ``rows[i]``: per coordinate, sort its ``n`` values (``own[rows[i]]`` and
    ``pool[neighbours[i]]``, ``n = neighbours.shape[1] + 1``) and write the mean of sorted
    positions ``lo..hi-1`` into ``out[rows[i]]`` (summed in float64). NaN sorts as +inf.
    ``sent`` (bool [S, P]): the coordinates each pool row carries; the receiver's own value
    stands in for the others."""
    size = neighbours.shape[1] + 1
    if not 0 <= lo < hi <= size:
        raise ValueError(f"sorted positions {lo}..{hi - 1} out of 0..{size - 1}")  # a caller bug
    block = int(min(MAX_BLOCK, max(8, BUFFER_VALUES // size)))
    pairs = selection_network(size, lo, hi)
    mask = _NO_MASK if sent is None else sent
    _middle_mean_kernel(own, pool, rows, neighbours, pairs, lo, hi, block, out, mask, sent is not None)


# Reassociating the float64 sum lets it run in vector lanes; the order is fixed at compile time.
@compiled(fastmath={"reassoc"})
def _distance_kernel(own, pool, dst, src, out, sent, masked):
    width = own.shape[1]
    for e in range(dst.shape[0]):
        mine = own[dst[e]]
        theirs = pool[src[e]]
        acc = 0.0
        if masked:
            heard = sent[src[e]]
            for c in range(width):
                z = (np.float64(theirs[c]) - np.float64(mine[c])) * heard[c]
                acc += z * z
        else:
            for c in range(width):
                z = np.float64(theirs[c]) - np.float64(mine[c])
                acc += z * z
        out[e] = np.sqrt(acc)


def edge_distances(
    own: np.ndarray, pool: np.ndarray, dst: np.ndarray, src: np.ndarray, out: np.ndarray, sent: np.ndarray | None = None
) -> None:
    """``out[e] = ||pool[src[e]] - own[dst[e]]||`` in float64, one pass over the rows, no copy;
    with ``sent`` (bool [S, P]) over the coordinates the pool row carries."""
    _distance_kernel(own, pool, dst, src, out, _NO_MASK if sent is None else sent, sent is not None)


__all__ = ["edge_distances", "middle_mean", "selection_network", "sorting_network"]
