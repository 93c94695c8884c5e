"""The cooperation step, written once: what a device does with what its neighbours sent.

After local training every algorithm runs a short :class:`Cooperation` pipeline over stacked
parameter rows:

1. zero or more *stages*, each either a :class:`Gossip` step (every receiving row aggregates its
   own row with the rows its live neighbours sent, by an aggregation rule) or a
   :class:`GlobalMean` (FedAvg's server: one weighted mean over every present device);
2. the affinity blend ``(1 - a) * before + a * after`` (a = 1: plain P2PL);
3. absent devices keep their rows exactly;
4. a guard: a row that came out non-finite or exploding (norm beyond ``max_norm_ratio`` times
   its row before, see :func:`unsound_rows`) is rolled back to that row. Inside each gossip step
   a receiver whose result is unsound first retries without the neighbours whose own rows are
   out of bounds (their weight goes to itself), as a real node does (:func:`gossip`).

Each runtime supplies the rows it holds and the rows it heard, and calls the same functions:
the simulator over all N rows at once, a Ray shard over its rows plus halo rows, a node over its
one row plus what arrived. Who hears whom, with which weight, is a :class:`Neighbourhoods` (W's
rows in CSR form, indexing a *pool* of sent rows); a device's own row is always passed apart
from the pool, because what an attacker sends need not be what it holds.

Aggregation rules (``consensus.aggregation``; see docs/robustness.md):

* ``mean``: ``W_nn θ_n + Σ_m W_nm θ_m`` (the paper's consensus).
* ``trimmed-mean``: per coordinate, drop the ``b = floor(trim * (d + 1))`` largest and smallest of
  the ``d + 1`` values of the neighbourhood (self included; b is capped so one value remains) and
  average the rest, unweighted (Yang & Bajwa's BRIDGE-T).
* ``median``: per coordinate, the median of the neighbourhood's ``d + 1`` values, unweighted.
* ``clipped``: self-centred clipping (He, Karimireddy & Jaggi 2022):
  ``θ_n + Σ_m W_nm clip(θ_m − θ_n, τ_n)`` with ``clip(z, τ) = z min(1, τ/||z||)``; the radius
  ``τ_n`` comes from the nearest neighbours carrying ``clip_quantile`` of the weight
  (:func:`clip_radius`).
* ``redescending``: ``θ_n + Σ_m W_nm r(‖θ_m − θ_n‖) (θ_m − θ_n)`` with ``r(z) = min(1, (τ_n/z)²)``
  and ``τ_n = radius_factor x`` the weighted median of the neighbours' distances
  (:func:`median_distance`): neighbours within τ_n count fully, a farther one moves the device
  by ``W τ_n² / z``, which fades the farther it lies (a redescending influence).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import scipy.sparse as sp
import torch

from p2pl.core.sparse_mix import csr_mean, dense_mean, everyone_mean
from p2pl.core.sparse_sums import sent_sums
from p2pl.errors import P2PLError, choose

if TYPE_CHECKING:  # compress builds on this module
    from p2pl.core.compress import Compression

T = TypeVar("T")

#: A row whose L2 norm exceeds this multiple of its reference row's norm (or of 1) counts as
#: exploding (``consensus.max_norm_ratio``): no honest step grows a model 1000-fold.
MAX_NORM_RATIO = 1000.0
#: Values one job of a robust rule reads (4M floats = 16 MB): bounds a gathered block on GPU and
#: splits the work into jobs for every core.
GATHER_BUDGET = 1 << 22
#: Values a robust rule's step must touch before it runs the compiled CPU kernels: they start in
#: ~0.8 s per process (numba, once), which a small step (a node's one row, a test's network) would
#: not win back; below it torch computes the same numbers.
KERNEL_MIN_VALUES = 1 << 20
#: Below this many receivers x pool rows, W is applied as one dense matmul.
DENSE_MAX_CELLS = 256 * 256
#: Up to this many cells, a W with at least 1/DENSE_MIN_SHARE of its cells nonzero is applied
#: dense too: a BLAS product beats the CSR walk from a few percent density on (a complete graph
#: of 1,000 devices: 0.84 s a step as CSR; BENCHMARKS.md, "p2pl round vs a hand-written torch loop").
DENSE_LIMIT_CELLS = 1 << 24
DENSE_MIN_SHARE = 16


# ----------------------------------------------------------------------------- neighbourhoods


@dataclass(frozen=True, eq=False)
class Neighbourhoods:
    """Whom each of R receiving rows hears this step, and its row of W.

    Receiver ``r`` hears pool rows ``src[indptr[r]:indptr[r + 1]]`` with weights ``weight[...]``;
    ``self_weight[r]`` is W_nn. Rows with no neighbours have W_nn = 1 and keep their row.
    """

    indptr: np.ndarray  # int64 [R + 1]
    src: np.ndarray  # int64 [M], indices into the pool of sent rows
    weight: np.ndarray  # float64 [M]
    self_weight: np.ndarray  # float64 [R]

    @staticmethod
    def from_edges(
        num_rows: int, dst: np.ndarray, src: np.ndarray, weight: np.ndarray, self_weight: np.ndarray
    ) -> Neighbourhoods:
        """From (receiving row, pool row, weight) triples in any order (kept stable per row)."""
        dst = np.asarray(dst, dtype=np.int64)
        order = np.argsort(dst, kind="stable")
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(dst, minlength=num_rows), out=indptr[1:])
        return Neighbourhoods(
            indptr,
            np.asarray(src, dtype=np.int64)[order],
            np.asarray(weight, dtype=np.float64)[order],
            np.asarray(self_weight, dtype=np.float64),
        )

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)

    @property
    def dst(self) -> np.ndarray:
        """The receiving row of each entry."""
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), self.degree)

    def with_weights(self, weight: np.ndarray, self_weight: np.ndarray) -> Neighbourhoods:
        return Neighbourhoods(self.indptr, self.src, weight, self_weight)

    def subset(self, rows: np.ndarray) -> Neighbourhoods:
        """The neighbourhoods of ``rows`` only (in that order), still indexing the same pool."""
        rows = np.asarray(rows, dtype=np.int64)
        deg = self.degree[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(deg, out=indptr[1:])
        spans = [np.arange(self.indptr[r], self.indptr[r + 1]) for r in rows.tolist()]
        take = np.concatenate(spans).astype(np.int64) if spans else np.zeros(0, dtype=np.int64)
        return Neighbourhoods(indptr, self.src[take], self.weight[take], self.self_weight[rows])

    def matrix(self, pool_rows: int) -> sp.csr_matrix:
        """The off-diagonal part of W as a CSR matrix [R, pool_rows] (float32)."""
        return sp.csr_matrix((self.weight.astype(np.float32), self.src, self.indptr), shape=(self.num_rows, pool_rows))


# --------------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Gossip:
    """One consensus step with the neighbours, by an aggregation rule."""

    rule: str = "mean"
    trim: float = 0.2  # trimmed-mean: share cut at each end
    clip_quantile: float = 0.8  # clipped: share of the neighbour weight trusted to set the radius
    radius_factor: float = 1.5  # redescending: radius = this x the weighted median neighbour distance
    max_norm_ratio: float = MAX_NORM_RATIO  # see unsound_rows
    # compressed messages and the mean: each coordinate's mean over the receiver and the neighbours
    # that sent it (weights renormalized), rather than the receiver's own value standing in for the
    # others (p2pl.core.compress, compression.unsent)
    sent_only: bool = False
    # Who sends to whom (GOSSIP_PEERS): "all" live neighbours with W's weights, or "one-random":
    # every device sends to one live neighbour drawn by keyed randomness and each receiver
    # weighs itself and what it received equally (core.neighbours.one_peer_neighbourhoods).
    peers: str = "all"


GOSSIP_PEERS = ("all", "one-random")


@dataclass(frozen=True)
class GlobalMean:
    """FedAvg's server step: Σ w_n θ_n / Σ w_n over the present devices, sent back to them."""


