"""Per-round network dynamics: link models, dropout, stragglers, sparse rounds, mobility, replay.

Statistical checks use fixed seeds and tolerances of about 5 standard errors, with the standard
error computed from independent units (links or devices) wherever draws are correlated in time.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pytest

from p2pl.config import LinksConfig, TopologyConfig
from p2pl.errors import P2PLError
from p2pl.graph.links import (
    NetworkDynamics,
    RoundNetwork,
    expected_link_up_rate,
    expected_live_edge_rate,
    validate_links,
)
from p2pl.graph.topology import Topology, build_topology, geometric_graph, graph_edges


def complete(n: int) -> Topology:
    return Topology(name="complete", graph=nx.complete_graph(n))


def run(dyn: NetworkDynamics, rounds: int) -> list[RoundNetwork]:
    return [dyn.next_round() for _ in range(rounds)]


def up_matrix(nets: list[RoundNetwork], base: np.ndarray) -> np.ndarray:
    """bool [rounds, E]: whether each base edge is live in each round (static graph)."""
    n = int(base.max()) + 1
    keys = base[:, 0] * n + base[:, 1]
    out = np.zeros((len(nets), base.shape[0]), dtype=bool)
    for i, net in enumerate(nets):
        live = net.live_edges[:, 0] * n + net.live_edges[:, 1]
        out[i] = np.isin(keys, live)
    return out


def same_rounds(a: list[RoundNetwork], b: list[RoundNetwork]) -> bool:
    for x, y in zip(a, b, strict=True):
        if x.round != y.round or x.cooperate != y.cooperate:
            return False
        for name in ("live_edges", "active", "work", "base_edges"):
            if not np.array_equal(getattr(x, name), getattr(y, name)):
                return False
        if (x.positions is None) != (y.positions is None):
            return False
        if x.positions is not None and not np.array_equal(x.positions, y.positions):
            return False
    return True


def mobile_topology(n: int = 120, seed: int = 3) -> Topology:
    cfg = TopologyConfig(name="random-geometric", area_m=500.0, range_m=80.0, allow_disconnected=True)
    return build_topology(cfg, n, seed)


FULL = LinksConfig(
    model="gilbert-elliott",
    ge_good_to_bad=0.2,
    ge_bad_to_good=0.3,
    ge_up_good=0.9,
    ge_up_bad=0.1,
    dropout=0.1,
    straggler_prob=0.2,
    straggler_work=0.25,
    mobility_speed=40.0,
    mobility_pause=2,
)


# --- link models ---------------------------------------------------------------------------------


def test_static_links_all_up_and_static_flag():
    topo = complete(10)
    dyn = NetworkDynamics(topo, LinksConfig(), every=1, seed=0)
    assert dyn.static
    for net in run(dyn, 5):
        assert np.array_equal(net.live_edges, topo.edges)
        assert np.array_equal(net.base_edges, topo.edges)
        assert net.active.all() and np.all(net.work == 1.0)
        assert net.positions is None
    assert NetworkDynamics(topo, LinksConfig(model="bernoulli", p_up=1.0), 3, 0).static
    assert not NetworkDynamics(topo, LinksConfig(model="bernoulli", p_up=0.5), 1, 0).static
    assert not NetworkDynamics(topo, LinksConfig(dropout=0.1), 1, 0).static
    assert not NetworkDynamics(topo, LinksConfig(straggler_prob=0.1), 1, 0).static


def test_bernoulli_up_rate_matches_p_up():
    topo = complete(30)  # 435 links
    p = 0.3
    nets = run(NetworkDynamics(topo, LinksConfig(model="bernoulli", p_up=p), 1, seed=11), 400)
    ups = up_matrix(nets, topo.edges)
    se = np.sqrt(p * (1 - p) / ups.size)  # independent over links and rounds
    assert abs(ups.mean() - p) < 5 * se
    # and it varies: not the same links every round
    assert not np.array_equal(ups[0], ups[1])
    assert expected_link_up_rate(LinksConfig(model="bernoulli", p_up=p)) == p


def test_gilbert_elliott_stationary_up_rate():
    cfg = LinksConfig(model="gilbert-elliott", ge_good_to_bad=0.1, ge_bad_to_good=0.3, ge_up_good=0.9, ge_up_bad=0.2)
    expected = expected_link_up_rate(cfg)
    pi_bad = 0.1 / 0.4
    assert expected == pytest.approx((1 - pi_bad) * 0.9 + pi_bad * 0.2)
    topo = complete(64)  # 2016 independent chains
    ups = up_matrix(run(NetworkDynamics(topo, cfg, 1, seed=5), 300), topo.edges)
    per_link = ups.mean(axis=0)  # links are independent; rounds are not
    se = per_link.std(ddof=1) / np.sqrt(per_link.size)
    assert abs(per_link.mean() - expected) < 5 * se
    # started from the stationary law: already the right rate in round 1
    se1 = np.sqrt(expected * (1 - expected) / ups.shape[1])
    assert abs(ups[0].mean() - expected) < 5 * se1


def _complete_runs(series: np.ndarray, value: bool) -> np.ndarray:
    """Lengths of the runs of ``value`` along axis 0 that start and end inside the window."""
    lengths = []
    for col in series.T:
        x = (col == value).astype(np.int8)
        edges = np.diff(np.concatenate([[0], x, [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        full = (starts > 0) & (ends < x.size)
        lengths.append(ends[full] - starts[full])
    return np.concatenate(lengths)


def test_gilbert_elliott_is_bursty_markov_chain():
    g2b, b2g = 0.05, 0.25
    cfg = LinksConfig(model="gilbert-elliott", ge_good_to_bad=g2b, ge_bad_to_good=b2g)
    topo = complete(32)  # 496 links
    ups = up_matrix(run(NetworkDynamics(topo, cfg, 1, seed=2), 400), topo.edges)
    # with up_good = 1 and up_bad = 0 the link state is the chain state: check its transitions
    now, nxt = ups[:-1], ups[1:]
    down_count = (~now).sum()
    p_recover = (~now & nxt).sum() / down_count  # P(down -> up) = b2g
    p_fail = (now & ~nxt).sum() / now.sum()  # P(up -> down) = g2b
    assert abs(p_recover - b2g) < 5 * np.sqrt(b2g * (1 - b2g) / down_count)
    assert abs(p_fail - g2b) < 5 * np.sqrt(g2b * (1 - g2b) / now.sum())
    # mean length of a down period: rounds spent down / periods ended (unbiased under the
    # window's censoring, unlike the mean of the complete runs) = 1 / p_recover ~ 1 / b2g = 4
    mean_down = 1.0 / p_recover
    assert abs(mean_down - 1 / b2g) < 5 * np.sqrt(b2g * (1 - b2g) / down_count) / b2g**2
    # iid links with the same up-rate would have down runs of mean 1 / (1 - pi_bad) = 1.2
    assert _complete_runs(ups, False).mean() > 3.0


def test_gilbert_elliott_chain_belongs_to_the_pair():
    # g2b = b2g = 1: the chain alternates deterministically, so its state after a gap is known
    cfg = LinksConfig(model="gilbert-elliott", ge_good_to_bad=1.0, ge_bad_to_good=1.0)
    dyn = NetworkDynamics(complete(40), cfg, 1, seed=0)
    base = dyn._base_edges0
    half = base[::2]
    up1 = dyn._link_up(1, base)
    assert up1 is not None and 0 < up1.sum() < up1.size
    up2 = dyn._link_up(2, half)  # the other half is out of range in round 2
    assert up2 is not None and np.array_equal(up2, ~up1[::2])
    up3 = dyn._link_up(3, base)  # back again: two steps for the absent ones, one for the others
    assert up3 is not None
    assert np.array_equal(up3[::2], up1[::2])
    assert np.array_equal(up3[1::2], up1[1::2])
    up6 = dyn._link_up(6, half)  # a gap of three rounds: three flips
    assert up6 is not None and np.array_equal(up6, ~up1[::2])


# --- devices -------------------------------------------------------------------------------------


def test_dropout_rate_and_absent_devices_never_communicate():
    q = 0.2
    topo = complete(40)
    dyn = NetworkDynamics(topo, LinksConfig(model="bernoulli", p_up=0.7, dropout=q), 1, seed=9)
    nets = run(dyn, 300)
    active = np.stack([net.active for net in nets])
    se = np.sqrt(q * (1 - q) / active.size)
    assert abs((~active).mean() - q) < 5 * se
    base_keys = set(map(tuple, topo.edges.tolist()))
    live_total = 0
    for net in nets:
        u, v = net.live_edges.T
        assert net.active[u].all() and net.active[v].all()
        assert set(map(tuple, net.live_edges.tolist())) <= base_keys
        assert np.all(net.live_edges[:, 0] < net.live_edges[:, 1])
        assert np.all(net.work[~net.active] == 0.0)
        live_total += net.live_edges.shape[0]
    rate = live_total / (len(nets) * topo.edges.shape[0])
    expected = expected_live_edge_rate(LinksConfig(model="bernoulli", p_up=0.7, dropout=q))
    assert expected == pytest.approx(0.7 * 0.8**2)
    assert abs(rate - expected) < 0.02  # ~5 s.e. (per-round dropout correlates the edges of a round)


def test_stragglers_rate_and_work_values():
    s, w = 0.3, 0.25
    cfg = LinksConfig(dropout=0.1, straggler_prob=s, straggler_work=w)
    nets = run(NetworkDynamics(complete(50), cfg, 1, seed=4), 300)
    work = np.stack([net.work for net in nets])
    active = np.stack([net.active for net in nets])
    assert set(np.unique(work).tolist()) == {0.0, w, 1.0}
    assert np.array_equal(work == 0.0, ~active)
    present = work[active]
    rate = (present == w).mean()
    assert abs(rate - s) < 5 * np.sqrt(s * (1 - s) / present.size)


def test_streams_are_independent():
    topo = complete(30)
    base = LinksConfig(model="bernoulli", p_up=0.5, dropout=0.2)
    a = run(NetworkDynamics(topo, base, 1, seed=1), 10)
    b = run(NetworkDynamics(topo, dataclasses.replace(base, straggler_prob=0.5), 1, seed=1), 10)
    c = run(NetworkDynamics(topo, dataclasses.replace(base, dropout=0.0), 1, seed=1), 10)
    for x, y, z in zip(a, b, c, strict=True):
        assert np.array_equal(x.active, y.active) and np.array_equal(x.live_edges, y.live_edges)
        # without dropout the link draws are unchanged: the live set only grows
        x_keys = set(map(tuple, x.live_edges.tolist()))
        assert x_keys <= set(map(tuple, z.live_edges.tolist()))


# --- sparse communication ------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 3, 5])
def test_cooperate_every_r_rounds(every):
    nets = run(NetworkDynamics(complete(5), LinksConfig(), every, seed=0), 20)
    assert [net.round for net in nets] == list(range(1, 21))
    assert [net.cooperate for net in nets] == [k % every == 0 for k in range(1, 21)]


def test_sparse_rounds_do_not_change_link_draws():
    cfg = LinksConfig(model="gilbert-elliott")
    a = run(NetworkDynamics(complete(20), cfg, 1, seed=3), 8)
    b = run(NetworkDynamics(complete(20), cfg, 4, seed=3), 8)
    assert all(np.array_equal(x.live_edges, y.live_edges) for x, y in zip(a, b, strict=True))


# --- mobility ------------------------------------------------------------------------------------


def test_mobility_stays_in_area_moves_at_most_speed_and_rebuilds_graph():
    topo = mobile_topology()
    speed, radius, area = 40.0, 80.0, 500.0
    cfg = LinksConfig(mobility_speed=speed, mobility_pause=2)
    dyn = NetworkDynamics(topo, cfg, 1, seed=7, radius=radius, area=area)
    assert not dyn.static
    nets = run(dyn, 60)
    assert np.array_equal(nets[0].base_edges, topo.edges)  # round 1: the topology as built
    assert nets[0].positions is not None and np.array_equal(nets[0].positions, topo.positions)
    prev = nets[0].positions
    moved = paused = 0
    for net in nets[1:]:
        pos = net.positions
        assert pos is not None
        assert pos.min() >= 0.0 and pos.max() <= area
        step = np.hypot(*(pos - prev).T)
        assert step.max() <= speed * (1 + 1e-9)
        moved += int((step > 0).sum())
        paused += int((step == 0).sum())
        prev = pos
        # brute force: exactly the pairs within range
        d = np.hypot(pos[:, None, 0] - pos[None, :, 0], pos[:, None, 1] - pos[None, :, 1])
        iu, iv = np.triu_indices(pos.shape[0], k=1)
        within = d[iu, iv] <= radius
        expected = np.stack([iu[within], iv[within]], axis=1)
        assert np.array_equal(net.base_edges, expected)
        assert np.array_equal(net.live_edges, net.base_edges)  # static links on top
        assert np.array_equal(net.base_edges, graph_edges(geometric_graph(pos, radius)))
    assert moved > 0 and paused > 0  # devices travel, reach waypoints and pause there
    assert not np.array_equal(nets[1].base_edges, nets[-1].base_edges)


def test_mobility_links_apply_on_rebuilt_graph():
    topo = mobile_topology()
    cfg = LinksConfig(model="bernoulli", p_up=0.5, dropout=0.1, mobility_speed=30.0)
    for net in run(NetworkDynamics(topo, cfg, 1, seed=1, radius=80.0, area=500.0), 20):
        base = set(map(tuple, net.base_edges.tolist()))
        assert set(map(tuple, net.live_edges.tolist())) <= base
        assert net.active[net.live_edges].all()


def test_mobile_gilbert_elliott_keeps_stationary_rate():
    cfg = LinksConfig(model="gilbert-elliott", ge_good_to_bad=0.2, ge_bad_to_good=0.3, mobility_speed=40.0)
    dyn = NetworkDynamics(mobile_topology(200), cfg, 1, seed=8, radius=80.0, area=500.0)
    nets = run(dyn, 150)
    up = sum(net.live_edges.shape[0] for net in nets)
    total = sum(net.base_edges.shape[0] for net in nets)
    # expected 0.6; ~5 s.e. allowing for the correlation of a pair's chain over time
    assert abs(up / total - expected_link_up_rate(cfg)) < 0.01


# --- determinism and resuming --------------------------------------------------------------------


def test_same_seed_same_sequence_different_seed_differs():
    topo = mobile_topology()
    a = run(NetworkDynamics(topo, FULL, 2, seed=42, radius=80.0, area=500.0), 15)
    b = run(NetworkDynamics(topo, FULL, 2, seed=42, radius=80.0, area=500.0), 15)
    c = run(NetworkDynamics(topo, FULL, 2, seed=43, radius=80.0, area=500.0), 15)
    assert same_rounds(a, b)
    assert not same_rounds(a, c)


@pytest.mark.parametrize(
    "cfg",
    [FULL, dataclasses.replace(FULL, mobility_speed=0.0), LinksConfig(model="bernoulli", p_up=0.4)],
)
def test_resume_from_state_dict_and_replay(cfg):
    topo = mobile_topology()
    make = lambda: NetworkDynamics(topo, cfg, 3, seed=5, radius=80.0, area=500.0)  # noqa: E731
    original = make()
    head = run(original, 25)
    state = original.state_dict()
    tail = run(original, 15)

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.round == 25
    assert same_rounds(run(resumed, 15), tail)

    replayed = make()
    replayed.advance_to(26)
    assert same_rounds(run(replayed, 15), tail)

    restarted = make()  # loading a round-0 state is a fresh start
    restarted.load_state_dict(make().state_dict())
    assert same_rounds(run(restarted, 25), head)


def test_state_dict_is_a_copy_and_checked():
    topo = mobile_topology()
    dyn = NetworkDynamics(topo, FULL, 1, seed=5, radius=80.0, area=500.0)
    run(dyn, 4)
    state = dyn.state_dict()
    snapshot = {k: np.array(v, copy=True) for k, v in state.items()}
    run(dyn, 4)
    assert all(np.array_equal(state[k], snapshot[k]) for k in state)
    other = NetworkDynamics(topo, FULL, 1, seed=6, radius=80.0, area=500.0)
    with pytest.raises(P2PLError, match="seed"):
        other.load_state_dict(state)


def test_round_arrays_are_read_only():
    net = NetworkDynamics(complete(6), LinksConfig(model="bernoulli", p_up=0.5), 1, seed=0).next_round()
    for arr in (net.live_edges, net.active, net.work, net.base_edges):
        with pytest.raises(ValueError):
            arr[...] = 0


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "topology", "message"),
    [
        ({"model": "markov"}, "ring", "unknown links.model"),
        ({"model": "bernoulli", "p_up": 1.5}, "ring", r"links.p_up .* \[0, 1\]"),
        ({"model": "bernoulli", "p_up": float("nan")}, "ring", "links.p_up"),
        ({"model": "bernoulli", "p_up": 0.0}, "ring", "never communicate"),
        ({"p_up": 0.5}, "ring", "only applies to links.model = 'bernoulli'"),
        ({"dropout": -0.1}, "ring", "links.dropout"),
        ({"dropout": 1.0}, "ring", "every device is absent"),
        ({"straggler_prob": 2.0}, "ring", "links.straggler_prob"),
        ({"straggler_work": 0.0}, "ring", r"straggler_work .* \(0, 1\]"),
        ({"straggler_work": 1.5}, "ring", "straggler_work"),
        ({"model": "gilbert-elliott", "ge_good_to_bad": -1.0}, "ring", "ge_good_to_bad"),
        ({"model": "gilbert-elliott", "ge_good_to_bad": 0.0, "ge_bad_to_good": 0.0}, "ring", "both 0"),
        ({"model": "gilbert-elliott", "ge_up_good": 0.0, "ge_up_bad": 0.0}, "ring", "never lets a link"),
        ({"mobility_speed": -1.0}, "random-geometric", "mobility_speed"),
        ({"mobility_pause": -2}, "random-geometric", "mobility_pause"),
        ({"mobility_speed": 0.1}, "ring", "random-geometric"),
    ],
)
def test_validate_links_errors(changes, topology, message):
    cfg = dataclasses.replace(LinksConfig(), **changes)
    with pytest.raises(P2PLError, match=message) as info:
        validate_links(cfg, topology)
    assert "\n" not in str(info.value)


def test_validate_links_accepts_good_configs():
    validate_links(LinksConfig(), "ring")
    validate_links(FULL, "random-geometric")
    validate_links(LinksConfig(model="bernoulli", p_up=0.01, straggler_work=1.0), "complete")


def test_dynamics_rejects_bad_arguments():
    with pytest.raises(P2PLError, match="every"):
        NetworkDynamics(complete(4), LinksConfig(), 0, seed=0)
    with pytest.raises(ValueError, match="radius"):
        NetworkDynamics(mobile_topology(), LinksConfig(mobility_speed=1.0), 1, seed=0)
    with pytest.raises(ValueError, match="area"):
        NetworkDynamics(mobile_topology(), LinksConfig(mobility_speed=1.0), 1, seed=0, radius=80.0, area=1.0)
    with pytest.raises(ValueError, match="go back"):
        dyn = NetworkDynamics(complete(4), LinksConfig(), 1, seed=0)
        run(dyn, 3)
        dyn.advance_to(2)


def test_default_area_is_unit_square():
    topo = build_topology(TopologyConfig(radius=0.3), 50, 0)
    dyn = NetworkDynamics(topo, LinksConfig(mobility_speed=0.05), 1, seed=0, radius=0.3)
    assert dyn.area == 1.0
    for net in run(dyn, 30):
        assert net.positions is not None and net.positions.min() >= 0.0 and net.positions.max() <= 1.0
