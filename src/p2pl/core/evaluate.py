"""Every device's accuracy and loss on the common test set, batched over devices.

Evaluation is a forward pass of N models over the same test samples, so it is batched the way
training is (``core.train.choose_strategy``): a plain MLP as batched matmuls, small convnets
with vmap, large ones one device at a time. Devices holding identical parameters (FedAvg,
centralized, right after max-norm sync) are evaluated once and the result is copied to all.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from p2pl.core.parallel import free_cores, run_jobs
from p2pl.core.params import ParamSpec
from p2pl.core.probe import outputs_per_sample
from p2pl.core.train import choose_strategy

# Floats of activations alive at once on a CPU (2M floats = 8 MiB): chunks that stay in cache
# were 1.4x faster than one 256 MiB chunk for 1,000 MLPs (BENCHMARKS.md), and a chunk this size
# still makes each matmul large. On an accelerator the budget follows its free memory.
ACTIVATION_BUDGET = 1 << 21

# Multiply-adds (devices x parameters x test samples, about a forward's) from which an evaluation
# is split over the free cores. Measured on the 2-core box (BENCHMARKS.md, "default round"):
# SPLIT_NOTE
MIN_SPLIT_WORK = 100_000_000

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (flat [n, P], x [b, ...]) -> logits [n, C, b]


def activation_budget(device: torch.device) -> int:
    """Activation floats one evaluation chunk may hold on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(ACTIVATION_BUDGET, free // 16)  # a quarter of free memory, 4-byte floats
    return ACTIVATION_BUDGET


def distinct_rows(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(representatives, inverse): ``params[representatives][inverse]`` equals ``params`` exactly.

    Rows are grouped by an integer hash of the bits of their first 256 columns (exact, so
    equal rows always share a key), then every row is checked for equality with its group's
    first row; a row that differs (a hash collision) becomes its own group. So two rows share a
    result only when they are equal.
    """
    n = params.shape[0]
    every = torch.arange(n, device=params.device)
    if n <= 1:
        return every, every
    if torch.equal(params[1:], params[0].expand(n - 1, -1)):  # stops at the first difference
        return every[:1], torch.zeros(n, dtype=torch.long, device=params.device)
    # A block of leading columns: contiguous per row (a strided sample was 40x slower to copy).
    block = params[:, :256].contiguous().view(torch.int32).long()
    mixers = torch.arange(1, block.shape[1] + 1, device=params.device) * 0x9E3779B1 | 1  # odd
    keys = (block * mixers).sum(1)  # integer arithmetic: the same bits give the same key
    distinct_keys, group = torch.unique(keys, return_inverse=True)
    if len(distinct_keys) == n:  # no two rows share a key, so no two are equal (the usual case)
        return every, every
    first = torch.full((n,), n, dtype=torch.long, device=params.device)
    first = first.scatter_reduce(0, group, every, reduce="amin")[group]
    owner = every.clone()
    # Only rows that share a key with an earlier row are compared: distinct models cost the hash.
    candidates = (first != every).nonzero().squeeze(1)
    if len(candidates):
        same = (params[candidates] == params[first[candidates]]).all(1)
        owner[candidates[same]] = first[candidates[same]]
    representatives, inverse = torch.unique(owner, return_inverse=True)
    return representatives, inverse


_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]] = weakref.WeakKeyDictionary()


def _outputs_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """:func:`~p2pl.core.probe.outputs_per_sample`, probed once per model and input shape (the
    probe is a forward pass: ~0.1 ms, paid by every evaluation of a round before)."""
    shapes = _PROBED.setdefault(model, {})
    if input_shape not in shapes:
        shapes[input_shape] = outputs_per_sample(model, input_shape)
    return shapes[input_shape]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    spec: ParamSpec,
    params: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    sample_chunk: int = 4096,
    device_chunk: int = 0,
    strategy: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (accuracy [N], mean cross-entropy loss [N]) as float64 on the CPU.

    ``strategy`` is a training strategy (``core.train.STRATEGIES``); ``device_chunk`` = 0 sizes
    the device chunks from the model's activations and the memory budget.
    """
    n_dev, n_test = params.shape[0], x_test.shape[0]
    if n_dev == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.clone()
    representatives, inverse = distinct_rows(params)
    distinct = params[representatives] if len(representatives) < n_dev else params
    chosen = choose_strategy(model, strategy, tuple(x_test.shape[1:]))
    per_sample = max(1, _outputs_per_sample(model, tuple(x_test.shape[1:])))
    budget = activation_budget(params.device)
    sample_chunk = max(1, min(sample_chunk, n_test, budget // per_sample))
    if device_chunk <= 0:
        device_chunk = max(1, budget // (sample_chunk * per_sample))
    forward = _forward(model, spec, chosen)
    n = distinct.shape[0]
    correct = torch.zeros(n, dtype=torch.float64, device=params.device)
    loss = torch.zeros(n, dtype=torch.float64, device=params.device)
    # Over the free cores when the evaluation is large enough for the hand-off to pay (see
    # MIN_SPLIT_WORK), in at least two chunks per core: a core held by another process then
    # delays one chunk, and the other workers take the rest (core.parallel.run_jobs).
    workers = free_cores(params.device) if chosen != "loop" and n * spec.total * n_test >= MIN_SPLIT_WORK else 1
    if workers > 1:
        device_chunk = min(device_chunk, -(-n // (2 * workers)))

    def run(worker: int, lo: int) -> None:
        hi = min(n, lo + device_chunk)
        for s in range(0, n_test, sample_chunk):  # each device's sums in sample order, as one chunk
            logits = forward(distinct[lo:hi], x_test[s : s + sample_chunk])  # [n, C, b]
            hits, ce = _scores(logits, y_test[s : s + sample_chunk])
            correct[lo:hi] += hits
            loss[lo:hi] += ce

    run_jobs(run, range(0, n, device_chunk), workers)
    acc, mean_loss = (correct / n_test).cpu(), (loss / n_test).cpu()
    if n < n_dev:
        acc, mean_loss = acc[inverse.cpu()], mean_loss[inverse.cpu()]
    return acc, mean_loss


def _scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per device: correct predictions and summed cross-entropy, from logits ``[n, C, b]``.

    Classes lie along dim 1 so every reduction runs over contiguous rows of samples (reducing
    a short last dim was 2-4x slower on CPU). ``max`` returns the first maximal class, as argmax.
    """
    n = logits.shape[0]
    # amax, not max: max over a non-last dim with indices was 13x slower than amax (BENCHMARKS.md).
    best = logits.amax(1)
    target = logits.gather(1, y.view(1, 1, -1).expand(n, 1, -1)).squeeze(1)
    shifted = logits - best.unsqueeze(1)  # 0 exactly where a class attains the maximum
    # argmax's rule: the first maximal class (NaN counts as maximal). The target is predicted when
    # it is the only class attaining the maximum; ties and NaN (no exact 0: rare) ask argmax itself.
    hit = target == best
    maxima = (shifted == 0).view(torch.uint8).sum(1, dtype=torch.uint8)
    unclear = maxima != 1
    if bool(unclear.any()):
        device, sample = unclear.nonzero(as_tuple=True)
        hit[device, sample] = logits[device, :, sample].argmax(1) == y[sample]
    hits = hit.sum(1, dtype=torch.float64)
    # cross-entropy = logsumexp - the target's logit; float32 per sample, summed in float64.
    # Shifted logits are clamped at -80 before exp: exp below ~-87 gives a subnormal, which the
    # CPU computes 15x slower, and a term under 2e-35 cannot change a sum that holds the max's
    # exp(0) = 1 in float32, so the loss is the same.
    ce = shifted.clamp_min_(-80.0).exp_().sum(1).log_().add_(best).sub_(target)
    return hits, ce.sum(1, dtype=torch.float64)


def _forward(model: nn.Module, spec: ParamSpec, strategy: str) -> Forward:
    """f(flat [n, P], x [b, ...]) -> logits [n, C, b] for this strategy."""
    if strategy == "bmm":
        return _mlp_forward(model, spec)

    def logits_of(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, spec.unflatten(flat), (x,))

    batched = vmap(logits_of, in_dims=(0, None))

    def with_vmap(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return batched(flat, x).transpose(1, 2)

    def one_at_a_time(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([logits_of(row, x).t() for row in flat])

    if strategy == "vmap":
        return with_vmap

    return one_at_a_time


def _mlp_forward(model: nn.Module, spec: ParamSpec) -> Forward:
    """A plain MLP over many devices, feature-major (activations ``[n, features, b]``): the
    first layer is one matmul of every device's weights stacked with the shared test inputs,
    the rest batched matmuls, and the logits come out ``[n, C, b]`` with no transposes."""
    layers = list(model)  # type: ignore[call-overload]
    first = min(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear))

    def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = spec.unflatten(flat)
        n = flat.shape[0]
        h = x.flatten(1).t()  # [in, b], shared by every device
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                w, bias = p[f"{i}.weight"], p[f"{i}.bias"]  # [n, out, in], [n, out]
                if i == first:
                    # [n*out, in] @ [in, b]: one large matmul instead of n small ones.
                    out = w.shape[1]
                    h = torch.addmm(bias.reshape(-1, 1), w.reshape(n * out, -1), h).view(n, out, -1)
                else:
                    h = torch.baddbmm(bias.unsqueeze(2), w, h)
            elif isinstance(layer, nn.ReLU):
                h = torch.relu_(h)
        return h

    return forward
