"""Consensus (mixing) weights (docs/design.md): ``θ_n ← Σ_{m ∈ N_n ∪ {n}} W_nm θ_m``.

| rule         | W_nm (m a neighbour)             | W_nn                         |
|--------------|----------------------------------|------------------------------|
| metropolis   | 1 / (1 + max(d_n, d_m))          | 1 − Σ_m W_nm                 |
| max-degree   | 1 / (1 + d_max)                  | 1 − d_n / (1 + d_max)        |
| uniform      | 1 / (1 + d_n)                    | 1 / (1 + d_n)                |
| data-size    | |D_m| / Σ_{j ∈ N_n ∪ {n}} |D_j|  | |D_n| / Σ_{j ∈ N_n ∪ {n}} |D_j| |

The formulas live in one function, :func:`_row_formula`, over a flat list of (row, neighbour)
pairs. :func:`mixing_weights` calls it for the whole graph at once (vectorized), and
:func:`row_weights` for the single row a real device computes from what it sees locally, so the
simulator and the networked node cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from p2pl.errors import P2PLError, choose

WEIGHT_RULES: tuple[str, ...] = ("metropolis", "max-degree", "uniform", "data-size")  # names of _RULES


# eq=False: array fields make generated __eq__ ambiguous; compare .dense() instead.
@dataclass(frozen=True, eq=False)
class MixingWeights:
    """Sparse W: off-diagonal entries as (dst, src, weight) plus the diagonal ``self_weight``.

    Row ``dst`` is the receiving device n, column ``src`` its neighbour m. Both directions of
    every undirected link appear, sorted by dst then src.
    """

    num_devices: int
    dst: np.ndarray  # int64 [M]
    src: np.ndarray  # int64 [M]
    weight: np.ndarray  # float64 [M], W[dst, src]
    self_weight: np.ndarray  # float64 [N], W[n, n]

    def dense(self) -> np.ndarray:
        w = np.zeros((self.num_devices, self.num_devices), dtype=np.float64)
        w[self.dst, self.src] = self.weight
        w[np.diag_indices(self.num_devices)] = self.self_weight
        return w

    def to_sparse(self) -> sp.csr_matrix:
        diag = np.arange(self.num_devices, dtype=np.int64)
        rows = np.concatenate([self.dst, diag])
        cols = np.concatenate([self.src, diag])
        vals = np.concatenate([self.weight, self.self_weight])
        return sp.csr_matrix((vals, (rows, cols)), shape=(self.num_devices, self.num_devices))


@dataclass(frozen=True)
class _Pairs:
    """(receiving row, neighbour) pairs and what each side looks like (see :func:`_row_formula`)."""

    row: np.ndarray  # [M] receiving row of each pair, indexing the per-row arrays
    own_degree: np.ndarray  # [R]
    neighbour_degree: np.ndarray  # [M]
    own_size: np.ndarray | None  # [R]
    neighbour_size: np.ndarray | None  # [M]
    max_degree: int

    @property
    def num_rows(self) -> int:
        return self.own_degree.shape[0]


def _metropolis(p: _Pairs) -> tuple[np.ndarray, np.ndarray]:
    w = 1.0 / (1.0 + np.maximum(p.own_degree[p.row], p.neighbour_degree))
    return w, 1.0 - np.bincount(p.row, weights=w, minlength=p.num_rows)


def _max_degree(p: _Pairs) -> tuple[np.ndarray, np.ndarray]:
    return np.full(p.row.shape[0], 1.0 / (1.0 + p.max_degree)), 1.0 - p.own_degree / (1.0 + p.max_degree)


def _uniform(p: _Pairs) -> tuple[np.ndarray, np.ndarray]:
    return 1.0 / (1.0 + p.own_degree[p.row]), 1.0 / (1.0 + p.own_degree)


def _data_size(p: _Pairs) -> tuple[np.ndarray, np.ndarray]:
    assert p.own_size is not None and p.neighbour_size is not None  # checked by the callers
    total = p.own_size + np.bincount(p.row, weights=p.neighbour_size, minlength=p.num_rows)
    return p.neighbour_size / total[p.row], p.own_size / total


#: consensus.weights name -> (W_nm per pair, W_nn per row): the table above, once.
_RULES = {"metropolis": _metropolis, "max-degree": _max_degree, "uniform": _uniform, "data-size": _data_size}


def _row_formula(
    rule: str,
    row: np.ndarray,
    own_degree: np.ndarray,
    neighbour_degree: np.ndarray,
    own_size: np.ndarray | None,
    neighbour_size: np.ndarray | None,
    max_degree: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (W_nm per pair, W_nn per row) by ``rule``.

    ``row`` [M] indexes the receiving device of each (n, m) pair into the per-row arrays
    ``own_degree`` / ``own_size`` [R]; ``neighbour_*`` [M] describe m as n sees it.
    """
    w, self_w = _RULES[rule](_Pairs(row, own_degree, neighbour_degree, own_size, neighbour_size, max_degree))
    return np.asarray(w, dtype=np.float64), np.asarray(self_w, dtype=np.float64)


