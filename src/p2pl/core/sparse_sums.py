"""The two sums of a compressed gossip step on the CPU, from the coordinates each sender sent.

A receiver ``n`` needs ``Σ_m W_nm s_m ⊙ v_m`` and ``Σ_m W_nm s_m``, where ``s_m`` marks the few
coordinates sender ``m`` sent (top-k or random-k: ~1 %). The compiled kernel walks, for each
receiver, its neighbours in order and, for each, only the coordinates that neighbour sent,
adding into the receiver's two rows, which it zeroes first. Receivers are independent, so blocks
of them run on the free cores, and each element is the same sequence of float32 products and
additions as a scatter-add over the (edge, sent coordinate) pairs in receiver order, which it
replaced: the same bits, without the index arithmetic, the two ``[N, P]`` zero fills on one core
and the per-pair weight and value copies (~3x less time at 1,000 devices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from p2pl.core.order_stats import compiled
from p2pl.core.parallel import free_cores, run_jobs

if TYPE_CHECKING:
    from p2pl.core.cooperate import Neighbourhoods

__all__ = ["sent_sums"]

#: Receiving rows per job.
_ROWS_PER_JOB = 64


@compiled()
def _sums(  # pragma: no cover - compiled
    pool: np.ndarray,
    sent_ptr: np.ndarray,
    sent_cols: np.ndarray,
    indptr: np.ndarray,
    src: np.ndarray,
    weight: np.ndarray,
    kept: np.ndarray,
    heard: np.ndarray,
    lo: int,
    hi: int,
) -> None:
    for n in range(lo, hi):
        kept[n, :] = 0.0
        heard[n, :] = 0.0
        for e in range(indptr[n], indptr[n + 1]):
            m = src[e]
            w = weight[e]
            for j in range(sent_ptr[m], sent_ptr[m + 1]):
                c = sent_cols[j]
                kept[n, c] += w * pool[m, c]
                heard[n, c] += w


def sent_sums(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, sent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_m W_nm s_m ⊙ v_m, Σ_m W_nm s_m) for every receiving row, new ``[R, P]`` tensors of
    ``own``'s dtype (CPU)."""
    rows, cols = sent.nonzero(as_tuple=True)
    sent_ptr = np.zeros(pool.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows.numpy(), minlength=pool.shape[0]), out=sent_ptr[1:])
    dtype = own.dtype
    values = pool.detach().to(dtype).contiguous().numpy()
    weight = hoods.weight.astype(values.dtype)  # the products in the rows' precision, as before
    kept = torch.empty(hoods.num_rows, own.shape[1], dtype=dtype)
    heard = torch.empty_like(kept)
    out_kept, out_heard = kept.numpy(), heard.numpy()
    col_index = cols.numpy()
    jobs = [(lo, min(lo + _ROWS_PER_JOB, hoods.num_rows)) for lo in range(0, hoods.num_rows, _ROWS_PER_JOB)]

    def run(_worker: int, job: tuple[int, int]) -> None:
        _sums(values, sent_ptr, col_index, hoods.indptr, hoods.src, weight, out_kept, out_heard, job[0], job[1])

    run_jobs(run, jobs, free_cores(own.device))
    return kept, heard
