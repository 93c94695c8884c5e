"""Independent jobs over the CPU cores that torch's own threads leave free.

A run keeps torch at one thread while its ops are small (thread hand-off inside each small op
costs more than it gains), which leaves the other cores idle. Work that splits into large
independent jobs (chunks of devices in a training step or an evaluation, row blocks of a sparse
product) runs them on Python threads instead: torch, numpy and scipy release the GIL inside
their kernels. Each job writes only its own rows, so results do not depend on the split.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (owning process id, pool)


def free_cores(device: torch.device | None = None) -> int:
    """Workers for jobs on ``device``: the CPU cores divided by torch's own thread count (1 off
    the CPU: an accelerator runs the jobs' kernels itself)."""
    if device is not None and device.type != "cpu":
        return 1
    return max(1, cpu_count() // max(1, torch.get_num_threads()))


@functools.cache
def cpu_count() -> int:
    """The machine's CPUs, read once (``os.cpu_count`` reads a file under /sys on every call:
    ~20 us, paid per training step before)."""
    return os.cpu_count() or 1


def _executor() -> ThreadPoolExecutor:
    """One pool per process (kept: starting threads for every training step cost more than the
    step's split gained); a forked child starts its own."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="p2pl"))
        return _pool[1]


def run_jobs(run: Callable[[int, T], None], jobs: Sequence[T], workers: int) -> None:
    """``run(worker, job)`` for every job, over ``workers`` threads: the calling thread is worker 0
    and ``workers - 1`` pool threads join it; each takes the next job nobody has taken yet, in
    order. A worker whose core is held by another process then delays only the job it holds:
    the others take the rest (with a fixed share per worker, the caller waited for the
    slowest one). Each worker index is used by one thread at a time, so state kept per worker
    (scratch buffers) is never shared between threads."""
    workers = max(1, min(workers, len(jobs)))
    if workers == 1 or threading.current_thread().name.startswith("p2pl"):  # never wait on the pool from it
        for job in jobs:
            run(0, job)
        return
    taken = iter(range(len(jobs)))
    lock = threading.Lock()
    threads = torch.get_num_threads()

    def share(worker: int) -> None:
        # A thread's first torch ops ran MKL at the machine's default thread count (and gave other
        # last bits than the caller's, for a 10 x 64 @ 64 x 360 product): use the caller's count.
        if worker:
            torch.set_num_threads(threads)
        while True:
            with lock:
                index = next(taken, None)
            if index is None:
                return
            run(worker, jobs[index])

    helpers = [_executor().submit(share, worker) for worker in range(1, workers)]
    try:
        share(0)
    finally:
        for helper in helpers:
            helper.result()  # re-raises a job's exception here
