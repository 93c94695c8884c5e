"""Communication topologies: which devices can exchange parameters.

Every graph has nodes exactly ``0..N-1`` (device ids) and no self-loops; a device always mixes
with itself through its self weight, never through an edge.

One topology has one-way links: ``directed-random-geometric`` places devices in the unit square
like ``random-geometric`` but gives each device its own radio range, so u may reach v while v
does not reach u. Its :attr:`Topology.arcs` hold the one-way links ``u -> v``; its ``graph`` is
the undirected support (a pair is linked when either direction is), which link failures, max
norm sync, sharding and statistics work on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from scipy.spatial import Delaunay, QhullError, cKDTree
from scipy.spatial.distance import pdist, squareform

from p2pl.config import TopologyConfig
from p2pl.errors import P2PLError, choose

TOPOLOGIES: tuple[str, ...] = (
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
)


# eq=False: the fields are a mutable graph and an array, so value equality/hashing is meaningless.
@dataclass(frozen=True, eq=False)
class Topology:
    """A built topology. Treat ``graph`` as read-only; link failures work on edge arrays instead."""

    name: str
    graph: nx.Graph  # nodes exactly 0..N-1
    positions: np.ndarray | None = None  # [N, 2] float64 for geometric graphs (unit square or metres)
    radius: float | None = None  # geometric graphs: the link range used (resolved when automatic)
    arcs: np.ndarray | None = None  # directed topologies: int64 [A, 2] one-way links u -> v, sorted
    ranges: np.ndarray | None = None  # directed-random-geometric: [N] each device's radio range

    @property
    def num_devices(self) -> int:
        return int(self.graph.number_of_nodes())

    @property
    def edges(self) -> np.ndarray:
        """int64 [E, 2] with u < v, rows sorted lexicographically (independent of insertion order)."""
        return graph_edges(self.graph)


def graph_edges(graph: nx.Graph) -> np.ndarray:
    """The undirected edges of ``graph`` as a canonical int64 [E, 2] array (u < v, sorted rows)."""
    edges = np.array(list(graph.edges()), dtype=np.int64).reshape(-1, 2)
    edges.sort(axis=1)
    edges = edges[edges[:, 0] != edges[:, 1]]  # defensive: self-loops are not links
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    return np.ascontiguousarray(edges[order])


def _graph_from_edges(num_devices: int, edges: np.ndarray) -> nx.Graph:
    graph = nx.Graph()
    graph.add_nodes_from(range(num_devices))  # isolated devices must still be nodes
    graph.add_edges_from(edges.tolist())
    graph.remove_edges_from(list(nx.selfloop_edges(graph)))
    return graph


def geometric_graph(positions: np.ndarray, radius: float) -> nx.Graph:
    """Link devices whose Euclidean distance is ``<= radius`` (k-d tree: fast at 10,000+ devices)."""
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[0] < 1:
        raise P2PLError(f"positions must be an [N, 2] array of device coordinates, got shape {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise P2PLError("positions contain NaN or infinite coordinates; give finite device positions")
    if not (math.isfinite(radius) and radius > 0):
        raise P2PLError(f"link radius must be a positive finite number, got {radius}")
    pairs = cKDTree(pos).query_pairs(r=float(radius), output_type="ndarray")  # distance <= r
    return _graph_from_edges(pos.shape[0], np.asarray(pairs, dtype=np.int64).reshape(-1, 2))


# The automatic radius is the connectivity-threshold shape sqrt(c ln N / (pi N)) scaled so that
# 100 devices get exactly 0.25, the radius the default experiment has always used.
AUTO_RADIUS_DEVICES, AUTO_RADIUS_AT = 100, 0.25
_UNIT_SQUARE_DIAGONAL = math.sqrt(2.0)  # a radius this large links every pair in the unit square


def auto_radius(num_devices: int) -> float:
    """The automatic link radius for ``num_devices`` devices in the unit square.

    ``r(N) = 0.25 * sqrt((ln N / N) / (ln 100 / 100))``: the same as ``sqrt(c ln N / (pi N))``
    with ``c`` such that ``r(100) = 0.25``, written as a ratio so that ``r(100)`` is exactly
    0.25 in floating point. Capped at the unit square's diagonal, beyond which nothing changes.
    """
    if num_devices < 2:
        return _UNIT_SQUARE_DIAGONAL  # one device: nothing to link, any radius will do
    n, n0 = float(num_devices), float(AUTO_RADIUS_DEVICES)
    ratio = (math.log(n) / n) / (math.log(n0) / n0)
    return min(AUTO_RADIUS_AT * math.sqrt(ratio), _UNIT_SQUARE_DIAGONAL)


def longest_mst_edge(positions: np.ndarray) -> float:
    """The longest edge of the positions' Euclidean minimum spanning tree: the smallest radius
    whose geometric graph is connected. The Delaunay triangulation contains the Euclidean MST,
    so only its O(N) edges are weighed (all pairs for tiny or degenerate point sets)."""
    pos = np.asarray(positions, dtype=np.float64)
    n = pos.shape[0]
    if n < 2:
        return 0.0
    try:
        if n < 4:
            raise QhullError("too few points to triangulate")
        simplices = Delaunay(pos).simplices
        pairs = np.concatenate([simplices[:, [0, 1]], simplices[:, [1, 2]], simplices[:, [0, 2]]])
        # each inner edge belongs to two triangles: once only (a sparse matrix sums duplicates)
        pairs = np.unique(np.sort(pairs, axis=1), axis=0)
        lengths = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
        weighted = coo_matrix((lengths, (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    except QhullError:  # collinear or too few points: weigh every pair
        weighted = squareform(pdist(pos))
    # Coincident devices give zero-length edges, which csgraph drops: the max still is the max.
    tree = minimum_spanning_tree(weighted)
    return float(tree.data.max()) if tree.nnz else 0.0


def _components(positions: np.ndarray, radius: float) -> int:
    """Connected components of the geometric graph (scipy: no networkx graph is built)."""
    n = positions.shape[0]
    pairs = cKDTree(positions).query_pairs(r=float(radius), output_type="ndarray").reshape(-1, 2)
    adjacency = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return int(connected_components(adjacency, directed=False, return_labels=False))


def connected_radius(positions: np.ndarray, radius: float) -> float:
    """``radius`` if it already links ``positions`` into one component, otherwise the smallest
    radius (just above the longest Euclidean MST edge) that does. Deterministic in the positions."""
    if positions.shape[0] < 2 or _components(positions, radius) == 1:
        return radius
    # Just above the longest edge, so a last-bit difference between the k-d tree's distances
    # and ours cannot drop it; checked, and raised again in the (never seen) case it did.
    raised = max(radius, longest_mst_edge(positions) * (1 + 1e-9))
    while _components(positions, raised) > 1:
        raised *= 1 + 1e-6
    return raised


def directed_arcs(positions: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """One-way links ``u -> v`` where v is within u's own radio range, int64 [A, 2] sorted."""
    pos = np.asarray(positions, dtype=np.float64)
    reach = np.asarray(ranges, dtype=np.float64)
    tree = cKDTree(pos)
    pairs = (
        tree.query_pairs(r=float(reach.max()), output_type="ndarray").reshape(-1, 2)
        if len(pos) > 1
        else (np.zeros((0, 2), dtype=np.int64))
    )
    both = np.concatenate([pairs, pairs[:, ::-1]]).astype(np.int64)
    dist = np.linalg.norm(pos[both[:, 0]] - pos[both[:, 1]], axis=1)
    arcs = both[dist <= reach[both[:, 0]]]
    return np.ascontiguousarray(arcs[np.lexsort((arcs[:, 1], arcs[:, 0]))])


