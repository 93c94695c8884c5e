"""The hand-written batched MLP backward (training strategy 'bmm') against autograd."""

from __future__ import annotations

import pytest
import torch

from p2pl.config import ModelConfig
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.core.train import make_loss_grad
from p2pl.models import build_model


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n, 6), generator=g)
    mask = (torch.rand(n, 6, generator=g) > 0.4).float()
    mask[:, 0] = 1.0  # every device has at least one real sample
    return x, y, mask


@pytest.mark.parametrize("hidden", [[], [16], [24, 12]])
def test_bmm_gradients_and_losses_match_autograd(hidden: list[int]) -> None:
    model = build_model(ModelConfig(name="mlp", hidden=hidden), (1, 8, 8), 10)
    spec = ParamSpec.of(model)
    params = init_device_params(model, spec, seed=0, devices=range(7))
    manual = make_loss_grad(model, spec, "bmm")
    autograd = make_loss_grad(model, spec, "vmap")
    # shrinking then growing the device count reuses (and regrows) the gradient buffer
    for n, seed in [(7, 1), (3, 2), (7, 3)]:
        x, y, mask = _batch(n, seed)
        grads, losses = manual(params[:n], x, y, mask)
        expected_grads, expected_losses = autograd(params[:n], x, y, mask)
        assert grads.shape == (n, spec.total)
        assert torch.allclose(grads, expected_grads, rtol=1e-5, atol=1e-7), (grads - expected_grads).abs().max()
        assert torch.allclose(losses, expected_losses, rtol=1e-6, atol=0)
        assert grads.abs().sum() > 0
