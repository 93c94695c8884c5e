"""Every device's accuracy and loss on the common test set, batched over devices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from p2pl.core.params import ParamSpec
from p2pl.core.probe import outputs_per_sample

ACTIVATION_BUDGET = 1 << 26  # floats


@torch.no_grad()
def evaluate(
    model: nn.Module,
    spec: ParamSpec,
    params: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    sample_chunk: int = 4096,
    device_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (accuracy [N], mean cross-entropy loss [N]) as float64."""
    n_dev, n_test = params.shape[0], x_test.shape[0]
    if device_chunk <= 0:
        # Bound the activations alive at once to ~64M floats (256 MiB): devices x samples x what
        # the model outputs per sample, measured on this model and input shape.
        per_sample = max(1, outputs_per_sample(model, tuple(x_test.shape[1:])))
        sample_chunk = max(1, min(sample_chunk, ACTIVATION_BUDGET // per_sample))
        device_chunk = max(1, min(n_dev, ACTIVATION_BUDGET // (min(n_test, sample_chunk) * per_sample)))

    def logits_of(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, spec.unflatten(flat), (x,))

    batched = vmap(logits_of, in_dims=(0, None))
    correct = torch.zeros(n_dev, dtype=torch.float64)
    loss = torch.zeros(n_dev, dtype=torch.float64)
    for lo in range(0, n_dev, device_chunk):
        rows = slice(lo, min(n_dev, lo + device_chunk))
        for s in range(0, n_test, sample_chunk):
            x, y = x_test[s : s + sample_chunk], y_test[s : s + sample_chunk]
            logits = batched(params[rows], x)  # [n, b, C]
            correct[rows] += (logits.argmax(-1) == y).sum(1).double()
            ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="none")
            loss[rows] += ce.view(logits.shape[0], -1).sum(1).double()
    return correct / n_test, loss / n_test
