from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from p2pl.config import TopologyConfig
from p2pl.errors import P2PLError
from p2pl.graph.topology import (
    TOPOLOGIES,
    Topology,
    auto_radius,
    build_topology,
    connected_radius,
    geometric_graph,
    longest_mst_edge,
    read_edge_list,
)


def build(name: str, n: int, seed: int = 0, **kw: object) -> Topology:
    return build_topology(TopologyConfig(name=name, **kw), n, seed)  # type: ignore[arg-type]


def degrees(topo: Topology) -> np.ndarray:
    return np.array([topo.graph.degree(i) for i in range(topo.num_devices)])


def assert_canonical(topo: Topology, n: int) -> None:
    assert topo.num_devices == n
    assert list(topo.graph.nodes) == list(range(n))
    e = topo.edges
    assert e.dtype == np.int64 and e.shape == (topo.graph.number_of_edges(), 2)
    assert np.all(e[:, 0] < e[:, 1])
    assert [tuple(r) for r in e.tolist()] == sorted(tuple(r) for r in e.tolist())
    assert nx.number_of_selfloops(topo.graph) == 0


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("complete", {}),
        ("ring", {}),
        ("grid", {}),
        ("torus", {}),
        ("star", {}),
        ("erdos-renyi", {"p": 0.3}),
        ("random-geometric", {"radius": 0.4}),
        ("small-world", {"k": 4, "rewire": 0.2}),
        ("barabasi-albert", {"m": 2}),
        ("random-regular", {"k": 3}),
    ],
)
def test_each_generated_topology_is_canonical_connected_and_deterministic(name: str, kw: dict) -> None:
    a = build(name, 36, seed=5, **kw)
    b = build(name, 36, seed=5, **kw)
    assert_canonical(a, 36)
    assert nx.is_connected(a.graph)
    np.testing.assert_array_equal(a.edges, b.edges)
    if a.positions is not None:
        np.testing.assert_array_equal(a.positions, b.positions)


def test_all_names_covered() -> None:
    assert set(TOPOLOGIES) == {
        "complete",
        "ring",
        "grid",
        "torus",
        "star",
        "erdos-renyi",
        "random-geometric",
        "directed-random-geometric",
        "small-world",
        "barabasi-albert",
        "random-regular",
        "edge-list",
    }


def test_random_topologies_change_with_seed() -> None:
    for name, kw in [("erdos-renyi", {"p": 0.3}), ("random-regular", {"k": 4}), ("random-geometric", {})]:
        assert not np.array_equal(build(name, 40, 1, **kw).edges, build(name, 40, 2, **kw).edges), name


def test_complete_ring_star() -> None:
    n = 12
    assert len(build("complete", n).edges) == n * (n - 1) // 2
    assert np.all(degrees(build("ring", n)) == 2)
    assert nx.is_isomorphic(build("ring", n).graph, nx.cycle_graph(n))
    star = build("star", n)
    assert degrees(star)[0] == n - 1 and np.all(degrees(star)[1:] == 1)
    assert len(build("ring", 2).edges) == 1  # no multi-edge for two devices


def test_grid_shape_and_torus_degrees() -> None:
    grid = build("grid", 12, rows=3)  # 3 x 4
    assert len(grid.edges) == 3 * 3 + 2 * 4
    assert grid.graph.has_edge(0, 1) and grid.graph.has_edge(0, 4) and not grid.graph.has_edge(3, 4)
    assert sorted(degrees(grid).tolist()).count(2) == 4  # four corners
    square = build("grid", 36)  # most square: 6 x 6
    assert nx.diameter(square.graph) == 10
    torus = build("torus", 20)  # 4 x 5
    assert np.all(degrees(torus) == 4)
    assert torus.graph.has_edge(0, 4) and torus.graph.has_edge(0, 15)  # wrap-arounds


def test_grid_rows_must_divide_devices() -> None:
    with pytest.raises(P2PLError, match=r"topology.rows = 7 .*divisor of 12"):
        build("grid", 12, rows=7)
    with pytest.raises(P2PLError, match="rows must be >= 0"):
        build("torus", 12, rows=-1)


def test_random_regular_degrees_and_parity() -> None:
    assert np.all(degrees(build("random-regular", 30, k=5)) == 5)
    with pytest.raises(P2PLError, match="even"):
        build("random-regular", 31, k=3)
    with pytest.raises(P2PLError, match="must be < devices"):
        build("random-regular", 6, k=6)


def test_barabasi_albert_and_small_world_edges() -> None:
    n, m = 50, 3
    assert len(build("barabasi-albert", n, m=m).edges) == (n - m) * m
    assert len(build("small-world", n, k=4, rewire=0.3).edges) == n * 2  # rewiring keeps the count
    with pytest.raises(P2PLError, match="even number"):
        build("small-world", n, k=3)


