"""The acceptance numbers (BENCHMARKS.md), through the real ``p2pl`` command.

1. ``p2pl run`` (the default experiment: 100 devices, digits, IID, random geometric graph,
   uniform weights, sync on): wall time (target < 60 s) and every device's final accuracy
   (target: min >= 90%).
2. ``p2pl compare`` on the same setup: P2PL's mean within 2 points of FedAvg's, its min within
   3 points of FedAvg's min, local-only clearly lower.
3. Sync off vs sync on: rounds to 80% mean accuracy (target: more rounds without sync), for
   ``--seeds`` seeds (one seed can be lucky).
5. The default experiment's round, evaluation included, against ONE centralized epoch (one
   model, one torch.optim, one epoch over the union of the data, batch 8: what a user would
   write; ``bench_engines.py``'s ``c.loop``); target <= 0.3x. Interleaved: each repeat runs
   ``--round-rounds`` rounds of the default experiment in-process (the steady rounds after the
   first, timed at each round's end) and as many centralized epochs; wall and CPU medians.
4. ``p2pl compare`` on MNIST-format data: no real MNIST can be had offline, so this writes the
   four IDX files (the real format, read by the real reader) holding synthetic, learnable
   28x28 digits-like images: a smooth random prototype per class, randomly shifted and scaled,
   plus noise (6,000 train / 1,000 test by default), and compares the four algorithms with the
   'lenet' model for ``--mnist-rounds`` rounds.

    python benchmarks/bench_acceptance.py                  # everything (~10 min on 2 cores)
    python benchmarks/bench_acceptance.py --skip-mnist     # 1-3 only (~1 min)
    python benchmarks/bench_acceptance.py --only mnist --mnist-rounds 5 --out /tmp/acc
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ALGORITHMS = ("p2pl", "fedavg", "centralized", "local")
PARTS = ("run", "compare", "sync", "mnist", "round")


def p2pl_cli(*argv: str) -> float:
    """Run the ``p2pl`` command; returns its wall time in seconds."""
    exe = shutil.which("p2pl")
    cmd = [exe] if exe else [sys.executable, "-c", "from p2pl.cli import entry; entry()"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"p2pl {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return time.perf_counter() - t0


def summary(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / "summary.json").read_text())
    return result


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def compare_table(directory: Path) -> dict[str, dict[str, Any]]:
    runs = {name: summary(directory / name) for name in ALGORITHMS}
    print(f"  {'algorithm':>11} | {'mean':>6} {'min':>6} {'max':>6} | {'to 80%':>6} {'to 90%':>6} | MB/dev  time s")
    for name, s in runs.items():
        acc = s["final"]["accuracy"]
        to = s["rounds_to_mean_accuracy"]
        print(
            f"  {name:>11} | {pct(acc['mean'])} {pct(acc['min'])} {pct(acc['max'])} | "
            f"{to['0.8']!s:>6} {to['0.9']!s:>6} | {s['bytes_sent_per_device'] / 1e6:6.2f} {s['wall_time_s']:7.1f}"
        )
    p, f, loc = (runs[n]["final"]["accuracy"] for n in ("p2pl", "fedavg", "local"))
    print(
        f"  P2PL - FedAvg: mean {100 * (p['mean'] - f['mean']):+.1f} points (target within 2), "
        f"min {100 * (p['min'] - f['min']):+.1f} points (target within 3); "
        f"local mean {100 * (loc['mean'] - p['mean']):+.1f} points vs P2PL (target: clearly lower)"
    )
    return runs


def part_run(out: Path, common: list[str]) -> None:
    print("1. p2pl run (default experiment)")
    wall = p2pl_cli("run", "--out", str(out / "run"), "--fresh", "--quiet", *common)
    s = summary(out / "run")
    acc = s["final"]["accuracy"]
    print(
        f"  command wall time {wall:.1f} s (rounds {s['wall_time_s']:.1f} s; target < 60 s); final accuracy mean "
        f"{pct(acc['mean'])} min {pct(acc['min'])} max {pct(acc['max'])} (target: min >= 90%); "
        f"strategy {s['training_strategy']}, {s['threads']} thread(s), sync steps {s['sync_steps']}"
    )


def part_compare(out: Path, common: list[str]) -> None:
    print("2. p2pl compare (default experiment)")
    wall = p2pl_cli("compare", "--out", str(out / "compare"), "--fresh", "--quiet", *common)
    print(f"  command wall time {wall:.1f} s")
    compare_table(out / "compare")


def part_sync(out: Path, seeds: list[int], common: list[str]) -> None:
    print("3. rounds to 80% mean accuracy, sync on vs off (default experiment)")
    for seed in seeds:
        row = {}
        for on in (True, False):
            d = out / f"sync-{'on' if on else 'off'}-{seed}"
            p2pl_cli("run", "--out", str(d), "--fresh", "--quiet", "--seed", str(seed),
                     "--set", f"sync.enabled={str(on).lower()}", *common)  # fmt: skip
            s = summary(d)
            row[on] = (s["rounds_to_mean_accuracy"]["0.8"], s["rounds_to_mean_accuracy"]["0.9"], s["final"]["accuracy"])
        verdict = "yes" if (row[False][0] or 10**9) > (row[True][0] or 10**9) else "NO"
        print(
            f"  seed {seed}: to 80% on {row[True][0]} / off {row[False][0]}  (to 90% on {row[True][1]} / off "
            f"{row[False][1]}; final mean on {pct(row[True][2]['mean'])} off {pct(row[False][2]['mean'])}) "
            f"-> more rounds without sync: {verdict}"
        )


def part_round(repeats: int, rounds: int, overrides: list[str]) -> None:
    import statistics

    from bench_engines import round_timer  # the same centralized epoch as bench_engines.py

    from p2pl.config import load_config
    from p2pl.sim.simulator import run_experiment

    print(f"5. default experiment round (evaluation included) vs one centralized epoch, {repeats} repeats")
    cfg = load_config(None, [f"rounds={rounds}", "output.progress=false", *overrides])
    central = load_config(None, ['algorithm="centralized"', "training.local_epochs=1", 'engine="reference"',
                                 "output.progress=false", *overrides])  # fmt: skip
    epoch, _ = round_timer(central)
    epoch(0)  # warm-up
    rounds_wall: list[float] = []
    rounds_cpu: list[float] = []
    epoch_wall: list[float] = []
    epoch_cpu: list[float] = []
    phases: dict[str, list[float]] = {}
    marks: list[tuple[float, float]] = []

    def mark(k: int, total: int, metrics: dict[str, float]) -> None:
        marks.append((time.perf_counter(), time.process_time()))

    for r in range(repeats):
        marks.clear()
        result = run_experiment(cfg, progress=mark)
        for (w0, c0), (w1, c1) in itertools.pairwise(marks):
            rounds_wall.append(w1 - w0)
            rounds_cpu.append(c1 - c0)
        for phase, seconds in result.phase_time_s.items():
            phases.setdefault(phase, []).append(seconds / rounds)
        for i in range(rounds - 1):
            w0, c0 = time.perf_counter(), time.process_time()
            epoch(r * rounds + i + 1)
            epoch_cpu.append(time.process_time() - c0)
            epoch_wall.append(time.perf_counter() - w0)
    rw, rc = statistics.median(rounds_wall), statistics.median(rounds_cpu)
    ew, ec = statistics.median(epoch_wall), statistics.median(epoch_cpu)
    split = " / ".join(f"{k} {1e3 * statistics.median(v):.1f}" for k, v in phases.items())
    print(
        f"  round {1e3 * rw:.1f} ms (CPU {1e3 * rc:.1f}); centralized epoch {1e3 * ew:.1f} ms (CPU {1e3 * ec:.1f}); "
        f"round / epoch = {rw / ew:.2f}x wall, {rc / ec:.2f}x CPU (target <= 0.3x)\n"
        f"  mean phase ms per round (incl. round 1): {split}; strategy {result.summary['training_strategy']}, "
        f"{result.summary['threads']} thread(s)"
    )


# ---------------------------------------------------------------------------------------------
# synthetic MNIST-format data


def _prototypes(rng: np.random.Generator, classes: int = 10) -> np.ndarray:
    """One smooth 28x28 pattern per class in [0, 1]: random 7x7 blobs upsampled, sharpened."""
    coarse = rng.random((classes, 7, 7))
    fine = np.kron(coarse, np.ones((4, 4)))  # 28x28
    # Blur so patterns are smooth strokes rather than blocks, then keep the brighter half.
    k = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16
    for axis in (1, 2):
        fine = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, fine)
    cut = np.median(fine, axis=(1, 2), keepdims=True)
    return np.clip((fine - cut) * 4, 0, 1)


def synthetic_mnist(n: int, rng: np.random.Generator, protos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(protos), size=n).astype(np.uint8)
    images = np.empty((n, 28, 28), dtype=np.float64)
    shifts = rng.integers(-4, 5, size=(n, 2))
    scales = rng.uniform(0.6, 1.0, size=n)
    for i in range(n):
        images[i] = np.roll(protos[labels[i]], tuple(shifts[i]), axis=(0, 1)) * scales[i]
    # Noise and shifts tuned so a linear model gets ~85-90% (not trivially separable) while a CNN,
    # being shift-invariant, can do better.
    images += rng.normal(0, 0.6, size=images.shape)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding MNIST uses: magic 0x0803 (uint8 images) / 0x0801 (uint8 labels)."""
    magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    from p2pl import atomic

    rng = np.random.default_rng(seed)
    protos = _prototypes(rng)
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = synthetic_mnist(n, rng, protos)
        atomic.write_bytes(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images))
        atomic.write_bytes(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels))


