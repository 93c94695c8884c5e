"""End to end through the simulator: link failures, dropout, stragglers, sparse rounds, mobility,
affinity, the oscillation measure and devices.csv.

The network dynamics, P2PL's cooperation step and local training are recorded by wrapping the
real methods (nothing is replaced), so these tests check what the simulator actually did in each
round: the W rows it used, the bytes it counted, the steps each device took.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pl.algorithms.base import RoundLinks
from p2pl.config import ExperimentConfig, load_config
from p2pl.core.train import VectorizedTrainer
from p2pl.graph.links import NetworkDynamics, RoundNetwork
from p2pl.sim.simulator import LocalBackend, run_experiment

BASE = [
    "devices=12",
    "rounds=4",
    "model.hidden=[16]",
    "training.local_epochs=1",
    'topology.name="complete"',
    "output.progress=false",
]


def config(*overrides: str) -> ExperimentConfig:
    return load_config(None, [*BASE, *overrides])


@dataclass
class Exchanged:
    links: RoundLinks
    before: torch.Tensor
    after: torch.Tensor
    sent: np.ndarray
    w: np.ndarray | None  # the dense W P2PL used (None: no cooperation this round)


@dataclass
class Trace:
    nets: list[RoundNetwork] = field(default_factory=list)
    exchanges: list[Exchanged] = field(default_factory=list)
    trains: list[tuple[np.ndarray | None, np.ndarray]] = field(default_factory=list)  # (work, steps)


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Trace:
    """Record every round's network, P2PL exchange and local training of the next run."""
    t = Trace()
    next_round, exchange, train = NetworkDynamics.next_round, LocalBackend.exchange, VectorizedTrainer.train

    def recording_next_round(self: NetworkDynamics) -> RoundNetwork:
        net = next_round(self)
        t.nets.append(net)
        return net

    def recording_exchange(self: LocalBackend, links: RoundLinks, round_index: int) -> np.ndarray:
        before = self.params().clone()
        sent = exchange(self, links, round_index)
        w = None
        if links.cooperate:  # W is cached per live edge set: this is the one just used
            n = before.shape[0]
            hoods = self.cooperation.neighbourhoods(n, links.live_edges)
            w = np.zeros((n, n))
            w[hoods.dst, hoods.src] = hoods.weight
            w[np.arange(n), np.arange(n)] = hoods.self_weight
        t.exchanges.append(Exchanged(links, before, self.params().clone(), sent.copy(), w))
        return sent

    def recording_train(self: VectorizedTrainer, params, round_index, work=None):  # type: ignore[no-untyped-def]
        stats = train(self, params, round_index, work)
        t.trains.append((None if work is None else np.array(work), stats.steps.numpy().copy()))
        return stats

    monkeypatch.setattr(NetworkDynamics, "next_round", recording_next_round)
    monkeypatch.setattr(LocalBackend, "exchange", recording_exchange)
    monkeypatch.setattr(VectorizedTrainer, "train", recording_train)
    return t


def edge_set(edges: np.ndarray) -> set[tuple[int, int]]:
    return {(int(u), int(v)) for u, v in edges}


def live_degree(edges: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(edges.ravel(), minlength=n)


# ---------------------------------------------------------------------------------------------
# W rows from the links actually up


@pytest.mark.parametrize("rule", ["uniform", "data-size"])
def test_rows_sum_to_one_and_use_only_live_neighbours(trace: Trace, rule: str) -> None:
    cfg = config(f'consensus.weights="{rule}"', 'links.model="bernoulli"', "links.p_up=0.5",
                 "links.dropout=0.2", "rounds=6")  # fmt: skip
    result = run_experiment(cfg)
    n = cfg.devices
    sizes = result.experiment.setting.data_sizes
    full = edge_set(result.experiment.topology.edges)
    assert len(trace.exchanges) == len(trace.nets) == cfg.rounds
    live_counts = set()
    for net, ex in zip(trace.nets, trace.exchanges, strict=True):
        live = edge_set(net.live_edges)
        live_counts.add(len(live))
        assert np.array_equal(ex.links.live_edges, net.live_edges)  # the simulator passed this round's links
        assert live <= full
        assert all(net.active[u] and net.active[v] for u, v in live)  # absent devices have no links
        assert ex.w is not None
        np.testing.assert_allclose(ex.w.sum(axis=1), 1.0, atol=1e-6)
        off = {(int(a), int(b)) for a, b in zip(*np.nonzero(ex.w - np.diag(np.diag(ex.w))), strict=True)}
        assert off == live | {(v, u) for u, v in live}  # exactly the live neighbours, both ways
        deg = live_degree(net.live_edges, n)
        for u, v in live:  # each device's own row, renormalized over who it heard from
            if rule == "uniform":
                assert ex.w[u, v] == pytest.approx(1 / (1 + deg[u]), rel=1e-6)
            else:
                heard = sizes[u] + sum(sizes[m] for m in range(n) if (min(u, m), max(u, m)) in live)
                assert ex.w[u, v] == pytest.approx(sizes[v] / heard, rel=1e-6)
        expected = torch.from_numpy(ex.w).float() @ ex.before
        active = torch.from_numpy(net.active.copy())  # RoundNetwork arrays are read-only
        torch.testing.assert_close(ex.after[active], expected[active], rtol=1e-5, atol=1e-6)
        assert torch.equal(ex.after[~active], ex.before[~active])  # an absent device keeps its model
    assert len(live_counts) > 1 and max(live_counts) < len(full)  # links really failed, and varied
    assert not all(net.active.all() for net in trace.nets)  # dropout really happened


@pytest.mark.parametrize("rule", ["metropolis", "max-degree"])
def test_doubly_stochastic_rules_stay_symmetric_on_the_live_graph(trace: Trace, rule: str) -> None:
    cfg = config(f'consensus.weights="{rule}"', 'links.model="bernoulli"', "links.p_up=0.4", "links.dropout=0.1")
    run_experiment(cfg)
    for net, ex in zip(trace.nets, trace.exchanges, strict=True):
        assert ex.w is not None
        np.testing.assert_allclose(ex.w, ex.w.T, atol=1e-9)
        np.testing.assert_allclose(ex.w.sum(axis=0), 1.0, atol=1e-6)
        np.testing.assert_allclose(ex.w.sum(axis=1), 1.0, atol=1e-6)
        live = edge_set(net.live_edges)
        assert {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(ex.w, 1)), strict=True)} == live
        deg = live_degree(net.live_edges, cfg.devices)
        for u, v in live:  # recomputed from the current (live) degrees, not the base graph's
            expected = 1 / (1 + deg.max()) if rule == "max-degree" else 1 / (1 + max(deg[u], deg[v]))
            assert ex.w[u, v] == pytest.approx(expected)


