"""Local training for a batch of devices: one batched forward/backward per local step.

The P2PL local phase, written once: the simulator runs it over all N devices, a Ray shard over
its devices, and a real node over a batch of one. Devices with fewer samples take fewer steps
(exactly what they would do alone); absent devices (work 0) take none; stragglers stop after a
share of their steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from p2pl.config import TrainingConfig
from p2pl.core import optim
from p2pl.core.parallel import free_cores, run_jobs
from p2pl.core.params import ParamSpec
from p2pl.core.probe import outputs_per_sample
from p2pl.core.schedule import EpochPlan, Partition, epoch_plans
from p2pl.errors import P2PLError, choose

STRATEGIES = ("auto", "bmm", "vmap", "loop")

LossGrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
BatchedLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _is_plain_mlp(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and all(isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU)) for m in model)


# vmap batches a convolution over devices as one grouped convolution: faster than a loop of
# small convolutions while feature maps are small, slower once they are large. Measured
# break-even (torch 2.13 CPU, 1 thread, N = 10 and 100, batch 8; BENCHMARKS.md): vmap won for the
# 'cnn' on 8x8 (1.5k conv outputs per sample, 4.7x) and LeNet on 28x28 / 32x32 (6.3k / 8.4k,
# up to 1.5x); the loop won for the 'cnn' on 28x28 / 32x32 (19k / 25k) and the ResNet (>100k).
VMAP_MAX_CONV_OUTPUTS = 10_000

# Parameters of the devices one chunk of a bmm step holds (1M floats = 4 MiB each for the rows,
# their optimizer state and their gradient: together they stay in cache). The default
# experiment's 100 devices are one chunk; 10,000 devices are ~46.
CHUNK_FLOATS = 1 << 20
# Fewest devices worth a thread of their own in a step split over cores. Splitting the default
# experiment's 100 devices made its round 1.16x slower on the shared 2-core box (thread hand-off
# and the GIL between ~1 ms halves, while other processes held the second core); chunks of a
# 10,000-device step take ~5 ms each, where the hand-off is noise.
MIN_CHUNK_DEVICES = 256
# Largest epoch of samples (devices x samples x features) the bmm strategy gathers at once on
# the CPU (4 MiB; the default experiment's epoch is 0.4 MiB); larger ones, such as 10,000 devices'
# or an image dataset's, are gathered step by step.
EPOCH_SAMPLE_FLOATS = 1 << 20


def conv_outputs_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Elements all convolution layers output for one input sample (a forward on zeros)."""
    return outputs_per_sample(model, input_shape, (nn.modules.conv._ConvNd,))


def choose_strategy(model: nn.Module, requested: str = "auto", input_shape: tuple[int, ...] | None = None) -> str:
    """The fastest exact way to batch this model's local steps over devices on CPU.

    bmm: a plain MLP as batched matmuls; vmap: any functional model, batched by torch.func;
    loop: one device at a time. Models with convolutions use vmap when their feature maps on
    ``input_shape`` are small (see VMAP_MAX_CONV_OUTPUTS), else (or without a shape) the loop.
    """
    choose("training strategy", requested, STRATEGIES)
    if requested == "bmm" and not _is_plain_mlp(model):
        raise P2PLError("training strategy 'bmm' needs a plain MLP (Flatten/Linear/ReLU); use 'vmap'")
    if requested != "auto":
        return requested
    if _is_plain_mlp(model):
        return "bmm"
    if not _has_conv(model):
        return "vmap"
    if input_shape is None:
        return "loop"
    try:
        outputs = conv_outputs_per_sample(model, input_shape)
    except Exception:  # a model that cannot run on this shape fails in training with its own error
        return "loop"
    return "vmap" if outputs <= VMAP_MAX_CONV_OUTPUTS else "loop"


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each device's real samples in the batch (padding is masked out)."""
    return (per_sample * mask).sum(-1) / mask.sum(-1)


