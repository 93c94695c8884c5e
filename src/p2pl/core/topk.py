"""Top-k compression's choice: each row's k largest magnitudes, as sorted indices.

The rule, the same on every path, so that a node choosing for its one row picks exactly what the
simulator picks for it: the k largest ``|x|`` of the row; among equal magnitudes at the cut, the
lower indices; NaN counts as larger than any number.

On the CPU, for steps of at least KERNEL_MIN_VALUES values, a compiled kernel does it in three
passes over each row, with no sort: a min-heap of the k largest magnitudes finds the cut, a count
says how many ties at the cut to take, and a last pass writes the indices in ascending order. Rows
are independent and spread over the free cores. ``torch.topk`` followed by a sort of the indices
cost ~5x more at 1,000 devices x 4,810 parameters, and leaves ties to chance. Elsewhere (a GPU, a
node's single row) a stable descending sort gives the same indices.
"""

from __future__ import annotations

import numpy as np
import torch

from p2pl.core.order_stats import compiled
from p2pl.core.parallel import free_cores, run_jobs

__all__ = ["KERNEL_MIN_VALUES", "top_k_indices"]

#: Below this many values a step takes the torch path (the kernel's thread hand-off and, on a fresh
#: install, its one-time compilation are not worth it).
KERNEL_MIN_VALUES = 1 << 20
#: Rows per job of the kernel.
_ROWS_PER_JOB = 64


@compiled()
def _magnitude(value: float) -> float:  # pragma: no cover - compiled
    """What the rule ranks: ``|value|``, with NaN above every number."""
    key = abs(value)
    return np.inf if key != key else key


@compiled()
def _top_k_rows(values: np.ndarray, k: int, out: np.ndarray, lo: int, hi: int) -> None:  # pragma: no cover - compiled
    heap = np.empty(k, dtype=np.float32)
    width = values.shape[1]
    for r in range(lo, hi):
        row = values[r]
        # 1. the k largest magnitudes in a min-heap: its root is the cut
        for i in range(k):
            key = _magnitude(row[i])
            j = i  # sift up
            while j > 0:
                parent = (j - 1) // 2
                if heap[parent] <= key:
                    break
                heap[j] = heap[parent]
                j = parent
            heap[j] = key
        for i in range(k, width):
            key = _magnitude(row[i])
            if key <= heap[0]:
                continue
            j = 0  # replace the root, sift down
            while True:
                child = 2 * j + 1
                if child >= k:
                    break
                if child + 1 < k and heap[child + 1] < heap[child]:
                    child += 1
                if heap[child] >= key:
                    break
                heap[j] = heap[child]
                j = child
            heap[j] = key
        cut = heap[0]
        # 2. how many lie strictly above the cut; the rest of the k are ties at it, lowest first
        above = 0
        for i in range(width):
            key = _magnitude(row[i])
            if key > cut:
                above += 1
        ties = k - above
        # 3. the indices, ascending
        n = 0
        for i in range(width):
            key = _magnitude(row[i])
            if key > cut:
                out[r, n] = i
                n += 1
            elif key == cut and ties > 0:
                out[r, n] = i
                n += 1
                ties -= 1


def _by_sort(values: torch.Tensor, k: int) -> torch.Tensor:
    """The same rule with torch ops (any device): a stable descending sort keeps lower indices
    first among equal magnitudes, and sorts NaN first."""
    order = torch.sort(values.abs(), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def top_k_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's ``k`` largest magnitudes, ascending (int64 ``[R, k]``)."""
    rows, width = values.shape
    if not 0 < k <= width:
        raise ValueError(f"k = {k} must be in 1..{width}")
    if values.device.type != "cpu" or values.numel() < KERNEL_MIN_VALUES:
        return _by_sort(values, k)
    data = values.detach().float().contiguous().numpy()
    out = np.empty((rows, k), dtype=np.int64)
    jobs = [(lo, min(lo + _ROWS_PER_JOB, rows)) for lo in range(0, rows, _ROWS_PER_JOB)]
    run_jobs(lambda _worker, job: _top_k_rows(data, k, out, job[0], job[1]), jobs, free_cores(values.device))
    return torch.from_numpy(out)
