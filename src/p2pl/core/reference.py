"""The reference engine: one nn.Module and one torch.optim optimizer per device, in a plain loop.

Slow and obviously right: the oracle the vectorized engine is tested against. It walks the same
mini-batch schedule (``p2pl.core.schedule``) so the two must agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pl.config import TrainingConfig
from p2pl.core.optim import torch_optimizer
from p2pl.core.params import ParamSpec
from p2pl.core.schedule import Partition, epoch_plan
from p2pl.core.train import RoundStats, step_limits
from p2pl.errors import P2PLError


class ReferenceTrainer:
    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        spec: ParamSpec,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        partition: Partition,
        cfg: TrainingConfig,
        seed: int,
    ) -> None:
        self.spec = spec
        self.x_train, self.y_train = x_train, y_train
        self.partition = partition
        self.cfg = cfg
        self.seed = seed
        self.models = [model_factory() for _ in partition.indices]
        self.optimizers = [torch_optimizer(cfg, list(m.parameters())) for m in self.models]
        self.strategy = "reference"

    @property
    def num_devices(self) -> int:
        return len(self.models)

    def train(
        self,
        params: torch.Tensor,
        round_index: int,
        work: np.ndarray | None = None,
        *,
        span: list[tuple[int, int]] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> RoundStats:
        if span is not None or after_step is not None:  # each device runs all its steps at once
            raise P2PLError("the reference engine trains device by device; mixing between local steps needs "
                            "engine = 'vectorized'")  # fmt: skip
        limits = step_limits(self.partition.sizes, self.cfg, work)
        plans = [
            epoch_plan(self.partition, self.seed, round_index, e, self.cfg.batch_size)
            for e in range(self.cfg.local_epochs)
        ]
        taken = torch.zeros(self.num_devices, dtype=torch.int64)
        mean_loss = torch.full((self.num_devices,), float("nan"))
        for n, (model, opt) in enumerate(zip(self.models, self.optimizers, strict=True)):
            if int(limits[n]) == 0:
                continue
            self.spec.load_module(model, params[n])
            size, losses = int(self.partition.sizes[n]), []
            for plan in plans:
                for lo in range(0, size, self.cfg.batch_size):
                    if int(taken[n]) == int(limits[n]):
                        break
                    idx = plan.order[n, lo : min(lo + self.cfg.batch_size, size)]
                    opt.zero_grad()
                    loss = F.cross_entropy(model(self.x_train[idx]), self.y_train[idx])
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    taken[n] += 1
            params[n] = self.spec.module_vector(model)
            mean_loss[n] = float(np.mean(losses))
        return RoundStats(mean_loss, taken)

    # Optimizer state in the vectorized engine's stacked layout, so checkpoints are engine-neutral.
    def state_tensors(self) -> dict[str, torch.Tensor]:
        keys = _state_keys(self.cfg)
        out = {k: torch.zeros(self.num_devices, self.spec.total) for k in keys if k != "step"}
        if "step" in keys:
            out["step"] = torch.zeros(self.num_devices, dtype=torch.float64)
        for n, (model, opt) in enumerate(zip(self.models, self.optimizers, strict=True)):
            params = list(model.parameters())
            if not opt.state.get(params[0]):
                continue
            for key in out:
                if key == "step":
                    out[key][n] = float(opt.state[params[0]]["step"])
                else:
                    out[key][n] = torch.cat([opt.state[p][key].reshape(-1) for p in params])
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        keys = _state_keys(self.cfg)
        for n, (model, opt) in enumerate(zip(self.models, self.optimizers, strict=True)):
            if "step" in keys and float(tensors["step"][n]) == 0:
                continue
            views = {k: self.spec.unflatten(tensors[k][n]) for k in keys if k != "step"}
            for name, p in model.named_parameters():
                entry = {k: v[name].clone() for k, v in views.items()}
                if "step" in keys:
                    entry["step"] = torch.tensor(float(tensors["step"][n]))
                opt.state[p] = entry


def _state_keys(cfg: TrainingConfig) -> tuple[str, ...]:
    return {"sgd": (), "momentum": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "step")}[cfg.optimizer]
