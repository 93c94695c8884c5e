"""What P2PL and its baselines cost on real devices and radios: seconds and joules per round.

* :mod:`p2pl.system.profiles` - device presets and files (FLOP/s, energy per FLOP, radio powers);
* :mod:`p2pl.system.flops` - training FLOPs per sample, counted from the model;
* :mod:`p2pl.system.radio` - link rates (log-distance path loss + Shannon, or fixed);
* :mod:`p2pl.system.timing` - how long a synchronous round takes (device-to-device or edge server);
* :mod:`p2pl.system.energy` - joules per device per round;
* :mod:`p2pl.system.model` - :class:`SystemModel`, one per run, the simulator's per-round hook;
* :mod:`p2pl.system.plots` - accuracy against seconds and joules; the edge-link crossover.

Formulas, presets and their sources: docs/system-model.md.
"""

from __future__ import annotations

from p2pl.system.model import RoundCost, SystemModel

__all__ = ["RoundCost", "SystemModel"]
