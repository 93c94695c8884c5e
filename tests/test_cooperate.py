"""The cooperation pipeline (p2pl.core.cooperate): each aggregation rule against a plain oracle,
the robust rules' bounds on one lying neighbour, and the finish (affinity, absent rows, rollback)."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import scipy.stats
import torch

from p2pl.core import cooperate
from p2pl.core.cooperate import (
    Cooperation,
    Gossip,
    Neighbourhoods,
    aggregate,
    clip_radius,
    finish,
    median_distance,
    trim_count,
    unsound_rows,
)
from p2pl.errors import P2PLError
from p2pl.graph.topology import graph_edges
from p2pl.graph.weights import mixing_weights


def _hoods(n: int, edges: np.ndarray, rule: str = "metropolis") -> Neighbourhoods:
    w = mixing_weights(n, edges, rule)
    return Neighbourhoods.from_edges(n, w.dst, w.src, w.weight, w.self_weight)


def _graph(n: int, seed: int = 0) -> np.ndarray:
    return graph_edges(nx.connected_watts_strogatz_graph(n, 6, 0.3, seed=seed))


def _params(n: int, p: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed))


def _neighbourhood_values(params: np.ndarray, hoods: Neighbourhoods, r: int) -> np.ndarray:
    lo, hi = hoods.indptr[r], hoods.indptr[r + 1]
    return np.concatenate([params[r : r + 1], params[hoods.src[lo:hi]]])


@pytest.mark.parametrize("n", [12, 300])  # dense matmul path and CSR path
def test_mean_is_w_times_params(n: int) -> None:
    edges = _graph(n)
    params = _params(n, 7)
    out = aggregate(params, params, _hoods(n, edges), Gossip("mean"))
    expected = mixing_weights(n, edges, "metropolis").dense() @ params.double().numpy()
    assert np.abs(out.double().numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("rule", ["trimmed-mean", "median"])
def test_robust_rules_match_numpy_per_coordinate(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n, p = 40, 9
    edges = _graph(n, seed=1)
    hoods = _hoods(n, edges)
    params = _params(n, p, 1)
    monkeypatch.setattr(cooperate, "GATHER_BUDGET", 50)  # many small chunks: chunking must not matter
    x = params.double().numpy()
    for kernel_min in (0, 10**12):  # the compiled kernel, torch's path
        monkeypatch.setattr(cooperate, "KERNEL_MIN_VALUES", kernel_min)
        out = aggregate(params, params, hoods, Gossip(rule, trim=0.2)).double().numpy()
        for r in range(n):
            values = _neighbourhood_values(x, hoods, r)
            if rule == "median":
                expected = np.median(values, axis=0)
            else:
                expected = scipy.stats.trim_mean(values, 0.2, axis=0)
            assert np.abs(out[r] - expected).max() < 1e-6


def test_trim_count_keeps_at_least_one_value() -> None:
    assert [trim_count(0.2, size) for size in (1, 2, 4, 5, 10, 21)] == [0, 0, 0, 1, 2, 4]
    assert trim_count(0.49, 3) == 1 and trim_count(0.49, 2) == 0


def test_clip_radius_trusts_the_nearest_share_of_the_weight() -> None:
    # receiver 0 hears distances 1, 4, 2 (weights .2 .6 .2); receiver 1 nobody; receiver 2 one at 3
    indptr = np.array([0, 3, 3, 4])
    distances = np.array([1.0, 4.0, 2.0, 3.0])
    weight = np.array([0.2, 0.6, 0.2, 0.5])
    # q = 0.4: the two nearest (1 and 2, weight .4 of 1.0) are trusted: τ² = (.2 + .8) / .6
    radius = clip_radius(distances, weight, indptr, 0.4)
    assert np.allclose(radius, [math.sqrt(1.0 / 0.6), 0.0, math.sqrt(0.5 * 9 / 0.6)])
    # q = 0.2: only the nearest is trusted; a lone neighbour is always trusted
    assert np.allclose(clip_radius(distances, weight, indptr, 0.2), [math.sqrt(0.2 / 0.8), 0.0, math.sqrt(4.5 / 0.8)])
    # q = 1: everyone is trusted (no clipping expected in practice)
    assert clip_radius(distances, weight, indptr, 1.0)[0] > 4.0


def test_clipped_without_clipping_is_the_mean_and_clips_a_far_neighbour() -> None:
    n = 30
    edges = _graph(n, seed=2)
    hoods = _hoods(n, edges)
    params = _params(n, 6, 2)
    mean = aggregate(params, params, hoods, Gossip("mean"))
    unclipped = aggregate(params, params, hoods, Gossip("clipped", clip_quantile=1.0))
    assert torch.allclose(unclipped, mean, atol=1e-5)  # radius beyond every neighbour: the mean
    # A neighbour 1e6 away moves a receiver by at most W_nm x its clip radius, not by 1e6.
    liar = 0
    sent = params.clone()
    sent[liar] *= 1e6
    clipped = aggregate(params, sent, hoods, Gossip("clipped", clip_quantile=0.8))
    moved = (clipped - params).norm(dim=1)
    assert float(moved.max()) < 20.0


def test_median_distance_is_the_weighted_median_of_each_receivers_neighbours() -> None:
    # receiver 0 hears distances 1, 4, 2 (weights .2 .6 .2): cumulative .2, .4, 1.0 -> 4;
    # receiver 1 nobody; receiver 2 one at 3; receiver 3 equal weights 5, 1, 3, 2 -> 2 (.5 reached)
    indptr = np.array([0, 3, 3, 4, 8])
    distances = np.array([1.0, 4.0, 2.0, 3.0, 5.0, 1.0, 3.0, 2.0])
    weight = np.array([0.2, 0.6, 0.2, 0.5, 0.1, 0.1, 0.1, 0.1])
    assert median_distance(distances, weight, indptr).tolist() == [4.0, 0.0, 3.0, 2.0]


def test_redescending_keeps_near_neighbours_and_fades_far_ones() -> None:
    n, p = 30, 200
    edges = _graph(n, seed=2)
    hoods = _hoods(n, edges)
    params = _params(n, p, 2)
    mean = aggregate(params, params, hoods, Gossip("mean"))
    wide = aggregate(params, params, hoods, Gossip("redescending", radius_factor=1e6))
    assert torch.allclose(wide, mean, atol=1e-5)  # every neighbour within the radius: the mean
    # Neighbour 0 sends its row flipped and x500. Clipping would still move each receiver by
    # W τ towards it (τ about the honest distance); here the pull W τ² / distance nearly vanishes.
    sent = params.clone()
    sent[0] = -500.0 * params[0]
    out = aggregate(params, sent, hoods, Gossip("redescending"))
    liar = hoods.src == 0
    silent = hoods.with_weights(np.where(liar, 0.0, hoods.weight),
                                hoods.self_weight + np.bincount(hoods.dst[liar], hoods.weight[liar], n))  # fmt: skip
    without = aggregate(params, params, silent, Gossip("mean"))  # the liar's weight on each receiver
    for r in np.unique(hoods.dst[liar]).tolist():
        lo, hi = hoods.indptr[r], hoods.indptr[r + 1]
        honest = [int(m) for m in hoods.src[lo:hi] if m != 0]
        typical = float((params[honest] - params[r]).norm(dim=1).median())
        w = float(hoods.weight[lo:hi][hoods.src[lo:hi] == 0][0])
        assert float((out[r] - without[r]).norm()) < 0.05 * w * typical


@pytest.mark.parametrize("rule", ["trimmed-mean", "median", "clipped", "redescending"])
def test_one_huge_neighbour_cannot_move_a_robust_receiver_far(rule: str) -> None:
    n = 60
    edges = _graph(n, seed=3)
    hoods = _hoods(n, edges)
    params = _params(n, 8, 3)
    sent = params.clone()
    sent[5] = 3.4e38  # every value the largest finite float32
    robust = aggregate(params, sent, hoods, Gossip(rule))
    honest = aggregate(params, params, hoods, Gossip(rule))
    victims = torch.from_numpy(np.unique(hoods.dst[hoods.src == 5]))
    assert bool(torch.isfinite(robust).all())
    assert float((robust[victims] - honest[victims]).abs().max()) < 5.0
    # the plain mean is taken over: the same neighbour moves its receivers by ~1e37
    plain = aggregate(params, sent, hoods, Gossip("mean"))
    assert float(plain[victims].abs().max()) > 1e30


def test_finish_blends_keeps_absent_rows_and_rolls_back_unsound_rows() -> None:
    before = _params(5, 4, 4)
    after = _params(5, 4, 5)
    after[3, 1] = float("nan")
    after[4, 0] = 1e5  # exploding: norm far beyond 1000 x its row before
    active = np.array([True, False, True, True, True])
    out = finish(Cooperation((Gossip(),), affinity=0.25), after, before, active)
    assert torch.allclose(out[0], 0.75 * before[0] + 0.25 * after[0])
    assert torch.equal(out[1], before[1])  # absent
    assert torch.equal(out[3], before[3]) and torch.equal(out[4], before[4])  # rolled back
    rows = torch.tensor([[1.0, math.inf], [0.0, 1.0], [1e4, 0.0], [999.0, 0.0]])
    assert unsound_rows(rows, torch.zeros(4, 2)).tolist() == [True, False, True, False]
    assert unsound_rows(rows, torch.full((4, 2), 10.0)).tolist() == [True, False, False, False]


def test_subset_keeps_each_rows_neighbourhood() -> None:
    n = 20
    hoods = _hoods(n, _graph(n, seed=6))
    part = hoods.subset(np.array([7, 2]))
    for i, r in enumerate([7, 2]):
        lo, hi = hoods.indptr[r], hoods.indptr[r + 1]
        assert part.src[part.indptr[i] : part.indptr[i + 1]].tolist() == hoods.src[lo:hi].tolist()
        assert part.self_weight[i] == hoods.self_weight[r]


def test_unknown_rule_is_a_clear_error() -> None:
    params = _params(3, 2)
    hoods = _hoods(3, np.array([[0, 1], [1, 2]]))
    with pytest.raises(P2PLError, match=r"consensus\.aggregation 'krum'"):
        aggregate(params, params, hoods, Gossip("krum"))
