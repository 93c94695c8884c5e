"""User model factories for the ``model.factory = "user_models:..."`` tests (tests/ is on sys.path)."""

from __future__ import annotations

import math

from torch import nn


def small_tanh_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Not a plain Linear/ReLU MLP, so the engine must batch it with vmap, not bmm."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.Tanh(), nn.Linear(16, num_classes))


def with_batchnorm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Carries running statistics (buffers), which the engines refuse."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes), nn.BatchNorm1d(num_classes))


def not_a_model(input_shape: tuple[int, ...], num_classes: int) -> str:
    return "oops"


NOT_CALLABLE = 3
