"""Starting or joining Ray for the cluster backend: robust on a busy machine, quiet on a normal run.

* Ray waits a fixed 30 s for its raylet to register, which a loaded 2-core machine can exceed; a
  timed-out start is shut down and retried, and a local instance is started with no pre-started
  worker processes (they compete with the raylet's own start) and a longer worker registration
  timeout.
* A normal run used to print Ray's token-authentication notice and, once per process, an ERROR
  line about actor constructor arguments held in the object store (our actors fetch the
  training set through such an argument on purpose, and the driver keeps it alive). The notice's
  logger is set to ERROR, and that one known line is filtered out of stderr while actors are
  created; everything else Ray prints still comes through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from p2pl.errors import P2PLError

START_ATTEMPTS = 3
_RETRY_PAUSE_S = 2.0
_TIMED_OUT = "timed out during startup"  # Ray's message when its raylet did not register in time
# Settings of a local instance that we start (not allowed when joining an existing cluster).
LOCAL_SYSTEM_CONFIG = {
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
    "worker_register_timeout_seconds": 180,
}
# The one ERROR line a normal run printed (see the module doc); matched exactly, nothing else.
ACTOR_ARGS_NOTICE = "has constructor arguments in the object store and max_restarts > 0"
_QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


def quiet_ray_logs() -> None:
    """No usage-stats prompt and no token-authentication notice; warnings from the rest of Ray stay."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def start_ray(ray: Any, address: str | None = None, num_cpus: int | None = None) -> None:
    """``ray.init`` (a new local instance, or join ``address``), retried when start-up times out."""
    quiet_ray_logs()
    local = address is None and not os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if local:
        options["_system_config"] = LOCAL_SYSTEM_CONFIG
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
    where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(address=address, **options)
            return
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise P2PLError(f"could not start or join {where} ({err}); check --address") from None
        except Exception as err:  # Ray raises a bare Exception when its raylet is slow to start
            if _TIMED_OUT not in str(err):
                raise
            ray.shutdown()
            if attempt == START_ATTEMPTS:
                raise P2PLError(
                    f"{where} did not start in {START_ATTEMPTS} attempts (its raylet timed out; the machine "
                    "is busy); retry when the load is lower, or start Ray yourself and pass --address"
                ) from None
            time.sleep(_RETRY_PAUSE_S * attempt)


@contextlib.contextmanager
def without_stderr_line(fragment: str) -> Iterator[None]:
    """Hide lines containing ``fragment`` that anything in this process (Python or C++) writes to
    stderr inside the block; every other line is written to stderr afterwards, in order."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True) if fragment.encode() not in line]
            if kept:
                os.write(2, b"".join(kept))
