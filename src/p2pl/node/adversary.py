"""A node that misbehaves on the network, for robustness tests and experiments.

An authenticated device can be captured or buggy; these are the *network-level* lies it can tell,
each a small override of one :class:`~p2pl.node.runtime.NodeRuntime` hook, so the honest runtime
carries no attack code. Chosen by the node config's ``[adversary] attack`` (``scale`` sets the
strength; 0 means the default given here):

``sync-hijack``  claims a max-norm-sync norm ``scale`` (1e6) times its own; in flood mode it also
                 serves its init times ``scale``, so the claim looks true to whoever fetches it.
``silent``       accepts every message but never sends one (no claims, no parameters).
``data-size``    claims ``scale`` samples (2**52) with its parameters (data-size weights).
``hello-round``  answers every hello with round ``scale`` (2**40).
``header-bomb``  each round also sends every neighbour a parameters message whose safetensors
                 header names ``scale`` (1,000,000) zero-size tensors, as large as the
                 neighbour's message limit lets through.
``flood``        each round also sends every neighbour ``scale`` (200) messages with distinct keys:
                 parameters for far-future rounds and steps, sync claims, hellos.

The parameter-level attacks ``scale``, ``sign-flip`` and ``gaussian`` are the simulator's own
transforms (``core.adversary``), applied in :meth:`NodeRuntime.outgoing` with the same keyed draws,
so an attacking node sends exactly what its simulated twin sends. ``label-flip`` is data: the
node trains on the labels its data file holds (``p2pl launch`` writes the flipped ones). ALIE
needs the rows it hears before it sends, which a node's round does not wait for: simulator only.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from p2pl.core.adversary import DEFAULT_SCALE, Adversary, SendContext
from p2pl.core.cooperate import one_row
from p2pl.errors import P2PLError
from p2pl.node import wire
from p2pl.node.config import NodeConfig
from p2pl.node.runtime import Claim, NodeRuntime

__all__ = ["NETWORK_ATTACKS", "ROW_ATTACKS", "AdversaryRuntime", "build_runtime"]

log = logging.getLogger(__name__)

#: attack -> its default strength
NETWORK_ATTACKS: dict[str, float] = {
    "sync-hijack": 1e6,
    "silent": 0.0,
    "data-size": float(2**52),
    "hello-round": float(2**40),
    "header-bomb": 1_000_000.0,
    "flood": 200.0,
}
#: the simulator's row transforms a node applies to what it sends (see core.adversary)
ROW_ATTACKS: dict[str, float] = {a: DEFAULT_SCALE[a] for a in ("scale", "sign-flip", "gaussian")}


class AdversaryRuntime(NodeRuntime):
    """A node that plays one of :data:`NETWORK_ATTACKS` (see the module docstring)."""

    def __init__(self, cfg: NodeConfig, *, fresh: bool = False) -> None:
        super().__init__(cfg, fresh=fresh)
        self.attack = cfg.adversary.attack
        self.strength = cfg.adversary.scale or {**NETWORK_ATTACKS, **ROW_ATTACKS}[self.attack]
        self._rows = (
            Adversary.of(cfg.adversary, np.array([cfg.index]), cfg.seed) if self.attack in ROW_ATTACKS else None
        )
        if self.attack == "header-bomb":
            # Its own client must let the bomb out; a receiver's limit is what stops it.
            self.client.max_message_bytes = 64 * 1024 * 1024
        log.warning("%s plays the %r attack (strength %g)", cfg.id, self.attack, self.strength)

    # ------------------------------------------------------------------------ the lies

    def sync_claim(self) -> Claim:
        honest = super().sync_claim()
        if self.attack != "sync-hijack":
            return honest
        if self.cfg.sync.mode == "flood":  # a claim that matches what it serves
            return Claim(float(self._served_init(self.init_of(self.cfg.index)).double().norm()), honest.index,
                         honest.owner)  # fmt: skip
        return Claim(honest.norm * self.strength, honest.index, honest.owner)

    def _served_init(self, init: torch.Tensor) -> torch.Tensor:
        return init * self.strength if self.attack == "sync-hijack" else init.clone()

    def outgoing(self, row: torch.Tensor, round_index: int, step: int) -> torch.Tensor:
        if self._rows is None:
            return super().outgoing(row, round_index, step)
        rows = row.reshape(1, -1)
        ctx = SendContext(rows, one_row(1.0, []), self.cfg.seed, round_index, step)
        return self._rows.send(rows, np.array([self.cfg.index]), ctx)[0]

    def hello_round(self) -> int:
        return int(self.strength) if self.attack == "hello-round" else super().hello_round()

    def params_extras(self, loss: float) -> dict[str, Any]:
        extras = super().params_extras(loss)
        if self.attack == "data-size":
            extras["data_size"] = int(self.strength)
        return extras

    def broadcast(self, targets: Mapping[str, str], message: bytes) -> dict[str, bool]:
        if self.attack == "silent":
            return dict.fromkeys(targets, True)  # as if sent: it keeps "waiting" like an honest node
        sent = super().broadcast(targets, message)
        if self.attack in ("header-bomb", "flood") and message[:4] == wire.MAGIC:
            header = wire.peek_header(message)
            if header.kind == "params" and header.step == 0:
                for junk in self._junk(header.round):
                    self.client.send_many(targets, junk, timeout=self.cfg.network.send_timeout)
        return sent

    # ------------------------------------------------------------------------ the junk

    def _junk(self, round_index: int) -> list[bytes]:
        if self.attack == "header-bomb":
            return [self._bomb(round_index)]
        out: list[bytes] = []
        params = self._tensors(self.params[0])
        ahead = self.cfg.network.max_rounds_ahead
        for i in range(int(self.strength)):
            kind = ("params", "sync-norm", "hello")[i % 3]
            header = self._header(kind, round_index + i % (ahead + 4), i, data_size=1, degree=1)
            out.append(wire.encode(header, params if kind == "params" else None))
        return out

    def _bomb(self, round_index: int) -> bytes:
        """A params message whose payload header lists ``strength`` zero-size tensors (cut to what
        fits the receiver's limit: the model's largest message)."""
        room = self.wire_spec.max_message_bytes() - wire.PREFIX_SIZE - wire.MAX_HEADER_BYTES
        entry = '"t{:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
        count = max(1, min(int(self.strength), (room - 16) // (len(entry.format(0)) + 1)))
        st_header = ("{" + ",".join(entry.format(i) for i in range(count)) + "}").encode()
        payload = struct.pack("<Q", len(st_header)) + st_header
        # Next round's key: new to the receiver's mailbox, so only the payload checks can stop it.
        header = self._header("params", round_index + 1, 0, data_size=self.data_size, degree=1)
        raw = json.dumps({**header.to_json(), "payload_size": len(payload)}, separators=(",", ":")).encode()
        return struct.pack("<4sI", wire.MAGIC, len(raw)) + raw + payload


def build_runtime(cfg: NodeConfig, *, fresh: bool = False) -> NodeRuntime:
    """The runtime a node config asks for: honest, or one playing a network-level attack."""
    attack = cfg.adversary.attack
    if attack in ("none", "label-flip"):  # label-flip: the data file holds the flipped labels
        return NodeRuntime(cfg, fresh=fresh)
    if attack in NETWORK_ATTACKS or attack in ROW_ATTACKS:
        return AdversaryRuntime(cfg, fresh=fresh)
    raise P2PLError(
        f"adversary.attack = {attack!r} needs the rows a device hears before it sends and runs in the "
        f"simulator only; a node plays {', '.join([*NETWORK_ATTACKS, *ROW_ATTACKS, 'label-flip'])}"
    )