def strongly_connected(num_devices: int, arcs: np.ndarray) -> int:
    """Strongly connected components of the directed graph (1: every device reaches every other)."""
    a = np.asarray(arcs, dtype=np.int64).reshape(-1, 2)
    adjacency = coo_matrix((np.ones(len(a)), (a[:, 0], a[:, 1])), shape=(num_devices, num_devices))
    return int(connected_components(adjacency, directed=True, connection="strong", return_labels=False))


def radio_ranges(radius: float, spread: float, draws: np.ndarray) -> np.ndarray:
    """Per-device ranges uniform in ``[radius (1 - spread), radius (1 + spread)]`` from uniform ``draws``."""
    return radius * (1.0 + spread * (2.0 * np.asarray(draws, dtype=np.float64) - 1.0))


def _directed_geometric(cfg: TopologyConfig, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float, np.ndarray]:
    """Positions, centre radius and per-device ranges of a directed random geometric graph.

    An automatic radius (``topology.radius = 0``) starts from the undirected graph's automatic
    radius and grows by 2 % steps until every device reaches every other (strongly connected):
    once the shortest range covers the longest Euclidean MST edge every MST link runs both ways,
    so the search ends."""
    positions = rng.random((n, 2))
    draws = rng.random(n)  # after the positions: the same seed places devices as random-geometric does
    radius, spread = cfg.radius, cfg.range_spread
    if radius == 0:
        radius = auto_radius(n)
        while n > 1 and strongly_connected(n, directed_arcs(positions, radio_ranges(radius, spread, draws))) > 1:
            radius *= 1.02
    return positions, radius, radio_ranges(radius, spread, draws)


