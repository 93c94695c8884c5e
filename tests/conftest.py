"""Shared test fixtures: one torch thread (the machine is shared) and a tiny experiment factory."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from p2pl.config import ExperimentConfig, load_config

# Small batched ops run fastest on one thread, and several test processes share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# 10 devices on digits for 2 rounds of 1 local epoch: ~0.1 s per run, yet every code path runs.
# Radius 0.6 keeps the random-geometric graph of 10 devices connected for the seeds used here.
TINY_OVERRIDES = (
    "devices=10",
    "rounds=2",
    "training.local_epochs=1",
    "topology.radius=0.6",
    "output.progress=false",
)


@pytest.fixture
def tiny_overrides() -> list[str]:
    """The tiny experiment as ``--set`` overrides (for CLI tests)."""
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_config() -> Callable[..., ExperimentConfig]:
    """``tiny_config("training.optimizer='adam'", ...)``: the tiny experiment plus overrides."""

    def make(*overrides: str) -> ExperimentConfig:
        return load_config(None, [*TINY_OVERRIDES, *overrides])

    return make
