from __future__ import annotations

import functools
import os
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from p2pl.config import TopologyConfig
from p2pl.graph import stats as stats_mod
from p2pl.graph.draw import draw_topology
from p2pl.graph.stats import format_stats, graph_stats, spectral_gap
from p2pl.graph.topology import Topology, build_topology
from p2pl.graph.weights import MixingWeights, mixing_weights


def ring_gap(n: int) -> float:
    # Metropolis on a ring: W = (I + A) / 3, eigenvalues (1 + 2 cos(2 pi k / n)) / 3.
    return 1.0 - (1.0 + 2.0 * np.cos(2.0 * np.pi / n)) / 3.0


def stats_for(topo: Topology, rule: str = "metropolis") -> dict:
    return graph_stats(topo, mixing_weights(topo.num_devices, topo.edges, rule))


@pytest.fixture
def sparse_above_100(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send graphs above 100 devices down the sparse eigensolver path (default: above 500)."""
    monkeypatch.setattr(stats_mod, "DENSE_EIG_ALWAYS_MAX_DEVICES", 100)
    monkeypatch.setattr(stats_mod, "DENSE_EIG_MAX_DEVICES", 100)  # no silent dense fallback


# 11, 20: dense; 300, 800: sparse. shift_invert=True starves plain ARPACK to force the fallback.
@pytest.mark.parametrize(("n", "shift_invert"), [(11, False), (20, False), (300, False), (800, True)])
def test_ring_stats_match_closed_form(
    n: int, shift_invert: bool, sparse_above_100: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shift_invert:
        monkeypatch.setattr(stats_mod, "ARPACK_LM_MAXITER", 1)
    topo = build_topology(TopologyConfig(name="ring"), n, 0)
    st = stats_for(topo)
    assert st["devices"] == n and st["edges"] == n
    assert st["degree_min"] == st["degree_max"] == 2 and st["degree_mean"] == 2.0 and st["degree_std"] == 0.0
    assert st["diameter"] == n // 2 and st["diameter_exact"] is True
    assert st["connected"] is True and st["components"] == 1
    assert st["spectral_gap"] == pytest.approx(ring_gap(n), abs=1e-9)


def test_star_degrees_and_nonsymmetric_gap() -> None:
    topo = build_topology(TopologyConfig(name="star"), 9, 0)
    w = mixing_weights(9, topo.edges, "uniform")
    st = graph_stats(topo, w)
    assert (st["degree_min"], st["degree_max"], st["diameter"]) == (1, 8, 2)
    assert st["degree_mean"] == pytest.approx(16 / 9)
    expected = 1 - np.sort(np.abs(np.linalg.eigvals(w.dense())))[-2]
    assert st["spectral_gap"] == pytest.approx(expected, abs=1e-12)
    assert 0 < st["spectral_gap"] < 1


@pytest.mark.parametrize("shift_invert", [False, True])
@pytest.mark.parametrize(
    ("name", "rule"), [("random-geometric", "data-size"), ("random-geometric", "metropolis"), ("star", "data-size")]
)
def test_sparse_path_agrees_with_dense(
    name: str, rule: str, shift_invert: bool, sparse_above_100: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # data-size has tiny self weights, so the shift-invert path must also find λ_min near −1.
    if shift_invert:
        monkeypatch.setattr(stats_mod, "ARPACK_LM_MAXITER", 1)
    w = rgg_or_star_weights(name, rule)
    assert spectral_gap(w) == pytest.approx(dense_gap(name, rule), abs=1e-9)


@functools.cache
def rgg_or_star_weights(name: str, rule: str) -> MixingWeights:
    topo = build_topology(TopologyConfig(name=name, radius=0.15), 250, 1)
    return mixing_weights(250, topo.edges, rule, data_sizes=np.arange(1.0, 251.0))


@functools.cache
def dense_gap(name: str, rule: str) -> float:  # cached: a dense eig is the slow part of this test
    w = rgg_or_star_weights(name, rule).dense()
    return float(1 - np.sort(np.abs(np.linalg.eigvals(w)))[-2])


def test_disconnected_graph() -> None:
    topo = build_topology(TopologyConfig(name="random-geometric", radius=0.1, allow_disconnected=True), 60, 0)
    st = stats_for(topo)
    assert st["connected"] is False and st["components"] == nx.number_connected_components(topo.graph) > 1
    assert st["diameter"] is None
    assert st["spectral_gap"] == pytest.approx(0.0, abs=1e-9)  # eigenvalue 1 per component


def test_single_device() -> None:
    st = stats_for(build_topology(TopologyConfig(name="complete"), 1, 0))
    assert st["devices"] == 1 and st["edges"] == 0 and st["diameter"] == 0 and st["spectral_gap"] == 1.0


def test_large_graph_diameter_is_a_marked_lower_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats_mod, "EXACT_DIAMETER_MAX_DEVICES", 10)
    topo = build_topology(TopologyConfig(name="grid"), 30, 0)  # 5 x 6: diameter 9
    st = stats_for(topo)
    assert st["diameter_exact"] is False
    assert st["diameter"] is not None and 5 <= st["diameter"] <= 9
    assert ">= " in format_stats(st) and "lower bound" in format_stats(st)


def test_format_stats_is_aligned() -> None:
    text = format_stats(stats_for(build_topology(TopologyConfig(name="ring"), 10, 0)))
    lines = text.splitlines()
    assert 3 <= len(lines) <= 8
    assert "10" in lines[0] and "diameter" in text and "spectral gap" in text
    starts = {len(line) - len(line[line.index("  ") :].lstrip()) for line in lines}
    assert len(starts) == 1  # values start in one column


@pytest.mark.parametrize("name", ["ring", "random-geometric"])
def test_draw_writes_png_atomically(tmp_path: Path, name: str) -> None:
    topo = build_topology(TopologyConfig(name=name, radius=0.4, allow_disconnected=True), 15, 0)
    out = tmp_path / "sub" / "topology.png"
    draw_topology(topo, out, title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["topology.png"]  # no temp file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
