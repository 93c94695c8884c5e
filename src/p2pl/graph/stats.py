"""Graph statistics to report with every run: degrees, diameter, components, spectral gap of W."""

from __future__ import annotations

import networkx as nx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from p2pl.graph.topology import Topology
from p2pl.graph.weights import MixingWeights

# Exact diameter = one BFS per device. Above these sizes it is replaced by networkx's 2-sweep
# approximation, a lower bound, and "diameter_exact" says so.
EXACT_DIAMETER_MAX_DEVICES = 3000
EXACT_DIAMETER_MAX_WORK = 400_000_000  # N * (N + 2E) BFS steps: ~a few seconds in scipy's C BFS
DENSE_EIG_ALWAYS_MAX_DEVICES = 500  # dense eigenvalues below this; sparse ARPACK first above
DENSE_EIG_MAX_DEVICES = 2000  # dense fallback when ARPACK fails, up to this size
ARPACK_LM_MAXITER = 150  # restarts of plain ARPACK before switching to shift-invert (~seconds at 10k)


def _diameter(graph: nx.Graph, num_devices: int, num_edges: int) -> tuple[int, bool]:
    """(diameter, exact) of a connected graph."""
    if num_devices == 1:
        return 0, True
    if num_edges == num_devices * (num_devices - 1) // 2:
        return 1, True  # complete: no BFS needed (and the all-pairs BFS would be the slowest case)
    work = num_devices * (num_devices + 2 * num_edges)
    if num_devices > EXACT_DIAMETER_MAX_DEVICES or work > EXACT_DIAMETER_MAX_WORK:
        return int(nx.approximation.diameter(graph, seed=0)), False
    adj = nx.to_scipy_sparse_array(graph, nodelist=range(num_devices), format="csr")
    best = 0
    # All-pairs BFS in chunks of sources keeps memory at chunk x N instead of N x N.
    for start in range(0, num_devices, 256):
        sources = np.arange(start, min(start + 256, num_devices))
        dist = csgraph.shortest_path(adj, method="D", unweighted=True, directed=False, indices=sources)
        best = max(best, int(dist.max()))
    return best, True


def _sparse_second_magnitude(w: sp.csr_matrix, symmetric: bool) -> float | None:
    """|λ₂| of a large sparse W, or None if ARPACK does not converge.

    First plain largest-magnitude ARPACK with a bounded iteration count: fast when the gap is not
    tiny (expanders such as Erdős–Rényi, where an LU factorisation would fill in and take minutes).
    If that stalls — λ₂ within ~1e-5 of 1, as on a ring or grid of 10,000 devices — shift-invert
    just above 1 separates 1 and λ₂ by orders of magnitude, and the LU of such low-dimensional
    graphs stays sparse. It finds the eigenvalues nearest to 1, which are the top ones when the
    spectrum is real; that holds for every rule in :mod:`p2pl.graph.weights` (each W is diagonally
    similar to a symmetric matrix). A complex answer there means "not converged".
    """
    n = w.shape[0]
    solve = spla.eigsh if symmetric else spla.eigs
    v0 = np.random.default_rng(0).standard_normal(n)  # fixed start: same W => same reported numbers
    try:
        vals = solve(
            w,
            k=2,
            which="LM",
            return_eigenvectors=False,
            ncv=min(n - 1, 40),
            maxiter=ARPACK_LM_MAXITER,
            tol=1e-12,
            v0=v0,
        )
        return float(np.sort(np.abs(np.asarray(vals)))[0])
    except (spla.ArpackNoConvergence, spla.ArpackError):
        pass
    eps = 1e-6  # shift just outside [-1, 1] keeps W - σI non-singular
    try:
        top = solve(w, k=2, sigma=1.0 + eps, which="LM", return_eigenvectors=False, tol=1e-12, v0=v0)
    except (spla.ArpackNoConvergence, spla.ArpackError, RuntimeError, ValueError):
        return None
    if np.max(np.abs(np.imag(top))) > 1e-9:
        return None
    second = float(np.sort(np.real(top))[0])  # λ₂, just below λ₁ = 1
    # Gershgorin: every (real) eigenvalue is >= 2 W_nn − 1. If that already bounds λ_min above −λ₂,
    # |λ₂| wins without computing λ_min — good, since the bottom of a ring's spectrum is a tight
    # cluster near −1/3 where shift-invert needs a minute.
    if -float(np.min(2.0 * w.diagonal() - 1.0)) <= abs(second):
        return abs(second)
    try:
        bottom = solve(w, k=1, sigma=-1.0 - eps, which="LM", return_eigenvectors=False, tol=1e-10, v0=v0, maxiter=300)
    except (spla.ArpackNoConvergence, spla.ArpackError, RuntimeError, ValueError):
        return None
    if np.max(np.abs(np.imag(bottom))) > 1e-9:
        return None
    return max(abs(second), abs(float(np.real(bottom[0]))))


