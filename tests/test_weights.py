from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from p2pl.errors import P2PLError
from p2pl.graph.topology import graph_edges
from p2pl.graph.weights import WEIGHT_RULES, MixingWeights, mixing_weights, row_weights

SIZES_RNG = np.random.default_rng(7)


def edges_of(graph: nx.Graph) -> np.ndarray:
    return graph_edges(graph)


def star_plus_isolated() -> tuple[int, np.ndarray]:
    g = nx.star_graph(5)  # 0 centre, 1..5 leaves
    g.add_edge(6, 7)
    g.add_nodes_from([8, 9])  # isolated devices
    return 10, edges_of(g)


GRAPHS: dict[str, tuple[int, np.ndarray]] = {
    "path4": (4, edges_of(nx.path_graph(4))),
    "star": (8, edges_of(nx.star_graph(7))),
    "star+isolated": star_plus_isolated(),
    "lollipop": (9, edges_of(nx.lollipop_graph(5, 4))),
    "er": (30, edges_of(nx.gnp_random_graph(30, 0.2, seed=1))),
    "no-edges": (3, np.empty((0, 2), dtype=np.int64)),
}


def sizes_for(n: int) -> np.ndarray:
    return SIZES_RNG.integers(1, 50, size=n).astype(np.float64)


def weights(n: int, e: np.ndarray, rule: str) -> MixingWeights:
    return mixing_weights(n, e, rule, data_sizes=sizes_for(n) if rule == "data-size" else None)


@pytest.mark.parametrize("rule", WEIGHT_RULES)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_rows_sum_to_one_and_match_graph(rule: str, graph: str) -> None:
    n, e = GRAPHS[graph]
    mw = weights(n, e, rule)
    w = mw.dense()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.all(w >= 0)
    # Non-zeros exactly on the links plus the diagonal.
    adj = np.zeros((n, n), dtype=bool)
    adj[e[:, 0], e[:, 1]] = adj[e[:, 1], e[:, 0]] = True
    np.testing.assert_array_equal((w > 0) & ~np.eye(n, dtype=bool), adj)
    # Layout contract: both directions, sorted by (dst, src), sparse == dense.
    assert mw.dst.shape == mw.src.shape == mw.weight.shape == (2 * len(e),)
    assert mw.dst.dtype == mw.src.dtype == np.int64 and mw.weight.dtype == np.float64
    pairs = list(zip(mw.dst.tolist(), mw.src.tolist(), strict=True))
    assert pairs == sorted(pairs)
    np.testing.assert_array_equal(mw.to_sparse().toarray(), w)
    isolated = ~adj.any(axis=1)
    np.testing.assert_array_equal(mw.self_weight[isolated], 1.0)


@pytest.mark.parametrize("rule", ["metropolis", "max-degree"])
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_doubly_stochastic_rules_are_symmetric(rule: str, graph: str) -> None:
    n, e = GRAPHS[graph]
    w = weights(n, e, rule).dense()
    np.testing.assert_allclose(w, w.T, atol=1e-15)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)


@pytest.mark.parametrize("rule", ["uniform", "data-size"])
def test_singly_stochastic_rules_are_not_column_stochastic_on_irregular_graph(rule: str) -> None:
    n, e = GRAPHS["star"]
    w = mixing_weights(n, e, rule, data_sizes=np.arange(1.0, n + 1)).dense()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert np.abs(w.sum(axis=0) - 1.0).max() > 0.1


def test_hand_computed_path_graph() -> None:
    # Path 0 - 1 - 2 - 3: degrees 1, 2, 2, 1; max degree 2.
    e = np.array([[0, 1], [1, 2], [2, 3]])
    third = 1 / 3
    metropolis = np.array(
        [
            [2 / 3, third, 0, 0],
            [third, third, third, 0],
            [0, third, third, third],
            [0, 0, third, 2 / 3],
        ]
    )
    np.testing.assert_allclose(mixing_weights(4, e, "metropolis").dense(), metropolis, atol=1e-15)
    # max-degree: 1/(1+2) per link, self 1 - d/3 -> same matrix on this graph.
    np.testing.assert_allclose(mixing_weights(4, e, "max-degree").dense(), metropolis, atol=1e-15)
    uniform = np.array(
        [
            [0.5, 0.5, 0, 0],
            [third, third, third, 0],
            [0, third, third, third],
            [0, 0, 0.5, 0.5],
        ]
    )
    np.testing.assert_allclose(mixing_weights(4, e, "uniform").dense(), uniform, atol=1e-15)
    sizes = np.array([1.0, 2.0, 3.0, 4.0])
    data = np.array(
        [
            [1 / 3, 2 / 3, 0, 0],
            [1 / 6, 2 / 6, 3 / 6, 0],
            [0, 2 / 9, 3 / 9, 4 / 9],
            [0, 0, 3 / 7, 4 / 7],
        ]
    )
    np.testing.assert_allclose(mixing_weights(4, e, "data-size", data_sizes=sizes).dense(), data, atol=1e-15)


