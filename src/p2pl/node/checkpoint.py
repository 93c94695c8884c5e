"""A node's resumable state in one safetensors file, replaced atomically after every round.

Tensors: the parameters, the optimizer state, the synchronized initialization (so a restarted
node can still serve it to a neighbour that is fetching it), torch's RNG state, and the
per-round measurements. Scalars (round, config fingerprint, sync facts, which neighbours were
mixed each round) are JSON in the safetensors metadata, with a sha256 of everything
(``p2pl.atomic.write_safetensors``): a corrupt, edited or non-finite checkpoint is refused on
load with one line saying so. Nothing here is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pl import atomic
from p2pl.errors import P2PLError

__all__ = ["CHECKPOINT", "NodeCheckpoint", "NodeHistory", "load", "save"]

CHECKPOINT = "checkpoint.safetensors"
_AFRESH = "delete it (or pass --fresh) to start this node afresh"


@dataclass
class NodeHistory:
    """What one node measured. ``eval_rounds`` index ``accuracy``/``loss``; the rest have one entry
    per finished round 1..k."""

    eval_rounds: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    round_time_s: list[float] = field(default_factory=list)
    mixed: list[list[str]] = field(default_factory=list)  # neighbours mixed with, per round
    compute_s: list[float] = field(default_factory=list)  # seconds training, per round
    comm_s: list[float] = field(default_factory=list)  # seconds sending, waiting and mixing, per round


@dataclass
class NodeCheckpoint:
    round: int  # last finished round (0: after synchronization)
    params: torch.Tensor  # [P] float32
    optimizer: dict[str, torch.Tensor]  # rows of a batch of one
    sync_params: torch.Tensor | None  # the synchronized init this node serves on Fetch
    rng_state: torch.Tensor  # torch.get_rng_state()
    history: NodeHistory
    meta: dict[str, Any]


def save(directory: Path, ckpt: NodeCheckpoint) -> None:
    h = ckpt.history
    tensors: dict[str, torch.Tensor] = {
        "params": ckpt.params.detach().contiguous(),
        "rng_state": ckpt.rng_state.contiguous(),
        "hist.eval_rounds": torch.tensor(h.eval_rounds, dtype=torch.int64),
        "hist.accuracy": torch.tensor(h.accuracy, dtype=torch.float64),
        "hist.loss": torch.tensor(h.loss, dtype=torch.float64),
        "hist.train_loss": torch.tensor(h.train_loss, dtype=torch.float64),
        "hist.bytes_sent": torch.tensor(h.bytes_sent, dtype=torch.int64),
        "hist.round_time_s": torch.tensor(h.round_time_s, dtype=torch.float64),
        "hist.compute_s": torch.tensor(h.compute_s, dtype=torch.float64),
        "hist.comm_s": torch.tensor(h.comm_s, dtype=torch.float64),
    }
    tensors |= {f"opt.{k}": v.detach().contiguous() for k, v in ckpt.optimizer.items()}
    if ckpt.sync_params is not None:
        tensors["sync_params"] = ckpt.sync_params.detach().contiguous()
    metadata = {"round": str(ckpt.round), "meta": json.dumps(ckpt.meta), "mixed": json.dumps(h.mixed)}
    atomic.write_safetensors(Path(directory) / CHECKPOINT, tensors, metadata)


def load(directory: Path, num_params: int | None = None) -> NodeCheckpoint | None:
    """The checkpoint in ``directory`` (None if there is none); ``num_params`` checks its shape."""
    path = Path(directory) / CHECKPOINT
    if not path.exists():
        return None
    try:
        tensors, metadata = atomic.read_safetensors(path)
        round_index = int(metadata["round"])
        meta = json.loads(metadata["meta"])
        mixed = json.loads(metadata["mixed"])
        h = NodeHistory(
            eval_rounds=[int(v) for v in tensors["hist.eval_rounds"]],
            accuracy=[float(v) for v in tensors["hist.accuracy"]],
            loss=[float(v) for v in tensors["hist.loss"]],
            train_loss=[float(v) for v in tensors["hist.train_loss"]],
            bytes_sent=[int(v) for v in tensors["hist.bytes_sent"]],
            round_time_s=[float(v) for v in tensors["hist.round_time_s"]],
            mixed=[[str(p) for p in row] for row in mixed],
            # absent in checkpoints written before the node measured them
            compute_s=[float(v) for v in tensors.get("hist.compute_s", torch.zeros(0))],
            comm_s=[float(v) for v in tensors.get("hist.comm_s", torch.zeros(0))],
        )
        params = tensors["params"]
        rng_state = tensors["rng_state"]
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise P2PLError(f"node checkpoint {path} is unreadable or corrupt ({err}); {_AFRESH}") from None
    state = {"params": params, **{k: v for k, v in tensors.items() if k.startswith("opt.") or k == "sync_params"}}
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise P2PLError(f"node checkpoint {path} holds non-finite values in {', '.join(bad)}; {_AFRESH}")
    if num_params is not None and tuple(params.shape) != (num_params,):
        raise P2PLError(
            f"node checkpoint {path} holds {tuple(params.shape)} parameters, the model has {num_params}; "
            "delete it or use the matching model"
        )
    optimizer = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    return NodeCheckpoint(round_index, params, optimizer, tensors.get("sync_params"), rng_state, h, meta)
