"""Graph sharding for the Ray backend: balanced, neighbours together, and an exact halo plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2pl.config import TopologyConfig
from p2pl.core.cooperate import Gossip, Neighbourhoods, aggregate
from p2pl.errors import P2PLError
from p2pl.graph.topology import build_topology
from p2pl.graph.weights import mixing_weights
from p2pl.sim.ray_backend import consensus_plans
from p2pl.sim.sharding import count_cut_edges, shard_devices


def geometric_edges(n: int = 400, radius: float = 0.12, seed: int = 0) -> np.ndarray:
    return build_topology(TopologyConfig(radius=radius), n, seed).edges


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_shards_cover_every_device_once_and_are_balanced(k: int) -> None:
    edges = geometric_edges()
    sh = shard_devices(400, edges, k)
    assert sh.num_shards == k
    allids = np.concatenate(sh.shards)
    assert np.array_equal(np.sort(allids), np.arange(400))
    assert sh.sizes.max() - sh.sizes.min() <= 1
    for s, ids in enumerate(sh.shards):
        assert np.all(np.diff(ids) > 0)  # sorted ascending
        assert np.all(sh.shard_of[ids] == s)
        assert np.array_equal(sh.local_index[ids], np.arange(len(ids)))
    assert sh.cut_edges == count_cut_edges(sh.shard_of, edges)
    brute = sum(1 for u, v in edges if sh.shard_of[u] != sh.shard_of[v])
    assert sh.cut_edges == brute


def test_graph_partition_keeps_neighbours_together() -> None:
    edges = geometric_edges()
    for k in (2, 4):
        rcm = shard_devices(400, edges, k)
        rr = shard_devices(400, edges, k, method="round-robin")
        # round-robin cuts ~(1 - 1/k) of all edges; bands of the square cut only their borders
        assert rr.cut_edges > 0.4 * len(edges)
        assert rcm.cut_edges < 0.35 * rr.cut_edges


def test_sharding_is_deterministic_and_handles_disconnected_graphs() -> None:
    edges = np.array([[0, 3], [1, 4], [2, 5]])  # three components, each kept whole
    a, b = shard_devices(6, edges, 3), shard_devices(6, edges, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a.shards, b.shards, strict=True))
    assert a.cut_edges == 0
    empty = shard_devices(5, np.empty((0, 2), dtype=np.int64), 2)
    assert empty.cut_edges == 0 and empty.sizes.tolist() == [3, 2]


@pytest.mark.parametrize("k", [0, 6])
def test_bad_shard_counts_are_one_line_errors(k: int) -> None:
    with pytest.raises(P2PLError, match="shards"):
        shard_devices(5, np.empty((0, 2), dtype=np.int64), k)
    with pytest.raises(P2PLError, match="sharding method"):
        shard_devices(5, np.empty((0, 2), dtype=np.int64), 2, method="random")


@pytest.mark.parametrize("rule", ["uniform", "metropolis", "data-size"])
@pytest.mark.parametrize("k", [2, 3])
def test_halo_plans_reproduce_the_global_consensus_step(rule: str, k: int) -> None:
    """What the shards do (own rows + received halo rows, one edge-list step each) equals W @ θ."""
    n, p = 120, 7
    edges = geometric_edges(n, 0.2, seed=1)
    sizes = np.random.default_rng(0).integers(1, 20, n)
    w = mixing_weights(n, edges, rule, sizes)
    hoods = Neighbourhoods.from_edges(n, w.dst, w.src, w.weight, w.self_weight)
    params = torch.randn(n, p, generator=torch.Generator().manual_seed(0))
    want = aggregate(params, params, hoods, Gossip())
    sh = shard_devices(n, edges, k)
    plans = consensus_plans(hoods, sh)
    # each shard's published blocks, as the driver routes them: (sender, receiver) -> rows
    sent = {}
    for t, plan in enumerate(plans):
        own = params[torch.from_numpy(sh.shards[t])]
        for s, rows in zip(plan.send_to, plan.send_rows, strict=True):
            sent[(t, s)] = own[torch.from_numpy(rows)]
    moved = 0
    for s, plan in enumerate(plans):
        own = params[torch.from_numpy(sh.shards[s])]
        halos = [sent[(t, s)] for t in plan.sources]
        moved += sum(len(h) for h in halos)
        got = aggregate(own, torch.cat([own, *halos]), plan.hoods, Gossip())
        torch.testing.assert_close(got, want[torch.from_numpy(sh.shards[s])], rtol=0, atol=1e-6)
    # only boundary devices travel: never more rows than cut edges (each counted once per side)
    assert 0 < moved <= 2 * sh.cut_edges
    assert moved < n
