"""The robust rules' compiled kernels (p2pl.core.order_stats) against numpy's sort, torch's path
(the GPU one, run here on CPU) and the node's one-row view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2pl.core import cooperate
from p2pl.core.cooperate import Gossip, Neighbourhoods, aggregate, one_row, sorted_middle
from p2pl.core.order_stats import edge_distances, middle_mean, selection_network, sorting_network


@pytest.mark.parametrize("size", range(1, 13))
def test_sorting_network_sorts_every_binary_input(size: int) -> None:
    # The 0-1 principle: a comparator network that sorts every 0/1 input sorts every input.
    x = ((np.arange(2**size)[:, None] >> np.arange(size)) & 1).astype(np.int8)
    for i, j in sorting_network(size):
        x[:, i], x[:, j] = np.minimum(x[:, i], x[:, j]), np.maximum(x[:, i], x[:, j])
    assert (np.diff(x, axis=1) >= 0).all()


def test_selection_network_keeps_fewer_pairs_for_a_median() -> None:
    full = len(sorting_network(19))
    assert len(selection_network(19, 9, 10)) < full
    assert len(selection_network(19, 0, 19)) == full


def _values(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    # rounded to a coarse grid: many ties, as a stalled or copied row would give
    return np.round(rng.standard_normal((rows, width)) * 4).astype(np.float32) / 4


def _expected(own: np.ndarray, pool: np.ndarray, neighbours: np.ndarray, lo: int, hi: int) -> np.ndarray:
    values = np.concatenate([own[:, None, :], pool[neighbours]], axis=1)  # [rows, n, P]
    with np.errstate(invalid="ignore"):  # inf - inf in a mean: NaN, as expected
        return np.sort(values, axis=1)[:, lo:hi].astype(np.float64).mean(axis=1)  # NaN sorts last


@pytest.mark.parametrize("size", [1, 2, 3, 19, 20, 64, 301])
def test_middle_mean_is_the_mean_of_sorted_positions(size: int) -> None:
    rng = np.random.default_rng(size)
    rows, width, pool_rows = 7, 600, 400  # 600 coordinates: more than one block, and a partial one
    own, pool = _values(rng, rows, width), _values(rng, pool_rows, width)
    neighbours = np.stack([rng.choice(pool_rows, size - 1, replace=False) for _ in range(rows)]).astype(np.int64)
    for lo, hi in {(0, size), ((size - 1) // 2, size // 2 + 1), (size // 4, size - size // 4), (size - 1, size)}:
        out = np.full((rows + 2, width), -7.0, dtype=np.float32)
        target = np.arange(rows, dtype=np.int64) + 2  # receivers write their own rows only
        middle_mean(np.concatenate([own[:2], own]), pool, target, neighbours, lo, hi, out)
        assert np.abs(out[2:] - _expected(own, pool, neighbours, lo, hi)).max() <= 1e-6
        assert (out[:2] == -7.0).all()


def test_non_finite_values_sort_as_numpy_does() -> None:
    rng = np.random.default_rng(0)
    own, pool = _values(rng, 5, 40), _values(rng, 30, 40)
    pool[3, :10] = np.nan
    pool[4, 5:15] = np.inf
    pool[5, 12:20] = -np.inf
    neighbours = np.stack([np.array([3, 4, 5, 6, 7, 8])] * 5).astype(np.int64)
    for lo, hi in [(1, 6), (3, 4), (0, 7)]:
        out = np.empty_like(own)
        middle_mean(own, pool, np.arange(5), neighbours, lo, hi, out)
        expected = _expected(own, pool, neighbours, lo, hi)
        finite = np.isfinite(expected)
        assert np.abs(out[finite] - expected[finite]).max() <= 1e-6
        assert not np.isfinite(out[~finite]).any()  # a surviving NaN / inf keeps the row unsound


def test_torch_path_matches_the_kernel() -> None:
    rng = np.random.default_rng(1)
    own, pool = _values(rng, 6, 300), _values(rng, 50, 300)
    neighbours = np.stack([rng.choice(50, 12, replace=False) for _ in range(6)]).astype(np.int64)
    rows = np.arange(6, dtype=np.int64)
    for lo, hi in [(6, 7), (2, 11)]:
        out = np.empty_like(own)
        middle_mean(own, pool, rows, neighbours, lo, hi, out)
        torch_out = sorted_middle(torch.from_numpy(own), torch.from_numpy(pool), rows, neighbours, lo, hi)
        assert np.array_equal(torch_out.numpy(), out)  # the same bits


def test_edge_distances_match_numpy() -> None:
    rng = np.random.default_rng(2)
    own, pool = rng.standard_normal((4, 333)).astype(np.float32), rng.standard_normal((9, 333)).astype(np.float32)
    pool[8] *= 1e30  # squares beyond float32 stay finite in float64
    dst, src = np.array([0, 0, 1, 3, 3]), np.array([1, 8, 2, 2, 0])
    out = np.empty(5)
    edge_distances(own, pool, dst, src, out)
    expected = np.linalg.norm(pool[src].astype(np.float64) - own[dst], axis=1)
    assert np.allclose(out, expected, rtol=1e-9)


@pytest.mark.parametrize("rule", ["trimmed-mean", "median", "clipped", "redescending"])
def test_a_node_computes_its_row_as_the_simulator(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The network's step runs the compiled kernels, a node's small step torch's path.
    n, p = 30, 700
    rng = np.random.default_rng(3)
    params = torch.from_numpy(rng.standard_normal((n, p)).astype(np.float32))
    sent = params.clone()
    sent[4] *= -3.0  # a lying neighbour
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if (j - i) % n in (1, 2, 3, 7)]
    dst = np.array([e[0] for e in edges] + [e[1] for e in edges])
    src = np.array([e[1] for e in edges] + [e[0] for e in edges])
    degree = np.bincount(dst, minlength=n)
    weight = 1.0 / (1.0 + degree[dst])
    hoods = Neighbourhoods.from_edges(n, dst, src, weight, 1.0 / (1.0 + degree))
    stage = Gossip(rule)
    monkeypatch.setattr(cooperate, "KERNEL_MIN_VALUES", 0)
    everyone = aggregate(params, sent, hoods, stage)
    monkeypatch.setattr(cooperate, "KERNEL_MIN_VALUES", 10**12)
    for r in (0, 4, 17):
        lo, hi = hoods.indptr[r], hoods.indptr[r + 1]
        heard = sent[torch.from_numpy(hoods.src[lo:hi])]
        node = aggregate(params[r : r + 1], heard, one_row(hoods.self_weight[r], hoods.weight[lo:hi].tolist()), stage)
        if rule in ("clipped", "redescending"):  # end in a weighted mean, whose sum order depends on the batch
            assert torch.allclose(node[0], everyone[r], rtol=0, atol=1e-6)
        else:
            assert torch.equal(node[0], everyone[r])


def test_compressed_messages_fill_unsent_coordinates_with_the_receivers_own_value() -> None:
    rng = np.random.default_rng(4)
    own, pool = _values(rng, 5, 300), _values(rng, 40, 300)
    sent = rng.random((40, 300)) < 0.3  # each pool row carries about 30 % of the coordinates
    neighbours = np.stack([rng.choice(40, 9, replace=False) for _ in range(5)]).astype(np.int64)
    rows = np.arange(5, dtype=np.int64)
    out = np.empty_like(own)
    middle_mean(own, pool, rows, neighbours, 3, 7, out, sent)
    filled = np.where(sent[neighbours], pool[neighbours], own[:, None, :])  # [rows, 9, P]
    values = np.concatenate([own[:, None, :], filled], axis=1)
    assert np.abs(out - np.sort(values, axis=1)[:, 3:7].astype(np.float64).mean(axis=1)).max() <= 1e-6
    torch_out = sorted_middle(torch.from_numpy(own), torch.from_numpy(pool), rows, neighbours, 3, 7,
                              torch.from_numpy(sent))  # fmt: skip
    assert np.array_equal(torch_out.numpy(), out)
    dst, src = np.array([0, 1, 4]), np.array([7, 7, 30])
    distances = np.empty(3)
    edge_distances(own, pool, dst, src, distances, sent)
    expected = np.linalg.norm((pool[src].astype(np.float64) - own[dst]) * sent[src], axis=1)
    assert np.allclose(distances, expected, rtol=1e-9)
