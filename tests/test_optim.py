"""Functional optimizers (p2pl.core.optim) step for step against torch.optim."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from p2pl.config import TrainingConfig
from p2pl.core import optim
from p2pl.errors import P2PLError

CONFIGS = {
    "sgd": TrainingConfig(optimizer="sgd", lr=0.1),
    "sgd-wd": TrainingConfig(optimizer="sgd", lr=0.1, weight_decay=0.01),
    "momentum": TrainingConfig(optimizer="momentum", lr=0.05, momentum=0.9),
    "momentum-wd": TrainingConfig(optimizer="momentum", lr=0.05, momentum=0.5, weight_decay=0.1),
    "adam": TrainingConfig(optimizer="adam", lr=0.01),
    "adam-wd": TrainingConfig(optimizer="adam", lr=0.003, betas=[0.8, 0.99], eps=1e-6, weight_decay=0.05),
}


def _torch_run(cfg: TrainingConfig, start: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Each row as its own torch Parameter and optimizer, fed the same gradients."""
    out = []
    for row in range(start.shape[0]):
        p = torch.nn.Parameter(start[row].clone())
        opt = optim.torch_optimizer(cfg, [p])
        for g in grads:
            opt.zero_grad()
            p.grad = g[row].clone()
            opt.step()
        out.append(p.detach())
    return torch.stack(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_torch_optim(name: str) -> None:
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(4, 37, generator=gen)
    grads = [torch.randn(4, 37, generator=gen) for _ in range(6)]
    params = start.clone()
    state = optim.init_state(cfg, 4, 37)
    for g in grads:
        optim.step(cfg, params, g.clone(), state)  # step may overwrite its gradient (scratch)
    expected = _torch_run(cfg, start, grads)
    assert torch.allclose(params, expected, atol=1e-6, rtol=1e-5), (params - expected).abs().max()
    assert not torch.allclose(params, start)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_only_active_rows_step_and_idle_state_is_untouched(name: str) -> None:
    """A device idle at a step keeps its parameters and state (Adam's step count included)."""
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(3, 11, generator=gen)
    grads = [torch.randn(3, 11, generator=gen) for _ in range(4)]
    params = start.clone()
    state = optim.init_state(cfg, 3, 11)
    for t, g in enumerate(grads):
        # device 1 takes steps 0 and 2 only, device 2 takes none after step 0
        rows = torch.tensor([0, 1, 2]) if t == 0 else torch.tensor([0, 1]) if t == 2 else torch.tensor([0])
        before = {k: v.clone() for k, v in state.tensors.items()}
        params_before = params.clone()
        optim.step(cfg, params, g[rows], state, rows)  # g[rows] is a copy: scratch for step
        idle = sorted(set(range(3)) - set(rows.tolist()))
        assert torch.equal(params[idle], params_before[idle])
        for key, value in state.tensors.items():
            assert torch.equal(value[idle], before[key][idle]), key
    steps_of = {0: [0, 1, 2, 3], 1: [0, 2], 2: [0]}
    for device, taken in steps_of.items():
        expected = _torch_run(cfg, start[device : device + 1], [grads[t][device : device + 1] for t in taken])
        assert torch.allclose(params[device], expected[0], atol=1e-6, rtol=1e-5)
    if name == "adam":
        assert state.tensors["step"].tolist() == [4.0, 2.0, 1.0]


def test_torch_optimizer_uses_the_config() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = optim.torch_optimizer(CONFIGS["sgd"], p)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0
    mom = optim.torch_optimizer(CONFIGS["momentum-wd"], p)
    assert mom.defaults["momentum"] == 0.5 and mom.defaults["weight_decay"] == 0.1
    adam = optim.torch_optimizer(CONFIGS["adam-wd"], p)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.8, 0.99)


def test_unknown_optimizer_is_a_clear_error() -> None:
    cfg = dataclasses.replace(TrainingConfig(), optimizer="rmsprop")
    with pytest.raises(P2PLError, match=r"unknown optimizer 'rmsprop'.*adam, momentum, sgd"):
        optim.init_state(cfg, 2, 3)
    with pytest.raises(P2PLError, match="unknown optimizer"):
        optim.torch_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
