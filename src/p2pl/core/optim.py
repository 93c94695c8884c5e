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


class Update:
    """One optimizer step of a batch of device rows, applied column block by column block.

    ``columns(lo, hi, grads)`` updates columns ``[lo, hi)`` of every stepping row; the blocks
    together must cover every column once. The bmm training strategy hands each layer's
    gradient over as soon as its matmul has produced it, so no ``[n, P]`` gradient is assembled
    (the copy into one was ~10 % of a step). The arithmetic per element is the same whatever the
    blocks, so results do not depend on them. With ``rows``, only those devices step: a slice
    of rows is updated in place (views), an index tensor's rows are gathered into ``params`` /
    ``tensors`` here (the rows a loss is computed on) and written back by ``finish``; an idle
    device's parameters and optimizer state (incl. Adam's step count) stay untouched.

    An update of rows stepped in place (``rows`` None or a slice) can be reused for the next
    step of the same rows (call ``next_step`` first): its column views are built once.
    A step's decays that do not depend on the gradient (the momentum buffer's, Adam's second
    moment's) run when it starts, over every stepping row at once, so every column block must
    then be given its gradient.
    """

    def __init__(
        self,
        cfg: TrainingConfig,
        params: torch.Tensor,
        state: OptimizerState,
        rows: torch.Tensor | slice | None = None,
    ) -> None:
        self.cfg = cfg
        self.rows = rows
        self.target, self.state = params, state
        self.params = params if rows is None else params[rows]
        self.tensors = state.tensors if rows is None else {k: v[rows] for k, v in state.tensors.items()}
        self._blocks = {k: v for k, v in self.tensors.items() if k != "step"}
        self._views: dict[tuple[int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._adam: tuple[torch.Tensor, torch.Tensor] | None = None
        self.next_step()

    def next_step(self) -> None:
        """Start a step (the constructor starts the first): Adam counts it and takes its bias
        corrections."""
        cfg = self.cfg
        if cfg.optimizer == "momentum":
            # The buffer's decay does not depend on the gradient: one pass over every stepping row
            # (contiguous) rather than one per column block; ``columns`` adds the gradient.
            self._blocks["momentum_buffer"].mul_(cfg.momentum)
        elif cfg.optimizer == "adam":
            self._blocks["exp_avg_sq"].mul_(cfg.betas[1])  # the same for the second moment
            self.tensors["step"] += 1
            steps = self.tensors["step"]
            bias1 = 1 - cfg.betas[0] ** steps
            bias2_sqrt = (1 - cfg.betas[1] ** steps).sqrt()
            dtype = self.params.dtype
            self._adam = (cfg.lr / bias1).to(dtype).unsqueeze(1), bias2_sqrt.to(dtype).unsqueeze(1)

    def columns(self, lo: int, hi: int, grads: torch.Tensor) -> None:
        """Update columns ``[lo, hi)`` with ``grads [n, hi - lo]`` (scratch: may be overwritten)."""
        views = self._views.get((lo, hi))
        if views is None:
            if lo == 0 and hi == self.params.shape[1]:
                views = (self.params, self._blocks)
            else:
                views = (self.params[:, lo:hi], {k: v[:, lo:hi] for k, v in self._blocks.items()})
            self._views[(lo, hi)] = views
        _step_rows(self.cfg, views[0], grads, views[1], self._adam)

    def finish(self) -> None:
        """Write gathered rows back (nothing to do when the rows stepped in place)."""
        if self.rows is None or isinstance(self.rows, slice):
            return
        self.target[self.rows] = self.params
        for key, value in self.tensors.items():
            self.state.tensors[key][self.rows] = value


def step(
    cfg: TrainingConfig,
    params: torch.Tensor,
    grads: torch.Tensor,
    state: OptimizerState,
    rows: torch.Tensor | slice | None = None,
) -> None:
    """Update ``params`` (and ``state``) in place; with ``rows``, only those devices step and
    ``grads`` holds just their rows (an idle device's parameters and state stay untouched).
    ``grads`` is scratch: it may be overwritten (no [n, P] temporaries per step)."""
    update = Update(cfg, params, state, rows)
    update.columns(0, params.shape[1], grads)
    update.finish()


def _step_rows(
    cfg: TrainingConfig,
    p: torch.Tensor,
    g: torch.Tensor,
    st: dict[str, torch.Tensor],
    adam: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """In place on ``p`` and ``st``; ``g`` is the trainer's scratch gradient and may be overwritten.
    ``adam``: each row's step size and sqrt of the second moment's bias correction."""
    if cfg.weight_decay:
        g = g.add_(p, alpha=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        p.add_(g, alpha=-cfg.lr)
    elif cfg.optimizer == "momentum":
        buf = st["momentum_buffer"]  # already decayed by this step's Update.next_step: buf * momentum
        # torch starts the buffer at the first gradient; a zero buffer gives the same value.
        buf.add_(g)
        p.add_(buf, alpha=-cfg.lr)
    else:
        assert adam is not None
        step_size, bias2_sqrt = adam
        beta1, beta2 = cfg.betas
        st["exp_avg"].lerp_(g, 1 - beta1)
        st["exp_avg_sq"].addcmul_(g, g, value=1 - beta2)  # decayed by beta2 in Update.next_step
        # g is no longer needed: reuse it for the denominator (no [n, P] allocation per step)
        denom = torch.sqrt(st["exp_avg_sq"], out=g).div_(bias2_sqrt).add_(cfg.eps)
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