def _dense_second_magnitude(weights: MixingWeights, symmetric: bool) -> float:
    w = weights.dense()
    vals = np.linalg.eigvalsh(w) if symmetric else np.linalg.eigvals(w)
    return float(np.sort(np.abs(vals))[-2])


def spectral_gap(weights: MixingWeights) -> float | None:
    """1 − |λ₂| of W (W may be non-symmetric); None if no eigensolver converges.

    Dense LAPACK is the oracle, but on this class of machine a dense non-symmetric ``eig`` at 2000
    devices costs ~10 s of CPU (``eigvalsh`` ~2.5 s), against well under a second for ARPACK on the
    sparse W with the same answer to ~1e-13. So: dense up to 500 devices; sparse above, with a dense
    fallback up to 2000 devices when ARPACK fails; None if it fails on a larger graph.
    """
    n = weights.num_devices
    if n == 1:
        return 1.0  # a single device is its own average: consensus is immediate
    w = weights.to_sparse()
    symmetric = bool(abs(w - w.T).max() <= 1e-12) if w.nnz else True
    second: float | None
    if n <= DENSE_EIG_ALWAYS_MAX_DEVICES:
        second = _dense_second_magnitude(weights, symmetric)
    else:
        second = _sparse_second_magnitude(w, symmetric)
        if second is None and n <= DENSE_EIG_MAX_DEVICES:
            second = _dense_second_magnitude(weights, symmetric)
    if second is None:
        return None
    # W is non-negative and row-stochastic, so |λ| <= 1; clip rounding just outside [0, 1].
    return float(min(1.0, max(0.0, 1.0 - second)))


def graph_stats(topology: Topology, weights: MixingWeights) -> dict[str, float | int | None]:
    """Degree statistics, connectivity, diameter and spectral gap.

    ``diameter`` is exact when ``diameter_exact`` is true (N <= 3000 and not too dense);
    otherwise it is a lower bound from the 2-sweep heuristic. None when disconnected.
    """
    graph = topology.graph
    n = topology.num_devices
    degrees = np.fromiter((d for _, d in graph.degree()), dtype=np.int64, count=n)
    num_edges = int(graph.number_of_edges())
    components = int(nx.number_connected_components(graph))
    connected = components == 1
    diameter: int | None = None
    exact = True
    if connected:
        diameter, exact = _diameter(graph, n, num_edges)
    return {
        "devices": n,
        "edges": num_edges,
        "degree_min": int(degrees.min()),
        "degree_mean": float(degrees.mean()),
        "degree_max": int(degrees.max()),
        "degree_std": float(degrees.std()),
        "diameter": diameter,
        "diameter_exact": exact,
        "connected": connected,
        "components": components,
        "spectral_gap": spectral_gap(weights),
    }


def _num(value: float | int | None, fmt: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return format(value, fmt)


def format_stats(stats: dict[str, float | int | None]) -> str:
    """A few aligned lines for a terminal."""
    get = stats.get
    diameter = _num(get("diameter"))
    if get("diameter") is not None and not get("diameter_exact", True):
        diameter = f">= {diameter} (lower bound)"
    components = get("components")
    rows = [
        ("devices", f"{_num(get('devices'))}   edges {_num(get('edges'))}"),
        (
            "degree",
            f"min {_num(get('degree_min'))}   mean {_num(get('degree_mean'), '.3f')}   "
            f"max {_num(get('degree_max'))}   std {_num(get('degree_std'), '.3f')}",
        ),
        ("connected", f"{_num(get('connected'))} ({_num(components)} component{'s' if components != 1 else ''})"),
        ("diameter", diameter),
        ("spectral gap", _num(get("spectral_gap"))),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)
