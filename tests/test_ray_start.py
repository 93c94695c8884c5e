"""Ray start-up is retried when the raylet is slow (a busy machine), and the one known notice of a
normal run is filtered from stderr while everything else gets through. No Ray needed: a fake
``ray`` module records the calls."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from p2pl.errors import P2PLError
from p2pl.sim import ray_start
from p2pl.sim.ray_start import LOCAL_SYSTEM_CONFIG, start_ray

SLOW_RAYLET = Exception(
    "The current node timed out during startup. This could happen because some of the raylet failed to startup "
    "or the GCS has become overloaded."
)


class FakeRay:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = list(failures)
        self.inits: list[dict[str, Any]] = []
        self.shutdowns = 0

    def init(self, address: str | None = None, **options: Any) -> None:
        self.inits.append({"address": address, **options})
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_start.time, "sleep", lambda seconds: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_a_slow_raylet_is_shut_down_and_retried() -> None:
    ray = FakeRay([SLOW_RAYLET])
    start_ray(ray, num_cpus=2)
    assert len(ray.inits) == 2 and ray.shutdowns == 1
    # a local instance: no pre-started workers competing with the raylet, a longer registration wait
    assert ray.inits[-1]["_system_config"] == LOCAL_SYSTEM_CONFIG and ray.inits[-1]["num_cpus"] == 2


def test_start_up_gives_up_in_one_line_after_the_last_attempt() -> None:
    ray = FakeRay([SLOW_RAYLET] * ray_start.START_ATTEMPTS)
    with pytest.raises(P2PLError, match=r"did not start in 3 attempts.*pass --address") as err:
        start_ray(ray)
    assert "\n" not in str(err.value) and ray.shutdowns == ray_start.START_ATTEMPTS


def test_joining_a_cluster_passes_no_local_settings_and_reports_a_bad_address() -> None:
    ray = FakeRay([ConnectionError("could not connect to GCS at 10.0.0.9:6379")])
    with pytest.raises(P2PLError, match=r"the Ray cluster at '10.0.0.9:6379' .*check --address"):
        start_ray(ray, "10.0.0.9:6379", num_cpus=2)
    assert len(ray.inits) == 1 and "_system_config" not in ray.inits[0] and "num_cpus" not in ray.inits[0]


def test_other_errors_are_not_retried() -> None:
    ray = FakeRay([TypeError("a bug")])
    with pytest.raises(TypeError):
        start_ray(ray)
    assert len(ray.inits) == 1 and ray.shutdowns == 0


def test_the_token_notice_is_silenced_but_ray_warnings_are_not() -> None:
    start_ray(FakeRay([]))
    assert os.environ["RAY_USAGE_STATS_ENABLED"] in ("0", "1")
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert not token.isEnabledFor(logging.WARNING) and token.isEnabledFor(logging.ERROR)
    assert logging.getLogger("ray._private.worker").isEnabledFor(logging.WARNING)


_FILTER_SCRIPT = """
import os, sys
from p2pl.sim.ray_start import ACTOR_ARGS_NOTICE, without_stderr_line
with without_stderr_line(ACTOR_ARGS_NOTICE):
    os.write(2, b"[E core_worker.cc] keep: a real error\\n")  # as C++ writes: straight to fd 2
    os.write(2, f"[E core_worker.cc] Actor A {ACTOR_ARGS_NOTICE}. See ...\\n".encode())
    print("keep: from Python", file=sys.stderr)
print("after the block", file=sys.stderr)
"""


def test_only_the_known_line_is_filtered_from_stderr() -> None:
    # A real process: stderr is file descriptor 2 there, as for the p2pl command
    proc = subprocess.run([sys.executable, "-c", _FILTER_SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "[E core_worker.cc] keep: a real error\nkeep: from Python\nafter the block\n"