def test_bytes_sent_count_only_live_links(trace: Trace) -> None:
    cfg = config('links.model="bernoulli"', "links.p_up=0.5", "links.dropout=0.2", "consensus.steps=2")
    result = run_experiment(cfg)
    model_bytes = result.experiment.spec.nbytes
    full_degree = live_degree(result.experiment.topology.edges, cfg.devices)
    for k, (net, ex) in enumerate(zip(trace.nets, trace.exchanges, strict=True)):
        expected = live_degree(net.live_edges, cfg.devices) * 2 * model_bytes
        np.testing.assert_array_equal(ex.sent, expected)
        np.testing.assert_array_equal(result.history.bytes_sent[k], expected)
        assert ex.sent.sum() < (full_degree * 2 * model_bytes).sum()
        assert result.history.live_links[k] == len(net.live_edges)
    total = np.sum(result.history.bytes_sent, axis=0).mean() + result.summary["sync_bytes_per_device"]
    assert result.summary["bytes_sent_per_device"] == pytest.approx(total)


def test_fedavg_bytes_only_for_present_devices(trace: Trace) -> None:
    cfg = config('algorithm="fedavg"', "links.dropout=0.3")
    result = run_experiment(cfg)
    model_bytes = result.experiment.spec.nbytes
    for net, sent in zip(trace.nets, result.history.bytes_sent, strict=True):
        np.testing.assert_array_equal(sent, np.where(net.active, model_bytes, 0))


def test_a_device_with_no_live_link_keeps_its_model(trace: Trace) -> None:
    cfg = config('topology.name="ring"', 'links.model="bernoulli"', "links.p_up=0.3", "rounds=6")
    run_experiment(cfg)
    isolated = 0
    for net, ex in zip(trace.nets, trace.exchanges, strict=True):
        deg = live_degree(net.live_edges, cfg.devices)
        for d in np.flatnonzero(deg == 0):
            isolated += 1
            assert torch.equal(ex.after[d], ex.before[d])
        for d in np.flatnonzero(deg > 0):
            assert not torch.equal(ex.after[d], ex.before[d])  # a linked device does mix
    assert isolated > 0  # the setting really isolated some devices


def test_stragglers_take_fewer_local_steps_and_absent_devices_none(trace: Trace) -> None:
    cfg = config("training.local_epochs=2", "links.straggler_prob=0.5", "links.straggler_work=0.5",
                 "links.dropout=0.2")  # fmt: skip
    result = run_experiment(cfg)
    sizes = result.experiment.setting.data_sizes
    full = np.ceil(sizes / cfg.training.batch_size).astype(int) * cfg.training.local_epochs
    seen = {"full": 0, "straggler": 0, "absent": 0}
    for net, (work, steps) in zip(trace.nets, trace.trains, strict=True):
        np.testing.assert_array_equal(work if work is not None else np.ones(cfg.devices), net.work)
        for d in range(cfg.devices):
            if not net.active[d]:
                assert steps[d] == 0
                seen["absent"] += 1
            elif net.work[d] < 1:
                assert steps[d] == math.ceil(full[d] * 0.5) < full[d]
                seen["straggler"] += 1
            else:
                assert steps[d] == full[d]
                seen["full"] += 1
    assert all(seen.values())


