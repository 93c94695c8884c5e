"""Which training strategy (bmm / vmap / loop) is fastest per model family, N and thread count.

``p2pl.core.train.choose_strategy`` picks a strategy from the model and input shape (plain MLP
-> bmm; convolutions -> vmap while their outputs are small, else loop; anything else -> vmap)
and ``p2pl.sim.simulator.configure_threads`` picks 1 torch thread when devices * params <= 1e7,
else all cores. This script measures every exact
strategy that applies, at 1 and 2 threads, through the real ``VectorizedTrainer.train`` (batch
schedule, masked loss, functional optimizer included), so those two rules can be checked.

Inputs are random tensors of the real shapes (timing does not depend on pixel values):

* ``mlp@digits``   the default MLP (64 hidden) on 1x8x8      ``mlp784``  784-200-200 MLP on 1x28x28
* ``cnn@digits``   the 'cnn' on 1x8x8                         ``cnn@cifar``  the 'cnn' on 3x32x32
* ``cnn@mnist``    the 'cnn' on 1x28x28                       ``lenet@mnist``  'lenet' on 1x28x28
* ``lenet@cifar``  'lenet' on 3x32x32                         ``resnet@cifar``  'resnet' on 3x32x32

Every device holds ``steps * batch`` samples and trains one epoch, so one call = ``steps`` local
steps of all N devices. Printed: milliseconds per local step (all N devices), median of
``--repeats`` interleaved calls after a warm-up, and the CPU time of this process alongside.

    python benchmarks/bench_strategies.py                       # all families, N in {10, 100}
    python benchmarks/bench_strategies.py --quick               # fewer repeats, N = 100
    python benchmarks/bench_strategies.py --families lenet@mnist resnet@cifar --devices 10 100 --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from p2pl.config import ModelConfig, TrainingConfig
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.core.schedule import Partition
from p2pl.core.train import VectorizedTrainer, choose_strategy
from p2pl.models import build_model


@dataclass(frozen=True)
class Family:
    model: str
    shape: tuple[int, int, int]
    hidden: tuple[int, ...] = (64,)
    steps: int = 4  # local steps per timed call (fewer for the heavy models)


FAMILIES = {
    "mlp@digits": Family("mlp", (1, 8, 8), steps=20),
    "mlp784": Family("mlp", (1, 28, 28), hidden=(200, 200), steps=8),
    "cnn@digits": Family("cnn", (1, 8, 8), steps=8),
    "cnn@cifar": Family("cnn", (3, 32, 32), steps=3),
    "cnn@mnist": Family("cnn", (1, 28, 28), steps=3),
    "lenet@mnist": Family("lenet", (1, 28, 28), steps=3),
    "lenet@cifar": Family("lenet", (3, 32, 32), steps=3),
    "resnet@cifar": Family("resnet", (3, 32, 32), steps=2),
}


def applicable(family: Family, model: torch.nn.Module) -> list[str]:
    out = ["vmap", "loop"]
    try:
        choose_strategy(model, "bmm")
        out.insert(0, "bmm")
    except Exception:  # bmm needs a plain MLP
        pass
    return out


def make_trainer(
    family: Family, n: int, strategy: str, batch: int, seed: int = 0
) -> tuple[VectorizedTrainer, torch.Tensor]:
    model = build_model(ModelConfig(name=family.model, hidden=list(family.hidden)), family.shape, 10)
    spec = ParamSpec.of(model)
    per_device = family.steps * batch
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n * per_device, *family.shape, generator=gen)
    y = torch.randint(0, 10, (n * per_device,), generator=gen)
    parts = [torch.arange(d * per_device, (d + 1) * per_device).numpy() for d in range(n)]
    cfg = TrainingConfig(batch_size=batch, local_epochs=1)
    trainer = VectorizedTrainer(model, spec, x, y, Partition.full(parts), cfg, seed, strategy)
    params = init_device_params(model, spec, seed, range(n))
    return trainer, params


@dataclass
class Cell:
    wall: list[float]
    cpu: list[float]


def measure(family: Family, n: int, threads: int, batch: int, repeats: int) -> tuple[dict[str, Cell], str, int]:
    torch.set_num_threads(threads)
    probe = build_model(ModelConfig(name=family.model, hidden=list(family.hidden)), family.shape, 10)
    strategies = applicable(family, probe)
    runs = {s: make_trainer(family, n, s, batch) for s in strategies}
    cells = {s: Cell([], []) for s in strategies}
    for trainer, params in runs.values():
        trainer.train(params, 0)  # warm-up
    for r in range(repeats):
        for s, (trainer, params) in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            trainer.train(params, r + 1)
            cells[s].cpu.append((time.process_time() - c0) / family.steps)
            cells[s].wall.append((time.perf_counter() - w0) / family.steps)
    return cells, choose_strategy(probe, "auto", family.shape), ParamSpec.of(probe).total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--devices", type=int, nargs="+", default=None, help="device counts (default 10 100)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8, the default config's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 3)")
    parser.add_argument("--quick", action="store_true", help="N = 100 only, 2 repeats")
    args = parser.parse_args()
    devices = args.devices or ([100] if args.quick else [10, 100])
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"ms per local step of all N devices (batch {args.batch}); median of {repeats}; torch {torch.__version__}")
    head = (
        f"{'family':>13} {'params':>7} {'N':>4} {'thr':>3} | {'bmm':>8} {'vmap':>8} {'loop':>8} | "
        f"{'best':>5} {'auto':>5} {'rule thr':>8}"
    )
    print(head + "   (cpu ms: bmm vmap loop)")
    print("-" * len(head))
    for name in args.families:
        family = FAMILIES[name]
        for n in devices:
            for threads in args.threads:
                cells, auto, total = measure(family, n, threads, args.batch, repeats)
                med = {s: statistics.median(c.wall) * 1e3 for s, c in cells.items()}
                cpu = {s: statistics.median(c.cpu) * 1e3 for s, c in cells.items()}
                best = min(med, key=med.__getitem__)
                rule = 1 if n * total <= 10_000_000 else 2
                col = " ".join(f"{med[s]:8.1f}" if s in med else f"{'-':>8}" for s in ("bmm", "vmap", "loop"))
                cpu_col = " ".join(f"{cpu[s]:.1f}" if s in cpu else "-" for s in ("bmm", "vmap", "loop"))
                cells_txt = f"{col} | {best:>5} {auto:>5} {rule:>8}   ({cpu_col})"
                print(f"{name:>13} {total:>7} {n:>4} {threads:>3} | {cells_txt}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
