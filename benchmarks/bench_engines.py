"""Vectorized round vs reference round vs one centralized epoch, side by side in one run.

For each N: the same dataset (digits by default), model, batch size and seed. Timed:

* ``vec round``: one round of local training (``training.local_epochs`` epochs, default 5) of
  all N devices with the vectorized engine (``VectorizedTrainer``, the strategy ``auto`` picks);
* ``ref round``: the same round with the reference engine (one nn.Module + torch.optim per device);
* ``central epoch``: ONE epoch of one model over the union of the devices' data, same batch
  size: a plain torch loop (``ReferenceTrainer`` with one device, i.e. what a user would write)
  and the vectorized engine with one device; the faster is the baseline.

Local training only (no evaluation, no consensus: those are the same for both engines and
measured elsewhere). Each number is the median of ``--repeats`` runs after one warm-up run, the engines interleaved
(one call of each per repeat); CPU-time medians and the wall min/max are printed too, because
the machine is shared.

    python benchmarks/bench_engines.py                    # N in {10, 100, 1000}, 5 repeats
    python benchmarks/bench_engines.py --quick            # N in {10, 100}, 2 repeats
    python benchmarks/bench_engines.py --devices 100 --repeats 9 --set model.hidden=[200,200]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from p2pl.config import ExperimentConfig, load_config
from p2pl.experiment import build_experiment
from p2pl.sim.simulator import configure_threads


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]  # this process's CPU time: less inflated than wall time when others load the machine

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def __str__(self) -> str:
        return f"{self.median * 1e3:9.1f}"


def timed(fns: dict[str, Callable[[int], object]], repeats: int) -> dict[str, Timing]:
    """Wall and CPU time of each ``fn(round)``, interleaved (one call of each per repeat) so a
    burst of load from other processes hits every engine alike; one warm-up call each first."""
    out = {name: Timing([], []) for name in fns}
    for fn in fns.values():
        fn(0)
    for r in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn(r + 1)
            out[name].cpu.append(time.process_time() - c0)
            out[name].wall.append(time.perf_counter() - w0)
    return out


def round_timer(cfg: ExperimentConfig, strategy: str = "auto") -> tuple[Callable[[int], object], str]:
    """A function running one round of local training for ``cfg``'s devices, and its strategy."""
    exp = build_experiment(cfg)
    trainer = exp.trainer(strategy)
    params = exp.start_params()[0]

    def run(round_index: int) -> object:
        return trainer.train(params, round_index + 1)

    return run, getattr(trainer, "strategy", "reference")


# Training does not depend on the graph; a ring is cheap to build and connected for every N.
NEUTRAL = ['topology.name="ring"', "sync.enabled=false"]


def bench(n: int, user: list[str], repeats: int, threads: int, with_reference: bool) -> dict[str, object]:
    overrides = [*NEUTRAL, f"devices={n}", *user]
    base = load_config(None, overrides)
    exp = build_experiment(base)
    # The simulator's rule for N devices; the one-model centralized run gets the same count
    # (the rule gives it 1 thread too at these sizes) so the engines compete on equal terms.
    used = configure_threads(threads, n, exp.spec.total)
    fns: dict[str, Callable[[int], object]] = {}
    fns["vec"], strategy = round_timer(base)
    if with_reference:
        fns["ref"], _ = round_timer(load_config(None, [*overrides, 'engine="reference"']))
    central = [*overrides, 'algorithm="centralized"', "training.local_epochs=1"]
    fns["central_loop"], _ = round_timer(load_config(None, [*central, 'engine="reference"']))
    fns["central_vec"], _ = round_timer(load_config(None, central))
    row: dict[str, object] = {"n": n, "threads": used, "strategy": strategy, "E": base.training.local_epochs}
    row.update(timed(fns, repeats))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=None, help="device counts (default 10 100 1000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 5)")
    parser.add_argument("--quick", action="store_true", help="N in {10, 100}, 2 repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the simulator's rule)")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference engine")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set training.local_epochs=1")  # fmt: skip
    args = parser.parse_args()
    # reference.py's float(loss) warns once per process; it is not what we measure.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    devices = args.devices or ([10, 100] if args.quick else [10, 100, 1000])
    repeats = args.repeats or (2 if args.quick else 5)
    cfg = load_config(None, args.overrides)
    print(
        f"data={cfg.data.name} model={cfg.model.name} hidden={cfg.model.hidden} batch={cfg.training.batch_size} "
        f"E={cfg.training.local_epochs} optimizer={cfg.training.optimizer}; median of {repeats} after 1 warm-up; "
        f"torch {torch.__version__}"
    )
    head = (
        f"{'N':>5} {'thr':>3} {'strategy':>8} | {'vec round':>9} {'ref round':>9} {'ref/vec':>7} | "
        f"{'c.loop':>9} {'c.vec':>9} {'vec/E':>9} {'(vec/E)/c':>9} {'vec/c':>6}"
    )
    print("times in ms per call; c.* = one centralized epoch; vec/E = vec round per local epoch")
    print(head)
    print("-" * len(head))
    for n in devices:
        row = bench(n, args.overrides, repeats, args.threads, not args.no_reference)
        vec, loop, one = row["vec"], row["central_loop"], row["central_vec"]
        assert isinstance(vec, Timing) and isinstance(loop, Timing) and isinstance(one, Timing)
        central = min(loop, one, key=lambda t: t.median)
        epochs = int(row["E"])  # type: ignore[call-overload]
        ref = row.get("ref")
        ref_cols = f"{ref!s} {ref.median / vec.median:6.1f}x" if isinstance(ref, Timing) else f"{'-':>9} {'-':>7}"
        print(
            f"{n:>5} {row['threads']!s:>3} {row['strategy']!s:>8} | {vec} {ref_cols} | {row['central_loop']} "
            f"{row['central_vec']} {vec.median / epochs * 1e3:9.1f} {vec.median / epochs / central.median:8.2f}x "
            f"{vec.median / central.median:5.2f}x"
        )
        cpu = " ".join(f"{k}={v.cpu_median * 1e3:.1f}" for k, v in row.items() if isinstance(v, Timing))
        spread = " ".join(
            f"{k}={min(v.wall) * 1e3:.1f}-{max(v.wall) * 1e3:.1f}" for k, v in row.items() if isinstance(v, Timing)
        )
        print(f"      cpu median ms: {cpu}\n      wall min-max ms: {spread}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