def test_sparse_communication_cooperates_every_r_rounds(trace: Trace) -> None:
    cfg = config("consensus.every=3", "rounds=6")
    result = run_experiment(cfg)
    for k, ex in enumerate(trace.exchanges, 1):
        assert ex.links.cooperate == (k % 3 == 0)
        if k % 3:
            assert not ex.sent.any()
            assert torch.equal(ex.after, ex.before)
        else:
            assert ex.sent.all()
            assert not torch.equal(ex.after, ex.before)
    assert [int(b.sum() > 0) for b in result.history.bytes_sent] == [0, 0, 1, 0, 0, 1]


def test_affinity_one_is_plain_consensus_and_below_one_blends(trace: Trace) -> None:
    plain = run_experiment(config('topology.name="ring"', "consensus.affinity=1.0"))
    for ex in trace.exchanges:
        assert ex.w is not None
        torch.testing.assert_close(ex.after, torch.from_numpy(ex.w).float() @ ex.before, rtol=1e-5, atol=1e-6)
    trace.exchanges.clear()
    blended = run_experiment(config('topology.name="ring"', "consensus.affinity=0.3"))
    for ex in trace.exchanges:
        assert ex.w is not None
        mixed = torch.from_numpy(ex.w).float() @ ex.before
        torch.testing.assert_close(ex.after, 0.7 * ex.before + 0.3 * mixed, rtol=1e-5, atol=1e-6)
    assert not torch.equal(plain.params, blended.params)


def test_oscillation_is_reported_with_after_local_evaluation(tmp_path: Path) -> None:
    cfg = config("eval.after_local=true", 'partition.scheme="dirichlet"', "partition.alpha=0.1", "rounds=3")
    result = run_experiment(cfg, tmp_path / "run")
    h = result.history
    assert len(h.local_accuracy) == cfg.rounds
    local = np.array([a.mean() for a in h.local_accuracy])
    after = np.array([a.mean() for a in h.accuracy[1:]])
    assert result.summary["oscillation"] == pytest.approx(float(np.mean(np.abs(local - after))))
    assert result.summary["oscillation"] > 0
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"local_accuracy", "local_loss"} <= set(rows[0])
    assert len(rows) == (cfg.rounds + 1) * cfg.devices
    without = run_experiment(config("rounds=2"))
    assert without.summary["oscillation"] is None


def test_devices_csv_has_label_histograms_and_sizes(tmp_path: Path) -> None:
    cfg = config('partition.scheme="dirichlet"', "partition.alpha=0.1", "rounds=1")
    result = run_experiment(cfg, tmp_path)
    exp = result.experiment
    with (tmp_path / "devices.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == cfg.devices
    y = exp.dataset.y_train.numpy()
    classes = exp.dataset.num_classes
    skewed = False
    for d, row in enumerate(rows):
        hist = np.array([int(row[f"label_{c}"]) for c in range(classes)])
        assert int(row["device"]) == d
        assert int(row["samples"]) == len(exp.parts[d]) == hist.sum()
        np.testing.assert_array_equal(hist, np.bincount(y[exp.parts[d]], minlength=classes))
        skewed |= bool((hist == 0).any())
    assert skewed  # alpha = 0.1 leaves labels out on some device


def test_mobility_rebuilds_the_graph_within_radio_range(trace: Trace) -> None:
    radius = 0.45
    cfg = config('topology.name="random-geometric"', f"topology.radius={radius}", "topology.allow_disconnected=true",
                 "links.mobility_speed=0.15", "rounds=5")  # fmt: skip
    run_experiment(cfg)
    graphs = set()
    for net, ex in zip(trace.nets, trace.exchanges, strict=True):
        assert net.positions is not None
        assert net.positions.min() >= 0 and net.positions.max() <= 1
        for u, v in edge_set(net.live_edges):
            assert np.hypot(*(net.positions[u] - net.positions[v])) <= radius + 1e-12
        dist = np.hypot(*(net.positions[:, None, :] - net.positions[None, :, :]).transpose(2, 0, 1))
        within = {(u, v) for u in range(cfg.devices) for v in range(u + 1, cfg.devices) if dist[u, v] <= radius}
        assert edge_set(net.base_edges) == within
        assert ex.w is not None
        assert {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(ex.w, 1)), strict=True)} == within
        graphs.add(frozenset(within))
    assert len(graphs) > 1  # devices moved and the graph changed


def test_resume_with_dynamics_gives_the_uninterrupted_numbers(tmp_path: Path) -> None:
    cfg = config('topology.name="random-geometric"', "topology.radius=0.5", "topology.allow_disconnected=true",
                 'links.model="gilbert-elliott"', "links.dropout=0.1", "links.straggler_prob=0.3",
                 "links.mobility_speed=0.1", "rounds=5")  # fmt: skip
    whole = run_experiment(cfg)
    run_experiment(cfg, tmp_path, stop_after=2)
    resumed = run_experiment(cfg, tmp_path)
    assert torch.equal(whole.params, resumed.params)
    assert whole.history.live_links == resumed.history.live_links
    for a, b in zip(whole.history.bytes_sent, resumed.history.bytes_sent, strict=True):
        np.testing.assert_array_equal(a, b)
