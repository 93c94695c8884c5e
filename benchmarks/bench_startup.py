"""Start-up time of the ``p2pl`` command against a bare ``import torch``, side by side in one run.

Every command used to import torch, Ray and gRPC at start: ~2 s before ``--version`` answered.
Now a command imports only what it uses. Timed, each in a fresh interpreter (what a user pays):

* ``python3 -c "import torch"``: the floor of any command that trains;
* ``python3 -m p2pl --version`` and ``--help``;
* ``python3 -m p2pl run --no-such-flag`` (a usage error) and ``run --set devices=0`` (a config error);
* ``python3 -m p2pl topology --set devices=100``: topology-only work (networkx, scipy; no torch).

The commands are interleaved (one of each per repeat) and the median wall and CPU times are
printed, with each command's ratio to ``import torch``; acceptance: ``--version`` under 0.25x.

    python benchmarks/bench_startup.py                 # 7 repeats
    python benchmarks/bench_startup.py --repeats 15
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS: dict[str, list[str]] = {
    "import torch": ["-c", "import torch"],
    "p2pl --version": ["-m", "p2pl", "--version"],
    "p2pl --help": ["-m", "p2pl", "--help"],
    "p2pl run --no-such-flag": ["-m", "p2pl", "run", "--no-such-flag"],
    "p2pl run --set devices=0": ["-m", "p2pl", "run", "--set", "devices=0"],
    "p2pl topology (100 devices)": ["-m", "p2pl", "topology", "--set", "devices=100"],
}
TARGET = 0.25  # --version in under a quarter of `import torch`


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh interpreter running ``args``."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each command (default 7)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}, {args.repeats} repeats")
    for argv in COMMANDS.values():  # warm the file cache: every command once, untimed
        time_once(argv)
    wall: dict[str, list[float]] = {name: [] for name in COMMANDS}
    cpu: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, argv in COMMANDS.items():
            w, c = time_once(argv)
            wall[name].append(w)
            cpu[name].append(c)
    base_wall, base_cpu = statistics.median(wall["import torch"]), statistics.median(cpu["import torch"])
    print(f"{'command':<30} {'wall s':>7} {'cpu s':>7} {'wall ratio':>11} {'cpu ratio':>10}")
    for name in COMMANDS:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:<30} {w:7.3f} {c:7.3f} {w / base_wall:10.2f}x {c / base_cpu:9.2f}x")
    ratio = statistics.median(wall["p2pl --version"]) / base_wall
    verdict = "ok" if ratio < TARGET else "MISSED"
    print(f"p2pl --version / import torch = {ratio:.3f} (target < {TARGET}): {verdict}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0 if ratio < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
