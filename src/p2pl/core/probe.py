"""How big a model's activations are per input sample, measured by one forward pass on zeros."""

from __future__ import annotations

import torch
from torch import nn


def outputs_per_sample(
    model: nn.Module, input_shape: tuple[int, ...], kinds: tuple[type[nn.Module], ...] | None = None
) -> int:
    """Elements output by the model's leaf modules (or only those of ``kinds``) for one sample."""
    total = 0

    def count(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel()

    modules = [m for m in model.modules() if not list(m.children())]
    if kinds is not None:
        modules = [m for m in model.modules() if isinstance(m, kinds)]
    hooks = [m.register_forward_hook(count) for m in modules]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return total