def _check_sizes(sizes: np.ndarray, what: str) -> None:
    if sizes.size and not (np.all(np.isfinite(sizes)) and np.all(sizes > 0)):
        raise P2PLError(f"{what} must all be positive (every device needs local data), got {sizes.min()}")


def bounded_claims(own: np.ndarray, claimed: np.ndarray, max_ratio: float) -> np.ndarray:
    """A neighbour's claimed data size as a receiver counts it: within [own / r, own * r].

    A size is a neighbour's word, never checkable: bounding it relative to the receiver's own
    size means no single neighbour can take over a row of W (2^52) or vanish from it (0) by lying.
    Non-finite claims count as the receiver's own size."""
    own = np.asarray(own, dtype=np.float64)
    claimed = np.asarray(claimed, dtype=np.float64)
    claimed = np.where(np.isfinite(claimed), claimed, own)
    return np.clip(claimed, own / max_ratio, own * max_ratio)


def _undirected_edges(num_devices: int, edges: np.ndarray) -> np.ndarray:
    """Validate and canonicalize edges to unique rows with u < v (duplicates would inflate degrees)."""
    e = np.asarray(edges)
    if e.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if e.ndim != 2 or e.shape[1] != 2 or not np.issubdtype(e.dtype, np.integer):
        raise P2PLError(f"edges must be an integer [E, 2] array of device ids, got {e.dtype} {e.shape}")
    e = np.sort(e.astype(np.int64), axis=1)
    if e.min() < 0 or e.max() >= num_devices:
        raise P2PLError(f"edge endpoints must be device ids in [0, {num_devices}), got {e.min()}..{e.max()}")
    if np.any(e[:, 0] == e[:, 1]):
        raise P2PLError("edges contain a self-loop; a device mixes with itself through its self weight")
    return np.unique(e, axis=0)


def mixing_weights(
    num_devices: int,
    edges: np.ndarray,
    rule: str,
    data_sizes: np.ndarray | None = None,
    claimed_sizes: np.ndarray | None = None,
    max_size_ratio: float = math.inf,
) -> MixingWeights:
    """W for the live undirected links ``edges`` (int64 [E, 2]); isolated devices keep W_nn = 1.

    ``claimed_sizes`` are the sizes devices announce (default: the true ``data_sizes``); each
    receiver bounds a neighbour's claim by :func:`bounded_claims`."""
    rule = choose("consensus weight rule (consensus.weights)", rule, WEIGHT_RULES)
    if num_devices < 1:
        raise P2PLError(f"devices must be a positive integer, got {num_devices}")
    e = _undirected_edges(num_devices, edges)
    dst = np.concatenate([e[:, 0], e[:, 1]])
    src = np.concatenate([e[:, 1], e[:, 0]])
    order = np.lexsort((src, dst))
    dst, src = dst[order], src[order]
    degree = np.bincount(dst, minlength=num_devices).astype(np.int64)
    # "Max degree of the given live graph": with failed links this is the live maximum.
    max_degree = int(degree.max()) if num_devices else 0

    sizes: np.ndarray | None = None
    if rule == "data-size":
        if data_sizes is None:
            raise P2PLError("consensus.weights = 'data-size' needs each device's data size; pass data_sizes")
        sizes = np.asarray(data_sizes, dtype=np.float64).reshape(-1)
        if sizes.shape[0] != num_devices:
            raise P2PLError(f"data_sizes has {sizes.shape[0]} entries for {num_devices} devices")
        _check_sizes(sizes, "data sizes")

    neighbour_sizes = None
    if sizes is not None:
        claims = sizes if claimed_sizes is None else np.asarray(claimed_sizes, dtype=np.float64).reshape(-1)
        neighbour_sizes = bounded_claims(sizes[dst], claims[src], max_size_ratio)
    weight, self_weight = _row_formula(rule, dst, degree, degree[src], sizes, neighbour_sizes, max_degree)
    return MixingWeights(num_devices, dst, src, weight, self_weight)