def test_metropolis_and_max_degree_differ_on_star() -> None:
    # Star with 4 leaves: metropolis leaf-centre 1/(1+4) = max-degree; add a tail to separate them.
    e = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [4, 5]])
    met = mixing_weights(6, e, "metropolis").dense()
    mxd = mixing_weights(6, e, "max-degree").dense()
    assert met[4, 5] == pytest.approx(1 / 3)  # 1 / (1 + max(2, 1))
    assert mxd[4, 5] == pytest.approx(1 / 5)  # 1 / (1 + d_max = 4)
    assert mxd[5, 5] == pytest.approx(1 - 1 / 5)


def test_edges_are_canonicalized() -> None:
    # Duplicates and reversed pairs describe the same links; they must not inflate degrees.
    e = np.array([[1, 0], [0, 1], [2, 1], [1, 2]])
    np.testing.assert_array_equal(
        mixing_weights(3, e, "uniform").dense(), mixing_weights(3, np.array([[0, 1], [1, 2]]), "uniform").dense()
    )


@pytest.mark.parametrize("rule", WEIGHT_RULES)
@pytest.mark.parametrize("graph", ["star+isolated", "lollipop", "er"])
def test_row_weights_agree_with_mixing_weights(rule: str, graph: str) -> None:
    n, e = GRAPHS[graph]
    sizes = sizes_for(n)
    mw = mixing_weights(n, e, rule, data_sizes=sizes if rule == "data-size" else None)
    w = mw.dense()
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(e.tolist())
    max_degree = max(d for _, d in g.degree())
    for node in range(n):
        nbrs = sorted(g.neighbors(node))
        self_w, row = row_weights(
            rule,
            node,
            len(nbrs),
            nbrs,
            [g.degree(m) for m in nbrs],
            float(sizes[node]),
            [float(sizes[m]) for m in nbrs],
            max_degree,
        )
        assert self_w == w[node, node]  # same formula code => bit-identical
        assert set(row) == set(nbrs)
        for m, value in row.items():
            assert value == w[node, m]


def test_row_weights_renormalize_a_missing_neighbour() -> None:
    # Device 0 hears from only 2 of its 3 neighbours this round: the row still sums to 1.
    self_w, row = row_weights("uniform", 0, 2, [1, 3], [1, 1])
    assert self_w + sum(row.values()) == pytest.approx(1.0)
    assert row == {1: pytest.approx(1 / 3), 3: pytest.approx(1 / 3)}


def test_row_weights_validation() -> None:
    with pytest.raises(P2PLError, match="own_degree 3 != 2"):
        row_weights("uniform", 0, 3, [1, 2], [1, 1])
    with pytest.raises(P2PLError, match="max_degree"):
        row_weights("max-degree", 0, 2, [1, 2], [1, 1])
    with pytest.raises(P2PLError, match="own_size and neighbour_sizes"):
        row_weights("data-size", 0, 1, [1], [1])
    with pytest.raises(P2PLError, match="distinct and exclude itself"):
        row_weights("uniform", 0, 1, [0], [1])
    with pytest.raises(P2PLError, match="unknown consensus weight rule"):
        row_weights("gossip", 0, 0, [], [])


def test_errors() -> None:
    e = np.array([[0, 1]])
    with pytest.raises(P2PLError, match=r"unknown consensus weight rule .*'nope'; choose one of: .*metropolis"):
        mixing_weights(2, e, "nope")
    with pytest.raises(P2PLError, match="needs each device's data size"):
        mixing_weights(2, e, "data-size")
    with pytest.raises(P2PLError, match="2 entries for 3 devices"):
        mixing_weights(3, e, "data-size", data_sizes=np.array([1.0, 2.0]))
    with pytest.raises(P2PLError, match="positive"):
        mixing_weights(2, e, "data-size", data_sizes=np.array([1.0, 0.0]))
    with pytest.raises(P2PLError, match="self-loop"):
        mixing_weights(2, np.array([[1, 1]]), "uniform")
    with pytest.raises(P2PLError, match=r"in \[0, 2\)"):
        mixing_weights(2, np.array([[0, 2]]), "uniform")


def test_large_graph_is_vectorized() -> None:
    n = 10_000
    rng = np.random.default_rng(0)
    e = rng.integers(0, n, size=(100_000, 2))
    e = e[e[:, 0] != e[:, 1]]
    mw = mixing_weights(n, e, "metropolis")
    sums = np.bincount(mw.dst, weights=mw.weight, minlength=n) + mw.self_weight
    np.testing.assert_allclose(sums, 1.0, atol=1e-12)
