"""Model registry: small, BatchNorm-free networks that train well on devices and vectorize.

Models must not carry buffers (BatchNorm running statistics do not average meaningfully across
devices and would need their own consensus); use GroupNorm instead.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import nn

from p2pl.config import ModelConfig
from p2pl.errors import P2PLError, choose


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise P2PLError(
            f"model {model!r} needs image-shaped input [C, H, W], but the data has shape {list(input_shape)}; "
            'use model.name = "mlp"'
        )
    c, h, w = input_shape
    return c, h, w


def _flat_size(features: nn.Module, shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *shape)).numel())


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv blocks and a linear head; fits 8x8 digits as well as 28x28 / 32x32 images."""
    c, h, w = _image_shape(input_shape, "cnn")
    blocks: list[nn.Module] = [nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    blocks += [nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()]
    if min(h, w) >= 8:
        blocks.append(nn.MaxPool2d(2))
    features = nn.Sequential(*blocks, nn.Flatten())
    return nn.Sequential(features, nn.Linear(_flat_size(features, (c, h, w)), num_classes))


def lenet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 style CNN for 28x28 grey images (works for any H, W >= 12)."""
    c, h, w = _image_shape(input_shape, "lenet")
    features = nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )  # fmt: skip
    flat = _flat_size(features, (c, h, w))
    return nn.Sequential(
        features, nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
    )


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (no running statistics, so it averages across devices)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(groups, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...] = (16, 32, 64)) -> nn.Module:
    """A small ResNet (one basic block per stage) for 32x32 colour images, GroupNorm throughout."""
    c, _, _ = _image_shape(input_shape, "resnet")
    groups = 4
    layers: list[nn.Module] = [
        nn.Conv2d(c, widths[0], 3, padding=1, bias=False), nn.GroupNorm(groups, widths[0]), nn.ReLU()
    ]  # fmt: skip
    c_in = widths[0]
    for i, width in enumerate(widths):
        layers.append(BasicBlock(c_in, width, stride=1 if i == 0 else 2, groups=groups))
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise P2PLError(f"model.factory must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise P2PLError(f"model.factory: cannot import {module_name!r} ({err}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise P2PLError(f"model.factory: {module_name!r} has no callable {attr!r}")
    return factory


#: model.name -> builder(input_shape, num_classes, config).
MODELS: dict[str, Callable[[tuple[int, ...], int, ModelConfig], nn.Module]] = {
    "mlp": lambda shape, classes, cfg: mlp(shape, classes, cfg.hidden),
    "cnn": lambda shape, classes, cfg: cnn(shape, classes),
    "lenet": lambda shape, classes, cfg: lenet(shape, classes),
    "resnet": lambda shape, classes, cfg: resnet(shape, classes),
}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured model; a user factory is called as ``factory(input_shape, num_classes)``."""
    if cfg.factory:
        model = _load_factory(cfg.factory)(tuple(input_shape), num_classes)
        if not isinstance(model, nn.Module):
            raise P2PLError(f"model.factory {cfg.factory!r} returned {type(model).__name__}, not a torch nn.Module")
    else:
        model = MODELS[choose("model", cfg.name, tuple(MODELS))](tuple(input_shape), num_classes, cfg)
    if any(True for _ in model.buffers()):
        raise P2PLError(
            "models with buffers (e.g. BatchNorm running statistics) are not supported: "
            "use GroupNorm or LayerNorm instead"
        )
    return model
