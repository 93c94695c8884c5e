"""Stacked device parameters: one flat float32 row per device, with named views for the model.

A flat ``[N, P]`` matrix makes consensus a matrix product, max-norm sync a row gather, and the
optimizer one set of tensor ops; ``ParamSpec.unflatten`` gives the model its named tensors as
views, so no copy is made per step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from p2pl.core.rng import derive_seed

_GLOBAL_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class ParamSpec:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @staticmethod
    def of(model: nn.Module) -> ParamSpec:
        named = list(model.named_parameters())
        return ParamSpec(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def nbytes(self) -> int:
        """Bytes of one device's parameters as float32 (what one model transfer costs)."""
        return 4 * self.total

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views ``[..., *shape]`` into ``flat [..., P]``."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, list(self.numels), dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        first = tensors[self.names[0]]
        lead = first.shape[: first.dim() - len(self.shapes[0])]
        return torch.cat([tensors[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def module_vector(self, model: nn.Module) -> torch.Tensor:
        return self.flatten({n: p.detach() for n, p in model.named_parameters()})

    def load_module(self, model: nn.Module, vector: torch.Tensor) -> None:
        views = self.unflatten(vector)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(views[name])


def init_device_params(model: nn.Module, spec: ParamSpec, seed: int, devices: list[int] | range) -> torch.Tensor:
    """Each device draws its own initialization from its own seed (devices share no init).

    The module's own ``reset_parameters`` are used, so a device's init is exactly what a plain
    ``torch.manual_seed(s); build_model()`` would give; the global RNG is left untouched.
    """
    out = torch.empty(len(devices), spec.total)
    # reset_parameters draws from torch's global generator: hold a lock so devices initialized on
    # several threads of one process (in-process nodes, tests) cannot interleave their draws.
    resets = [cast(Callable[[], None], m.reset_parameters) for m in model.modules() if hasattr(m, "reset_parameters")]
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        for row, device in enumerate(devices):
            torch.manual_seed(derive_seed(seed, "init", device))
            for reset in resets:
                reset()
            out[row] = spec.module_vector(model)
    return out
