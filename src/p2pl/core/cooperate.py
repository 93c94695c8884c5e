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

from p2pl.errors import P2PLError, choose

if TYPE_CHECKING:  # compress builds on this module
    from p2pl.core.compress import Compression

T = TypeVar("T")

#: A row whose L2 norm exceeds this multiple of its reference row's norm (or of 1) counts as
#: exploding (``consensus.max_norm_ratio``): no honest step grows a model 1000-fold.
MAX_NORM_RATIO = 1000.0
#: Values one gathered block of a robust rule may hold (4M floats = 16 MB: stays in cache, and
#: no large fresh allocation per chunk).
GATHER_BUDGET = 1 << 22
#: Below this many receivers x pool rows, W is applied as one dense matmul.
DENSE_MAX_CELLS = 256 * 256


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
    max_norm_ratio: float = MAX_NORM_RATIO  # see unsound_rows
    # compressed messages and the mean: each coordinate's mean over the receiver and the neighbours
    # that sent it (weights renormalized), rather than the receiver's own value standing in for the
    # others (p2pl.core.compress, compression.unsent)
    sent_only: bool = False


@dataclass(frozen=True)
class GlobalMean:
    """FedAvg's server step: Σ w_n θ_n / Σ w_n over the present devices, sent back to them."""


Stage = Gossip | GlobalMean


@dataclass(frozen=True)
class Cooperation:
    """What an algorithm does after local training (see the module doc)."""

    stages: tuple[Stage, ...] = ()
    affinity: float = 1.0
    max_norm_ratio: float = MAX_NORM_RATIO  # the guard after cooperation (see unsound_rows)
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
    if r * s <= DENSE_MAX_CELLS:
        dense = torch.zeros(r, s, dtype=own.dtype)
        dense[torch.from_numpy(hoods.dst), torch.from_numpy(hoods.src)] = torch.from_numpy(hoods.weight).to(own.dtype)
        return torch.addcmul(dense @ pool, self_w, own)
    # A CSR product walks each receiver's neighbours once: measured 7x faster than a torch
    # gather + index_add over the edge list at 10,000 devices (BENCHMARKS.md).
    mixed = torch.from_numpy(np.asarray(hoods.matrix(s) @ pool.detach().numpy(), dtype=np.float32))
    return torch.addcmul(mixed, self_w, own)


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
        kept, heard = _sparse_sums(own, pool, hoods, sent)  # few coordinates sent: walk only those
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
    return torch.where(weight > 0, weighted_sum / weight.clamp_min(1e-30), own)


