"""Max norm synchronization (p2pl.core.sync and P2PL.start).

Issue #2: after it, every device on a connected graph holds the parameters of the device whose
initial norm was largest, in at most diameter steps.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pytest
import torch

from p2pl.algorithms import P2PL
from p2pl.algorithms.base import Setting
from p2pl.config import AdversaryConfig, ConsensusConfig, SyncConfig
from p2pl.core.adversary import Adversary
from p2pl.core.sync import CLAIM_BYTES, max_norm_owner, sync_bytes_per_device
from p2pl.graph.topology import graph_edges

GRAPHS = {
    "path": nx.path_graph(15),
    "ring": nx.cycle_graph(16),
    "grid": nx.grid_2d_graph(4, 5),
    "star": nx.star_graph(12),
    "geometric": nx.random_geometric_graph(40, 0.3, seed=5),
    "small-world": nx.connected_watts_strogatz_graph(30, 4, 0.2, seed=1),
    "complete": nx.complete_graph(9),
}


def _relabelled(g: nx.Graph) -> nx.Graph:
    return nx.convert_node_labels_to_integers(g, ordering="sorted")


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_device_ends_with_the_max_norm_init_within_the_diameter(name: str, seed: int) -> None:
    g = _relabelled(GRAPHS[name])
    assert nx.is_connected(g)
    n = g.number_of_nodes()
    inits = torch.randn(n, 20, generator=torch.Generator().manual_seed(seed))
    norms = inits.double().norm(dim=1)
    result = max_norm_owner(norms, graph_edges(g))
    best = int(norms.argmax())
    assert result.owner.tolist() == [best] * n
    # The flood from the max-norm device needs exactly its eccentricity, at most the diameter.
    assert result.steps == nx.eccentricity(g, v=best) <= nx.diameter(g)
    synced = inits[result.owner]
    assert torch.equal(synced, inits[best].expand(n, -1))


def test_ties_go_to_the_lowest_device_id() -> None:
    g = nx.path_graph(6)
    norms = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.5, 3.0])
    assert max_norm_owner(norms, graph_edges(g)).owner.tolist() == [1] * 6


def test_max_steps_stops_the_flood_early() -> None:
    g = nx.path_graph(8)
    norms = torch.tensor([9.0, 1, 2, 3, 4, 5, 6, 7])
    partial = max_norm_owner(norms, graph_edges(g), max_steps=2)
    assert partial.steps == 2
    # after s steps a device holds the best norm within distance s of itself
    assert partial.owner.tolist() == [0, 0, 0, 5, 6, 7, 7, 7]
    assert max_norm_owner(norms, graph_edges(g)).steps == 7


def test_each_component_of_a_disconnected_graph_gets_its_own_max() -> None:
    g = nx.disjoint_union(nx.path_graph(3), nx.cycle_graph(4))
    norms = torch.tensor([1.0, 5.0, 2.0, 0.1, 0.3, 7.0, 0.2])
    result = max_norm_owner(norms, graph_edges(g))
    assert result.owner.tolist() == [1, 1, 1, 5, 5, 5, 5]


def test_no_edges_means_no_steps() -> None:
    result = max_norm_owner(torch.tensor([1.0, 2.0]), np.empty((0, 2), dtype=np.int64))
    assert result.owner.tolist() == [0, 1] and result.steps == 0


def _setting(edges: np.ndarray, n: int, sync: SyncConfig, adversary: Adversary | None = None) -> Setting:
    return Setting(np.full(n, 10), edges, "uniform", ConsensusConfig(), sync, 400, adversary or Adversary())


@pytest.mark.parametrize("mode", ["verified", "flood"])
def test_p2pl_start_syncs_and_counts_the_bytes(mode: str) -> None:
    g = _relabelled(GRAPHS["grid"])
    n, edges = g.number_of_nodes(), graph_edges(g)
    norms = torch.randn(n, 100, generator=torch.Generator().manual_seed(7)).double().norm(dim=1)
    start = P2PL().start(norms, _setting(edges, n, SyncConfig(mode=mode)))
    best = int(norms.argmax())
    assert start.owner.tolist() == [best] * n and np.all(start.scale == 1.0)
    assert start.steps == nx.eccentricity(g, v=best)
    degree = np.array([g.degree(v) for v in range(n)])
    # verified sync sends (norm, owner) claims; the paper's flood sends the whole model each step
    message = 400 if mode == "flood" else CLAIM_BYTES
    assert start.bytes_sent.tolist() == (degree * start.steps * message).tolist()
    assert sync_bytes_per_device(edges, n, 3, 10).tolist() == (degree * 30).tolist()

    off = P2PL().start(norms, _setting(edges, n, dataclasses.replace(SyncConfig(), enabled=False)))
    assert off.owner.tolist() == list(range(n)) and off.steps == 0 and not off.bytes_sent.any()
    capped = P2PL().start(norms, _setting(edges, n, SyncConfig(steps=1)))
    assert capped.steps <= 1


def test_verified_sync_ignores_a_hijacker_and_the_flood_adopts_it() -> None:
    g = _relabelled(GRAPHS["grid"])
    n, edges = g.number_of_nodes(), graph_edges(g)
    norms = torch.randn(n, 100, generator=torch.Generator().manual_seed(3)).double().norm(dim=1)
    honest_best = int(norms.argmax())
    liar = (honest_best + 5) % n
    hijack = Adversary.of(AdversaryConfig(attack="sync-hijack"), np.array([liar]), seed=0)
    verified = P2PL().start(norms, _setting(edges, n, SyncConfig(mode="verified"), hijack))
    others = np.arange(n) != liar
    assert set(verified.owner[others].tolist()) == {honest_best}  # the lie changed nothing
    assert np.all(verified.scale == 1.0) and verified.owner[liar] == liar
    flood = P2PL().start(norms, _setting(edges, n, SyncConfig(mode="flood"), hijack))
    assert flood.owner.tolist() == [liar] * n  # the paper's sync hands the network to the liar
    assert np.all(flood.scale[others] == hijack.scale) and flood.scale[liar] == 1.0
