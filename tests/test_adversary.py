"""Simulated attackers (p2pl.core.adversary) and what the simulator makes of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import networkx as nx
import numpy as np
import pytest
import torch

from p2pl.config import AdversaryConfig, ExperimentConfig
from p2pl.core.adversary import Adversary, SendContext, place_attackers
from p2pl.core.cooperate import Neighbourhoods
from p2pl.core.rounds import NetworkFacts, gossip_bytes, heard_edges, network_neighbourhoods
from p2pl.errors import P2PLError
from p2pl.experiment import build_experiment
from p2pl.graph.topology import graph_edges
from p2pl.sim.simulator import run_experiment

STAR = graph_edges(nx.star_graph(9))  # hub 0, leaves 1..9


def test_placement_by_count_fraction_random_and_degree() -> None:
    random = place_attackers(100, STAR, AdversaryConfig(attack="scale", fraction=0.1), seed=3)
    assert len(random) == 10 and len(set(random.tolist())) == 10
    assert np.array_equal(random, place_attackers(100, STAR, AdversaryConfig(attack="scale", fraction=0.1), seed=3))
    assert not np.array_equal(random, place_attackers(100, STAR, AdversaryConfig(attack="scale", fraction=0.1), 4))
    hub = place_attackers(10, STAR, AdversaryConfig(attack="scale", count=2, placement="degree"), seed=0)
    assert hub.tolist() == [0, 1]  # the hub, then the lowest id among equal degrees
    assert len(place_attackers(10, STAR, AdversaryConfig(attack="none", count=3), seed=0)) == 0
    with pytest.raises(P2PLError, match="no honest device"):
        place_attackers(10, STAR, AdversaryConfig(attack="scale", count=10), seed=0)


def _ctx(rows: torch.Tensor, hoods: Neighbourhoods, round_index: int = 1) -> SendContext:
    return SendContext(rows, hoods, seed=0, round_index=round_index, step=0)


def test_row_attacks_change_only_what_attackers_send() -> None:
    rows = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    ids = np.arange(4)
    hoods = Neighbourhoods.from_edges(4, [], [], [], np.ones(4))
    for attack, expected in (("scale", rows[1] * 1e6), ("sign-flip", -rows[1])):
        adv = Adversary.of(AdversaryConfig(attack=attack), np.array([1]), seed=0)
        sent = adv.send(rows, ids, _ctx(rows, hoods))
        assert torch.equal(sent[[0, 2, 3]], rows[[0, 2, 3]])
        assert torch.allclose(sent[1], expected)
    noisy = Adversary.of(AdversaryConfig(attack="gaussian", scale=0.5), np.array([1, 2]), seed=0)
    a = noisy.send(rows, ids, _ctx(rows, hoods))
    b = noisy.send(rows, ids, _ctx(rows, hoods))
    assert torch.equal(a, b)  # keyed draws: same seed, round, step and device -> same noise
    assert not torch.equal(a[1] - rows[1], a[2] - rows[2])  # but not the same noise per device
    assert not torch.equal(a, noisy.send(rows, ids, _ctx(rows, hoods, round_index=2)))
    assert abs(float((a[1] - rows[1]).std()) - 0.5) < 0.4


def test_alie_sends_mean_minus_z_std_of_what_it_hears() -> None:
    rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    hoods = Neighbourhoods.from_edges(1, [0, 0, 0], [1, 2, 3], [0.25] * 3, [0.25])  # device 0 hears 1, 2, 3
    adv = Adversary.of(AdversaryConfig(attack="alie", scale=1.5), np.array([0]), seed=0)
    sent = adv.send(rows[:1], np.array([0]), _ctx(rows, hoods))
    heard = rows[:4].double()
    expected = heard.mean(0) - 1.5 * heard.std(0, correction=0)
    assert torch.allclose(sent[0].double(), expected, atol=1e-6)


def test_silent_attackers_are_heard_by_nobody_and_send_nothing() -> None:
    adv = Adversary.of(AdversaryConfig(attack="silent"), np.array([0]), seed=0)
    facts = NetworkFacts(np.full(10, 5), "uniform", 10.0, 100, adv)
    assert len(heard_edges(STAR, adv)) == 0  # every link of the star touches its silent hub
    hoods = network_neighbourhoods(10, STAR, facts)
    assert hoods.degree.sum() == 0 and np.all(hoods.self_weight == 1.0)
    assert gossip_bytes(10, STAR, facts)[0] == 0 and gossip_bytes(10, STAR, facts)[1] == 100


def test_lying_about_data_size_is_bounded_by_the_receivers() -> None:
    sizes = np.full(10, 100)
    liar = Adversary.of(AdversaryConfig(attack="data-size"), np.array([0]), seed=0)  # claims 2^52
    hoods = network_neighbourhoods(10, STAR, NetworkFacts(sizes, "data-size", 4.0, 1, liar))
    # leaf 1 hears only the hub: the claim counts as at most 4 x its own size -> W = 400 / 500
    lo = hoods.indptr[1]
    assert hoods.src[lo] == 0 and hoods.weight[lo] == pytest.approx(0.8)
    unbounded = network_neighbourhoods(10, STAR, NetworkFacts(sizes, "data-size", float("inf"), 1, liar))
    assert unbounded.weight[unbounded.indptr[1]] > 0.999999  # without the bound the liar takes the row


def test_label_flip_poisons_only_the_attackers_training_data(tiny_config: Callable[..., ExperimentConfig]) -> None:
    cfg = tiny_config('adversary.attack="label-flip"', "adversary.count=2")
    exp = build_experiment(cfg)
    clean = build_experiment(tiny_config())
    bad = exp.setting.adversary.ids
    assert len(bad) == 2
    for d in range(exp.num_devices):
        x, y = exp.dataset.x_train[exp.parts[d]], exp.dataset.y_train[exp.parts[d]]
        x0, y0 = clean.dataset.x_train[clean.parts[d]], clean.dataset.y_train[clean.parts[d]]
        assert torch.equal(x, x0)
        assert torch.equal(y, 9 - y0) if d in bad else torch.equal(y, y0)


def test_summary_counts_honest_devices_only(tiny_config: Callable[..., ExperimentConfig], tmp_path: object) -> None:
    cfg = tiny_config('adversary.attack="scale"', "adversary.count=3", "rounds=2")
    result = run_experiment(cfg)
    honest = result.experiment.honest()
    assert result.summary["attackers"] == 3 and int((~honest).sum()) == 3
    last = result.history.accuracy[-1]
    assert result.summary["final"]["accuracy"]["mean"] == pytest.approx(float(last[honest].mean()))
    assert result.summary["final_attackers"]["accuracy"]["mean"] == pytest.approx(float(last[~honest].mean()))
    assert result.summary["attack"] == "scale"


def test_the_safety_net_stops_gross_scaling_and_robust_rules_resist_what_passes_it(
    tiny_config: Callable[..., ExperimentConfig],
) -> None:
    base = ["rounds=3", "topology.radius=0.6", "devices=20", "adversary.count=2"]
    clean = run_experiment(tiny_config(*base)).summary["final"]["accuracy"]["mean"]
    # x1e6 rows are out of bounds (consensus.max_norm_ratio): receivers mix without them
    scaled = run_experiment(tiny_config(*base, 'adversary.attack="scale"')).summary["final"]["accuracy"]
    assert np.isfinite(scaled["mean"]) and scaled["mean"] > clean - 0.05
    # -5 x the parameters passes the net: it takes the plain mean over, not the median
    flip = [*base, 'adversary.attack="sign-flip"', "adversary.scale=5"]
    mean = run_experiment(tiny_config(*flip)).summary["final"]["accuracy"]["mean"]
    median = run_experiment(tiny_config(*flip, 'consensus.aggregation="median"')).summary["final"]["accuracy"]["mean"]
    assert mean < clean - 0.3
    assert median > clean - 0.1


def test_verified_sync_keeps_the_network_from_a_hijacker(tiny_config: Callable[..., ExperimentConfig]) -> None:
    cfg = tiny_config("rounds=1", "devices=20", "topology.radius=0.6", 'adversary.attack="sync-hijack"',
                      "adversary.count=1")  # fmt: skip
    verified_exp = build_experiment(cfg)
    liar = int(verified_exp.setting.adversary.ids[0])
    honest = verified_exp.honest()
    inits = verified_exp.device_inits()
    norms = inits.double().norm(dim=1)
    best_honest = int(torch.argmax(torch.where(torch.from_numpy(honest), norms, -1.0)))
    rows, _ = verified_exp.start_params()
    assert torch.equal(rows[torch.from_numpy(honest)], inits[best_honest].expand(int(honest.sum()), -1))
    flood_exp = build_experiment(replace(cfg, sync=replace(cfg.sync, mode="flood")))
    flooded, _ = flood_exp.start_params()
    # the paper's flood: every honest device adopted the liar's init x 1e6
    assert torch.allclose(flooded[torch.from_numpy(honest)], (inits[liar] * 1e6).expand(int(honest.sum()), -1))
    verified = run_experiment(cfg)
    flood = run_experiment(replace(cfg, sync=replace(cfg.sync, mode="flood")))
    assert verified.summary["sync_mode"] == "verified" and flood.summary["sync_mode"] == "flood"
    assert verified.summary["sync_bytes_per_device"] < flood.summary["sync_bytes_per_device"] / 100