@dataclass(frozen=True)
class PushSum:
    """Push-sum over directed links (Kempe et al. 2003; SGP, Assran et al. 2019).

    Every device holds a push-sum weight ``w`` (the runtime keeps it across rounds) and splits
    ``(w θ, w)`` equally among itself and its live out-neighbours; a receiver's new weight is the
    sum of the shares it got, and its new row the share-weighted mean of the rows
    (:func:`p2pl.core.neighbours.push_sum_neighbourhoods` builds that row of weights). The rows
    are the de-biased models ``z = x / w`` devices train, so the mix is a plain weighted mean
    (:meth:`as_gossip`) with the shared safety net."""

    max_norm_ratio: float = MAX_NORM_RATIO

    def as_gossip(self) -> Gossip:
        return Gossip("mean", max_norm_ratio=self.max_norm_ratio)


Stage = Gossip | GlobalMean | PushSum


@dataclass(frozen=True)
class Cooperation:
    """What an algorithm does after local training (see the module doc)."""

    stages: tuple[Stage, ...] = ()
    affinity: float = 1.0
    max_norm_ratio: float = MAX_NORM_RATIO  # the guard after cooperation (see unsound_rows)
    # D-PSGD: the stages run after every local SGD step of the round instead of once after
    # local training (the runtimes pass a step hook to core.train; see docs/baselines.md).
    every_local_step: bool = False
    # what gossip stages send (p2pl.core.compress); None or method "none": the plain rows
    compression: Compression | None = None


