"""Consensus by the mean gossip step (p2pl.core.cooperate) and the weight rules it mixes with
(p2pl.graph.weights)."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
import torch

from p2pl.core import cooperate
from p2pl.core.consensus import consensus_distance
from p2pl.core.cooperate import Cooperation, Gossip, Neighbourhoods, finish, gossip, weighted_average
from p2pl.graph.topology import graph_edges
from p2pl.graph.weights import WEIGHT_RULES, MixingWeights, mixing_weights

N = 12


def _graph_edges(kind: str) -> np.ndarray:
    graphs = {
        "geometric": nx.random_geometric_graph(N, 0.45, seed=3),
        "ring": nx.cycle_graph(N),
        "star": nx.star_graph(N - 1),
        "complete": nx.complete_graph(N),
        "with-isolated": nx.path_graph(N - 2),  # devices N-2, N-1 have no links
    }
    g = graphs[kind]
    g.add_nodes_from(range(N))
    return graph_edges(g)


SIZES = np.arange(1, N + 1) * 7


def _params(seed: int = 0, p: int = 33) -> torch.Tensor:
    return torch.randn(N, p, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", WEIGHT_RULES)
@pytest.mark.parametrize("kind", ["geometric", "ring", "star", "complete", "with-isolated"])
def test_weight_rows_sum_to_one_and_doubly_stochastic_rules_are_symmetric(rule: str, kind: str) -> None:
    w = mixing_weights(N, _graph_edges(kind), rule, SIZES).dense()
    assert np.all(w >= 0)
    assert np.allclose(w.sum(1), 1.0)
    if rule in ("metropolis", "max-degree"):
        assert np.allclose(w, w.T)
        assert np.allclose(w.sum(0), 1.0)


def _hoods(weights: MixingWeights) -> Neighbourhoods:
    return Neighbourhoods.from_edges(weights.num_devices, weights.dst, weights.src, weights.weight, weights.self_weight)


def consensus(params: torch.Tensor, weights: MixingWeights, steps: int, affinity: float = 1.0) -> torch.Tensor:
    """``steps`` mean-gossip steps and the affinity blend, as the cooperation pipeline runs them."""
    hoods, mixed = _hoods(weights), params
    for _ in range(steps):
        mixed = gossip(mixed, mixed, hoods, Gossip("mean"))
    return finish(Cooperation((Gossip(),) * steps, affinity), mixed, params, None)


@pytest.mark.parametrize("rule", WEIGHT_RULES)
@pytest.mark.parametrize("kind", ["geometric", "star", "with-isolated"])
def test_dense_and_csr_products_agree(rule: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = mixing_weights(N, _graph_edges(kind), rule, SIZES)
    params = _params()
    expected = torch.from_numpy(weights.dense() @ params.double().numpy()).float()
    dense = consensus(params, weights, 1)
    monkeypatch.setattr(cooperate, "DENSE_MAX_CELLS", 0)  # force the CSR product
    csr = consensus(params, weights, 1)
    assert torch.allclose(dense, expected, atol=1e-6)
    assert torch.allclose(csr, expected, atol=1e-6)


def test_steps_and_affinity() -> None:
    weights = mixing_weights(N, _graph_edges("geometric"), "metropolis")
    w = torch.from_numpy(weights.dense())
    params = _params(1)
    p64 = params.double()
    assert torch.allclose(consensus(params, weights, 1).double(), w @ p64, atol=1e-6)
    assert torch.allclose(consensus(params, weights, 3).double(), w @ w @ w @ p64, atol=1e-5)
    blended = consensus(params, weights, 2, affinity=0.3).double()
    assert torch.allclose(blended, 0.7 * p64 + 0.3 * (w @ w @ p64), atol=1e-6)
    assert torch.equal(params, _params(1))  # the input is not modified


def test_doubly_stochastic_consensus_keeps_the_average_and_converges_to_it() -> None:
    weights = mixing_weights(N, _graph_edges("geometric"), "metropolis")
    params = _params(2)
    mean = params.double().mean(0)
    distances = [consensus_distance(params)]
    mixed = params
    for _ in range(60):
        mixed = consensus(mixed, weights, 1)
        distances.append(consensus_distance(mixed))
        assert torch.allclose(mixed.double().mean(0), mean, atol=1e-5)
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(distances))
    assert distances[-1] < 1e-3 * distances[0]


def test_uniform_on_a_complete_graph_is_the_average_in_one_step() -> None:
    weights = mixing_weights(N, _graph_edges("complete"), "uniform")
    params = _params(3)
    assert torch.allclose(consensus(params, weights, 1), params.mean(0).expand(N, -1), atol=1e-6)


def test_an_isolated_device_keeps_its_parameters() -> None:
    weights = mixing_weights(N, _graph_edges("with-isolated"), "uniform")
    params = _params(4)
    mixed = consensus(params, weights, 2)
    assert torch.equal(mixed[N - 1], params[N - 1])
    assert not torch.allclose(mixed[0], params[0])


def test_weighted_average_and_consensus_distance() -> None:
    params = _params(5, p=4)
    w = torch.arange(1, N + 1, dtype=torch.float64)
    expected = (params.double() * w.unsqueeze(1)).sum(0) / w.sum()
    assert torch.allclose(weighted_average(params, w).double(), expected, atol=1e-6)
    mean = params.double().mean(0)
    assert consensus_distance(params) == pytest.approx(float(((params.double() - mean) ** 2).sum(1).mean()))
    assert consensus_distance(params[:1].expand(5, -1)) == 0.0
