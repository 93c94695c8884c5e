"""Training FLOPs per sample, counted from the model's real forward and backward pass.

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix multiplications and convolutions
(2 FLOPs per multiply-add) of one forward + cross-entropy + backward pass over a small batch;
elementwise work (activations, the optimizer update) is not counted, which on the models here is
a few percent.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, batch: int = 8) -> float:
    """FLOPs of one training step per sample (forward + backward)."""
    probe = copy.deepcopy(model).float().train()
    x = torch.zeros(batch, *input_shape)
    y = torch.arange(batch) % num_classes
    counter = FlopCounterMode(display=False)
    with counter:
        loss = nn.functional.cross_entropy(probe(x), y)
        loss.backward()
    return float(counter.get_total_flops()) / batch
