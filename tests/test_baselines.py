"""The decentralized baselines (dpsgd, gossip, push-sum) and the directed random geometric graph:
each one's math on a hand-checkable case, reproducible draws, config errors and resume."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pl.algorithms import make_algorithm
from p2pl.algorithms.base import Setting
from p2pl.cli import main as cli
from p2pl.config import ConsensusConfig, ExperimentConfig, SyncConfig, TopologyConfig, TrainingConfig, load_config
from p2pl.core.adversary import Adversary
from p2pl.core.cooperate import PushSum, gossip
from p2pl.core.neighbours import live_arcs, one_peer_neighbourhoods, peer_choice, push_sum_neighbourhoods
from p2pl.core.rounds import PUSH_SUM_WEIGHT, NetworkCooperation
from p2pl.core.schedule import Partition
from p2pl.core.train import VectorizedTrainer, round_schedule
from p2pl.errors import P2PLError
from p2pl.experiment import build_experiment
from p2pl.graph.topology import build_topology, strongly_connected
from p2pl.models import build_model
from p2pl.node.runtime import push_sum_share
from p2pl.sim import checkpoint
from p2pl.sim.simulator import run_experiment

# A directed ring 0 -> 1 -> 2 -> 3 -> 0 with a chord 0 -> 2: strongly connected, not symmetric.
ARCS = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])


# ------------------------------------------------------------------------------------ push-sum


def test_push_sum_first_step_by_hand() -> None:
    hoods, weight = push_sum_neighbourhoods(4, ARCS, np.ones(4))
    # device 0 splits its weight 1 three ways (itself, 1, 2), the others two ways
    assert weight == pytest.approx([1 / 3 + 1 / 2, 1 / 2 + 1 / 3, 1 / 2 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 2])
    # device 2 hears 0 (share 1/3) and 1 (share 1/2), keeps 1/2: weights are shares / their sum
    row = slice(hoods.indptr[2], hoods.indptr[3])
    assert hoods.src[row].tolist() == [0, 1]
    assert hoods.weight[row] == pytest.approx([(1 / 3) / (4 / 3), (1 / 2) / (4 / 3)])
    assert hoods.self_weight[2] == pytest.approx((1 / 2) / (4 / 3))


def test_push_sum_preserves_the_weighted_sum_and_converges_to_the_average() -> None:
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = np.ones(4)
    average, mass = z.mean(0), (z * torch.from_numpy(weight).unsqueeze(1)).sum(0)
    stage = PushSum().as_gossip()
    for _ in range(100):
        hoods, weight = push_sum_neighbourhoods(4, ARCS, weight)
        z = gossip(z, z, hoods, stage)
        assert weight.sum() == pytest.approx(4.0)
        torch.testing.assert_close((z * torch.from_numpy(weight).unsqueeze(1)).sum(0), mass)
    assert float((z - average).abs().max()) < 1e-9  # every device holds the average of the starts
    assert not np.allclose(weight, 1.0)  # directed: the weights themselves do not equalize


def test_push_sum_weights_are_network_state_that_failures_keep() -> None:
    setting = Setting(np.full(4, 10), np.array([[0, 1], [0, 2], [0, 3], [1, 2], [2, 3]]), "uniform",
                      ConsensusConfig(), SyncConfig(), 20, Adversary(), base_arcs=ARCS)  # fmt: skip
    run = NetworkCooperation(make_algorithm("push-sum").cooperation(setting), setting.facts(), seed=0)
    rows = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    live = np.array([[0, 1], [1, 2], [2, 3]])  # the pairs (0, 3) and (0, 2) are down this round
    assert live_arcs(ARCS, live, 4).tolist() == [[0, 1], [1, 2], [2, 3]]
    out, sent = run.run(rows, live, np.ones(4, dtype=bool), round_index=1)
    assert sent.tolist() == [20, 20, 20, 0]  # one message per live out-arc
    state = run.planner.state_tensors()[PUSH_SUM_WEIGHT].numpy()
    assert state == pytest.approx([1 / 2, 1 / 2 + 1 / 2, 1 / 2 + 1 / 2, 1 + 1 / 2])
    torch.testing.assert_close(out[3], (rows[3] * 1.0 + rows[2] * 0.5) / 1.5)


# -------------------------------------------------------------------------------------- gossip

RING_PLUS = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [0, 5], [0, 3], [1, 4]])


def test_one_random_peer_is_keyed_and_a_node_draws_the_networks_choice() -> None:
    hoods = one_peer_neighbourhoods(6, RING_PLUS, seed=3, round_index=2, step=0)
    assert np.bincount(hoods.src, minlength=6).tolist() == [1] * 6  # one model per device
    neighbours = {d: sorted({int(v) for u, v in RING_PLUS.tolist() + RING_PLUS[:, ::-1].tolist() if u == d})
                  for d in range(6)}  # fmt: skip
    for receiver in range(6):
        senders = hoods.src[hoods.indptr[receiver] : hoods.indptr[receiver + 1]].tolist()
        heard = len(senders)
        assert hoods.self_weight[receiver] == pytest.approx(1 / (1 + heard))
        for sender in senders:
            assert receiver in neighbours[sender]
            # what a node computes alone, from its own neighbour list
            alone = peer_choice(3, 2, 0, np.array([sender]), np.array([0, len(neighbours[sender])]),
                                np.array(neighbours[sender]))  # fmt: skip
            assert int(alone[0]) == receiver
    again = one_peer_neighbourhoods(6, RING_PLUS, seed=3, round_index=2, step=0)
    assert np.array_equal(again.src, hoods.src) and np.array_equal(again.indptr, hoods.indptr)
    rounds = {one_peer_neighbourhoods(6, RING_PLUS, seed=3, round_index=k, step=0).src.tobytes() for k in range(8)}
    assert len(rounds) > 1  # the choice changes from round to round


def test_gossip_receivers_average_equally_and_send_one_model() -> None:
    setting = Setting(np.full(6, 10), RING_PLUS, "metropolis", ConsensusConfig(), SyncConfig(), 20, Adversary())
    run = NetworkCooperation(make_algorithm("gossip").cooperation(setting), setting.facts(), seed=3)
    rows = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    out, sent = run.run(rows, RING_PLUS, np.ones(6, dtype=bool), round_index=2)
    assert sent.tolist() == [20] * 6
    hoods = one_peer_neighbourhoods(6, RING_PLUS, seed=3, round_index=2, step=0)
    for r in range(6):
        senders = hoods.src[hoods.indptr[r] : hoods.indptr[r + 1]]
        torch.testing.assert_close(out[r], torch.cat([rows[r : r + 1], rows[senders]]).mean(0))


# --------------------------------------------------------------------------------------- dpsgd


def _trainer(sizes: list[int]) -> VectorizedTrainer:
    torch.manual_seed(0)
    model = build_model(load_config().model, (6,), 3)
    from p2pl.core.params import ParamSpec

    x, y = torch.randn(sum(sizes), 6), torch.randint(0, 3, (sum(sizes),))
    bounds = np.cumsum([0, *sizes])
    partition = Partition(tuple(np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))),
                          tuple(range(len(sizes))))  # fmt: skip
    cfg = TrainingConfig(batch_size=4, local_epochs=2, optimizer="sgd", lr=0.1)
    return VectorizedTrainer(model, ParamSpec.of(model), x, y, partition, cfg, seed=1)


def test_the_step_schedule_is_the_plain_loop_and_a_subset_walks_the_networks_steps() -> None:
    sizes, work = [3, 17, 9], np.array([1.0, 0.5, 1.0])
    full = _trainer(sizes)
    span = round_schedule(np.array(sizes), full.cfg, work)
    # epoch 0: the largest device takes ceil(17/4) = 5 steps; epoch 1: device 1 has used its
    # half (ceil(10 * 0.5) = 5 steps), so device 2's 3 steps set the length
    assert span == [(0, t) for t in range(5)] + [(1, t) for t in range(3)]
    params = torch.randn(3, full.spec.total, generator=torch.Generator().manual_seed(0))
    plain = params.clone()
    stats = full.train(plain, 1, work)
    calls: list[int] = []
    hooked = params.clone()
    full2 = _trainer(sizes)
    full2.train(hooked, 1, work, span=span, after_step=calls.append)
    assert calls == list(range(len(span)))  # after every step, also those a device sat out
    torch.testing.assert_close(hooked, plain)
    assert stats.steps.tolist() == [2, 5, 6]
    # a shard of one device walking the network's span takes exactly its own steps
    alone = _trainer(sizes)
    alone.partition = alone.partition.subset([2])
    alone.state.tensors = {k: v[2:3].clone() for k, v in alone.state.tensors.items()}
    row = params[2:3].clone()
    alone.train(row, 1, work[2:3], span=span)
    torch.testing.assert_close(row, plain[2:3])


def test_dpsgd_mixes_after_every_local_step(tiny_config: Callable[..., ExperimentConfig]) -> None:
    cfg = tiny_config("algorithm='dpsgd'", "rounds=1", "topology.name='complete'", "devices=2",
                      "training.optimizer='sgd'", "consensus.weights='uniform'",
                      "partition.samples_per_device=40")  # fmt: skip
    result = run_experiment(cfg)
    exp = result.experiment
    steps = round_schedule(exp.setting.data_sizes, cfg.training, None)
    assert result.history.bytes_sent[0].tolist() == [exp.spec.nbytes * len(steps)] * 2
    # by hand: x <- W (x - lr g) at every step, W = the 2-device average
    rows, _ = exp.start_params()
    trainer = exp.trainer()

    def average(j: int) -> None:
        rows.copy_(rows.mean(0, keepdim=True).expand_as(rows))

    trainer.train(rows, 1, after_step=average)
    torch.testing.assert_close(result.params, rows)
    p2pl = run_experiment(replace(cfg, algorithm="p2pl"))
    assert float((p2pl.params - result.params).abs().max()) > 1e-4  # mixing once per round differs


# --------------------------------------------------------------------------------------- graphs


def test_directed_random_geometric_links_each_device_within_its_own_range() -> None:
    topo = build_topology(TopologyConfig(name="directed-random-geometric"), 30, seed=1)
    assert topo.arcs is not None and topo.ranges is not None and topo.positions is not None and topo.radius
    pos, reach = topo.positions, topo.ranges
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=2)
    expected = np.argwhere((dist <= reach[:, None]) & ~np.eye(30, dtype=bool))
    assert topo.arcs.tolist() == expected.tolist()  # u -> v exactly when v is within u's range
    assert reach.min() >= topo.radius * 0.5 - 1e-12 and reach.max() <= topo.radius * 1.5 + 1e-12
    one_way = {tuple(a) for a in topo.arcs.tolist()} - {(v, u) for u, v in topo.arcs.tolist()}
    assert one_way  # ranges differ: some links run one way only
    assert strongly_connected(30, topo.arcs) == 1  # the automatic radius: everyone reaches everyone
    support = {tuple(sorted(a)) for a in topo.arcs.tolist()}
    assert {tuple(e) for e in topo.edges.tolist()} == support
    again = build_topology(TopologyConfig(name="directed-random-geometric"), 30, seed=1)
    assert again.arcs is not None and np.array_equal(again.arcs, topo.arcs)


def test_topology_command_reports_the_one_way_links(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["topology", "--set", "topology.name='directed-random-geometric'", "--set", "devices=30"]) == 0
    out = capsys.readouterr().out
    topo = build_topology(TopologyConfig(name="directed-random-geometric"), 30, seed=0)
    assert topo.arcs is not None
    assert f"one-way       {len(topo.arcs)} arcs" in out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["topology.name='directed-random-geometric'"], "only algorithm = 'push-sum' runs over"),
        (["algorithm='push-sum'", "topology.name='directed-random-geometric'", "topology.radius=0.05"],
         "disconnected .* strong components"),
        (["algorithm='push-sum'", "topology.name='directed-random-geometric'", "topology.range_spread=1.0"],
         "range_spread must be in"),
        (["algorithm='push-sum'", "consensus.aggregation='median'"], "set consensus.aggregation = 'mean'"),
        (["algorithm='dpsgd'", "engine='reference'"], "vectorized engine"),
    ],
)  # fmt: skip
def test_bad_baseline_configs_are_one_line_errors(
    overrides: list[str], message: str, tiny_config: Callable[..., ExperimentConfig]
) -> None:
    with pytest.raises(P2PLError, match=message):
        build_experiment(tiny_config(*overrides))


def test_cli_reports_a_directed_topology_for_p2pl_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["run", "--quiet", "--set", "topology.name='directed-random-geometric'", "--set", "devices=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "push-sum" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "overrides",
    [["algorithm='push-sum'", "topology.name='directed-random-geometric'", "topology.radius=0", "links.dropout=0.2"],
     ["algorithm='dpsgd'"], ["algorithm='gossip'"]],
    ids=["push-sum", "dpsgd", "gossip"],
)  # fmt: skip
def test_interrupted_and_resumed_runs_end_with_the_same_numbers(
    overrides: list[str], tmp_path: Path, tiny_config: Callable[..., ExperimentConfig]
) -> None:
    cfg = tiny_config(*overrides, "rounds=3", "partition.samples_per_device=24")
    straight = run_experiment(cfg)
    run_experiment(cfg, tmp_path, stop_after=1)
    saved = checkpoint.load(tmp_path)
    assert saved is not None
    if cfg.algorithm == "push-sum":
        weight = saved.optimizer[PUSH_SUM_WEIGHT]
        assert float(weight.sum()) == pytest.approx(cfg.devices) and not torch.allclose(weight, torch.ones(10).double())
    resumed = run_experiment(cfg, tmp_path)
    assert torch.equal(resumed.params, straight.params)
    weights = {"push-sum": "push-sum", "gossip": "equal", "dpsgd": cfg.consensus.weights}[cfg.algorithm]
    assert resumed.summary["weights"] == weights  # what the mix really used
    for a, b in zip(resumed.history.bytes_sent, straight.history.bytes_sent, strict=True):
        assert np.array_equal(a, b)


# ----------------------------------------------------------------------------------------- node


@pytest.mark.parametrize(
    ("claimed", "ok"),
    [(0.5, True), (5, True), (5.0001, False), (0.0, False), (-1.0, False), (math.inf, False), (math.nan, False),
     (True, False), ("1", False), (None, False)],
)  # fmt: skip
def test_a_nodes_push_sum_weight_share_is_bounded_by_the_network_size(claimed: object, ok: bool) -> None:
    assert (push_sum_share(claimed, 5) is not None) is ok


PEER = {"id": "dev-0", "index": 0, "address": "127.0.0.1:1"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithm": "fedavg"}, "unknown algorithm .* choose one of: dpsgd, gossip, p2pl, push-sum"),
        ({"peers": [PEER | {"sends": False}]}, "one-way link .* only algorithm = 'push-sum'"),
        ({"algorithm": "gossip", "peers": [PEER]}, "gossip needs peers\\[0\\].neighbours"),
        ({"algorithm": "dpsgd"}, "dpsgd needs network.max_data_size"),
    ],
)  # fmt: skip
def test_node_configs_of_the_baselines_reject_what_they_cannot_run(change: dict[str, object], message: str) -> None:
    from p2pl.node.config import node_config_from_dict

    data: dict[str, object] = {"id": "dev-1", "index": 1, "data": {"train": "a.npz", "test": "b.npz"}, **change}
    with pytest.raises(P2PLError, match=message) as err:
        node_config_from_dict(data)
    assert "\n" not in str(err.value)
    ok = {"algorithm": "push-sum", "peers": [PEER | {"sends": False}]}  # one-way: push-sum only
    assert node_config_from_dict({**data, **ok}).peers[0].hears


def test_a_push_sum_node_checkpoints_its_weight(tmp_path: Path) -> None:
    from p2pl.node import checkpoint as node_checkpoint
    from p2pl.node.runtime import NodeRuntime
    from test_node_runtime import node_config, tiny_data

    tiny_data(tmp_path, 2)
    cfg = node_config(tmp_path, 0, 0, {1: 1}, {"algorithm": "push-sum", "network": {"devices": 2}})
    rt = NodeRuntime(cfg)
    try:
        rt.params = rt.init_of(0).reshape(1, -1)
        rt.push_weight = 0.625
        rt._checkpoint(1)
    finally:
        rt.close()
    saved = node_checkpoint.load(Path(cfg.dir))
    assert saved is not None
    again = NodeRuntime(cfg)
    try:
        assert again.push_weight == 1.0 and again._resume(saved) == 2
        assert again.push_weight == 0.625
    finally:
        again.close()


def test_nodes_run_exactly_the_serverless_algorithms() -> None:
    from p2pl.algorithms import ALGORITHMS
    from p2pl.algorithms.base import GraphAlgorithm
    from p2pl.node.config import NODE_ALGORITHMS

    serverless = {name for name, build in ALGORITHMS.items() if isinstance(build(), GraphAlgorithm)}
    assert serverless == set(NODE_ALGORITHMS) == {"p2pl", "dpsgd", "gossip", "push-sum"}
