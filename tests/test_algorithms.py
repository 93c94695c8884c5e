"""P2PL and its baselines (p2pl.algorithms): the FedAvg identity, and how each one cooperates.

Complete graph + ``uniform`` weights + equal data sizes + sync: P2PL equals FedAvg
(<= 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import networkx as nx
import numpy as np
import pytest
import torch

from p2pl.algorithms import ALGORITHMS, P2PL, Centralized, FedAvg, Local, make_algorithm
from p2pl.algorithms.base import Algorithm, RoundLinks, Setting
from p2pl.config import ConsensusConfig, ExperimentConfig, SyncConfig
from p2pl.core.adversary import Adversary
from p2pl.core.rounds import NetworkCooperation
from p2pl.errors import P2PLError
from p2pl.graph.topology import graph_edges
from p2pl.sim.simulator import run_experiment

# digits holds 1797 samples; this test fraction leaves 1440 for training, 144 per device.
EQUAL_SIZES = ["data.test_fraction=0.1986", "topology.name='complete'", "consensus.weights='uniform'"]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_p2pl_on_a_complete_graph_with_uniform_weights_is_fedavg(
    optimizer: str, tiny_config: Callable[..., ExperimentConfig]
) -> None:
    cfg = tiny_config(*EQUAL_SIZES, f"training.optimizer='{optimizer}'", "rounds=3")
    p2pl = run_experiment(cfg)
    fedavg = run_experiment(replace(cfg, algorithm="fedavg"))
    assert p2pl.experiment.setting.data_sizes.tolist() == [144] * 10
    assert p2pl.summary["sync_steps"] == 1  # complete graph: one flood step
    diff = float((p2pl.params - fedavg.params).abs().max())
    assert diff <= 1e-6, f"P2PL differs from FedAvg by {diff}"
    assert np.allclose(p2pl.history.accuracy[-1], fedavg.history.accuracy[-1])
    # Sync is what makes the identity hold: synced devices start equal, unsynced ones do not.
    assert len(set(p2pl.history.accuracy[0].tolist())) == 1
    unsynced = run_experiment(replace(cfg, sync=replace(cfg.sync, enabled=False), rounds=1))
    assert len(set(unsynced.history.accuracy[0].tolist())) > 1


# ---------------------------------------------------------------------------------------------
# the exchange step, one algorithm at a time

N, P = 6, 5


def _setting(edges: np.ndarray, sizes: np.ndarray | None = None, **consensus: object) -> Setting:
    sizes = np.full(N, 10) if sizes is None else sizes
    return Setting(sizes, edges, "uniform", ConsensusConfig(**consensus), SyncConfig(), 20, Adversary())  # type: ignore[arg-type]


@dataclass
class Exchanged:
    params: torch.Tensor
    bytes_sent: np.ndarray


def _exchange(algorithm: Algorithm, params: torch.Tensor, links: RoundLinks, setting: Setting) -> Exchanged:
    """The cooperation step as every runtime runs it (here: all rows in one process)."""
    if not links.cooperate:
        return Exchanged(params, np.zeros(N, dtype=np.int64))
    run = NetworkCooperation(algorithm.cooperation(setting), setting.facts(), seed=0)
    return Exchanged(*run.run(params, links.live_edges, links.active, round_index=1))


def _links(edges: np.ndarray, active: np.ndarray | None = None, cooperate: bool = True) -> RoundLinks:
    return RoundLinks(edges, np.ones(N, dtype=bool) if active is None else active, cooperate)


def _params(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, P, generator=torch.Generator().manual_seed(seed))


COMPLETE = graph_edges(nx.complete_graph(N))
RING = graph_edges(nx.cycle_graph(N))


def test_exchange_identity_p2pl_complete_uniform_equals_fedavg_equal_sizes() -> None:
    params = _params()
    a = _exchange(P2PL(), params, _links(COMPLETE), _setting(COMPLETE))
    b = _exchange(FedAvg(), params, _links(COMPLETE), _setting(COMPLETE))
    assert torch.allclose(a.params, b.params, atol=1e-6)
    assert torch.allclose(b.params, params.mean(0).expand(N, -1), atol=1e-6)


def test_p2pl_exchange_mixes_with_live_neighbours_and_counts_bytes() -> None:
    params = _params(1)
    out = _exchange(P2PL(), params, _links(RING), _setting(RING, steps=2))
    w = np.zeros((N, N))
    for i in range(N):
        w[i, [i, (i - 1) % N, (i + 1) % N]] = 1 / 3
    expected = torch.from_numpy(w @ w @ params.double().numpy())
    assert torch.allclose(out.params.double(), expected, atol=1e-6)
    assert out.bytes_sent.tolist() == [2 * 2 * 20] * N  # degree x steps x model bytes


def test_p2pl_absent_devices_and_skipped_rounds_keep_their_parameters() -> None:
    params = _params(2)
    active = np.array([True, False, True, True, True, True])
    live = RING[~np.isin(RING, [1]).any(1)]  # the absent device's links are down
    out = _exchange(P2PL(), params, _links(live, active), _setting(RING))
    assert torch.equal(out.params[1], params[1])
    assert not torch.allclose(out.params[0], params[0])
    assert out.bytes_sent[1] == 0
    skipped = _exchange(P2PL(), params, _links(RING, cooperate=False), _setting(RING))
    assert torch.equal(skipped.params, params) and not skipped.bytes_sent.any()


def test_p2pl_affinity_keeps_a_share_of_the_own_model() -> None:
    params = _params(3)
    plain = _exchange(P2PL(), params, _links(RING), _setting(RING)).params
    damped = _exchange(P2PL(), params, _links(RING), _setting(RING, affinity=0.25)).params
    assert torch.allclose(damped, 0.75 * params + 0.25 * plain, atol=1e-6)


def test_fedavg_weights_by_data_size_and_skips_absent_devices() -> None:
    params = _params(4)
    sizes = np.array([1, 2, 3, 4, 5, 6])
    active = np.array([True, True, False, True, True, True])
    out = _exchange(FedAvg(), params, _links(COMPLETE, active), _setting(COMPLETE, sizes))
    present = np.flatnonzero(active)
    w = torch.from_numpy(sizes[present]).double()
    expected = (params[present].double() * w.unsqueeze(1)).sum(0) / w.sum()
    assert torch.allclose(out.params[present].double(), expected.expand(len(present), -1), atol=1e-6)
    assert torch.equal(out.params[2], params[2])
    assert out.bytes_sent.tolist() == [20, 20, 0, 20, 20, 20]
    skipped = _exchange(FedAvg(), params, _links(COMPLETE, cooperate=False), _setting(COMPLETE))
    assert torch.equal(skipped.params, params)


def test_starts_fedavg_and_centralized_share_synced_p2pls_init() -> None:
    norms = _params(5).double().norm(dim=1)
    best = int(norms.argmax())
    p2pl = P2PL().start(norms, _setting(RING))
    fedavg = FedAvg().start(norms, _setting(RING))
    central = Centralized().start(norms, _setting(RING))
    local = Local().start(norms, _setting(RING))
    assert p2pl.owner.tolist() == fedavg.owner.tolist() == [best] * N
    assert p2pl.steps > 0 and fedavg.steps == 0 and not fedavg.bytes_sent.any()
    assert central.owner.tolist() == [best]
    assert local.owner.tolist() == list(range(N))
    assert Centralized().num_devices(N) == 1 and P2PL().num_devices(N) == N


def test_local_never_communicates() -> None:
    params = _params(6)
    out = _exchange(Local(), params, _links(COMPLETE), _setting(COMPLETE))
    assert torch.equal(out.params, params) and not out.bytes_sent.any()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_runs(name: str, tiny_config: Callable[..., ExperimentConfig]) -> None:
    result = run_experiment(tiny_config(f"algorithm='{name}'", "rounds=1"))
    assert result.summary["algorithm"] == name
    assert result.params.shape[0] == (1 if name == "centralized" else 10)
    assert result.summary["final"]["accuracy"]["mean"] > 0.3  # one epoch on digits learns something
    if name == "local":
        assert len(set(result.history.accuracy[-1].tolist())) > 1


def test_unknown_algorithm() -> None:
    assert isinstance(make_algorithm("p2pl"), P2PL)
    with pytest.raises(P2PLError, match="unknown algorithm 'flood'; choose one of: centralized, dpsgd, fedavg"):
        make_algorithm("flood")
