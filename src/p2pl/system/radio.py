"""Link rates: device-to-device from metre distances (log-distance path loss + Shannon), or fixed.

Shannon model, per link of length ``d`` metres (formulas and default values with sources in
docs/system-model.md)::

    PL(d)  = PL0 + 10 * n * log10(max(d, 1 m) / 1 m)          dB
    P_rx   = P_tx - PL(d)                                        dBm
    N      = N0 + NF + 10 * log10(B)                             dBm
    rate   = B * log2(1 + 10 ** ((P_rx - N) / 10))              bit/s, capped at max_rate

Rates are symmetric (same radio on both ends), so one rate per undirected edge.
"""

from __future__ import annotations

import numpy as np

from p2pl.config import SystemConfig
from p2pl.errors import P2PLError

MBIT = 1e6


def shannon_rate_bps(distance_m: np.ndarray, cfg: SystemConfig) -> np.ndarray:
    """Achievable rate (bit/s) over links of the given lengths."""
    d = np.maximum(np.asarray(distance_m, dtype=np.float64), 1.0)  # the model starts at 1 m
    path_loss_db = cfg.reference_loss_db + 10.0 * cfg.path_loss_exponent * np.log10(d)
    bandwidth_hz = cfg.bandwidth_mhz * 1e6
    noise_dbm = cfg.noise_dbm_hz + cfg.noise_figure_db + 10.0 * np.log10(bandwidth_hz)
    snr = 10.0 ** ((cfg.tx_power_dbm - path_loss_db - noise_dbm) / 10.0)
    rate = bandwidth_hz * np.log2(1.0 + snr)
    if cfg.max_rate_mbps > 0:
        rate = np.minimum(rate, cfg.max_rate_mbps * MBIT)
    return rate


NEEDS_METRES = (
    "system.link_model = 'shannon' needs device positions in metres: use topology.name = "
    "'random-geometric' with topology.area_m and topology.range_m, or set system.link_model = 'fixed'"
)


def edge_rates_bps(edges: np.ndarray, positions: np.ndarray | None, cfg: SystemConfig) -> np.ndarray:
    """One rate (bit/s) per undirected edge ``[E, 2]`` under ``cfg.link_model``."""
    if cfg.link_model == "fixed":
        return np.full(len(edges), cfg.link_rate_mbps * MBIT)
    if positions is None:
        raise P2PLError(NEEDS_METRES)
    if len(edges) == 0:
        return np.zeros(0)
    delta = positions[edges[:, 0]] - positions[edges[:, 1]]
    return shannon_rate_bps(np.hypot(delta[:, 0], delta[:, 1]), cfg)


def check_positions_in_metres(positions: np.ndarray | None, area_m: float, cfg: SystemConfig) -> None:
    """Refuse Shannon rates over unit-square positions (they are not metres)."""
    if cfg.link_model == "shannon" and (positions is None or area_m <= 0):
        raise P2PLError(NEEDS_METRES)