def row_weights(
    rule: str,
    own_id: int,
    own_degree: int,
    neighbour_ids: Sequence[int],
    neighbour_degrees: Sequence[int],
    own_size: float | None = None,
    neighbour_sizes: Sequence[float] | None = None,
    max_degree: int | None = None,
    max_size_ratio: float = math.inf,
) -> tuple[float, dict[int, float]]:
    """One device's row of W from local knowledge: ``(W_nn, {m: W_nm})``.

    ``neighbour_ids`` are the neighbours heard from this round (a missing one is simply not in the
    row, and the rest renormalize); ``own_degree`` must equal their number. ``max_degree`` is
    needed by 'max-degree' only, sizes by 'data-size' only.
    """
    rule = choose("consensus weight rule (consensus.weights)", rule, WEIGHT_RULES)
    ids = np.asarray(list(neighbour_ids), dtype=np.int64).reshape(-1)
    degs = np.asarray(list(neighbour_degrees), dtype=np.int64).reshape(-1)
    if own_degree != ids.shape[0]:
        raise P2PLError(f"device {own_id}: own_degree {own_degree} != {ids.shape[0]} neighbours given")
    if len(set(ids.tolist())) != ids.shape[0] or own_id in set(ids.tolist()):
        raise P2PLError(f"device {own_id}: neighbour ids must be distinct and exclude itself, got {ids}")
    if rule == "metropolis" and degs.shape[0] != ids.shape[0]:
        raise P2PLError(f"device {own_id}: {degs.shape[0]} neighbour degrees for {ids.shape[0]} neighbours")
    if rule == "max-degree" and (max_degree is None or max_degree < own_degree):
        raise P2PLError(f"device {own_id}: max-degree needs max_degree >= own degree, got {max_degree}")
    own_sizes: np.ndarray | None = None
    nbr_sizes: np.ndarray | None = None
    if rule == "data-size":
        if own_size is None or neighbour_sizes is None:
            raise P2PLError(f"device {own_id}: data-size weights need own_size and neighbour_sizes")
        own_sizes = np.asarray([own_size], dtype=np.float64)
        nbr_sizes = np.asarray(list(neighbour_sizes), dtype=np.float64).reshape(-1)
        if nbr_sizes.shape[0] != ids.shape[0]:
            raise P2PLError(f"device {own_id}: {nbr_sizes.shape[0]} sizes for {ids.shape[0]} neighbours")
        _check_sizes(own_sizes, f"device {own_id}: data size")
        nbr_sizes = bounded_claims(np.full(nbr_sizes.shape, own_size), nbr_sizes, max_size_ratio)
        _check_sizes(nbr_sizes, f"device {own_id}: neighbour data sizes")
    if rule != "metropolis":
        degs = np.zeros(ids.shape[0], dtype=np.int64)  # unused by the other rules

    weight, self_weight = _row_formula(
        rule,
        np.zeros(ids.shape[0], dtype=np.int64),  # every pair belongs to row 0: this device
        np.asarray([own_degree], dtype=np.int64),
        degs,
        own_sizes,
        nbr_sizes,
        int(max_degree or 0),
    )
    return float(self_weight[0]), {int(m): float(w) for m, w in zip(ids.tolist(), weight.tolist(), strict=True)}