def test_metric_random_geometric_respects_range() -> None:
    topo = build("random-geometric", 200, seed=3, area_m=1000.0, range_m=150.0)
    pos = topo.positions
    assert pos is not None and pos.shape == (200, 2) and pos.dtype == np.float64
    assert pos.min() >= 0 and pos.max() <= 1000 and pos.max() > 1  # metres, not the unit square
    dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    expected = np.argwhere(np.triu(dist <= 150.0, k=1))
    np.testing.assert_array_equal(topo.edges, expected)


def test_unit_square_geometric_graph_matches_brute_force() -> None:
    pos = np.random.default_rng(0).random((150, 2))
    g = geometric_graph(pos, 0.15)
    dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    assert set(g.nodes) == set(range(150))
    assert {tuple(sorted(e)) for e in g.edges} == {tuple(e) for e in np.argwhere(np.triu(dist <= 0.15, 1))}
    with pytest.raises(P2PLError, match="radius"):
        geometric_graph(pos, 0.0)


def test_disconnected_is_refused_unless_allowed() -> None:
    with pytest.raises(P2PLError) as err:
        build("random-geometric", 100, radius=0.05)
    msg = str(err.value)
    assert "radius 0.05 is disconnected (" in msg and "components)" in msg
    assert "topology.allow_disconnected = true" in msg and "\n" not in msg
    topo = build("random-geometric", 100, radius=0.05, allow_disconnected=True)
    assert nx.number_connected_components(topo.graph) > 1
    with pytest.raises(P2PLError, match=r"erdos-renyi graph with p 0\.01 is disconnected"):
        build("erdos-renyi", 100, p=0.01)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "mesh"}, "unknown topology 'mesh'; choose one of: .*ring"),
        ({"name": "random-geometric", "radius": -1.0}, r"topology.radius must be >= 0 .*\(0: automatic\)"),
        ({"name": "random-geometric", "area_m": 100.0}, "topology.range_m must be > 0"),
        ({"name": "random-geometric", "range_m": 10.0}, "needs topology.area_m > 0"),
        ({"name": "erdos-renyi", "p": 0.0}, r"topology.p must be in \(0, 1\]"),
        ({"name": "erdos-renyi", "p": 1.5}, r"topology.p must be in \(0, 1\]"),
        ({"name": "small-world", "rewire": 2.0}, r"topology.rewire must be in \[0, 1\]"),
        ({"name": "barabasi-albert", "m": 0}, "topology.m must be >= 1"),
        ({"name": "barabasi-albert", "m": 10}, "must be < devices"),
        ({"name": "random-regular", "k": 0}, "topology.k must be >= 1"),
        ({"name": "edge-list"}, "topology.path is empty"),
    ],
)
def test_bad_parameters_are_one_line_errors(kw: dict, match: str) -> None:
    with pytest.raises(P2PLError, match=match) as err:
        build_topology(TopologyConfig(**kw), 10, 0)
    assert "\n" not in str(err.value)


def test_bad_device_count() -> None:
    with pytest.raises(P2PLError, match="positive integer"):
        build("ring", 0)


@pytest.mark.parametrize("name", [t for t in TOPOLOGIES if t != "edge-list"])
def test_single_device_is_allowed(name: str) -> None:
    topo = build(name, 1)
    assert topo.num_devices == 1 and topo.edges.shape == (0, 2)


def test_large_random_geometric_is_fast_enough() -> None:
    topo = build("random-geometric", 10_000, radius=0.03)
    assert topo.num_devices == 10_000
    assert 20 < topo.edges.shape[0] / 10_000 * 2 < 40  # mean degree ~ N pi r^2 = 28


# ---- edge lists ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edges.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_edge_list_parsing(tmp_path: Path) -> None:
    path = write(tmp_path, "# my network\n0 1\n\n1\t2   # trailing comment\n  2 3\n3 0\n1 0\n")
    g = read_edge_list(path, 5)
    assert list(g.nodes) == [0, 1, 2, 3, 4]  # device 4 isolated but present
    assert {tuple(sorted(e)) for e in g.edges} == {(0, 1), (1, 2), (2, 3), (0, 3)}
    topo = build("edge-list", 4, path=str(path))
    np.testing.assert_array_equal(topo.edges, [[0, 1], [0, 3], [1, 2], [2, 3]])
    with pytest.raises(P2PLError, match=r"from .*edges.txt.* is disconnected \(2 components\)"):
        build("edge-list", 5, path=str(path))
    assert build("edge-list", 5, path=str(path), allow_disconnected=True).num_devices == 5


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0 1\n1 2 3\n", r"edges.txt:2: expected two integer device ids"),
        ("0 1\n\nfoo bar\n", r"edges.txt:3: expected two integer"),
        ("0 1.5\n", r"edges.txt:1: expected two integer"),
        ("0\n", r"edges.txt:1: expected two integer"),
        ("# c\n0 1\n1 9\n", r"edges.txt:3: device id 9 is out of range for 5 devices"),
        ("0 -1\n", r"edges.txt:1: device id -1 is out of range"),
        ("0 1\n2 2\n", r"edges.txt:2: self-loop 2 2"),
    ],
)
def test_edge_list_errors_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(P2PLError, match=match) as err:
        read_edge_list(write(tmp_path, text), 5)
    assert "\n" not in str(err.value)


