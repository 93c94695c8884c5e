"""Byzantine devices: who attacks, and what an attacker sends instead of its parameters.

An attack is a transform of the rows an attacker *sends* (its own row is kept, so it can go on
looking honest); every runtime applies the same transform at the same place of the cooperation
step, keyed like every other random draw (seed, round, step, device), so the simulator, a Ray
shard and a real node draw the same numbers. Attacks and their ``adversary.scale`` (0 = the
default in ``DEFAULT_SCALE``):

* ``sync-hijack``: during max-norm sync, claims its init's norm x scale as the largest; in the
  paper's flooding sync it hands out its init x scale (verified sync rejects the claim).
* ``scale``: sends its parameters x scale.
* ``sign-flip``: sends −scale x its parameters.
* ``gaussian``: sends its parameters + N(0, scale²) noise.
* ``alie``: "a little is enough" (Baruch et al. 2019): per coordinate, the mean of the rows it
  hears (its own included) minus scale x their standard deviation: a small, coordinated shift
  that hides inside the honest spread.
* ``label-flip``: trains on flipped labels (``C − 1 − y``) and sends honestly (data poisoning).
* ``silent``: never sends (a staller): its neighbours hear nothing from it.
* ``data-size``: announces a data size of ``scale`` (default 2^52) to steer data-size weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from p2pl.config import ATTACKS, AdversaryConfig
from p2pl.core.cooperate import Neighbourhoods
from p2pl.core.rng import derive_seed, numpy_generator
from p2pl.errors import P2PLError, choose

DEFAULT_SCALE: dict[str, float] = {
    "none": 0.0,
    "sync-hijack": 1e6,
    "scale": 1e6,
    "sign-flip": 1.0,
    "gaussian": 1.0,
    "alie": 1.0,
    "label-flip": 0.0,
    "silent": 0.0,
    "data-size": 2.0**52,
}
#: Attacks that change the parameter rows an attacker sends in a gossip step.
ROW_ATTACKS = ("scale", "sign-flip", "gaussian", "alie")


@dataclass(frozen=True)
class SendContext:
    """What an attacker knows when it sends: the rows it hears (for ALIE) and the draw keys."""

    pool: torch.Tensor  # rows the attackers hear from (true rows, before any attack)
    hoods: Neighbourhoods  # the attackers' neighbourhoods into ``pool``
    seed: int
    round_index: int
    step: int


def _scale(rows: torch.Tensor, ids: np.ndarray, s: float, ctx: SendContext) -> torch.Tensor:
    return rows * s


def _sign_flip(rows: torch.Tensor, ids: np.ndarray, s: float, ctx: SendContext) -> torch.Tensor:
    return rows * -s


def _gaussian(rows: torch.Tensor, ids: np.ndarray, s: float, ctx: SendContext) -> torch.Tensor:
    out = rows.clone()
    for i, device in enumerate(ids.tolist()):
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "attack-noise", ctx.round_index, ctx.step, device))
        out[i] += s * torch.randn(rows.shape[1], generator=gen, dtype=rows.dtype).to(rows.device)
    return out


def _alie(rows: torch.Tensor, ids: np.ndarray, s: float, ctx: SendContext) -> torch.Tensor:
    out = rows.clone()
    for i in range(rows.shape[0]):
        lo, hi = ctx.hoods.indptr[i], ctx.hoods.indptr[i + 1]
        heard = ctx.pool[torch.from_numpy(ctx.hoods.src[lo:hi]).to(ctx.pool.device)]
        stack = torch.cat([rows[i : i + 1], heard]).double()
        mean, std = stack.mean(0), stack.std(0, correction=0)
        out[i] = (mean - s * std).to(rows.dtype)
    return out


_ROW_TRANSFORMS: dict[str, Callable[[torch.Tensor, np.ndarray, float, SendContext], torch.Tensor]] = {
    "scale": _scale,
    "sign-flip": _sign_flip,
    "gaussian": _gaussian,
    "alie": _alie,
}


@dataclass(frozen=True, eq=False)
class Adversary:
    """The attackers of one run (global device ids) and their attack."""

    attack: str = "none"
    scale: float = 0.0
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    seed: int = 0

    @staticmethod
    def of(cfg: AdversaryConfig, ids: np.ndarray, seed: int) -> Adversary:
        attack = choose("adversary.attack", cfg.attack, ATTACKS)
        scale = cfg.scale if cfg.scale != 0 else DEFAULT_SCALE[attack]
        return Adversary(attack, float(scale), np.unique(np.asarray(ids, dtype=np.int64)), seed)

    @property
    def active(self) -> bool:
        return self.attack != "none" and len(self.ids) > 0

    def mask(self, device_ids: np.ndarray | int) -> np.ndarray:
        """bool per device id: an attacker of this run's attack?"""
        ids = np.atleast_1d(np.asarray(device_ids, dtype=np.int64))
        return np.isin(ids, self.ids) if self.active else np.zeros(ids.shape, dtype=bool)

    def is_(self, attack: str) -> bool:
        return self.active and self.attack == attack

    @property
    def rewrites_rows(self) -> bool:
        return self.active and self.attack in ROW_ATTACKS

    def claimed_sizes(self, sizes: np.ndarray) -> np.ndarray:
        """The data sizes devices announce (the liars' differ)."""
        if not self.is_("data-size"):
            return sizes
        claims = np.asarray(sizes, dtype=np.float64).copy()
        claims[self.ids[self.ids < len(claims)]] = self.scale
        return claims

    def send(self, rows: torch.Tensor, device_ids: np.ndarray, ctx: SendContext) -> torch.Tensor:
        """What devices ``device_ids`` send for their ``rows`` (honest rows are passed through;
        ``ctx.hoods`` holds the neighbourhoods of the attacker rows, in row order)."""
        if not self.rewrites_rows:
            return rows
        bad = np.flatnonzero(self.mask(device_ids))
        if len(bad) == 0:
            return rows
        out = rows.clone()
        index = torch.from_numpy(bad).to(rows.device)
        out[index] = _ROW_TRANSFORMS[self.attack](rows[index], np.asarray(device_ids)[bad], self.scale, ctx)
        return out


def place_attackers(num_devices: int, edges: np.ndarray, cfg: AdversaryConfig, seed: int) -> np.ndarray:
    """Which devices attack: ``count`` (or ``fraction`` x N, rounded down) of them, at random
    (drawn from the seed) or at the highest degrees (ties to the lowest id)."""
    if cfg.attack == "none":
        return np.zeros(0, dtype=np.int64)
    count = cfg.count if cfg.count > 0 else int(np.floor(cfg.fraction * num_devices + 1e-9))
    if count >= num_devices:
        raise P2PLError(
            f"adversary: {count} attackers among {num_devices} devices leaves no honest device; "
            "lower adversary.count or adversary.fraction"
        )
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if cfg.placement == "degree":
        degree = np.bincount(np.asarray(edges, dtype=np.int64).ravel(), minlength=num_devices)
        chosen = np.lexsort((np.arange(num_devices), -degree))[:count]
    else:
        chosen = numpy_generator(seed, "adversary").choice(num_devices, size=count, replace=False)
    return np.sort(chosen.astype(np.int64))


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label-flipping poison: class y becomes C − 1 − y."""
    return (num_classes - 1) - labels


__all__ = ["DEFAULT_SCALE", "ROW_ATTACKS", "Adversary", "SendContext", "flip_labels", "place_attackers"]
