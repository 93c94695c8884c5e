"""Resumable run state in one safetensors file, replaced atomically after a round.

Parameters, optimizer state and the measurement history are tensors; the round, the config
fingerprint and scalar facts are string metadata. Randomness needs no state: every draw is keyed
by (seed, round, device), and the network dynamics are replayed to the checkpoint's round.
A sha256 of everything rides in the metadata: a corrupt or non-finite checkpoint is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pl import atomic
from p2pl.errors import P2PLError
from p2pl.metrics import History

CHECKPOINT = "checkpoint.safetensors"
_AFRESH = "delete it to start the run afresh"

_PER_EVAL = ("accuracy", "loss", "local_accuracy", "local_loss")
_PER_ROUND_ARRAYS = ("bytes_sent", "train_loss")
_PER_ROUND_SCALARS = ("consensus_distance", "live_links", "active_devices", "round_time_s")
_PHASE_TIMES = ("train_time_s", "exchange_time_s", "evaluate_time_s")


@dataclass
class Checkpoint:
    round: int
    params: torch.Tensor
    optimizer: dict[str, torch.Tensor]
    history: History
    meta: dict[str, Any]


def _stack(rows: list[np.ndarray], width: int, dtype: Any = np.float64) -> torch.Tensor:
    if not rows:
        return torch.zeros(0, width, dtype=torch.float64 if dtype == np.float64 else torch.int64)
    return torch.from_numpy(np.stack(rows).astype(dtype))


def save(directory: Path, ckpt: Checkpoint) -> None:
    h, n = ckpt.history, ckpt.params.shape[0]
    tensors: dict[str, torch.Tensor] = {"params": ckpt.params.contiguous()}
    tensors |= {f"opt.{k}": v.contiguous() for k, v in ckpt.optimizer.items()}
    for name in _PER_EVAL:
        tensors[f"hist.{name}"] = _stack(getattr(h, name), n)
    tensors["hist.bytes_sent"] = _stack(h.bytes_sent, n, np.int64)
    tensors["hist.train_loss"] = _stack(h.train_loss, n)
    tensors["hist.eval_rounds"] = torch.tensor(h.eval_rounds, dtype=torch.int64)
    for name in (*_PER_ROUND_SCALARS, *_PHASE_TIMES):
        tensors[f"hist.{name}"] = torch.tensor(getattr(h, name), dtype=torch.float64)
    if h.system_energy_j:  # the system model's per-round costs (only when it is enabled)
        tensors["hist.system_round_s"] = torch.tensor(h.system_round_s, dtype=torch.float64)
        tensors["hist.system_finish_s_mean"] = torch.tensor(h.system_finish_s_mean, dtype=torch.float64)
        tensors["hist.system_energy_j"] = _stack(h.system_energy_j, n)
    meta = {"round": str(ckpt.round), "meta": json.dumps(ckpt.meta)}
    atomic.write_safetensors(directory / CHECKPOINT, tensors, meta)


def load(directory: Path) -> Checkpoint | None:
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    try:
        tensors, meta = atomic.read_safetensors(path)
        round_index = int(meta["round"])
        extra = json.loads(meta["meta"])
    except (KeyError, ValueError, OSError) as err:
        raise P2PLError(f"checkpoint {path} is unreadable or corrupt ({err}); {_AFRESH}") from None
    state = {k: v for k, v in tensors.items() if k == "params" or k.startswith("opt.")}
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise P2PLError(f"checkpoint {path} holds non-finite values in {', '.join(bad)}; {_AFRESH}")
    h = History()
    for name in _PER_EVAL:
        setattr(h, name, [row.numpy() for row in tensors[f"hist.{name}"]])
    for name in _PER_ROUND_ARRAYS:
        setattr(h, name, [row.numpy() for row in tensors[f"hist.{name}"]])
    h.eval_rounds = [int(r) for r in tensors["hist.eval_rounds"]]
    h.consensus_distance = [float(v) for v in tensors["hist.consensus_distance"]]
    h.live_links = [int(v) for v in tensors["hist.live_links"]]
    h.active_devices = [int(v) for v in tensors["hist.active_devices"]]
    h.round_time_s = [float(v) for v in tensors["hist.round_time_s"]]
    for name in _PHASE_TIMES:  # absent from checkpoints written before phases were recorded
        times = tensors.get(f"hist.{name}", torch.full((len(h.round_time_s),), float("nan")))
        setattr(h, name, [float(v) for v in times])
    if "hist.system_energy_j" in tensors:
        h.system_round_s = [float(v) for v in tensors["hist.system_round_s"]]
        h.system_finish_s_mean = [float(v) for v in tensors["hist.system_finish_s_mean"]]
        h.system_energy_j = [row.numpy() for row in tensors["hist.system_energy_j"]]
    optimizer = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    return Checkpoint(round_index, tensors["params"], optimizer, h, extra)
