"""The weighted mean of a gossip step on the CPU for a large sparse W: ``W_nn θ_n + Σ_m W_nm θ_m``.

scipy's CSR product is the fastest exact kernel measured for it (7x torch's gather + index_add at
10,000 devices; torch's own CSR product was slower on one core and did not use the second). It
runs here over blocks of receiving rows, spread over the free CPU cores (scipy releases the GIL
in its sparse kernels; :mod:`p2pl.core.parallel`), each block finishing with its own rows' self
term while they are still in cache. Every output element is the same sum in the same order as
one product over all rows, so the result is bit-identical to it. The per-block matrices are
built once per neighbourhood object: the simulator keeps one while the live links stay put.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from p2pl.core.parallel import free_cores, run_jobs

if TYPE_CHECKING:
    from p2pl.core.cooperate import Neighbourhoods

#: Output floats per block of receiving rows (1M floats = 4 MiB: a block and the rows it reads
#: often stay in cache, and 10,000 devices give enough blocks to share between cores).
BLOCK_FLOATS = 1 << 20


@dataclass(frozen=True)
class _Blocks:
    pool_rows: int
    bounds: tuple[tuple[int, int], ...]  # [lo, hi) receiving rows of each block
    matrices: tuple[sp.csr_matrix, ...]  # W's off-diagonal rows lo..hi, float32


_BLOCKS: weakref.WeakKeyDictionary[Neighbourhoods, _Blocks] = weakref.WeakKeyDictionary()


def _blocks(hoods: Neighbourhoods, pool_rows: int, width: int) -> _Blocks:
    found = _BLOCKS.get(hoods)
    rows = max(1, BLOCK_FLOATS // max(width, 1))
    if found is not None and found.pool_rows == pool_rows and (len(found.bounds) == 1 or found.bounds[0][1] == rows):
        return found
    matrix = hoods.matrix(pool_rows)
    bounds = tuple((lo, min(lo + rows, hoods.num_rows)) for lo in range(0, hoods.num_rows, rows))
    made = _Blocks(pool_rows, bounds, tuple(matrix[lo:hi] for lo, hi in bounds))
    _BLOCKS[hoods] = made
    return made


def csr_mean(own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods) -> torch.Tensor:
    """``self_weight * own + W_offdiag @ pool`` for CPU float32 tensors, as a new tensor."""
    blocks = _blocks(hoods, pool.shape[0], pool.shape[1])
    self_w = torch.as_tensor(hoods.self_weight, dtype=own.dtype).unsqueeze(1)
    sent = pool.detach().numpy()
    out = torch.empty_like(own)

    def run(worker: int, block: int) -> None:
        lo, hi = blocks.bounds[block]
        mixed = torch.from_numpy(np.asarray(blocks.matrices[block] @ sent, dtype=np.float32))
        torch.addcmul(mixed, self_w[lo:hi], own[lo:hi], out=out[lo:hi])

    run_jobs(run, range(len(blocks.bounds)), free_cores())
    return out


#: Multiply-adds from which a dense W's product is split into row blocks over the free cores.
DENSE_SPLIT_WORK = 1 << 27


def dense_mean(own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods) -> torch.Tensor:
    """The same for a W held dense (small, or densely connected: a BLAS product then beats the
    CSR walk); a large product runs in row blocks over the free cores (each row's sum is the
    same whatever the block)."""
    r, s = hoods.num_rows, pool.shape[0]
    dense = torch.zeros(r, s, dtype=own.dtype)
    where = (torch.from_numpy(hoods.dst), torch.from_numpy(hoods.src))
    # a repeated edge adds up, as in the CSR product
    dense.index_put_(where, torch.from_numpy(hoods.weight).to(own.dtype), accumulate=True)
    self_w = torch.as_tensor(hoods.self_weight, dtype=own.dtype).unsqueeze(1)
    workers = free_cores()
    if workers == 1 or r * s * pool.shape[1] < DENSE_SPLIT_WORK:
        return torch.addcmul(dense @ pool, self_w, own)
    out = torch.empty_like(own)
    step = -(-r // (2 * workers))
    bounds = [(lo, min(lo + step, r)) for lo in range(0, r, step)]

    def run(worker: int, block: tuple[int, int]) -> None:
        lo, hi = block
        torch.addcmul(dense[lo:hi] @ pool, self_w[lo:hi], own[lo:hi], out=out[lo:hi])

    run_jobs(run, bounds, workers)
    return out


@dataclass(frozen=True)
class _Everyone:
    """Receivers that each hear every pool row but one (a complete graph), with one weight per row."""

    left_out: torch.Tensor  # int64 [R]: the pool row receiver r does not hear (its own)
    weight: torch.Tensor  # [R, 1]: the weight it gives every other row


_EVERYONE: weakref.WeakKeyDictionary[Neighbourhoods, tuple[int, _Everyone | None]] = weakref.WeakKeyDictionary()


def _everyone(hoods: Neighbourhoods, pool_rows: int) -> _Everyone | None:
    found = _EVERYONE.get(hoods)
    if found is not None and found[0] == pool_rows:
        return found[1]
    shape: _Everyone | None = None
    degree = hoods.degree
    if pool_rows > 1 and len(degree) and bool(np.all(degree == pool_rows - 1)):
        first = hoods.weight[hoods.indptr[:-1]]
        heard = np.zeros((len(degree), pool_rows), dtype=bool)
        heard[hoods.dst, hoods.src] = True
        if bool(np.all(hoods.weight == np.repeat(first, degree))) and int(heard.sum()) == len(hoods.src):
            shape = _Everyone(torch.from_numpy(np.argmin(heard, axis=1)), torch.from_numpy(first).unsqueeze(1))
    _EVERYONE[hoods] = (pool_rows, shape)
    return shape


def everyone_mean(own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods) -> torch.Tensor | None:
    """The mean when every receiver hears every other pool row with one weight (a complete graph
    with uniform or Metropolis weights): ``W_nn θ_n + w_n (Σ_m v_m − v_left-out)``, one column sum
    instead of an ``[R, S] @ [S, P]`` product (0.14 s a step at 1,000 devices on both cores, ~20 ms
    this way). None when W has another shape. The rounding differs from the product's: the column
    sum's error is ~1e-7 of Σ|v|, which the weight (1/N) brings back to ~1e-7 of a row."""
    shape = _everyone(hoods, pool.shape[0])
    if shape is None:
        return None
    others = torch.sub(pool.sum(dim=0), pool[shape.left_out])
    others.mul_(shape.weight.to(own.dtype))
    self_w = torch.as_tensor(hoods.self_weight, dtype=own.dtype).unsqueeze(1)
    return others.addcmul_(own, self_w)