def read_edge_list(path: str | Path, num_devices: int) -> nx.Graph:
    """Read a user's edge list: one ``u v`` pair of device ids per line; ``#`` comments allowed."""
    file = Path(path)
    if not file.is_file():
        raise P2PLError(f"edge-list file {str(file)!r} not found; set topology.path to an existing file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise P2PLError(f"cannot read edge-list file {str(file)!r}: {err}") from None
    edges: list[tuple[int, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{file}:{lineno}"
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            u, v = int(parts[0]), int(parts[1])
        except ValueError:
            raise P2PLError(
                f"{where}: expected two integer device ids 'u v', got {raw.strip()!r}; "
                "fix the line or comment it out with '#'"
            ) from None
        for node in (u, v):
            if not 0 <= node < num_devices:
                raise P2PLError(
                    f"{where}: device id {node} is out of range for {num_devices} devices; "
                    f"ids must be in [0, {num_devices - 1}] (or raise `devices`)"
                )
        if u == v:
            raise P2PLError(f"{where}: self-loop {u} {v}; a device always mixes with itself, remove the line")
        edges.append((u, v))
    return _graph_from_edges(num_devices, np.asarray(edges, dtype=np.int64).reshape(-1, 2))


def _grid_shape(rows: int, num_devices: int, name: str) -> tuple[int, int]:
    if rows < 0:
        raise P2PLError(f"topology.rows must be >= 0 (0: most square), got {rows}")
    if rows == 0:
        # Most square factorisation; a prime N degenerates to 1 x N (a path / ring), which is valid.
        rows = max(r for r in range(1, math.isqrt(num_devices) + 1) if num_devices % r == 0)
    if num_devices % rows != 0:
        divisors = [r for r in range(1, num_devices + 1) if num_devices % r == 0]
        raise P2PLError(
            f"{name} with topology.rows = {rows} cannot hold {num_devices} devices (rows x cols must "
            f"equal devices); set topology.rows to a divisor of {num_devices} "
            f"({', '.join(map(str, divisors[:12]))}{', ...' if len(divisors) > 12 else ''}) or 0"
        )
    return rows, num_devices // rows


def _lattice(rows: int, cols: int, wrap: bool) -> nx.Graph:
    """Grid/torus with device id ``r * cols + c`` (built from arrays: grid_2d_graph relabels slowly)."""
    ids = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    if wrap:
        right, down = np.roll(ids, -1, axis=1), np.roll(ids, -1, axis=0)
        pairs = [np.stack([ids.ravel(), right.ravel()], 1), np.stack([ids.ravel(), down.ravel()], 1)]
    else:
        pairs = [
            np.stack([ids[:, :-1].ravel(), ids[:, 1:].ravel()], 1),
            np.stack([ids[:-1, :].ravel(), ids[1:, :].ravel()], 1),
        ]
    # With 1 or 2 rows/cols the wrap creates self-loops/duplicates; _graph_from_edges drops them.
    return _graph_from_edges(rows * cols, np.concatenate(pairs))


def _check_parameters(cfg: TopologyConfig, name: str) -> None:
    """N-independent checks, done first so a bad config fails the same way for every N."""
    if name == "erdos-renyi" and not 0 < cfg.p <= 1:
        raise P2PLError(f"topology.p must be in (0, 1] for erdos-renyi, got {cfg.p}")
    if name == "random-geometric":
        if not cfg.area_m >= 0:
            raise P2PLError(f"topology.area_m must be >= 0 (0: unit square), got {cfg.area_m}")
        if cfg.area_m > 0:
            if not (math.isfinite(cfg.range_m) and cfg.range_m > 0):
                raise P2PLError(
                    f"topology.range_m must be > 0 metres when topology.area_m = {cfg.area_m}, "
                    f"got {cfg.range_m}; set the radio range, e.g. topology.range_m = 100"
                )
        else:
            if cfg.range_m != 0:
                raise P2PLError(
                    f"topology.range_m = {cfg.range_m} needs topology.area_m > 0 (the side of the area "
                    "in metres); set topology.area_m, or use topology.radius for the unit square"
                )
            if not (math.isfinite(cfg.radius) and cfg.radius >= 0):
                raise P2PLError(f"topology.radius must be >= 0 for random-geometric (0: automatic), got {cfg.radius}")
    if name == "directed-random-geometric":
        if not (math.isfinite(cfg.radius) and cfg.radius >= 0):
            raise P2PLError(f"topology.radius must be >= 0 for {name} (0: automatic), got {cfg.radius}")
        if not 0 <= cfg.range_spread < 1:
            raise P2PLError(f"topology.range_spread must be in [0, 1) for {name}, got {cfg.range_spread}")
        if cfg.area_m or cfg.range_m:
            raise P2PLError(f"{name} lives in the unit square; drop topology.area_m / range_m, use topology.radius")
    if name == "small-world":
        if cfg.k < 2 or cfg.k % 2:
            raise P2PLError(f"topology.k must be an even number >= 2 for small-world, got {cfg.k}")
        if not 0 <= cfg.rewire <= 1:
            raise P2PLError(f"topology.rewire must be in [0, 1], got {cfg.rewire}")
    if name == "barabasi-albert" and cfg.m < 1:
        raise P2PLError(f"topology.m must be >= 1 for barabasi-albert, got {cfg.m}")
    if name == "random-regular" and cfg.k < 1:
        raise P2PLError(f"topology.k must be >= 1 for random-regular, got {cfg.k}")
    if name == "edge-list" and not cfg.path:
        raise P2PLError("topology.path is empty; set it to an edge-list file for topology 'edge-list'")


def _disconnected_hint(cfg: TopologyConfig, name: str) -> tuple[str, str]:
    """(what was built, how to connect it) for the disconnected-graph message."""
    if name == "directed-random-geometric":
        return f" with radius {cfg.radius:g}", "increase topology.radius (0: automatic)"
    if name == "random-geometric":
        if cfg.area_m > 0:
            return f" with range {cfg.range_m:g} m in a {cfg.area_m:g} m square", "increase topology.range_m"
        return f" with radius {cfg.radius:g}", "increase topology.radius"
    if name == "erdos-renyi":
        return f" with p {cfg.p:g}", "increase topology.p"
    if name in ("random-regular", "small-world"):
        return f" with k {cfg.k}", "increase topology.k"
    if name == "edge-list":
        return f" from {cfg.path!r}", "add links to the edge list"
    return "", "change the topology"


def build_topology(cfg: TopologyConfig, num_devices: int, seed: int) -> Topology:
    """Build ``cfg.name`` over ``num_devices`` devices; same (cfg, N, seed) => identical graph."""
    name = choose("topology", cfg.name, TOPOLOGIES)
    n = num_devices
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise P2PLError(f"devices must be a positive integer, got {num_devices!r}")
    n = int(n)
    _check_parameters(cfg, name)
    # One generator for everything random here: positions come from it, networkx gets an int from it.
    rng = np.random.default_rng(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    positions: np.ndarray | None = None
    radius: float | None = None
    arcs: np.ndarray | None = None
    ranges: np.ndarray | None = None

    if name == "directed-random-geometric":
        positions, radius, ranges = _directed_geometric(cfg, n, rng)
        arcs = directed_arcs(positions, ranges)
        graph = _graph_from_edges(n, arcs)
    elif name == "random-geometric":
        side = cfg.area_m if cfg.area_m > 0 else 1.0
        radius = cfg.range_m if cfg.area_m > 0 else cfg.radius
        positions = rng.random((n, 2)) * side
        if radius == 0:  # automatic (unit square only): connected whatever the number of devices
            radius = connected_radius(positions, auto_radius(n))
        graph = geometric_graph(positions, radius)
    elif name == "edge-list":
        graph = read_edge_list(cfg.path, n)
    elif n == 1:
        graph = _graph_from_edges(1, np.empty((0, 2), dtype=np.int64))  # one device, nothing to link
    elif name == "complete":
        graph = nx.complete_graph(n)
    elif name == "ring":
        graph = nx.cycle_graph(n) if n >= 3 else nx.path_graph(n)  # a cycle needs 3+ devices
    elif name in ("grid", "torus"):
        rows, cols = _grid_shape(cfg.rows, n, name)
        graph = _lattice(rows, cols, wrap=name == "torus")
    elif name == "star":
        graph = nx.star_graph(n - 1)  # centre is device 0
    else:
        graph = _random_graph(cfg, name, n, int(rng.integers(2**31 - 1)))

    if set(graph.nodes) != set(range(n)):  # a bug here, not user input
        raise AssertionError(f"{name} graph nodes are not exactly 0..{n - 1}")
    # Canonical form: nodes inserted in id order, edges sorted, plain nx.Graph, whatever the generator.
    graph = _graph_from_edges(n, graph_edges(graph))
    if not cfg.allow_disconnected and n > 1:
        components = nx.number_connected_components(graph) if arcs is None else strongly_connected(n, arcs)
        if components > 1:
            detail, fix = _disconnected_hint(cfg, name)
            raise P2PLError(
                f"{name} graph{detail} is disconnected ({components} {'strong ' if arcs is not None else ''}"
                f"components); "
                f"{fix} or set topology.allow_disconnected = true"
            )
    return Topology(name=name, graph=graph, positions=positions, radius=radius, arcs=arcs, ranges=ranges)


def _random_graph(cfg: TopologyConfig, name: str, n: int, nx_seed: int) -> nx.Graph:
    if name == "erdos-renyi":
        # fast_gnp is O(N + E); gnp_random_graph is O(N^2) and too slow at 10,000 devices.
        return nx.fast_gnp_random_graph(n, cfg.p, seed=nx_seed)
    if name == "small-world":
        if cfg.k >= n:
            raise P2PLError(f"topology.k = {cfg.k} must be < devices = {n} for small-world; lower topology.k")
        if cfg.allow_disconnected:
            return nx.watts_strogatz_graph(n, cfg.k, cfg.rewire, seed=nx_seed)
        try:  # retries rewiring until connected, instead of refusing the first unlucky draw
            return nx.connected_watts_strogatz_graph(n, cfg.k, cfg.rewire, tries=100, seed=nx_seed)
        except nx.NetworkXError:
            raise P2PLError(
                f"small-world graph with k {cfg.k} and rewire {cfg.rewire:g} stayed disconnected after "
                "100 tries; increase topology.k or set topology.allow_disconnected = true"
            ) from None
    if name == "barabasi-albert":
        if cfg.m >= n:
            raise P2PLError(f"topology.m = {cfg.m} must be < devices = {n} for barabasi-albert; lower it")
        return nx.barabasi_albert_graph(n, cfg.m, seed=nx_seed)
    if name == "random-regular":
        if cfg.k >= n:
            raise P2PLError(f"topology.k = {cfg.k} must be < devices = {n} for random-regular; lower it")
        if (n * cfg.k) % 2:
            raise P2PLError(f"random-regular needs devices * k even, got {n} * {cfg.k}; change topology.k or devices")
        return nx.random_regular_graph(cfg.k, n, seed=nx_seed)
    raise AssertionError(f"unhandled topology {name!r}")  # TOPOLOGIES and this function disagree
