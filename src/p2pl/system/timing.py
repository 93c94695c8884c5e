"""How long a synchronous round takes: training, the device-to-device exchange, the edge server.

All functions are pure, over arrays with one entry per device (``[N]``) or per live undirected
edge (``[E]``); nothing here knows about files or torch. Formulas in docs/system-model.md.

P2PL (straggler-aware): device ``n`` finishes training at ``train_s[n]``; it mixes once every live
neighbour has finished too, then exchanges, so ``finish[n] = max(train_s[n], max_m train_s[m]) +
exchange_s[n]`` over its live neighbours ``m``; the round lasts ``max_n finish[n]``.

FedAvg: devices upload to the edge server as they finish training, over one shared uplink; the
server averages once every upload has arrived and broadcasts the average to all present devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = 8.0


@dataclass(frozen=True)
class Airtime:
    """Per device: seconds its radio transmits and receives, and its exchange time in the round."""

    tx_s: np.ndarray
    rx_s: np.ndarray
    exchange_s: np.ndarray


def training_seconds(flops: np.ndarray, device_flops: np.ndarray) -> np.ndarray:
    return flops / device_flops


def neighbour_max(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``max(values[n], values[m] for live neighbours m)`` per device."""
    out = values.copy()
    if len(edges):
        np.maximum.at(out, edges[:, 0], values[edges[:, 1]])
        np.maximum.at(out, edges[:, 1], values[edges[:, 0]])
    return out


def peer_airtime(
    edges: np.ndarray,
    bytes_sent: np.ndarray,
    rates_bps: np.ndarray,
    latency_s: float,
    shared_medium: bool,
) -> Airtime:
    """Device-to-device exchange over the live ``edges [E, 2]`` with per-edge rates.

    A device's ``bytes_sent`` (as the algorithm counted them) are split evenly over its live links.
    Without a shared medium every link is its own channel and the links run in parallel: a
    device's exchange lasts as long as its slowest link, both directions. With a shared medium a
    device's neighbourhood is one channel: its exchange lasts the airtime of every transmission
    in it (its own and its neighbours').
    """
    n = len(bytes_sent)
    tx = np.zeros(n)
    rx = np.zeros(n)
    exchange = np.zeros(n)
    if len(edges) == 0:
        return Airtime(tx, rx, exchange)
    u, v = edges[:, 0], edges[:, 1]
    degree = np.bincount(edges.ravel(), minlength=n)
    per_link_bits = np.divide(bytes_sent * BITS, degree, out=np.zeros(n), where=degree > 0)
    t_uv = per_link_bits[u] / rates_bps  # u -> v
    t_vu = per_link_bits[v] / rates_bps
    tx += np.bincount(u, t_uv, n) + np.bincount(v, t_vu, n)
    rx += np.bincount(v, t_uv, n) + np.bincount(u, t_vu, n)
    if shared_medium:
        exchange = tx + np.bincount(u, tx[v], n) + np.bincount(v, tx[u], n)
    else:
        slowest = np.maximum(t_uv, t_vu)
        np.maximum.at(exchange, u, slowest)
        np.maximum.at(exchange, v, slowest)
    exchange = np.where(degree > 0, exchange + latency_s, 0.0)
    return Airtime(tx, rx, exchange)


def peer_finish(train_s: np.ndarray, edges: np.ndarray, exchange_s: np.ndarray) -> np.ndarray:
    """Each device's finish time: it waits only for its live neighbours' training, then exchanges."""
    return neighbour_max(train_s, edges) + exchange_s


@dataclass(frozen=True)
class ServerRound:
    duration_s: float
    upload_done_s: float  # when the last upload reached the server
    tx_s: np.ndarray  # [N] each device's upload airtime
    rx_s: np.ndarray  # [N] each device's download airtime


def shared_uplink_done(arrivals_s: np.ndarray, airtime_s: np.ndarray) -> float:
    """When a work-conserving shared link has carried every upload (any fair or FIFO order):
    ``max_k (t_(k) + sum of the airtimes of uploads ready at or after t_(k))``."""
    if len(arrivals_s) == 0:
        return 0.0
    order = np.argsort(arrivals_s, kind="stable")
    t, w = arrivals_s[order], airtime_s[order]
    after = np.cumsum(w[::-1])[::-1]
    return float(np.max(t + after))


def server_round(
    train_s: np.ndarray,
    active: np.ndarray,
    upload_bytes: np.ndarray,
    download_bytes: float,
    uplink_bps: float,
    downlink_bps: float,
    latency_s: float,
    server_s: float,
) -> ServerRound:
    """FedAvg: shared uplink, one-way latency each way, server time, one broadcast down."""
    up = active & (upload_bytes > 0)
    tx = np.where(up, upload_bytes * BITS / uplink_bps, 0.0)
    done = shared_uplink_done(train_s[up], tx[up])
    down_s = download_bytes * BITS / downlink_bps
    rx = np.where(active, down_s, 0.0)
    duration = done + latency_s + server_s + latency_s + down_s
    return ServerRound(float(duration), done, tx, rx)