def _mean(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    if sent is not None:
        return _mean_filled(own, pool, hoods, stage, sent)
    self_w = torch.as_tensor(hoods.self_weight, dtype=own.dtype, device=own.device).unsqueeze(1)
    r, s = hoods.num_rows, pool.shape[0]
    if len(hoods.src) == 0:
        return own * self_w
    if own.device.type != "cpu":
        w = torch.sparse_csr_tensor(
            torch.as_tensor(hoods.indptr, device=own.device),
            torch.as_tensor(hoods.src, device=own.device),
            torch.as_tensor(hoods.weight, dtype=own.dtype, device=own.device),
            size=(r, s),
        )
        return torch.addcmul(w @ pool, self_w, own)
    cells = r * s
    if cells > DENSE_MAX_CELLS and (everyone := everyone_mean(own, pool, hoods)) is not None:
        return everyone
    if cells <= DENSE_MAX_CELLS or (cells <= DENSE_LIMIT_CELLS and len(hoods.src) * DENSE_MIN_SHARE >= cells):
        return dense_mean(own, pool, hoods)
    # A CSR product walks each receiver's neighbours once: measured 7x faster than a torch
    # gather + index_add over the edge list at 10,000 devices (BENCHMARKS.md).
    return csr_mean(own, pool, hoods)


def _mean_filled(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor
) -> torch.Tensor:
    """The weighted mean where pool row m carries only the coordinates ``sent[m]``, from two
    sparse products, ``Σ W (s ⊙ v)`` and ``Σ W s``, so no per-edge copy of the rows is made.

    A receiver uses its own value where a neighbour sent nothing,
    ``W_nn θ_n + Σ_m W_nm (s_m v_m + (1 − s_m) θ_n)``, or, with ``stage.sent_only``, each
    coordinate's mean over itself and the neighbours that sent it,
    ``(W_nn θ_n + Σ_m W_nm s_m v_m) / (W_nn + Σ_m W_nm s_m)``: filling with its own value gives a
    coordinate one neighbour sent a pull of only ``W_nm`` (~1/degree), so sparse gossip barely mixes."""
    total = np.bincount(hoods.dst, weights=hoods.weight, minlength=hoods.num_rows)
    self_weight = torch.from_numpy(np.asarray(hoods.self_weight, dtype=np.float64)).to(own.dtype).unsqueeze(1)
    probe = sent[:64]  # the share sent, estimated from a few rows (it picks the faster path only)
    if own.device.type == "cpu" and len(hoods.src) and int(probe.sum()) * 20 < probe.numel():
        kept, heard = sent_sums(own, pool, hoods, sent)  # few coordinates sent: walk only those
        if stage.sent_only:
            return _renormalized(kept.addcmul_(own, self_weight), heard.add_(self_weight), own)
        # own-value weight: W_nn + Σ W (1 − s), in place over Σ W s
        own_weight = torch.from_numpy(total + hoods.self_weight).to(own.dtype).unsqueeze(1)
        return torch.addcmul(kept, own, heard.neg_().add_(own_weight))
    mask = sent.to(own.dtype)
    kept = _mean(own, pool * mask, hoods, stage)  # W_nn θ_n + Σ W s ⊙ v
    heard = _mean(torch.zeros_like(own), mask, hoods, stage)  # Σ W s
    if stage.sent_only:
        return _renormalized(kept, heard.add_(self_weight.to(own.device)), own)
    unsent = torch.from_numpy(total).to(own.device, own.dtype).unsqueeze(1) - heard  # Σ W (1 − s)
    return torch.addcmul(kept, own, unsent)


def _renormalized(weighted_sum: torch.Tensor, weight: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``weighted_sum / weight`` per coordinate; the receiver's own value where the weight is 0
    (a receiver with no self weight that heard nothing at that coordinate)."""
    unheard = ~(weight > 0)
    out = weighted_sum.div_(weight.clamp_min(1e-30))  # in place: both sums are this step's own buffers
    if bool(unheard.any()):
        out[unheard] = own[unheard]
    return out


def _spread(run: Callable[[T], None], jobs: list[T], device: torch.device) -> None:
    """Run independent chunk jobs over every CPU core (the compiled kernels and torch's gathers
    release the GIL). Not torch's thread count: a run keeps torch at one thread for its many small
    training ops, while these chunks are large and independent."""
    workers = (os.cpu_count() or 1) if device.type == "cpu" else 1
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as threads:
            list(threads.map(run, jobs))
    else:
        for job in jobs:
            run(job)


def _kernel_arrays(values: int, *tensors: torch.Tensor) -> tuple[np.ndarray, ...] | None:
    """Contiguous numpy views of the tensors for the compiled kernels, or None where torch runs
    the step instead: off the CPU, or a step of fewer than KERNEL_MIN_VALUES values."""
    if values < KERNEL_MIN_VALUES or any(t.device.type != "cpu" for t in tensors):
        return None
    return tuple(t.detach().contiguous().numpy() for t in tensors)


def sorted_middle(
    own: torch.Tensor,
    pool: torch.Tensor,
    rows: np.ndarray,
    neighbours: np.ndarray,
    lo: int,
    hi: int,
    sent: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`p2pl.core.order_stats.middle_mean` in torch, for any device and the same bits: gathers
    ``[rows, P, n]`` (one coordinate's values contiguous), sorts it and sums positions ``lo..hi-1``
    in float64 in the kernel's order."""
    idx = torch.from_numpy(rows).to(own.device)
    neighbour_rows = torch.from_numpy(neighbours).to(pool.device)
    stack = torch.cat([own[idx].unsqueeze(2), pool[neighbour_rows].transpose(1, 2)], dim=2)
    if sent is not None:  # compressed messages: coordinates not sent take the receiver's own value
        heard = sent[neighbour_rows].transpose(1, 2)
        stack[..., 1:] = torch.where(heard, stack[..., 1:], stack[..., :1])
    ordered = stack.sort(dim=-1).values
    total = ordered[..., lo].double()
    for k in range(lo + 1, hi):
        total += ordered[..., k]
    return (total * (1.0 / (hi - lo))).to(own.dtype)


def _by_degree(
    own: torch.Tensor,
    pool: torch.Tensor,
    hoods: Neighbourhoods,
    reduce: Callable[[int], tuple[int, int]],
    sent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per receiver and coordinate, the mean of the sorted positions ``lo..hi-1`` of its ``d + 1``
    values (its own row and its neighbours' rows), ``(lo, hi) = reduce(d + 1)``. Receivers of
    equal degree are grouped, in jobs of at most GATHER_BUDGET values spread over every core.

    On CPU a compiled kernel orders each receiver's values in a cache-sized buffer
    (:mod:`p2pl.core.order_stats`); on GPU, and for small steps, torch sorts a gathered
    ``[rows, P, d + 1]`` block (:func:`sorted_middle`). Both give the same bits for finite values,
    so a node's one row equals the simulator's."""
    out = torch.empty(own.shape, dtype=own.dtype, device=own.device)
    degree = hoods.degree
    p = max(own.shape[1], 1)
    jobs: list[np.ndarray] = []
    for d in np.unique(degree).tolist():
        rows = np.flatnonzero(degree == d)
        chunk = max(1, GATHER_BUDGET // ((d + 1) * p))
        jobs += [rows[lo : lo + chunk] for lo in range(0, len(rows), chunk)]
    arrays = _kernel_arrays((len(hoods.src) + hoods.num_rows) * p, own, pool, out)
    mask = None if arrays is None or sent is None else sent.contiguous().numpy()
    if arrays is not None:
        from p2pl.core.order_stats import middle_mean  # here: only a run that needs it imports numba

    def run(part: np.ndarray) -> None:
        d = int(degree[part[0]])
        lo, hi = reduce(d + 1)
        neighbours = hoods.src[hoods.indptr[part][:, None] + np.arange(d)]
        if arrays is not None:
            middle_mean(arrays[0], arrays[1], part, neighbours, lo, hi, arrays[2], mask)
        else:
            out[torch.from_numpy(part).to(own.device)] = sorted_middle(own, pool, part, neighbours, lo, hi, sent)

    _spread(run, jobs, own.device)
    return out


def trim_count(trim: float, size: int) -> int:
    """Values cut at each end of a neighbourhood of ``size`` values (at least one value stays)."""
    return min(math.floor(trim * size + 1e-9), (size - 1) // 2)


def _trimmed_mean(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    def middle(size: int) -> tuple[int, int]:
        b = trim_count(stage.trim, size)
        return b, size - b

    return _by_degree(own, pool, hoods, middle, sent)


def _median(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    def middle(size: int) -> tuple[int, int]:
        # an even count averages the two middle values
        return (size - 1) // 2, size // 2 + 1

    return _by_degree(own, pool, hoods, middle, sent)


def _edge_distances(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, sent: torch.Tensor | None = None
) -> np.ndarray:
    """||pool[src] − own[dst]|| per neighbourhood entry, in float64 (over the coordinates sent,
    when ``sent`` masks the pool), in chunks over CPU threads."""
    dst, m = hoods.dst, len(hoods.src)
    out = np.empty(m, dtype=np.float64)
    chunk = max(1, GATHER_BUDGET // max(own.shape[1], 1))
    arrays = _kernel_arrays(m * own.shape[1], own, pool)
    mask = None if arrays is None or sent is None else sent.contiguous().numpy()
    if arrays is not None:
        from p2pl.core.order_stats import edge_distances  # lazily, as in _by_degree

    def run(lo: int) -> None:
        if arrays is not None:
            span = slice(lo, lo + chunk)
            edge_distances(arrays[0], arrays[1], dst[span], hoods.src[span], out[span], mask)
            return
        s = torch.from_numpy(hoods.src[lo : lo + chunk]).to(pool.device)
        d = torch.from_numpy(dst[lo : lo + chunk]).to(own.device)
        diff = pool[s].double() - own[d].double()
        if sent is not None:
            diff = diff * sent[s]
        out[lo : lo + chunk] = torch.linalg.vector_norm(diff, dim=1).cpu().numpy()

    _spread(run, list(range(0, m, chunk)), own.device)
    return out


def one_row(self_weight: float, weights: list[float]) -> Neighbourhoods:
    """The neighbourhood of a single device hearing pool rows ``0..k-1`` (a node's view)."""
    k = len(weights)
    return Neighbourhoods(
        np.array([0, k], dtype=np.int64),
        np.arange(k, dtype=np.int64),
        np.asarray(weights, dtype=np.float64),
        np.array([self_weight], dtype=np.float64),
    )


def _nearest_first(distances: np.ndarray, weight: np.ndarray, indptr: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each receiver's entries sorted by distance: (distances, weights, cumulative weight within
    the receiver, the receiver's total weight per entry, the receiver of each entry)."""
    r = len(indptr) - 1
    degree = np.diff(indptr)
    row = np.repeat(np.arange(r), degree)
    order = np.lexsort((distances, row))
    dist, w = distances[order], weight[order]
    cum = np.cumsum(w)
    start = np.concatenate([[0.0], cum])[indptr[:-1]]
    total = np.add.reduceat(w, indptr[:-1]) if len(w) else np.zeros(r)
    total = np.where(degree > 0, total, 0.0)
    return dist, w, cum - np.repeat(start, degree), np.repeat(total, degree), row


def clip_radius(distances: np.ndarray, weight: np.ndarray, indptr: np.ndarray, quantile: float) -> np.ndarray:
    """Per receiver, the clipping radius of self-centred clipping.

    The receiver trusts its nearest neighbours that together carry at most ``quantile`` of its
    neighbour weight (always at least the nearest one) and sets ``τ² = Σ_trusted W d² / (1 − q)``
    (He, Karimireddy & Jaggi's adaptive radius with δ = 1 − q as the weight share that may lie):
    honest neighbours at typical distances pass unclipped, a far outlier is pulled in to τ.
    0 for a receiver with no neighbours."""
    r = len(indptr) - 1
    dist, w, within, total, row = _nearest_first(distances, weight, indptr)
    first = np.zeros(len(w), dtype=bool)
    first[indptr[:-1][np.diff(indptr) > 0]] = True
    trusted = (within <= quantile * total * (1 + 1e-12)) | first
    sq = np.bincount(row, weights=np.where(trusted, w * dist**2, 0.0), minlength=r)
    delta = max(1.0 - quantile, 1e-12)
    return np.sqrt(sq / delta)


def median_distance(distances: np.ndarray, weight: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per receiver, the weighted median of its neighbours' distances: the nearest distance whose
    cumulative weight (nearest first) reaches half of the receiver's neighbour weight. Neighbours
    holding less than half of that weight cannot move it beyond the others' distances. 0 for a
    receiver with no neighbours."""
    r = len(indptr) - 1
    degree = np.diff(indptr)
    dist, _, within, total, row = _nearest_first(distances, weight, indptr)
    below = np.bincount(row, weights=within < 0.5 * total * (1 - 1e-12), minlength=r).astype(np.int64)
    out = np.zeros(r)
    has = degree > 0
    out[has] = dist[indptr[:-1][has] + np.minimum(below[has], degree[has] - 1)]
    return out


def _reweighted(
    own: torch.Tensor,
    pool: torch.Tensor,
    hoods: Neighbourhoods,
    keep: np.ndarray,
    stage: Gossip,
    sent: torch.Tensor | None,
) -> torch.Tensor:
    """``θ_n + Σ_m W_nm keep_nm (θ_m − θ_n)``: a weighted mean with weights ``W_nm keep_nm``, the
    weight a neighbour loses staying on the receiver's own row."""
    weight = hoods.weight * keep
    lost = np.bincount(hoods.dst, weights=hoods.weight - weight, minlength=hoods.num_rows)
    return _mean(own, pool, hoods.with_weights(weight, hoods.self_weight + lost), stage, sent)


def _clipped(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    if len(hoods.src) == 0:
        return _mean(own, pool, hoods, stage)
    distances = _edge_distances(own, pool, hoods, sent)
    tau = np.repeat(clip_radius(distances, hoods.weight, hoods.indptr, stage.clip_quantile), hoods.degree)
    # clip(z, τ) = z min(1, τ / ||z||): the neighbour's weight scaled by min(1, τ / ||z||)
    keep = np.where(distances > tau, tau / np.maximum(distances, 1e-300), 1.0)
    return _reweighted(own, pool, hoods, keep, stage, sent)


def _redescending(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    if len(hoods.src) == 0:
        return _mean(own, pool, hoods, stage)
    distances = _edge_distances(own, pool, hoods, sent)
    radius = stage.radius_factor * median_distance(distances, hoods.weight, hoods.indptr)
    tau = np.repeat(radius, hoods.degree)
    # Beyond τ the weight falls as (τ / ||z||)²: the pull W τ² / ||z|| is at most W τ (at ||z|| = τ,
    # as clipping's) and fades the farther the row lies, where clipping's stays W τ.
    keep = np.ones_like(distances)
    far = distances > tau  # NaN compares False: a NaN row keeps its weight and the guard drops it
    keep[far] = (tau[far] / distances[far]) ** 2
    return _reweighted(own, pool, hoods, keep, stage, sent)


#: consensus.aggregation name -> the rule, over (own rows, pool of sent rows, neighbourhoods, stage,
#: sent mask). ``sent`` (bool [S, P] or None): the coordinates each pool row carries (compressed
#: messages); a receiver uses its own value at the others, or (the mean with ``stage.sent_only``)
#: averages each coordinate over the neighbours that sent it.
AGGREGATION_RULES: dict[str, Callable[..., torch.Tensor]] = {
    "mean": _mean,
    "trimmed-mean": _trimmed_mean,
    "median": _median,
    "clipped": _clipped,
    "redescending": _redescending,
}


def aggregate(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    """One gossip step for R receiving rows ``own [R, P]`` from the ``pool [S, P]`` of sent rows
    (``sent``: bool [S, P], the coordinates each pool row carries; None: all of them)."""
    rule = AGGREGATION_RULES[choose("consensus.aggregation", stage.rule, tuple(AGGREGATION_RULES))]
    if own.shape[0] != hoods.num_rows:
        raise P2PLError(f"{own.shape[0]} rows for {hoods.num_rows} neighbourhoods")  # a runtime bug
    return rule(own, pool, hoods, stage, sent)


def weighted_average(params: torch.Tensor, weights: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Σ w_n θ_n / Σ w_n over devices (FedAvg's server step) as a float64 [P] vector.

    Summed in float64 (in row chunks), so an average of per-shard averages (the Ray backend)
    rounds to the same float32 parameters as one average over all devices."""
    w = weights.to(device=params.device, dtype=torch.float64)
    w = w / w.sum()
    out = torch.zeros(params.shape[1], dtype=torch.float64, device=params.device)
    for lo in range(0, params.shape[0], chunk):
        out += w[lo : lo + chunk] @ params[lo : lo + chunk].double()
    return out


# ------------------------------------------------------------------------------------ finish


def unsound_rows(rows: torch.Tensor, reference: torch.Tensor, ratio: float = MAX_NORM_RATIO) -> torch.Tensor:
    """bool [R]: rows that are non-finite or whose norm exceeds ``ratio`` x max(||reference||, 1)."""
    norm = torch.linalg.vector_norm(rows, dim=-1)
    bound = ratio * torch.linalg.vector_norm(reference, dim=-1).clamp_min(1.0)
    return ~(norm <= bound)  # NaN and inf compare False: unsound


def rollback_unsound(rows: torch.Tensor, before: torch.Tensor, ratio: float = MAX_NORM_RATIO) -> torch.Tensor:
    """Restore unsound rows of ``rows`` from ``before`` in place; returns their bool mask."""
    bad = unsound_rows(rows, before, ratio)
    if bool(bad.any()):
        rows[bad] = before[bad]
    return bad


def gossip(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    """One gossip step with the safety net every runtime shares: a receiver whose result is
    unsound retries without the neighbours whose own rows are out of bounds for it (their weight
    goes to itself); if that is still unsound it keeps its row."""
    mixed = aggregate(own, pool, hoods, stage, sent)
    bad = unsound_rows(mixed, own, stage.max_norm_ratio)
    if not bool(bad.any()):
        return mixed
    rows = np.flatnonzero(bad.cpu().numpy())
    sub = hoods.subset(rows)
    dst = sub.dst
    sent_norm = torch.linalg.vector_norm(pool[torch.from_numpy(sub.src).to(pool.device)], dim=-1)
    own_norm = torch.linalg.vector_norm(own[torch.from_numpy(rows).to(own.device)], dim=-1).clamp_min(1.0)
    suspect = (~(sent_norm <= stage.max_norm_ratio * own_norm[torch.from_numpy(dst).to(own.device)])).cpu().numpy()
    keep = ~suspect
    self_weight = sub.self_weight + np.bincount(dst, weights=np.where(suspect, sub.weight, 0.0), minlength=len(rows))
    reduced = Neighbourhoods.from_edges(len(rows), dst[keep], sub.src[keep], sub.weight[keep], self_weight)
    index = torch.from_numpy(rows).to(own.device)
    retry = aggregate(own[index], pool, reduced, stage, sent)
    rollback_unsound(retry, own[index], stage.max_norm_ratio)
    mixed[index] = retry
    return mixed


def finish(coop: Cooperation, after: torch.Tensor, before: torch.Tensor, active: np.ndarray | None) -> torch.Tensor:
    """Affinity blend, absent rows kept, unsound rows rolled back (returns a new tensor)."""
    out = after if coop.affinity >= 1.0 else torch.lerp(before, after, coop.affinity)
    if out is before:
        out = before.clone()
    if active is not None and not bool(np.all(active)):
        absent = torch.from_numpy(~np.asarray(active, dtype=bool)).to(out.device)
        out[absent] = before[absent]
    rollback_unsound(out, before, coop.max_norm_ratio)
    return out


__all__ = [
    "AGGREGATION_RULES",
    "GOSSIP_PEERS",
    "MAX_NORM_RATIO",
    "Cooperation",
    "GlobalMean",
    "Gossip",
    "Neighbourhoods",
    "PushSum",
    "Stage",
    "aggregate",
    "clip_radius",
    "finish",
    "gossip",
    "median_distance",
    "one_row",
    "rollback_unsound",
    "sorted_middle",
    "trim_count",
    "unsound_rows",
    "weighted_average",
]