def _sparse_sums(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, sent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_m W_nm s_m ⊙ v_m, Σ_m W_nm s_m) from the sent entries alone: one scatter-add over
    (edge, sent coordinate of its sender) pairs instead of two products over every coordinate."""
    rows, cols = (t.numpy() for t in sent.nonzero(as_tuple=True))
    count = np.bincount(rows, minlength=pool.shape[0])
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    per_edge = count[hoods.src]
    edge = np.repeat(np.arange(len(hoods.src)), per_edge)
    offset = np.arange(len(edge)) - np.repeat(np.cumsum(per_edge) - per_edge, per_edge)
    entry = start[hoods.src][edge] + offset
    dst = torch.from_numpy(hoods.dst[edge])
    col = torch.from_numpy(cols[entry])
    weight = torch.from_numpy(hoods.weight[edge]).to(own.dtype)
    values = pool[torch.from_numpy(rows[entry]), col]
    kept = torch.zeros_like(own).index_put_((dst, col), weight * values, accumulate=True)
    heard = torch.zeros_like(own).index_put_((dst, col), weight, accumulate=True)
    return kept, heard


def _spread(run: Callable[[T], None], jobs: list[T], device: torch.device) -> None:
    """Run independent chunk jobs over every CPU core (numpy's sort and torch's gathers release
    the GIL). Not torch's thread count: a run keeps torch at one thread for its many small
    training ops, while these chunks are large and independent."""
    workers = (os.cpu_count() or 1) if device.type == "cpu" else 1
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as threads:
            list(threads.map(run, jobs))
    else:
        for job in jobs:
            run(job)


def _by_degree(
    own: torch.Tensor,
    pool: torch.Tensor,
    hoods: Neighbourhoods,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    sent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``reduce`` to every receiver's values sorted per coordinate, ``[rows, P, d + 1]`` (its
    own row and its neighbours' rows), grouping receivers of equal degree, in chunks of at most
    GATHER_BUDGET values spread over torch's CPU threads (numpy's sort releases the GIL)."""
    out = torch.empty_like(own)
    degree = hoods.degree
    p = max(own.shape[1], 1)
    jobs: list[np.ndarray] = []
    for d in np.unique(degree).tolist():
        rows = np.flatnonzero(degree == d)
        chunk = max(1, GATHER_BUDGET // ((d + 1) * p))
        jobs += [rows[lo : lo + chunk] for lo in range(0, len(rows), chunk)]

    def run(part: np.ndarray) -> None:
        d = int(degree[part[0]])
        idx = torch.from_numpy(part).to(own.device)
        if d == 0:
            out[idx] = own[idx]
            return
        cols = hoods.indptr[part][:, None] + np.arange(d)
        neighbour_rows = torch.from_numpy(hoods.src[cols]).to(pool.device)
        # [rows, P, d + 1] with one coordinate's values contiguous: numpy sorts many short rows
        # several times faster than torch.sort does along any axis on CPU.
        stack = torch.cat([own[idx].unsqueeze(2), pool[neighbour_rows].transpose(1, 2)], dim=2)
        if sent is not None:  # compressed messages: coordinates not sent take the receiver's own value
            heard = sent[neighbour_rows].transpose(1, 2)
            stack[..., 1:] = torch.where(heard, stack[..., 1:], stack[..., :1])
        if stack.device.type == "cpu":
            stack.numpy().sort(axis=-1)  # in place: no second copy of the block
            ordered = stack
        else:
            ordered = stack.sort(dim=-1).values
        out[idx] = reduce(ordered)

    _spread(run, jobs, own.device)
    return out


def trim_count(trim: float, size: int) -> int:
    """Values cut at each end of a neighbourhood of ``size`` values (at least one value stays)."""
    return min(math.floor(trim * size + 1e-9), (size - 1) // 2)


def _trimmed_mean(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    def reduce(ordered: torch.Tensor) -> torch.Tensor:
        size = ordered.shape[-1]
        b = trim_count(stage.trim, size)
        return ordered[..., b : size - b].mean(dim=-1)

    return _by_degree(own, pool, hoods, reduce, sent)


def _median(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    def reduce(ordered: torch.Tensor) -> torch.Tensor:
        size = ordered.shape[-1]
        if size % 2:
            return ordered[..., size // 2]
        return (ordered[..., size // 2 - 1] + ordered[..., size // 2]) * 0.5

    return _by_degree(own, pool, hoods, reduce, sent)


def _edge_distances(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, sent: torch.Tensor | None = None
) -> np.ndarray:
    """||pool[src] − own[dst]|| per neighbourhood entry (over the coordinates sent, when ``sent``
    masks the pool), in cache-sized chunks over CPU threads."""
    dst, m = hoods.dst, len(hoods.src)
    out = np.empty(m, dtype=np.float64)
    chunk = max(1, GATHER_BUDGET // max(own.shape[1], 1))

    def run(lo: int) -> None:
        s = torch.from_numpy(hoods.src[lo : lo + chunk]).to(pool.device)
        d = torch.from_numpy(dst[lo : lo + chunk]).to(own.device)
        diff = pool[s] - own[d]
        if sent is not None:
            diff = diff * sent[s]
        out[lo : lo + chunk] = torch.linalg.vector_norm(diff, dim=1).double().cpu().numpy()

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


def clip_radius(distances: np.ndarray, weight: np.ndarray, indptr: np.ndarray, quantile: float) -> np.ndarray:
    """Per receiver, the clipping radius of self-centred clipping.

    The receiver trusts its nearest neighbours that together carry at most ``quantile`` of its
    neighbour weight (always at least the nearest one) and sets ``τ² = Σ_trusted W d² / (1 − q)``
    (He, Karimireddy & Jaggi's adaptive radius with δ = 1 − q as the weight share that may lie):
    honest neighbours at typical distances pass unclipped, a far outlier is pulled in to τ.
    0 for a receiver with no neighbours."""
    r = len(indptr) - 1
    degree = np.diff(indptr)
    row = np.repeat(np.arange(r), degree)
    order = np.lexsort((distances, row))
    dist, w = distances[order], weight[order]
    cum = np.cumsum(w)
    start = np.concatenate([[0.0], cum])[indptr[:-1]]
    total = np.add.reduceat(w, indptr[:-1]) if len(w) else np.zeros(r)
    has = degree > 0
    total = np.where(has, total, 0.0)
    within = cum - np.repeat(start, degree)  # cumulative weight, nearest first, within each row
    first = np.zeros(len(w), dtype=bool)
    first[indptr[:-1][has]] = True
    trusted = (within <= quantile * np.repeat(total, degree) * (1 + 1e-12)) | first
    sq = np.bincount(row, weights=np.where(trusted, w * dist**2, 0.0), minlength=r)
    delta = max(1.0 - quantile, 1e-12)
    return np.sqrt(sq / delta)


def _clipped(
    own: torch.Tensor, pool: torch.Tensor, hoods: Neighbourhoods, stage: Gossip, sent: torch.Tensor | None = None
) -> torch.Tensor:
    if len(hoods.src) == 0:
        return _mean(own, pool, hoods, stage)
    distances = _edge_distances(own, pool, hoods, sent)
    radius = clip_radius(distances, hoods.weight, hoods.indptr, stage.clip_quantile)
    tau = np.repeat(radius, hoods.degree)
    keep = np.where(distances > tau, tau / np.maximum(distances, 1e-300), 1.0)
    # θ_n + Σ W_nm c_nm (θ_m − θ_n) is a weighted mean with weights W_nm c_nm and the rest on self.
    weight = hoods.weight * keep
    lost = np.bincount(hoods.dst, weights=hoods.weight - weight, minlength=hoods.num_rows)
    return _mean(own, pool, hoods.with_weights(weight, hoods.self_weight + lost), stage, sent)


#: consensus.aggregation name -> the rule, over (own rows, pool of sent rows, neighbourhoods, stage,
#: sent mask). ``sent`` (bool [S, P] or None): the coordinates each pool row carries (compressed
#: messages); a receiver uses its own value at the others, or (the mean with ``stage.sent_only``)
#: averages each coordinate over the neighbours that sent it.
AGGREGATION_RULES: dict[str, Callable[..., torch.Tensor]] = {
    "mean": _mean,
    "trimmed-mean": _trimmed_mean,
    "median": _median,
    "clipped": _clipped,
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
    "MAX_NORM_RATIO",
    "Cooperation",
    "GlobalMean",
    "Gossip",
    "Neighbourhoods",
    "Stage",
    "aggregate",
    "clip_radius",
    "finish",
    "gossip",
    "one_row",
    "rollback_unsound",
    "trim_count",
    "unsound_rows",
    "weighted_average",
]
