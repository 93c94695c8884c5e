"""Who hears whom in the decentralized baselines' stages, as :class:`~p2pl.core.cooperate.Neighbourhoods`.

P2PL's gossip hears every live neighbour with W's weights (``core.rounds.network_neighbourhoods``).
The baselines select differently, and each selection is one function here, used over the whole
network by the simulator and the Ray driver and over one row by a real node:

* **one random peer** (``Gossip(peers="one-random")``): every device sends its row to one live
  neighbour, drawn uniformly by keyed randomness (:func:`peer_choice`: a node draws exactly the
  simulator's choice, and can compute a neighbour's choice from that neighbour's neighbour list);
  each receiver weighs itself and every row it received equally, ``1 / (1 + k)`` for ``k`` rows.
* **push-sum** (:class:`~p2pl.core.cooperate.PushSum`): over directed arcs ``u -> v`` (u's radio
  reaches v), every device splits its push-sum weight ``w`` equally among itself and its live
  out-neighbours; the receiver's row of weights is each share over the sum of the shares it got.
"""

from __future__ import annotations

import numpy as np

from p2pl.core.cooperate import Neighbourhoods
from p2pl.core.rng import keyed_uniform


def peer_choice(
    seed: int, round_index: int, step: int, devices: np.ndarray, indptr: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """The neighbour each of ``devices`` sends to in this (round, step): device ``i`` picks
    uniformly among ``candidates[indptr[i]:indptr[i + 1]]`` (its live neighbours in ascending
    order); -1 for a device with none. Keyed by (seed, round, step, device) only."""
    devices = np.asarray(devices, dtype=np.int64)
    degree = np.diff(np.asarray(indptr, dtype=np.int64))
    u = keyed_uniform(seed, "gossip-peer", (round_index, step), devices)
    pick = np.minimum((u * degree).astype(np.int64), np.maximum(degree - 1, 0))
    start = np.asarray(indptr[:-1], dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    chosen = candidates[np.minimum(start + pick, max(len(candidates) - 1, 0))] if len(candidates) else pick
    return np.where(degree > 0, chosen, -1)


def neighbour_lists(num_devices: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, neighbours): every device's neighbours over undirected ``edges``, ascending."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    dev = np.concatenate([e[:, 0], e[:, 1]])
    nbr = np.concatenate([e[:, 1], e[:, 0]])
    order = np.lexsort((nbr, dev))
    indptr = np.zeros(num_devices + 1, dtype=np.int64)
    np.cumsum(np.bincount(dev, minlength=num_devices), out=indptr[1:])
    return indptr, nbr[order]


def one_peer_neighbourhoods(
    num_devices: int, live_edges: np.ndarray, seed: int, round_index: int, step: int, mute: np.ndarray | None = None
) -> Neighbourhoods:
    """Every device sends to one random live neighbour; receivers average equally (pool = all
    rows). ``mute`` (bool [N]) marks devices whose message never arrives (silent attackers)."""
    indptr, neighbours = neighbour_lists(num_devices, live_edges)
    devices = np.arange(num_devices, dtype=np.int64)
    target = peer_choice(seed, round_index, step, devices, indptr, neighbours)
    sends = target >= 0
    if mute is not None:
        sends &= ~np.asarray(mute, dtype=bool)
    senders = devices[sends]  # ascending: each receiver hears its senders in index order
    receivers = target[sends]
    heard = np.bincount(receivers, minlength=num_devices)
    share = 1.0 / (1.0 + heard)
    return Neighbourhoods.from_edges(num_devices, receivers, senders, share[receivers], share)


def both_directions(edges: np.ndarray) -> np.ndarray:
    """Undirected links as arcs both ways, int64 [2E, 2]."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    return np.concatenate([e, e[:, ::-1]])


def live_arcs(arcs: np.ndarray, live_edges: np.ndarray, num_devices: int) -> np.ndarray:
    """The arcs whose device pair is linked this round (a link failure, an absent device or a
    silent attacker takes both directions of a pair down)."""
    arcs = np.asarray(arcs, dtype=np.int64).reshape(-1, 2)
    live = np.asarray(live_edges, dtype=np.int64).reshape(-1, 2)
    n = np.int64(num_devices)
    pair = np.minimum(arcs[:, 0], arcs[:, 1]) * n + np.maximum(arcs[:, 0], arcs[:, 1])
    up = np.minimum(live[:, 0], live[:, 1]) * n + np.maximum(live[:, 0], live[:, 1])
    return arcs[np.isin(pair, up)]


def push_sum_shares(weight: np.ndarray, out_degree: np.ndarray) -> np.ndarray:
    """What each device keeps and sends to each live out-neighbour: ``w / (1 + out-degree)``."""
    return np.asarray(weight, dtype=np.float64) / (1.0 + np.asarray(out_degree, dtype=np.float64))


def push_sum_row(own_share: float, shares: list[float]) -> tuple[float, list[float], float]:
    """One receiver's push-sum mix from its own share and the shares it received:
    ``(self weight, neighbour weights, new push-sum weight)`` (a node's view of
    :func:`push_sum_neighbourhoods`)."""
    total = own_share + float(np.sum(np.asarray(shares, dtype=np.float64)))
    return own_share / total, [s / total for s in shares], total


def push_sum_neighbourhoods(
    num_devices: int, arcs: np.ndarray, weight: np.ndarray
) -> tuple[Neighbourhoods, np.ndarray]:
    """Push-sum over the live ``arcs`` (int64 [A, 2], u -> v) from the devices' push-sum weights
    ``weight`` [N]: the receivers' rows of weights (pool = all rows) and the new weights.

    Column stochastic: every device's shares add up to its weight, so ``Σ w`` and ``Σ w z`` are
    preserved by the mix."""
    arcs = np.asarray(arcs, dtype=np.int64).reshape(-1, 2)
    arcs = arcs[np.lexsort((arcs[:, 0], arcs[:, 1]))]  # each receiver hears its senders in index order
    src, dst = arcs[:, 0], arcs[:, 1]
    share = push_sum_shares(weight, np.bincount(src, minlength=num_devices))
    new = share + np.bincount(dst, weights=share[src], minlength=num_devices)
    hoods = Neighbourhoods.from_edges(num_devices, dst, src, share[src] / new[dst], share / new)
    return hoods, new


__all__ = [
    "both_directions",
    "live_arcs",
    "neighbour_lists",
    "one_peer_neighbourhoods",
    "peer_choice",
    "push_sum_neighbourhoods",
    "push_sum_row",
    "push_sum_shares",
]
