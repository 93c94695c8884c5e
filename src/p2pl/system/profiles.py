"""Device profiles: how fast a device computes and what it draws computing, sending, receiving, idling.

A profile is five numbers (:class:`DeviceProfile`). It comes from a named preset (:data:`PRESETS`,
sources in docs/system-model.md), a TOML file with the same five keys, or a CSV file with those
columns: one row for every device, or one row per device (in device order, optionally with a
``device`` column). :func:`device_arrays` turns it into per-device arrays and spreads the
throughput log-normally (``system.heterogeneity``), keyed by seed and device, so the same config
and seed give the same devices on every engine.

Powers are the whole device's draw in that state (not increments): compute energy is
``FLOPs x joules_per_flop`` (``joules_per_flop`` = active power / FLOP/s), radio energy is
``tx_power_w x transmit time`` and ``rx_power_w x receive time``, and ``idle_power_w`` is paid for
the rest of the round.
"""

from __future__ import annotations

import csv
import math
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from p2pl.errors import P2PLError

FIELDS = ("flops", "joules_per_flop", "tx_power_w", "rx_power_w", "idle_power_w")
_DOMAIN = zlib.crc32(b"p2pl.system.profiles")  # keeps the spread apart from other users of the seed


@dataclass(frozen=True)
class DeviceProfile:
    flops: float  # sustained training throughput, FLOP/s
    joules_per_flop: float  # energy per FLOP while training (active power / flops)
    tx_power_w: float  # device draw while its radio transmits
    rx_power_w: float  # device draw while its radio receives
    idle_power_w: float  # device draw while waiting (radio listening, CPU idle)

    def check(self, where: str) -> DeviceProfile:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise P2PLError(f"{where}: {f.name} must be a finite number >= 0, got {value}")
        if self.flops <= 0:
            raise P2PLError(f"{where}: flops must be > 0 (FLOP/s the device sustains), got {self.flops}")
        return self


def _active(flops: float, watts: float) -> float:
    return watts / flops


# Numbers and their sources: docs/system-model.md ("Device presets"). Rounded; order-of-magnitude
# right is what matters when comparing P2PL with FedAvg on the same devices.
PRESETS: dict[str, DeviceProfile] = {
    # ESP32-class microcontroller at 240 MHz, 3.3 V (Espressif ESP32 Series Datasheet): CPU active
    # 68 mA, Wi-Fi TX 240 mA (802.11b, 19.5 dBm), RX 100 mA, modem-sleep 30 mA; ~100 MFLOP/s fp32.
    "mcu": DeviceProfile(1e8, _active(1e8, 0.068 * 3.3), 0.240 * 3.3, 0.100 * 3.3, 0.030 * 3.3),
    # Raspberry Pi 4 Model B: 2.7 W idle, 6.4 W with all four cores busy (pidramble.com power
    # benchmarks); Wi-Fi active adds ~0.7 W; ~5 GFLOP/s sustained fp32 in PyTorch on four A72 cores.
    "rpi4": DeviceProfile(5e9, _active(5e9, 6.4), 3.4, 3.2, 2.7),
    # A smartphone (big cores of a recent Snapdragon-class SoC, screen off): ~20 GFLOP/s fp32 at
    # ~4 W; Wi-Fi ~1.2 W transmitting, ~0.9 W receiving, ~0.3 W idle (Carroll & Heiser, USENIX ATC
    # 2010; Huang et al., MobiSys 2012).
    "phone": DeviceProfile(2e10, _active(2e10, 4.0), 1.2, 0.9, 0.3),
}


def _read_toml(path: Path) -> list[DeviceProfile]:
    from p2pl.config import read_toml

    data = read_toml(path)
    unknown = [k for k in data if k not in FIELDS]
    missing = [k for k in FIELDS if k not in data]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise P2PLError(f"device profile {path}: {what}; a profile has exactly {', '.join(FIELDS)}")
    try:
        values = {k: float(data[k]) for k in FIELDS}
    except (TypeError, ValueError):
        raise P2PLError(f"device profile {path}: every value must be a number ({', '.join(FIELDS)})") from None
    return [DeviceProfile(**values).check(str(path))]


def _read_csv(path: Path) -> list[DeviceProfile]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise P2PLError(f"cannot read device profile {path}: {err}") from None
    if not rows:
        raise P2PLError(f"device profile {path} has no rows; give a header ({', '.join(FIELDS)}) and a row")
    missing = [k for k in FIELDS if k not in header]
    if missing:
        raise P2PLError(f"device profile {path}: missing column {missing[0]!r}; columns: {', '.join(FIELDS)}")
    out = []
    for i, row in enumerate(rows, start=2):
        if "device" in row and row["device"] not in (None, "") and row["device"].strip() != str(i - 2):
            raise P2PLError(f"{path}:{i}: device {row['device']!r} out of order; list devices 0, 1, 2, ... in order")
        try:
            values = {k: float(row[k]) for k in FIELDS}
        except (TypeError, ValueError):
            raise P2PLError(f"{path}:{i}: every value in {', '.join(FIELDS)} must be a number") from None
        out.append(DeviceProfile(**values).check(f"{path}:{i}"))
    return out


def load_profiles(name: str) -> list[DeviceProfile]:
    """A preset (one profile for every device) or a file (one profile, or one per device)."""
    if name in PRESETS:
        return [PRESETS[name]]
    path = Path(name)
    if path.suffix.lower() not in (".toml", ".csv"):
        raise P2PLError(
            f"unknown system.device_profile {name!r}; choose a preset ({', '.join(PRESETS)}) or a .toml / .csv file"
        )
    if not path.is_file():
        raise P2PLError(f"device profile file {name!r} not found; set system.device_profile to an existing file")
    return _read_toml(path) if path.suffix.lower() == ".toml" else _read_csv(path)


@dataclass(frozen=True)
class DeviceArrays:
    """Every device's profile as arrays [N] (float64)."""

    flops: np.ndarray
    joules_per_flop: np.ndarray
    tx_power_w: np.ndarray
    rx_power_w: np.ndarray
    idle_power_w: np.ndarray


def device_arrays(profiles: list[DeviceProfile], n: int, heterogeneity: float, seed: int) -> DeviceArrays:
    """Per-device arrays; throughput spread by ``exp(sigma * z)``, ``z ~ N(0, 1)`` keyed by
    (seed, device), so the preset is the median device and the draw does not depend on N."""
    if len(profiles) not in (1, n):
        raise P2PLError(
            f"the device profile file lists {len(profiles)} devices but the run has {n}; give one row "
            "for every device or a single row for all"
        )
    rows = profiles * n if len(profiles) == 1 else profiles
    columns = {f: np.array([getattr(p, f) for p in rows], dtype=np.float64) for f in FIELDS}
    if heterogeneity > 0:
        # Device d takes the d-th draw of one stream keyed by the seed: the same for any N.
        z = np.random.default_rng([_DOMAIN, int(seed) & 0xFFFF_FFFF]).standard_normal(n)
        columns["flops"] = columns["flops"] * np.exp(heterogeneity * z)
    return DeviceArrays(**columns)
