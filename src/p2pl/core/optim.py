"""Functional optimizers over stacked device parameters, matching ``torch.optim`` step for step.

Each op mirrors torch.optim's single-tensor implementation (SGD with dampening 0, Adam with
bias correction) so the vectorized engine reproduces the per-device reference engine. Only
``active`` devices step: an idle device's parameters and optimizer state (incl. Adam's step
count) stay untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from p2pl.config import TrainingConfig
from p2pl.errors import choose

OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass
class OptimizerState:
    """Per-device optimizer state, rows aligned with the parameter rows."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def init_state(cfg: TrainingConfig, num_devices: int, num_params: int) -> OptimizerState:
    name = choose("optimizer", cfg.optimizer, OPTIMIZERS)
    if name == "sgd":
        return OptimizerState()
    if name == "momentum":
        return OptimizerState({"momentum_buffer": torch.zeros(num_devices, num_params)})
    return OptimizerState(
        {
            "exp_avg": torch.zeros(num_devices, num_params),
            "exp_avg_sq": torch.zeros(num_devices, num_params),
            "step": torch.zeros(num_devices, dtype=torch.float64),
        }
    )


def step(
    cfg: TrainingConfig,
    params: torch.Tensor,
    grads: torch.Tensor,
    state: OptimizerState,
    rows: torch.Tensor | None = None,
) -> None:
    """Update ``params`` (and ``state``) in place; with ``rows``, only those devices step and
    ``grads`` holds just their rows (an idle device's parameters and state stay untouched).
    ``grads`` is scratch: it may be overwritten (no [n, P] temporaries per step)."""
    if rows is None:
        _step_rows(cfg, params, grads, state.tensors)
        return
    sub_params = params[rows]
    sub_state = {k: v[rows] for k, v in state.tensors.items()}
    _step_rows(cfg, sub_params, grads, sub_state)
    params[rows] = sub_params
    for key, value in sub_state.items():
        state.tensors[key][rows] = value


def _step_rows(cfg: TrainingConfig, p: torch.Tensor, g: torch.Tensor, st: dict[str, torch.Tensor]) -> None:
    """In place on ``p`` and ``st``; ``g`` is the trainer's scratch gradient and may be overwritten."""
    if cfg.weight_decay:
        g = g.add_(p, alpha=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        p.add_(g, alpha=-cfg.lr)
    elif cfg.optimizer == "momentum":
        buf = st["momentum_buffer"]
        # torch starts the buffer at the first gradient; a zero buffer gives the same value.
        buf.mul_(cfg.momentum).add_(g)
        p.add_(buf, alpha=-cfg.lr)
    else:
        beta1, beta2 = cfg.betas
        st["step"] += 1
        st["exp_avg"].lerp_(g, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        steps = st["step"]
        bias1 = 1 - beta1**steps
        bias2_sqrt = (1 - beta2**steps).sqrt()
        step_size = (cfg.lr / bias1).to(p.dtype).unsqueeze(1)
        # g is no longer needed: reuse it for the denominator (no [n, P] allocation per step)
        denom = torch.sqrt(st["exp_avg_sq"], out=g).div_(bias2_sqrt.to(p.dtype).unsqueeze(1)).add_(cfg.eps)
        p.addcdiv_(st["exp_avg"] * step_size, denom, value=-1.0)


def torch_optimizer(cfg: TrainingConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The torch.optim optimizer the reference engine uses for the same config."""
    name = choose("optimizer", cfg.optimizer, OPTIMIZERS)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "momentum":
        return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    betas = (cfg.betas[0], cfg.betas[1])
    return torch.optim.Adam(parameters, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