def part_mnist(out: Path, args: argparse.Namespace, common: list[str]) -> None:
    print(
        f"4. p2pl compare on synthetic MNIST-format IDX files ({args.mnist_train} train / {args.mnist_test} test), "
        f"lenet, {args.mnist_rounds} rounds"
    )
    root = out / "mnist-data"
    write_mnist(root, args.mnist_train, args.mnist_test)
    sets = ['data.name="mnist"', f'data.root="{root}"', 'model.name="lenet"', f"rounds={args.mnist_rounds}"]
    wall = p2pl_cli("compare", "--out", str(out / "compare-mnist"), "--fresh", "--quiet",
                    *(a for s in sets for a in ("--set", s)), *common)  # fmt: skip
    print(f"  command wall time {wall:.1f} s")
    compare_table(out / "compare-mnist")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds for sync on/off")
    parser.add_argument("--mnist-train", type=int, default=6000)
    parser.add_argument("--mnist-test", type=int, default=1000)
    parser.add_argument("--mnist-rounds", type=int, default=10)
    parser.add_argument("--round-repeats", type=int, default=5, help="repeats of part 5")
    parser.add_argument("--round-rounds", type=int, default=6, help="rounds per repeat of part 5")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run")  # fmt: skip
    args = parser.parse_args()
    parts = [p for p in args.only if not (args.skip_mnist and p == "mnist")]
    common = [a for o in args.overrides for a in ("--set", o)]
    with tempfile.TemporaryDirectory(prefix="p2pl-accept-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if "run" in parts:
            part_run(out, common)
        if "compare" in parts:
            part_compare(out, common)
        if "sync" in parts:
            part_sync(out, args.seeds, common)
        if "mnist" in parts:
            part_mnist(out, args, common)
        if "round" in parts:
            part_round(args.round_repeats, args.round_rounds, args.overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