def _bmm_losses(model: nn.Module, spec: ParamSpec) -> BatchedLoss:
    layers = list(model)  # type: ignore[call-overload]

    def losses(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = spec.unflatten(flat)
        h = x.flatten(2)  # [n, b, features]
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                h = torch.baddbmm(p[f"{i}.bias"].unsqueeze(1), h, p[f"{i}.weight"].transpose(1, 2))
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
        n, b, c = h.shape
        per_sample = F.cross_entropy(h.reshape(n * b, c), y.reshape(-1), reduction="none").view(n, b)
        return _masked_mean(per_sample, mask)

    return losses


def _vmap_losses(model: nn.Module, spec: ParamSpec) -> BatchedLoss:
    def device_loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, spec.unflatten(flat), (x,))
        return _masked_mean(F.cross_entropy(logits, y, reduction="none"), mask)

    return vmap(device_loss)


class _Workspace:
    """Buffers reused across steps, one per name, grown to the most device rows seen so far; a
    step with fewer active devices uses a prefix of rows (still one contiguous block)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        n = like.shape[0]
        if buf is None or buf.shape[0] < n or buf.shape[1:] != like.shape[1:] or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return buf if buf.shape[0] == n else buf[:n]


BlockSink = Callable[[int, int, torch.Tensor], None]  # (first column, end column, gradient block [n, width])


@dataclass
class _BoundLinear:
    """One Linear layer of a bound parameter tensor: its views and where its gradient goes."""

    index: int  # position in the model
    weight: torch.Tensor  # [n, out, in] view of the parameters
    weight_t: torch.Tensor  # [n, in, out] the same, transposed (forward)
    bias: torch.Tensor  # [n, 1, out] view of the parameters
    grad: torch.Tensor  # [n, out, in] scratch for the weight gradient
    grad_rows: torch.Tensor  # ``grad`` as [n, out * in]
    bias_cols: torch.Tensor  # the bias gradient's columns of the tail block
    weight_cols: torch.Tensor | None  # the weight gradient's columns of the tail block (None: first layer)


@dataclass
class _Bound:
    """Everything a step of one parameter tensor needs, built once (see ``_MlpLossGrad.bind``)."""

    plan: list[_BoundLinear | None]  # the model's Linear (bound) and ReLU (None) layers, in order
    tail: torch.Tensor  # [n, P - first weight's columns]: every gradient column after the first weight
    tail_start: int
    first: _BoundLinear


class _MlpLossGrad:
    """A plain MLP's batched forward and hand-written backward: each weight gradient is one
    batched matmul in its own [n, out, in] layout into a reused buffer. ``__call__`` assembles
    them into a reused [n, P] gradient (what the other strategies return); ``train_step`` hands
    each block straight to the optimizer instead (:class:`p2pl.core.optim.Update`), so no
    gradient is assembled at all. Autograd's version transposed every weight gradient back into
    row layout and concatenated the pieces: ~60 % of a step (BENCHMARKS.md). Same sums as
    autograd, so results agree with it to float rounding (tests compare both and the reference
    engine)."""

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        self.spec = spec
        self.layers = list(model)  # type: ignore[call-overload]
        self.first_linear = min(i for i, layer in enumerate(self.layers) if isinstance(layer, nn.Linear))
        ends = np.cumsum(spec.numels).tolist()
        self.columns = {name: (end - size, end) for name, size, end in zip(spec.names, spec.numels, ends, strict=True)}
        if self.columns[f"{self.first_linear}.weight"][0] != 0:  # a plain MLP's parameters start with it
            raise P2PLError("the bmm strategy expects the first Linear's weight to lead the parameters")
        self.work = _Workspace()
        self._bound: dict[tuple[int, tuple[int, ...], tuple[int, ...]], _Bound] = {}
        self._minus_one: torch.Tensor | None = None
        # Per layer, what a step needs (names and column offsets), so a step builds no strings:
        # (layer index, is a Linear, weight name, bias name)
        self._plan = [
            (i, isinstance(layer, nn.Linear), f"{i}.weight", f"{i}.bias")
            for i, layer in enumerate(self.layers)
            if isinstance(layer, (nn.Linear, nn.ReLU))
        ]
        self._tail_start = self.columns[f"{self.first_linear}.weight"][1]

    def bind(self, flat: torch.Tensor) -> _Bound:
        """The views and gradient buffers of ``flat``, kept while the same tensor comes back (the
        parameters, every step of a round): rebuilding views, transposes and buffer slices was
        ~10 % of a step. A kept view holds its storage alive, so no other tensor can take its
        address until ``release``."""
        key = (flat.data_ptr(), tuple(flat.shape), tuple(flat.stride()))
        found = self._bound.get(key)
        if found is None:
            if len(self._bound) >= 2:  # the parameters and a gathered subset of rows; nothing stale
                self._bound.clear()
            found = self._bound[key] = self._make_bound(flat)
        return found

    def _make_bound(self, flat: torch.Tensor) -> _Bound:
        p = self.spec.unflatten(flat)
        n, tail_start, columns = flat.shape[0], self._tail_start, self.columns
        tail = self.work.get("tail", flat[:, tail_start:])

        def cols(name: str) -> torch.Tensor:
            lo, hi = columns[name]
            return tail[:, lo - tail_start : hi - tail_start]

        plan: list[_BoundLinear | None] = []
        for i, linear, weight, bias in self._plan:
            if not linear:
                plan.append(None)
                continue
            grad = self.work.get(weight, p[weight])
            plan.append(
                _BoundLinear(
                    index=i,
                    weight=p[weight],
                    weight_t=p[weight].transpose(1, 2),
                    bias=p[bias].unsqueeze(1),
                    grad=grad,
                    grad_rows=grad.view(n, -1),
                    bias_cols=cols(bias),
                    weight_cols=None if i == self.first_linear else cols(weight),
                )
            )
        first = next(layer for layer in plan if layer is not None and layer.index == self.first_linear)
        return _Bound(plan, tail, tail_start, first)

    def release(self) -> None:
        """Drop the kept views (end of a round: the parameters are replaced by cooperation)."""
        self._bound.clear()

    def __call__(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grads = self.work.get("grads", flat)

        def into_buffer(lo: int, hi: int, block: torch.Tensor) -> None:
            grads[:, lo:hi].copy_(block)

        return grads, self.train_step(flat, x, y, mask, into_buffer)

    def train_step(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, sink: BlockSink
    ) -> torch.Tensor:
        """Forward and backward of every device; each gradient block goes to ``sink`` once the
        parameters it belongs to are no longer needed (so ``sink`` may update them in place).
        Returns the losses [n]."""
        bound = self.bind(flat)
        h = x.flatten(2)  # [n, b, features]
        inputs: list[torch.Tensor] = []  # each Linear's input, for its weight gradient
        relu_out: list[torch.Tensor] = []  # each ReLU's output, for its backward
        for layer in bound.plan:
            if layer is not None:
                inputs.append(h)
                h = torch.baddbmm(layer.bias, h, layer.weight_t)
            else:
                h = torch.relu(h)
                relu_out.append(h)
        log_probs = torch.log_softmax(h, dim=2)  # [n, b, C]
        target = y.unsqueeze(2)
        per_sample = -log_probs.gather(2, target).squeeze(2)
        count = mask.sum(1)
        losses = (per_sample * mask).sum(1) / count
        # d(masked mean cross-entropy)/d(logits) = (softmax - onehot) * mask / count
        delta = log_probs.exp_()
        delta.scatter_add_(2, target, self._minus_ones(target))
        delta.mul_((mask / count.unsqueeze(1)).unsqueeze(2))
        # The first layer's weight is the leading column block and most of the parameters: its
        # gradient goes to the sink as it comes out of its matmul. Every later column (that
        # layer's bias and the later layers) is gathered in one small contiguous block, so
        # the sink sees two blocks per step rather than two per layer.
        for layer in reversed(bound.plan):
            if layer is None:
                # autograd's own ReLU backward: one fused op (a bool mask and a fill were 10x slower)
                delta = torch.ops.aten.threshold_backward(delta, relu_out.pop(), 0)
                continue
            x_in = inputs.pop()
            torch.bmm(delta.transpose(1, 2), x_in, out=layer.grad)
            torch.sum(delta, 1, out=layer.bias_cols)
            if layer.weight_cols is not None:
                delta = torch.bmm(delta, layer.weight)
                layer.weight_cols.copy_(layer.grad_rows)
        # Only now are the parameters no longer needed: the sink may update them in place.
        sink(0, bound.tail_start, bound.first.grad_rows)
        sink(bound.tail_start, flat.shape[1], bound.tail)
        return losses

    def _minus_ones(self, like: torch.Tensor) -> torch.Tensor:
        """-1 at every (device, sample): the one-hot subtracted from the softmax. Kept at the
        largest shape seen: scatter_add_ reads only the part its index covers."""
        ones = self._minus_one
        if ones is None or ones.device != like.device or ones.shape[0] < like.shape[0] or ones.shape[1] < like.shape[1]:
            ones = self._minus_one = torch.full(like.shape, -1.0, device=like.device)
        return ones


def _loop_loss_grad(model: nn.Module, spec: ParamSpec) -> LossGrad:
    """One device at a time, each with its own leaf: backpropagating a sum of per-device losses
    through row views of one [n,P] leaf would zero-fill and add a full [n,P] gradient per device
    (O(n^2 P) per step; measured 20x slower than this at 100 devices, see BENCHMARKS.md)."""

    def loss_grad(
        flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grads = torch.empty_like(flat)
        losses = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
        for i in range(flat.shape[0]):
            valid = mask[i] > 0  # a device's short last batch: only its real samples
            leaf = flat[i].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = functional_call(model, spec.unflatten(leaf), (x[i][valid],))
                loss = F.cross_entropy(logits, y[i][valid])
                (grads[i],) = torch.autograd.grad(loss, leaf)
            losses[i] = loss.detach()
        return grads, losses

    return loss_grad


def make_loss_grad(model: nn.Module, spec: ParamSpec, strategy: str) -> LossGrad:
    """f(flat [n,P], x [n,b,...], y [n,b], mask [n,b]) -> (grads [n,P], losses [n])."""
    if strategy == "loop":
        return _loop_loss_grad(model, spec)
    if strategy == "bmm":
        return _MlpLossGrad(model, spec)
    batched = {"bmm": _bmm_losses, "vmap": _vmap_losses}[strategy](model, spec)

    def loss_grad(
        flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = batched(leaf, x, y, mask)
            # Devices are independent, so d(sum of losses)/d(row n) is device n's own gradient.
            (grads,) = torch.autograd.grad(losses.sum(), leaf)
        return grads, losses.detach()

    return loss_grad


def step_limits(sizes: np.ndarray, cfg: TrainingConfig, work: np.ndarray | None) -> torch.Tensor:
    """Local steps each device takes this round: E epochs of ceil(|D_n|/B) mini-batches, or a
    share of them for a straggler (``work`` in [0, 1]; 0 = absent)."""
    per_epoch = (torch.from_numpy(np.asarray(sizes, dtype=np.int64)) + cfg.batch_size - 1) // cfg.batch_size
    full = per_epoch * cfg.local_epochs
    if work is None:
        return full
    # A copy: ``work`` may be a read-only array (torch warns on wrapping non-writable memory).
    share = torch.tensor(np.asarray(work, dtype=np.float64))
    return torch.minimum(torch.ceil(full.double() * share - 1e-9).long(), full)


def round_schedule(sizes: np.ndarray, cfg: TrainingConfig, work: np.ndarray | None) -> list[tuple[int, int]]:
    """The (epoch, step) iterations of a round's local-step loop over devices of these ``sizes``:
    in epoch e, as many steps as the device with the most left (a device with fewer idles).

    Over *all* devices this is the network's schedule, which a Ray shard or a node passes to
    :meth:`VectorizedTrainer.train` as ``span`` when something happens after every step (D-PSGD
    mixes): every runtime then counts the same steps whatever devices it holds."""
    per_epoch = (np.asarray(sizes, dtype=np.int64) + cfg.batch_size - 1) // cfg.batch_size
    limits = step_limits(sizes, cfg, work).numpy()
    out: list[tuple[int, int]] = []
    for epoch in range(cfg.local_epochs):
        left = np.minimum(per_epoch, np.maximum(limits - epoch * per_epoch, 0))
        steps = int(left.max()) if len(left) else 0
        if steps == 0:
            break
        out += [(epoch, t) for t in range(steps)]
    return out


@dataclass
class RoundStats:
    mean_loss: torch.Tensor  # [N] mean training loss over the steps taken (nan if none)
    steps: torch.Tensor  # [N] local steps taken


class VectorizedTrainer:
    """Owns the per-device optimizer state of a batch of devices and runs their local epochs."""

    def __init__(
        self,
        model: nn.Module,
        spec: ParamSpec,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        partition: Partition,
        cfg: TrainingConfig,
        seed: int,
        strategy: str = "auto",
    ) -> None:
        self.spec = spec
        self.x_train, self.y_train = x_train, y_train
        self.partition = partition
        self.cfg = cfg
        self.seed = seed
        self.strategy = choose_strategy(model, strategy, tuple(x_train.shape[1:]))
        self.loss_grad = make_loss_grad(model, spec, self.strategy)
        self._model = model
        self._helpers: list[LossGrad] = []  # workers 1.. of a step split over cores (own scratch)
        self.state = optim.init_state(cfg, len(partition.indices), spec.total)
        self.device = torch.device("cpu")
        # This round's optimizer updates of rows stepped in place, by chunk (None: every row):
        # their column views are built once per round, not once per step.
        self._updates: dict[tuple[int, int] | None, optim.Update] = {}
        self._full_round: tuple[np.ndarray, np.ndarray, list[tuple[int, int]]] | None = None
        self._samples: tuple[torch.Tensor, torch.Tensor] | None = None  # this epoch's (see _epoch_samples)

    @property
    def num_devices(self) -> int:
        return len(self.partition.indices)

    def to(self, device: torch.device) -> None:
        """Move the training data and optimizer state to ``device`` once (parameters passed to
        ``train`` must live there too); the step schedule stays on the CPU."""
        self.device = device
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        self.state.tensors = {k: v.to(device) for k, v in self.state.tensors.items()}
        self._updates.clear()

    def train(
        self,
        params: torch.Tensor,
        round_index: int,
        work: np.ndarray | None = None,
        *,
        span: list[tuple[int, int]] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> RoundStats:
        """Run this round's local epochs, updating ``params [N, P]`` in place.

        ``span``: the (epoch, step) iterations to walk (default: this batch's own
        :func:`round_schedule`); ``after_step(j)`` runs after iteration ``j``, on every
        iteration, also when none of these devices had a step left in it (D-PSGD mixes then:
        ``params`` may be rewritten in place there)."""
        steps = self.round_steps(params, round_index, work, span)
        while True:
            try:
                j = next(steps)
            except StopIteration as done:
                stats: RoundStats = done.value
                return stats
            if after_step is not None:
                after_step(j)

    def round_steps(
        self,
        params: torch.Tensor,
        round_index: int,
        work: np.ndarray | None = None,
        span: list[tuple[int, int]] | None = None,
    ) -> Generator[int, None, RoundStats]:
        """:meth:`train` one iteration at a time: yields each iteration's index after it ran and
        returns the round's stats (a Ray shard steps it between its driver's exchanges)."""
        limits, per_epoch, own_schedule = self._round_shape(work)
        schedule = own_schedule if span is None else span
        taken = np.zeros(self.num_devices, dtype=np.int64)
        loss_sum = torch.zeros(self.num_devices, dtype=torch.float64)
        self._updates.clear()  # views of the last round's parameters
        epochs = sorted({epoch for epoch, _ in schedule})
        plans = epoch_plans(self.partition, self.seed, round_index, epochs, self.cfg.batch_size)
        plan_of = dict(zip(epochs, plans, strict=True))
        plan_epoch = -1
        for j, (epoch, t) in enumerate(schedule):
            # Bookkeeping in numpy: [N] torch ops and their syncs were a visible share of a step.
            active = (t < per_epoch) & (taken < limits)
            if active.any():
                plan = plan_of[epoch]
                if plan_epoch != epoch:
                    self._samples, plan_epoch = self._epoch_samples(plan), epoch
                rows = None if active.all() else torch.from_numpy(np.flatnonzero(active))
                self._step(params, plan, t, rows, loss_sum)
                taken += active
            yield j
        self._samples = None
        for loss_grad in (self.loss_grad, *self._helpers):
            if isinstance(loss_grad, _MlpLossGrad):
                loss_grad.release()
        self._updates.clear()
        steps_taken = torch.from_numpy(taken)
        mean = torch.where(
            steps_taken > 0, loss_sum / steps_taken.clamp_min(1), torch.full_like(loss_sum, float("nan"))
        )
        return RoundStats(mean.float(), steps_taken)

    def _round_shape(self, work: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """(steps each device takes this round, steps of a full epoch, this batch's own
        :func:`round_schedule`); kept while every device does all its work (the usual round)."""
        if work is None and self._full_round is not None:
            return self._full_round
        sizes = self.partition.sizes
        limits = step_limits(sizes, self.cfg, work).numpy()
        per_epoch = (sizes + self.cfg.batch_size - 1) // self.cfg.batch_size
        shape = (limits, per_epoch, round_schedule(sizes, self.cfg, work))
        if work is None:
            self._full_round = shape
        return shape

    def _epoch_samples(self, plan: EpochPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every device's inputs and labels for the whole epoch, in the plan's order (one gather
        per epoch instead of two per step), where the bmm strategy steps them on the CPU and
        they are small (see EPOCH_SAMPLE_FLOATS); None: each step gathers its own batch."""
        features = math.prod(self.x_train.shape[1:])
        if self.strategy != "bmm" or self.device.type != "cpu" or plan.order.numel() * features > EPOCH_SAMPLE_FLOATS:
            return None
        flat = plan.order.reshape(-1)
        x = self.x_train.index_select(0, flat).view(*plan.order.shape, *self.x_train.shape[1:])
        return x, self.y_train.index_select(0, flat).view(plan.order.shape)

    def _step(
        self, params: torch.Tensor, plan: EpochPlan, t: int, rows: torch.Tensor | None, loss_sum: torch.Tensor
    ) -> None:
        """Step ``t`` of an epoch for every device (``rows`` None) or for ``rows`` only: in chunks
        of devices spread over the free cores when the strategy allows (see :meth:`chunks`)."""
        count = self.num_devices if rows is None else len(rows)
        # The batch width (padding trimmed) is the step's, whatever the chunk: a device's sums
        # then run over the same samples in the same order in every chunk.
        top = plan.order.shape[1] if rows is None else int(plan.sizes[rows].max())
        width = min(plan.batch_size, top - t * plan.batch_size)
        size, workers = self.chunks(count)
        if size >= count:
            self._step_part(params, plan, t, width, rows, loss_sum, self.loss_grad)
            return
        parts = [slice(lo, lo + size) if rows is None else rows[lo : lo + size] for lo in range(0, count, size)]
        while len(self._helpers) < workers - 1:
            self._helpers.append(make_loss_grad(self._model, self.spec, self.strategy))
        helpers = [self.loss_grad, *self._helpers]

        def run(worker: int, part: torch.Tensor | slice) -> None:
            self._step_part(params, plan, t, width, part, loss_sum, helpers[worker])

        run_jobs(run, parts, workers)

    def chunks(self, count: int) -> tuple[int, int]:
        """(devices per chunk, worker threads) for a step of ``count`` devices. The bmm strategy
        steps chunks whose parameters, optimizer state and gradient stay in cache between its
        forward, backward and update (at 10,000 devices these no longer fit, and each pass over
        them went to memory), and splits a step over the cores torch leaves free (a device's
        numbers do not depend on its chunk). Other strategies, and accelerators (which want one
        large batch), step every device at once."""
        if self.strategy != "bmm" or count <= 1 or self.device.type != "cpu":
            return max(count, 1), 1
        size = min(count, max(1, CHUNK_FLOATS // max(self.spec.total, 1)))
        workers = free_cores(self.device)
        if workers > 1 and count >= workers * MIN_CHUNK_DEVICES:
            size = min(size, -(-count // workers))  # at least one chunk per worker
        return size, workers

    def _step_part(
        self,
        params: torch.Tensor,
        plan: EpochPlan,
        t: int,
        width: int,
        rows: torch.Tensor | slice | None,
        loss_sum: torch.Tensor,
        loss_grad: LossGrad,
    ) -> None:
        lo = t * plan.batch_size
        order, valid = plan.order, plan.valid
        samples = self._samples
        if rows is not None:
            order, valid = order[rows], valid[rows]
        on_device = rows if not isinstance(rows, torch.Tensor) or self.device.type == "cpu" else rows.to(self.device)
        if samples is not None and not isinstance(rows, torch.Tensor):  # the epoch's gathered samples
            x_epoch, y_epoch = samples if rows is None else (samples[0][rows], samples[1][rows])
            x, y, mask = x_epoch[:, lo : lo + width], y_epoch[:, lo : lo + width], valid[:, lo : lo + width]
        else:
            idx, mask = order[:, lo : lo + width], valid[:, lo : lo + width]
            if self.device.type != "cpu":  # the schedule is CPU bookkeeping: ship this step's part
                idx, mask = idx.to(self.device), mask.to(self.device)
            flat_idx = idx.reshape(-1)
            x = self.x_train.index_select(0, flat_idx).view(*idx.shape, *self.x_train.shape[1:])
            y = self.y_train.index_select(0, flat_idx).view(idx.shape)
        mask = mask.to(x.dtype)
        update = self._update(params, on_device)
        if isinstance(loss_grad, _MlpLossGrad):
            losses = loss_grad.train_step(update.params, x, y, mask, update.columns)
        else:
            grads, losses = loss_grad(update.params, x, y, mask)
            update.columns(0, params.shape[1], grads)
        update.finish()
        if self.device.type != "cpu":
            losses = losses.cpu()
        if rows is None:
            loss_sum += losses
        else:
            loss_sum[rows] += losses

    def _update(self, params: torch.Tensor, rows: torch.Tensor | slice | None) -> optim.Update:
        """The optimizer update for this step of ``rows``: the round's own for rows stepped in
        place (``params`` is the same tensor all round), a new one for gathered rows."""
        if isinstance(rows, torch.Tensor):
            return optim.Update(self.cfg, params, self.state, rows)
        key = None if rows is None else (rows.start, rows.stop)
        update = self._updates.get(key)
        if update is None:
            update = self._updates[key] = optim.Update(self.cfg, params, self.state, rows)
        else:
            update.next_step()
        return update

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer state on the CPU (for checkpoints; a copy only when it lives elsewhere)."""
        return {k: v.cpu() for k, v in self.state.tensors.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in self.state.tensors:
            self.state.tensors[key] = tensors[key].to(self.device, copy=True)
        self._updates.clear()  # they viewed the replaced tensors