def test_edge_list_missing_file(tmp_path: Path) -> None:
    with pytest.raises(P2PLError, match=r"not found; set topology\.path"):
        read_edge_list(tmp_path / "nope.txt", 5)
    with pytest.raises(P2PLError, match="not found"):
        build("edge-list", 5, path=str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------------------------------------
# automatic radius (topology.radius = 0, the default): connected for any number of devices


def test_auto_radius_is_exactly_the_old_default_at_100_devices() -> None:
    assert auto_radius(100) == 0.25
    assert TopologyConfig().radius == 0  # the default is automatic
    auto, explicit = build("random-geometric", 100), build("random-geometric", 100, radius=0.25)
    assert auto.radius == 0.25
    np.testing.assert_array_equal(auto.edges, explicit.edges)  # the default experiment is unchanged
    # shrinks like sqrt(ln N / N), the connectivity threshold's shape
    assert auto_radius(10) > auto_radius(100) > auto_radius(1000) > auto_radius(10_000)
    assert auto_radius(1000) == pytest.approx(0.25 * np.sqrt((np.log(1000) / 1000) / (np.log(100) / 100)))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10, 16, 30, 64])
def test_default_random_geometric_graph_is_connected_for_few_devices(n: int) -> None:
    for seed in range(25):
        topo = build("random-geometric", n, seed)
        assert nx.is_connected(topo.graph), (n, seed)
        assert topo.radius is not None and topo.radius >= auto_radius(n)


def test_auto_radius_is_raised_just_enough_when_the_formula_leaves_the_graph_disconnected() -> None:
    # 10 devices from seed 85: the formula's radius leaves a device alone (found by search)
    topo = build("random-geometric", 10, 85)
    assert topo.positions is not None and topo.radius is not None
    formula = auto_radius(10)
    assert nx.number_connected_components(geometric_graph(topo.positions, formula)) > 1
    assert topo.radius > formula and nx.is_connected(topo.graph)
    # just above the longest edge of the Euclidean MST: any shorter radius disconnects the graph
    longest = longest_mst_edge(topo.positions)
    assert longest < topo.radius <= longest * (1 + 1e-6)
    assert nx.number_connected_components(geometric_graph(topo.positions, longest * (1 - 1e-9))) > 1
    # and reproducible: the positions come from the seed
    np.testing.assert_array_equal(build("random-geometric", 10, 85).edges, topo.edges)


@pytest.mark.parametrize("seed", range(6))
def test_longest_mst_edge_matches_a_dense_minimum_spanning_tree(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = rng.random((int(rng.integers(2, 300)), 2))
    full = nx.Graph()  # every pair, weighed by distance: the textbook MST, no triangulation
    for u in range(len(pos)):
        for v in range(u + 1, len(pos)):
            full.add_edge(u, v, weight=float(np.linalg.norm(pos[u] - pos[v])))
    expected = max(data["weight"] for *_, data in nx.minimum_spanning_edges(full, data=True))
    assert longest_mst_edge(pos) == pytest.approx(expected, rel=1e-12)
    assert connected_radius(pos, 1e-3) >= expected


def test_collinear_and_coincident_devices_still_get_a_connected_radius() -> None:
    line = np.stack([np.linspace(0, 1, 7) ** 2, np.zeros(7)], axis=1)  # no triangulation exists
    assert longest_mst_edge(line) == pytest.approx(1 - (5 / 6) ** 2)
    assert nx.is_connected(geometric_graph(line, connected_radius(line, 0.01)))
    same = np.zeros((5, 2))
    assert connected_radius(same, 0.01) == 0.01


def test_an_explicit_radius_keeps_refusing_a_disconnected_graph() -> None:
    with pytest.raises(P2PLError, match=r"radius 0\.2 is disconnected"):
        build("random-geometric", 10, 85, radius=0.2)
