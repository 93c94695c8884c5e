"""Peak memory of a 100-device run on CIFAR-10-sized data: the dataset is held once, not per device.

Writes the real CIFAR-10 *binary* files (``data_batch_1..5.bin`` + ``test_batch.bin``: 50,000 +
10,000 records of 1 label byte + 3,072 pixel bytes) with random pixels into a temporary folder,
so the real reader (``p2pl.data.registry``) loads them. Then, each in a fresh subprocess (so
one measurement's allocations cannot inflate another's peak), with the simulator's components:

* ``baseline``: import torch and p2pl only;
* ``load``: also load the dataset (float32, normalized: 60,000 x 3 x 32 x 32 x 4 bytes);
* ``round N``: build the experiment for N devices (cnn by default), max-norm sync, one round of
  local training (``training.local_epochs``, default 1 here: the peak does not depend on the
  number of steps; ``--work 0.1`` runs a tenth of them), the P2PL consensus step, and an evaluation of every device on
  ``--eval-samples`` test samples in chunks of ``eval.test_batch`` (the peak depends on the
  chunk sizes, not on how many chunks run, as long as ``--eval-samples`` >= ``eval.test_batch``;
  a full 10,000-sample pass of 100 devices only takes longer). The topology is a ring (the
  graph does not change memory; a 10-device random geometric graph is often disconnected).

Reported per child: peak RSS (``getrusage`` ru_maxrss) and RSS after each stage. Each child runs
under an address-space limit (``--limit-gb``) so an oversized allocation fails in the child
instead of pushing the shared machine into the OOM killer.

    python benchmarks/bench_memory.py                          # cnn, N in {10, 100}
    python benchmarks/bench_memory.py --model resnet --devices 100
    python benchmarks/bench_memory.py --set eval.test_batch=4096   # the default chunk: see BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TRAIN_RECORDS, TEST_RECORDS, RECORD = 50_000, 10_000, 3073
MB = 1024 * 1024
STAGES = ("rss_import_mb", "rss_load_mb", "rss_built_mb", "rss_trained_mb", "rss_consensus_mb", "rss_eval_mb")


def write_cifar(root: Path, seed: int = 0) -> int:
    """The six CIFAR-10 binary batch files with random pixels and labels; returns bytes written."""
    from p2pl import atomic
    from p2pl.data.registry import CIFAR_DIR, CIFAR_FILES

    folder = root / CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = 0
    for name in CIFAR_FILES:
        records = rng.integers(0, 256, size=(10_000, RECORD), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, size=10_000, dtype=np.uint8)
        atomic.write_bytes(folder / name, records.tobytes())
        total += records.nbytes
    return total


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> dict[str, object]:
    """One measurement, in this (fresh) process."""
    limit = int(args.limit_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(1)
    from p2pl.config import load_config
    from p2pl.core.evaluate import evaluate

    out: dict[str, object] = {"stage": args.child, "rss_import_mb": _rss_mb()}
    if args.child == "baseline":
        return out | {"peak_mb": _peak_mb()}
    from p2pl.data.registry import load_dataset

    overrides = [
        'data.name="cifar10"', f'data.root="{args.root}"', f'model.name="{args.model}"', "rounds=1",
        "training.local_epochs=1", f"devices={args.n or 1}", 'topology.name="ring"', *args.overrides,
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data, cfg.seed)
    data_mb = (ds.x_train.nbytes + ds.x_test.nbytes + ds.y_train.nbytes + ds.y_test.nbytes) / MB
    out |= {"dataset_mb": data_mb, "rss_load_mb": _rss_mb(), "peak_load_mb": _peak_mb()}
    if args.child == "load":
        return out | {"peak_mb": _peak_mb()}

    from p2pl.core.rounds import NetworkCooperation
    from p2pl.experiment import build_experiment

    exp = build_experiment(cfg)
    assert exp.dataset.x_train.data_ptr() == ds.x_train.data_ptr(), "the dataset must be loaded once"
    trainer = exp.trainer()
    params, _ = exp.start_params()
    index_mb = sum(p.nbytes for p in exp.parts) / MB
    out |= {"strategy": trainer.strategy, "params": exp.spec.total, "index_arrays_mb": index_mb}
    out |= {"rss_built_mb": _rss_mb(), "peak_built_mb": _peak_mb()}
    work = None if args.work >= 1 else np.full(len(exp.parts), args.work)
    stats = trainer.train(params, 1, work)
    out |= {"rss_trained_mb": _rss_mb(), "peak_trained_mb": _peak_mb(), "steps": int(stats.steps.max())}
    net = exp.dynamics().next_round()
    coop = NetworkCooperation(exp.algorithm.cooperation(exp.setting), exp.setting.facts(), cfg.seed)
    params, _ = coop.run(params, net.live_edges, net.active, 1)
    out |= {"rss_consensus_mb": _rss_mb()}
    k = args.eval_samples
    acc, _ = evaluate(exp.model, exp.spec, params, ds.x_test[:k], ds.y_test[:k], sample_chunk=cfg.eval.test_batch)
    out |= {"rss_eval_mb": _rss_mb(), "peak_mb": _peak_mb(), "acc_mean": float(acc.mean())}
    return out | {"seconds": time.perf_counter() - t0}


def run_child(stage: str, n: int, root: Path, args: argparse.Namespace) -> dict[str, object]:
    cmd = [
        sys.executable, __file__, "--child", stage, "--n", str(n), "--root", str(root), "--model", args.model,
        "--eval-samples", str(args.eval_samples), "--limit-gb", str(args.limit_gb), "--work", str(args.work),
        *(f"--set={o}" for o in args.overrides),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"stage": stage, "n": n, "error": tail}
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result | {"n": n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--model", default="cnn", help="model.name (default cnn; resnet is ~4x slower)")
    parser.add_argument("--eval-samples", type=int, default=1000, help="test samples evaluated (default 1000)")
    parser.add_argument("--work", type=float, default=1.0, help="share of the epoch's steps to run (peak is the same)")
    parser.add_argument("--limit-gb", type=float, default=12.0, help="address-space limit per child (GiB)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", default=None, help="reuse CIFAR-10 files in this folder (default: a temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="p2pl-cifar-") as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        from p2pl.data.registry import CIFAR_DIR

        if not (root / CIFAR_DIR / "test_batch.bin").is_file():
            written = write_cifar(root)
            print(f"wrote {written / MB:.0f} MiB of CIFAR-10 binary files (random pixels) to {root}")
        runs = [run_child("baseline", 0, root, args), run_child("load", 0, root, args)]
        runs += [run_child("round", n, root, args) for n in args.devices]
        for r in runs:
            print(json.dumps(r))
        print()
        print(
            f"{'stage':>10} {'N':>4} {'strategy':>8} | {'peak RSS MiB':>12} {'dataset MiB':>11} {'index MiB':>9} | "
            "RSS after import/load/build/train/consensus/eval MiB"
        )
        for r in runs:
            if "error" in r:
                print(f"{r['stage']!s:>10} {r['n']!s:>4}  FAILED: {r['error']}")
                continue
            stages = "/".join(f"{float(r[k]):.0f}" for k in STAGES if k in r)  # type: ignore[arg-type]
            label = r["stage"] if r["stage"] != "round" else "1 round"
            print(
                f"{label!s:>10} {r['n']!s:>4} {r.get('strategy', '-')!s:>8} | {float(r['peak_mb']):12.0f} "  # type: ignore[arg-type]
                f"{float(r.get('dataset_mb', 0)):11.0f} {float(r.get('index_arrays_mb', 0)):9.2f} | {stages}"  # type: ignore[arg-type]
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
