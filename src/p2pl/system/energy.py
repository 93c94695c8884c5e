"""Energy per device in a round: compute + radio transmit/receive + idle while waiting.

``E[n] = FLOPs[n] * joules_per_flop[n] + tx_power[n] * tx_s[n] + rx_power[n] * rx_s[n]
+ idle_power[n] * max(0, round_s - train_s[n] - tx_s[n] - rx_s[n])``; an absent device is off
(0 J). A device waits for the whole synchronous round: the next one starts for everybody together.
"""

from __future__ import annotations

import numpy as np

from p2pl.system.profiles import DeviceArrays


def round_energy(
    dev: DeviceArrays,
    active: np.ndarray,
    train_flops: np.ndarray,
    train_s: np.ndarray,
    tx_s: np.ndarray,
    rx_s: np.ndarray,
    round_s: float,
) -> np.ndarray:
    busy = train_s + tx_s + rx_s
    idle_s = np.maximum(round_s - busy, 0.0)
    joules = train_flops * dev.joules_per_flop + tx_s * dev.tx_power_w + rx_s * dev.rx_power_w
    joules += idle_s * dev.idle_power_w
    return np.where(active, joules, 0.0)
