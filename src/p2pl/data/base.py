"""The in-memory dataset every engine trains on: held once, devices hold index arrays."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dataset:
    """A classification dataset with a held-out test split common to all devices.

    ``x_*`` are float32 tensors shaped ``[n, *input_shape]`` (images as ``[n, C, H, W]``),
    ``y_*`` are int64 class labels in ``[0, num_classes)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])
