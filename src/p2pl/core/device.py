"""Which torch device a run computes on: the ``device`` config key, resolved against this machine."""

from __future__ import annotations

import torch

from p2pl.config import DEVICES
from p2pl.errors import P2PLError, choose


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(requested: str) -> torch.device:
    """``auto`` = cuda when this machine has a CUDA GPU, else cpu; an absent device is an error."""
    choose("device", requested, DEVICES)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _available(requested):
        raise P2PLError(f"device = {requested!r}, but this machine has no {requested} device; use --set device=cpu")
    if requested == "mps":
        # Accuracy, loss and Adam's step count are accumulated in float64, which MPS lacks.
        raise P2PLError("device = 'mps' is not supported yet (it has no float64); use --set device=cpu")
    return torch.device(requested)
