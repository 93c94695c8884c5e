"""core.parallel.run_jobs: every job once, the caller among the workers, one thread per worker."""

from __future__ import annotations

import threading
import time

import pytest

from p2pl.core.parallel import run_jobs


def test_every_job_runs_once_and_each_worker_is_one_thread() -> None:
    seen: list[tuple[int, int, int]] = []  # (job, worker, thread)
    lock = threading.Lock()

    def run(worker: int, job: int) -> None:
        time.sleep(0.002)  # long enough that both workers take jobs
        with lock:
            seen.append((job, worker, threading.get_ident()))

    run_jobs(run, list(range(12)), workers=2)
    assert sorted(job for job, _, _ in seen) == list(range(12))
    threads = {worker: {thread for _, w, thread in seen if w == worker} for _, worker, _ in seen}
    assert set(threads) == {0, 1}  # both workers took jobs
    assert all(len(t) == 1 for t in threads.values())  # a worker's scratch state is one thread's
    assert threads[0] == {threading.get_ident()}  # the caller is worker 0


def test_a_failing_job_raises_in_the_caller() -> None:
    def run(worker: int, job: int) -> None:
        if job == 3:
            raise ValueError("job 3")

    with pytest.raises(ValueError, match="job 3"):
        run_jobs(run, list(range(8)), workers=2)
