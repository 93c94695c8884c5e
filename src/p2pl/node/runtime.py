"""The ``p2pl node`` runtime: one device of P2PL in one process, talking to its neighbours over mutual TLS.

The math is the simulator's, run over a batch of one: the device's own
init (``core.params.init_device_params`` keyed by its global index), local epochs with
``core.train.VectorizedTrainer`` over its own samples (the shuffle keys depend only on the seed,
round, epoch, device index and sample position, so a node holding only its data walks the
simulator's batches), its row of W from ``graph.weights.row_weights``, and the mix as a
``core.cooperate.gossip`` over [self; neighbours]: the simulator's cooperation pipeline for one
row (aggregation rule, safety net, affinity blend). With no faults a node's parameters
equal the simulator's device row up to float rounding.

What the network adds, with no coordinator anywhere:

* **Start-up.** The node serves first, then says ``hello`` (a Fetch) to each neighbour until it
  answers or ``network.start_timeout`` passes; the reply carries the neighbour's current round.
* **Max norm synchronization.** Each step it floods its best claim ``(norm, owner, owner_index)``
  to its neighbours (``sync-norm``, round 0, step s) and adopts the best it hears (larger norm,
  ties to the lower device index -- ``core.sync``'s rule). When the claim has not changed for
  ``sync.patience`` steps it announces its final claim (step SYNC_DONE_STEP, so slower neighbours
  need not wait for steps it will never send). ``sync.mode = "verified"`` (the default): every
  device's init is a public function of (seed, device index), so each claim is checked by
  recomputing the owner's init (once per index) and a false one is ignored and logged; at the end
  the node adopts the owner's init computed locally -- no parameters travel at all.
  ``sync.mode = "flood"`` is the paper's form: the node fetches the winner's parameters from a
  neighbour that reported the claim, and a served payload must have the announced norm.
* **Rounds.** Train, send the parameters (``params``, round k, consensus step c) to every
  neighbour, wait until each neighbour that accepted ours has answered or the deadline passes,
  then mix with those that arrived: the row of W is recomputed over the live neighbours, so a
  missing one is renormalized away. Late and replayed messages are dropped by the mailbox
  (stale round) and duplicates cannot replace what was accepted.
* **Baselines** (``algorithm``, docs/baselines.md): the same exchange with other partners and
  weights, decided by the cooperation's stages, never by the algorithm's name. Randomized
  gossip sends to the one neighbour this node draws and waits for the neighbours whose public
  draw is this node; push-sum sends to its out-neighbours with its weight share (``weight``,
  bounded by :func:`push_sum_share`) and hears its in-neighbours; D-PSGD exchanges after every
  local step of the network's step schedule (``step`` = local step x consensus steps + c).
* **Faults.** An unreachable neighbour is skipped with exponential backoff (PeerClient) and
  mixed in again as soon as it answers. While waiting, a silent neighbour is probed with
  ``hello``: one that is down, or says it is already past this round, is not waited for; one that
  sent nothing for ``network.max_missed_rounds`` rounds is not waited for until it speaks again.
  A checkpoint is written atomically after every round; a restarted node resumes from it, tells
  its neighbours (``hello`` resets their backoff) and catches up to the round a strict majority
  of its answering neighbours report (never past the last round; see :func:`resume_target`).
* **Insiders.** A neighbour with a valid certificate may lie. What can be checked is checked
  (sync claims; message sizes, tensor names and shapes before decoding; the sender before the
  payload); what cannot is bounded (degree and data size in the header; the mailbox per sender;
  a claimed round only stops a wait). A non-finite or exploding result of training or mixing is
  rolled back and the neighbours involved are dropped for the round; the node never crashes on
  what a neighbour says.
* **Security.** Mutual TLS with the run's CA; every message is validated by the transport
  (``wire.decode``) before the runtime sees it; rejections are logged to ``node.log``.

Files in the node's directory: ``node.log``, ``status.json`` (state and round, rewritten
atomically after each round), ``metrics.csv`` (round, device, accuracy, loss),
``checkpoint.safetensors``, ``node.lock`` (held while the node runs: one node per directory).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pl import atomic
from p2pl.algorithms import make_algorithm
from p2pl.algorithms.base import GraphAlgorithm
from p2pl.core.compress import (
    Compression,
    Compressor,
    apply_sparse,
    check_compression,
    compressed_gossip,
    incompressible,
)
from p2pl.core.cooperate import Gossip, PushSum, Stage, finish, gossip, one_row, unsound_rows
from p2pl.core.device import resolve_device
from p2pl.core.evaluate import evaluate
from p2pl.core.neighbours import peer_choice, push_sum_row, push_sum_shares
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.core.rounds import PUSH_SUM_WEIGHT
from p2pl.core.schedule import Partition
from p2pl.core.sync import better_claim
from p2pl.core.train import VectorizedTrainer, round_schedule
from p2pl.data.base import Dataset
from p2pl.errors import P2PLError
from p2pl.graph.weights import row_weights
from p2pl.models import build_model
from p2pl.node import checkpoint, wire
from p2pl.node.certs import TlsConfig, load_tls_config
from p2pl.node.checkpoint import NodeCheckpoint, NodeHistory
from p2pl.node.config import NodeConfig, PeerConfig
from p2pl.node.mailbox import Mailbox
from p2pl.node.transport import PeerClient, PeerServer

__all__ = [
    "SYNC_DONE_STEP",
    "Claim",
    "NodeRuntime",
    "SyncOutcome",
    "load_node_data",
    "mix_row",
    "push_sum_share",
    "resume_target",
    "run_node",
]

log = logging.getLogger(__name__)

SYNC_DONE_STEP = wire.SYNC_DONE_STEP
STATUS = "status.json"
LOCK = "node.lock"
METRICS = "metrics.csv"
LOG = "node.log"
_PROBE_AFTER_S = 2.0  # wait this long for a neighbour before asking whether it is still there
_PROBE_EVERY_S = 2.0


# ------------------------------------------------------------------------------------------ data


def _read_split(path: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    from p2pl.data.user import read_npz  # the project's validated, pickle-free npz reader

    x, y = read_npz(path)
    if y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise P2PLError(f"{path}: {what} labels must be non-negative integers (class ids), got {y.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


def load_node_data(cfg: NodeConfig) -> Dataset:
    """This device's samples (in the order given: it keys the shuffles) and the common test set."""
    x_train, y_train = _read_split(cfg.data.train, "training")
    x_test, y_test = _read_split(cfg.data.test, "test")
    if len(y_train) == 0:
        raise P2PLError(f"{cfg.data.train} holds no samples; every device needs local data")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise P2PLError(
            f"training samples have shape {list(x_train.shape[1:])} but test samples "
            f"{list(x_test.shape[1:])}; both files must come from the same dataset"
        )
    seen = int(max(int(y_train.max()), int(y_test.max()) if len(y_test) else 0)) + 1
    classes = cfg.data.num_classes or seen
    if seen > classes:
        raise P2PLError(f"labels go up to {seen - 1} but data.num_classes = {classes}; raise it")
    return Dataset(cfg.id, x_train, y_train, x_test, y_test, classes)


# ------------------------------------------------------------------------------------------ math


def mix_row(
    own: torch.Tensor,
    neighbours: list[torch.Tensor],
    self_weight: float,
    weights: list[float],
    stage: Gossip | None = None,
) -> torch.Tensor:
    """One consensus step of one device, by the simulator's own code (``core.cooperate.gossip``
    over [its row] and the rows it heard; the weighted mean unless ``stage`` names a robust rule)."""
    stage = stage or Gossip()
    pool = torch.stack(neighbours) if neighbours else own.new_zeros(0, own.shape[-1])
    return gossip(own.reshape(1, -1), pool, one_row(self_weight, weights), stage)[0]


def push_sum_share(claimed: object, devices: int) -> float | None:
    """A neighbour's push-sum weight share if it is believable, else None: a finite number in
    (0, N] (N = ``network.devices``; 2**20 when unknown). All devices' weights sum to N, so no
    honest share exceeds it; the bound keeps a liar from overflowing or zeroing the mix, and the
    norm guard still rolls back an exploding row. Within it a liar can outweigh the receiver for
    a round, as a liar can under the plain mean: push-sum has no robust aggregation rule."""
    if isinstance(claimed, bool) or not isinstance(claimed, (int, float)):
        return None
    value = float(claimed)
    return value if math.isfinite(value) and 0 < value <= float(devices or 2**20) else None


@dataclass(frozen=True)
class SyncOutcome:
    owner: str
    owner_index: int
    norm: float
    steps: int  # the last step in which this node's pair changed (the simulator's sync_steps)
    adopted: bool  # False if the winner's parameters could not be fetched (own init kept)


# --------------------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Claim:
    """A max-norm sync claim: "the best init I know is device ``index``'s, of L2 norm ``norm``"."""

    norm: float
    index: int
    owner: str

    def beats(self, other: Claim) -> bool:
        return better_claim((self.norm, self.index), (other.norm, other.index))

    def extras(self) -> dict[str, Any]:
        return {"norm": self.norm, "owner": self.owner, "owner_index": self.index}


@dataclass(frozen=True)
class _Row:
    """A neighbour's parameters and the metadata the weights use, bounded by :meth:`NodeRuntime._read_row`."""

    flat: torch.Tensor
    degree: int
    data_size: float
    weight: float = 0.0  # push-sum: the share of its weight it sent with the row
    sent: torch.Tensor | None = None  # compressed top-k / random-k: the coordinates it carries


def _norm(x: torch.Tensor) -> float:
    return float(x.double().norm())  # float64: a float32 norm of 3.4e38-sized values overflows


def _lock_dir(directory: Path) -> int:
    """Hold an exclusive lock on ``directory/node.lock`` for the life of the process, so two node
    configs that point at one folder cannot overwrite each other's metrics and checkpoints."""
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise P2PLError(
            f"{directory} is in use by another running node ({path} is locked); give every node its own dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class NodeRuntime:
    """One device: build with a validated :class:`NodeConfig`, then :meth:`run` (blocking).

    The methods named as hooks (:meth:`outgoing`, :meth:`sync_claim`, :meth:`hello_round`,
    :meth:`params_extras`, :meth:`broadcast`) are the only places where what this node *says*
    is decided; ``p2pl.node.adversary`` overrides them to play an attacker in tests.
    """

    def __init__(self, cfg: NodeConfig, *, fresh: bool = False) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_dir(self.dir)
        try:
            self._setup(cfg, fresh)
        except BaseException:
            self._unlock()
            raise

    def _setup(self, cfg: NodeConfig, fresh: bool) -> None:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.data = load_node_data(cfg)
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes)
        self.spec = ParamSpec.of(self.model)
        self.wire_spec = wire.ModelSpec.from_module(self.model)
        # Compressed gossip: this node's sender state, its copies of the neighbours' rows (choco),
        # and the exact arrays a params message must hold (checked before anything is decoded).
        compression = Compression.of(cfg.compression, self.spec.numels)
        self.compressor = Compressor(compression, self.spec.total, cfg.seed) if compression.active else None
        self.copies: dict[str, torch.Tensor] = {}
        self.message_spec = self.wire_spec
        if self.compressor is not None:
            layout = self.compressor.layout.arrays
            self.message_spec = wire.ModelSpec(tuple(wire.TensorSpec(a.name, a.shape, a.dtype) for a in layout))
        partition = Partition(indices=(np.arange(len(self.data.y_train), dtype=np.int64),), device_ids=(cfg.index,))
        self.trainer = VectorizedTrainer(
            self.model, self.spec, self.data.x_train, self.data.y_train, partition, cfg.training, cfg.seed
        )
        # Training and evaluation run on ``device``; the row stays on the CPU for the network.
        self.device = resolve_device(cfg.device)
        self.x_test, self.y_test = self.data.x_test.to(self.device), self.data.y_test.to(self.device)
        if self.device.type != "cpu":
            self.trainer.to(self.device)
        self.peers: dict[str, str] = {p.id: p.address for p in cfg.peers}
        self.peer_index: dict[str, int] = {p.id: p.index for p in cfg.peers}
        self.peer_cfg: dict[str, PeerConfig] = {p.id: p for p in cfg.peers}
        self.data_size = len(self.data.y_train)
        self.tls: TlsConfig | None = None
        if not cfg.tls.insecure:
            ca = Path(cfg.tls.ca_cert) if cfg.tls.ca_cert else None
            self.tls = load_tls_config(Path(cfg.tls.cert_dir), cfg.id, ca)
        if fresh:
            (self.dir / checkpoint.CHECKPOINT).unlink(missing_ok=True)
        self.round_now = 0  # read by the server threads (fetch handler, link filter)
        # No message of this model can be larger, so neither the transport nor the mailbox holds more.
        limit = max(wire.PREFIX_SIZE + wire.MAX_HEADER_BYTES,
                    min(cfg.network.max_message_bytes, self.wire_spec.max_message_bytes()))  # fmt: skip
        # The cooperation a simulator would run for this device (one row of it).
        algorithm = make_algorithm(cfg.algorithm)
        assert isinstance(algorithm, GraphAlgorithm)  # NodeConfig.validate admits only those
        algorithm.check(cfg.consensus, "vectorized")
        self.cooperation = algorithm.cooperation_for(cfg.consensus)
        check_compression(compression, incompressible=incompressible(self.cooperation))
        # D-PSGD: the network's local steps each round (every device mixes after each of them)
        self.span: list[tuple[int, int]] = []
        if self.cooperation.every_local_step:
            self.span = round_schedule(np.array([cfg.network.max_data_size]), cfg.training, None)
        self.push_weight = 1.0  # push-sum: this device's weight w (checkpointed)
        self._step_mixed: list[str] = []  # D-PSGD: the neighbours mixed with after the first local step
        exchanges = max(1, len(self.span)) * cfg.consensus.steps  # params messages per round and sender
        self.mailbox = Mailbox(
            max_rounds_ahead=cfg.network.max_rounds_ahead,
            consensus_steps=exchanges,
            sync_steps_ahead=cfg.network.max_rounds_ahead,
            params_message_bytes=limit,
            allowed_senders=self.peers,
        )
        self.server = PeerServer(
            cfg.id,
            cfg.listen,
            self.tls,
            self.mailbox,
            self.message_spec,
            limit,
            fetch_handler=self._on_fetch,
            insecure=cfg.tls.insecure,
        )
        self.client = PeerClient(
            cfg.id,
            self.tls,
            limit,
            insecure=cfg.tls.insecure,
            backoff_initial=min(0.25, cfg.network.backoff_max),
            backoff_max=cfg.network.backoff_max,
            throttle_bps=cfg.network.throttle_mbps * 1e6,
        )
        self.client.set_link_filter(lambda peer: not cfg.link_cut(peer, self.round_now))
        # flood sync only: (claim, flat params) this node serves on a sync-fetch.
        self._held: tuple[Claim, torch.Tensor] | None = None
        self._init_norms: dict[int, float] = {}  # device index -> L2 norm of its public init
        self._missed: dict[str, int] = dict.fromkeys(self.peers, 0)  # consecutive rounds without its params
        self._skip_mark: dict[str, int] = {}  # its params_heard when it stopped being waited for
        self.params = torch.empty(0)
        self.history = NodeHistory()
        self.sync: SyncOutcome | None = None
        self.sync_bytes = 0  # what this node sent for the sync: claims, and (flood) parameters it served
        self._sync_served = 0  # bytes of sync-params replies served so far (server threads add to it)
        self._served_lock = threading.Lock()
        self.state = "starting"
        self._log_handler: logging.Handler | None = None
        self._started = time.time()

    # --------------------------------------------------------------------------- hooks

    def outgoing(self, row: torch.Tensor, round_index: int, step: int) -> torch.Tensor:
        """The parameters this node sends for consensus step ``step`` of ``round_index`` (the
        honest node sends its own row; an attacker transforms it here)."""
        return row

    def sync_claim(self) -> Claim:
        """This node's own max-norm claim: its public init's norm."""
        return Claim(self.init_norm(self.cfg.index), self.cfg.index, self.cfg.id)

    def hello_round(self) -> int:
        """The round this node reports in ``hello`` replies."""
        return self.round_now

    def params_extras(self, loss: float) -> dict[str, Any]:
        """Metadata sent with this node's parameters (the consensus weights use it)."""
        extras: dict[str, Any] = {"data_size": self.data_size, "degree": max(1, len(self.peers))}
        if math.isfinite(loss):
            extras["loss"] = loss
        return extras

    def broadcast(self, targets: Mapping[str, str], message: bytes) -> dict[str, bool]:
        """Send one message to ``{peer: address}``; ``{peer: acknowledged}``."""
        return self.client.send_many(targets, message, timeout=self.cfg.network.send_timeout)

    # ------------------------------------------------------------------------ messages

    def _header(self, kind: str, round_index: int, step: int, **extras: Any) -> wire.MessageHeader:
        # What neighbours' servers expect (the compressed message's layout when compressing); a
        # sync-params reply carries the model itself.
        spec = self.wire_spec if kind == "sync-params" else self.message_spec
        return wire.MessageHeader(kind, self.cfg.id, round_index, step, spec.fingerprint, extras=extras)

    def _tensors(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in self.spec.unflatten(flat).items()}

    def _flat(self, msg: wire.Message) -> torch.Tensor:
        assert msg.tensors is not None  # PAYLOAD_KINDS always carry tensors (checked by wire)
        return self.spec.flatten(msg.tensors).to(torch.float32)

    def _hello(self) -> bytes:
        extras = {"data_size": self.data_size, "degree": max(1, len(self.peers))}
        return wire.encode(self._header("hello", self.hello_round(), 0, **extras))

    def _on_fetch(self, req: wire.Message) -> bytes | None:
        """Fetch handler (a transport connection thread): ``hello`` and ``sync-fetch`` from neighbours only.
        A hello is answered, never stored: it cannot fill anything."""
        if req.sender not in self.peers or self.cfg.link_cut(req.sender, self.round_now):
            log.info("%s: ignored %s fetch from %s", self.cfg.id, req.kind, req.sender)
            return None
        if req.kind == "hello":
            # A neighbour says it is (back) up: stop skipping it, so it is mixed in again now.
            self.client.reset_backoff(req.sender)
            return self._hello()
        if req.kind == "sync-fetch" and self.cfg.sync.mode == "flood":
            held = self._held
            if held is None or req.header.extras.get("owner") != held[0].owner:
                return None  # not (yet) holding that owner's parameters: the caller retries
            header = self._header("sync-params", 0, 0, **held[0].extras())
            reply = wire.encode(header, self._tensors(held[1]))
            with self._served_lock:  # sync traffic, whenever it is served (often after our own sync)
                self._sync_served += len(reply)
                self.sync_bytes += len(reply)
            return reply
        return None

    # ----------------------------------------------------------------------- lifecycle

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.dir / LOG, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger("p2pl")
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        self._log_handler = handler

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def close(self) -> None:
        self.client.close()
        self.server.stop(0.5)
        if self._log_handler is not None:
            logging.getLogger("p2pl").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        self._unlock()

    def run(self) -> NodeHistory:
        """Start serving, synchronize (or resume), run every round; returns the history."""
        self._attach_log()
        try:
            return self._run()
        except BaseException as exc:
            self.state = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            # A P2PLError is the caller's to report (the CLI prints it as its one line): here it
            # goes to node.log and status.json only.
            log.error("%s: failed: %s", self.cfg.id, str(exc) or type(exc).__name__,
                      extra={"reported": isinstance(exc, P2PLError)})  # fmt: skip
            self._write_status(error=str(exc) or type(exc).__name__)
            raise
        finally:
            self.close()

    def _run(self) -> NodeHistory:
        cfg = self.cfg
        ckpt = checkpoint.load(self.dir, self.spec.total)
        if ckpt is not None and ckpt.meta.get("fingerprint") != cfg.fingerprint():
            raise P2PLError(
                f"{self.dir} holds a checkpoint of a different node config; use another dir or pass --fresh"
            )
        if ckpt is not None:
            self.round_now = ckpt.round + 1  # what our hello tells neighbours while we start up
        port = self.server.start()
        log.info("%s (index %d) serving on port %d, %d neighbours", cfg.id, cfg.index, port, len(self.peers))
        self._write_status()
        # A restarted node's neighbours are either running (they answer at once) or finished:
        # do not hold it for the full start-up window.
        window = cfg.network.start_timeout if ckpt is None else min(cfg.network.start_timeout, 10.0)
        peer_rounds = self._await_neighbours(window)
        if ckpt is not None:
            start = self._resume(ckpt)
            log.info("%s resumed after round %d; neighbours at rounds %s", cfg.id, ckpt.round, peer_rounds)
            target = resume_target(start, list(peer_rounds.values()), cfg.rounds)
            if target > start:
                start = self._skip_to(start, target)
        else:
            start = self._start()
        for k in range(start, cfg.rounds + 1):
            self._round(k)
        self.state = "done"
        self._write_status()
        log.info("%s finished %d rounds", cfg.id, cfg.rounds)
        return self.history

    def _resume(self, ckpt: NodeCheckpoint) -> int:
        self.params = ckpt.params.reshape(1, -1).clone()
        self.trainer.load_state_tensors(ckpt.optimizer)
        if PUSH_SUM_WEIGHT in ckpt.optimizer:
            self.push_weight = float(ckpt.optimizer[PUSH_SUM_WEIGHT][0])
        self._load_compression(ckpt.optimizer)
        torch.set_rng_state(ckpt.rng_state)
        self.history = ckpt.history
        meta = ckpt.meta
        self.sync = SyncOutcome(**meta["sync"]) if meta.get("sync") else None
        self.sync_bytes = int(meta.get("sync_bytes", 0))
        if ckpt.sync_params is not None and self.sync is not None:
            claim = Claim(self.sync.norm, self.sync.owner_index, self.sync.owner)
            self._held = (claim, ckpt.sync_params.clone())
        return ckpt.round + 1

    def _skip_to(self, start: int, target: int) -> int:
        """Catch up after a restart: join the neighbours' current round. The rounds missed while
        down are recorded as absent -- no training, no mixing, exactly how the simulator treats a
        device that dropped out -- so the node does not fall ever further behind."""
        log.info("%s: was absent in rounds %d-%d; joining the neighbours at round %d",
                 self.cfg.id, start, target - 1, target)  # fmt: skip
        h = self.history
        for k in range(start, target):
            if k % self.cfg.eval.every == 0:
                # The parameters did not change, so neither did the evaluation.
                h.eval_rounds.append(k)
                h.accuracy.append(h.accuracy[-1])
                h.loss.append(h.loss[-1])
            h.train_loss.append(float("nan"))
            h.bytes_sent.append(0)
            h.mixed.append([])
            h.round_time_s.append(0.0)
            h.compute_s.append(0.0)
            h.comm_s.append(0.0)
        self._checkpoint(target - 1)
        self._write_status()
        return target

    def _start(self) -> int:
        cfg = self.cfg
        init = self.init_of(cfg.index)
        if cfg.sync.enabled:
            self.state = "sync"
            self._write_status()
            if cfg.sync.mode == "flood":
                own = self.sync_claim()
                self._held = (own, self._served_init(init))
            before = self._bytes_sent()
            self.sync = self._synchronize()
            self.sync_bytes += self._bytes_sent() - before
            if cfg.sync.mode == "flood":
                assert self._held is not None
                init = self._held[1]
            else:
                # Nothing travelled: the owner's init is a public function of (seed, index).
                init = self.init_of(self.sync.owner_index)
        self.params = init.reshape(1, -1).clone()
        self._start_compression()
        acc, loss = self._evaluate()
        self.history.eval_rounds.append(0)
        self.history.accuracy.append(acc)
        self.history.loss.append(loss)
        self._checkpoint(0)
        return 1

    def _start_compression(self) -> None:
        """Sender state from the start row; choco's copies of the neighbours start where each of
        them starts: the synchronized init every device adopted, or (sync off) its public init."""
        if self.compressor is None:
            return
        self.compressor.start(self.params)
        if self.compressor.compression.method == "choco":
            synced = self.cfg.sync.enabled
            self.copies = {
                p: (self.params if synced else self.init_of(i).reshape(1, -1)).clone()
                for p, i in self.peer_index.items()
            }

    def _compression_state(self) -> dict[str, torch.Tensor]:
        if self.compressor is None:
            return {}
        return self.compressor.state_tensors() | {f"compress.copy.{p}": c for p, c in self.copies.items()}

    def _load_compression(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.compressor is None:
            return
        self.compressor.load_state_tensors(tensors)
        if self.compressor.compression.method == "choco":
            missing = [p for p in self.peers if f"compress.copy.{p}" not in tensors]
            if missing:
                raise P2PLError(f"the node checkpoint holds no choco copy of {missing[0]}; start it with --fresh")
            self.copies = {p: tensors[f"compress.copy.{p}"].clone() for p in self.peers}

    def _served_init(self, init: torch.Tensor) -> torch.Tensor:
        """Flood sync: the parameters this node serves for its own claim (an attacker's hook)."""
        return init.clone()

    # -------------------------------------------------------------------------- start-up

    def _await_neighbours(self, window: float) -> dict[str, int]:
        """Say hello until every neighbour answers or ``window`` seconds pass; {peer: its round}."""
        deadline = time.monotonic() + window
        rounds: dict[str, int] = {}
        missing = [p for p in self.peers if not self.cfg.link_cut(p, self.round_now)]
        while missing and time.monotonic() < deadline:
            for peer in list(missing):
                self.client.reset_backoff(peer)  # start-up: a peer not up yet is not "down"
                reply = self.client.fetch(peer, self.peers[peer], self._hello(), timeout=2.0)
                if reply is not None and reply.kind == "hello":
                    rounds[peer] = reply.round
                    missing.remove(peer)
            if missing:
                time.sleep(0.2)
        if missing:
            log.warning("%s: neighbours %s did not answer within %.0fs; going on without them",
                        self.cfg.id, missing, window)  # fmt: skip
        return rounds

    # ------------------------------------------------------------------ max norm sync

    def init_of(self, index: int) -> torch.Tensor:
        """Device ``index``'s initial parameters ``[P]``: a public function of (seed, index)."""
        return init_device_params(self.model, self.spec, self.cfg.seed, [index])[0]

    def init_norm(self, index: int) -> float:
        """L2 norm of device ``index``'s init (computed once per index)."""
        norm = self._init_norms.get(index)
        if norm is None:
            norm = self._init_norms[index] = _norm(self.init_of(index))
        return norm

    def _read_claim(self, peer: str, msg: wire.Message) -> Claim | None:
        """A neighbour's sync claim, or None (logged) if it is malformed or, in verified mode, false."""
        ex = msg.header.extras
        if not {"norm", "owner", "owner_index"} <= set(ex):
            log.warning("%s: sync message from %s lacks norm/owner; ignored", self.cfg.id, peer)
            return None
        claim = Claim(float(ex["norm"]), int(ex["owner_index"]), str(ex["owner"]))
        if self.cfg.sync.mode == "flood":
            return claim  # the paper's form: the norm is checked when the parameters arrive
        devices = self.cfg.network.devices
        known = {self.cfg.index: self.cfg.id, **{i: p for p, i in self.peer_index.items()}}
        why = ""
        if claim.index < 0 or (devices and claim.index >= devices):
            why = f"device index {claim.index} is outside the network (0..{devices - 1})"
        elif claim.index in known and known[claim.index] != claim.owner:
            why = f"device {claim.index} is {known[claim.index]}, not {claim.owner}"
        elif not math.isclose(claim.norm, self.init_norm(claim.index), rel_tol=1e-9, abs_tol=1e-12):
            why = f"device {claim.index}'s init has norm {self.init_norm(claim.index):.9g}, not {claim.norm:.9g}"
        if why:
            log.warning("%s: false sync claim from %s ignored: %s", self.cfg.id, peer, why)
            return None
        return claim

    def _synchronize(self) -> SyncOutcome:
        cfg = self.cfg
        best = self.sync_claim()
        reporters: dict[str, list[str]] = {}  # owner -> neighbours that announced it (fetch sources)
        unchanged, last_change, step = 0, 0, 0
        while not (cfg.sync.max_steps and step >= cfg.sync.max_steps):
            self.mailbox.set_sync_step(step)
            targets = self._targets(0)
            self.broadcast(targets, wire.encode(self._header("sync-norm", 0, step, **best.extras())))
            waiting = {p for p in targets if not self.client.is_down(p) and not self._skipped(p)}
            deadline = time.monotonic() + cfg.sync.step_timeout
            got = self.mailbox.wait_for_any("sync-norm", 0, [step, wire.SYNC_DONE_STEP], waiting, deadline)
            self._count_missed(f"sync step {step}", targets, got)
            changed = False
            for peer in sorted(got):
                try:
                    claim = self._read_claim(peer, got[peer])
                except Exception as err:  # nothing a neighbour says may crash the node
                    log.warning("%s: sync claim from %s ignored: %s", cfg.id, peer, err)
                    continue
                if claim is None:
                    continue
                reporters.setdefault(claim.owner, []).append(peer)
                if claim.beats(best):
                    best, changed = claim, True
            step += 1
            if changed:
                unchanged, last_change = 0, step
            else:
                unchanged += 1
            if unchanged >= cfg.sync.patience:
                break
        self.mailbox.set_sync_step(wire.SYNC_DONE_STEP)
        final = self._header("sync-norm", 0, wire.SYNC_DONE_STEP, **best.extras())
        self.broadcast(self._targets(0), wire.encode(final))
        adopted = True
        if cfg.sync.mode == "flood":
            own = self.sync_claim()
            adopted = best == own or self._fetch_winner(best, reporters.get(best.owner, []))
            if not adopted:
                best = own
        log.info("%s: max norm sync (%s) done after %d steps: owner %s (norm %.6g)",
                 cfg.id, cfg.sync.mode, step, best.owner, best.norm)  # fmt: skip
        return SyncOutcome(best.owner, best.index, best.norm, last_change, adopted)

    def _fetch_winner(self, best: Claim, sources: list[str]) -> bool:
        """Flood sync: fetch the winning parameters from a neighbour that announced them (it may
        itself still be fetching them, so retry until sync.fetch_timeout); adopt and serve them."""
        request = wire.encode(self._header("sync-fetch", 0, 0, owner=best.owner, owner_index=best.index))
        deadline = time.monotonic() + self.cfg.sync.fetch_timeout
        while time.monotonic() < deadline:
            for peer in dict.fromkeys(sources):
                reply = self.client.fetch(peer, self.peers[peer], request, timeout=5.0, expected=self.wire_spec)
                if reply is None or reply.kind != "sync-params" or reply.header.extras.get("owner") != best.owner:
                    continue
                flat = self._flat(reply)
                got = _norm(flat)
                if not math.isclose(got, best.norm, rel_tol=1e-9, abs_tol=1e-12):
                    log.warning("%s: %s served parameters of norm %.9g for %s, announced %.9g; refused",
                                self.cfg.id, peer, got, best.owner, best.norm)  # fmt: skip
                    continue
                self._held = (best, flat)
                return True
            time.sleep(0.05)
        log.warning("%s: could not fetch the max-norm parameters of %s; keeping own init", self.cfg.id, best.owner)
        return False

    # -------------------------------------------------------------------------- rounds

    def _targets(self, round_index: int) -> dict[str, str]:
        return {p: a for p, a in self.peers.items() if not self.cfg.link_cut(p, round_index)}

    def _bytes_sent(self) -> int:
        """Bytes this node really sent: its messages and its answers to neighbours' fetches, less
        the sync parameters it served (counted in ``sync_bytes`` whenever they are served)."""
        served = int(self.server.stats().get("bytes.sent", 0))
        with self._served_lock:
            served -= self._sync_served
        return int(self.client.stats().get("bytes.sent", 0)) + served

    def _sane(self, row: torch.Tensor, reference: torch.Tensor) -> bool:
        """Finite, and not exploded (``core.cooperate.unsound_rows``: the simulator's test)."""
        return not bool(unsound_rows(row.reshape(1, -1), reference.reshape(1, -1), self.cooperation.max_norm_ratio)[0])

    def _train(self, k: int) -> float:
        """Local training; a non-finite or exploded result is rolled back to the pre-train row
        (and the optimizer state to its pre-train value, or zeros if that is not finite either)."""
        before = self.params.clone()
        opt_before = {name: t.clone() for name, t in self.trainer.state_tensors().items()}
        row = self.params.to(self.device)  # train on the configured device; rows live on the CPU
        if self.cooperation.every_local_step and self._cooperates(k):
            stats = self.trainer.train(row, k, span=self.span, after_step=lambda j: self._mix_step(k, j, row))
        else:
            stats = self.trainer.train(row, k)
        self.params = row.cpu()
        if self._sane(self.params[0], before[0]):
            return float(stats.mean_loss[0])
        log.warning("%s round %d: local training gave non-finite or exploding parameters; rolled back",
                    self.cfg.id, k)  # fmt: skip
        self.params = before
        finite = all(bool(torch.isfinite(t).all()) for t in opt_before.values() if t.is_floating_point())
        self.trainer.load_state_tensors(
            opt_before if finite else {name: torch.zeros_like(t) for name, t in opt_before.items()}
        )
        return float("nan")

    def _cooperates(self, k: int) -> bool:
        return k % self.cfg.consensus.every == 0 and bool(self.peers) and bool(self.cooperation.stages)

    def _cooperate(self, k: int, first: int, own: torch.Tensor, loss: float) -> tuple[torch.Tensor, list[str]]:
        """The cooperation's stages for this row (numbered from ``first``), then the affinity
        blend and the guard, as every runtime finishes a cooperation step; returns the new row
        and the neighbours mixed with in the first stage."""
        before = own.clone()
        mixed: list[str] = []
        for c, stage in enumerate(self.cooperation.stages):
            own, live = self._consensus_step(k, first + c, own, loss, stage)
            if c == 0:
                mixed = live
        return finish(self.cooperation, own.reshape(1, -1), before.reshape(1, -1), None)[0].clone(), mixed

    def _mix_step(self, k: int, j: int, row: torch.Tensor) -> None:
        """D-PSGD: the cooperation after local step ``j``, written into the training row in place."""
        mixed, live = self._cooperate(k, j * len(self.cooperation.stages), row[0].cpu(), float("nan"))
        row[0].copy_(mixed)
        if j == 0:
            self._step_mixed = live

    def _round(self, k: int) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.round_now = k
        self.mailbox.set_round(k)
        self.state = "training"
        sent_before = self._bytes_sent()
        self._step_mixed = []
        train_loss = self._train(k)
        if cfg.faults.round_delay_s:
            time.sleep(cfg.faults.round_delay_s)  # injected straggler
        t_comm = time.perf_counter()
        compute_s = t_comm - t0  # with D-PSGD this includes the exchanges after every local step
        mixed: list[str] = self._step_mixed
        if self._cooperates(k) and not self.cooperation.every_local_step:
            own, mixed = self._cooperate(k, 0, self.params[0], train_loss)
            self.params = own.reshape(1, -1)
        comm_s = time.perf_counter() - t_comm
        if k % cfg.eval.every == 0 or k == cfg.rounds:
            acc, loss = self._evaluate()
            self.history.eval_rounds.append(k)
            self.history.accuracy.append(acc)
            self.history.loss.append(loss)
        self.history.train_loss.append(train_loss)
        self.history.bytes_sent.append(self._bytes_sent() - sent_before)
        self.history.mixed.append(mixed)
        self.history.round_time_s.append(time.perf_counter() - t0)
        self.history.compute_s.append(compute_s)
        self.history.comm_s.append(comm_s)
        if cfg.checkpoint_every and (k % cfg.checkpoint_every == 0 or k == cfg.rounds):
            self._checkpoint(k)
        self._write_status()
        self.mailbox.prune(k + 1)
        log.info("%s round %d: mixed with %s, acc %s", cfg.id, k, mixed or "nobody",
                 f"{self.history.accuracy[-1]:.4f}" if self.history.eval_rounds[-1] == k else "-")  # fmt: skip

    def _encode_params(self, k: int, c: int, own: torch.Tensor, loss: float, **extra: Any) -> bytes | None:
        try:
            row = self.outgoing(own, k, c)
            if self.compressor is not None:
                arrays = self.compressor.encode(row.reshape(1, -1), [self.cfg.index], k, c)
                tensors = {name: arrays[name][0].contiguous() for name in self.message_spec.names}
            else:
                tensors = self._tensors(row)
            extras = self.params_extras(loss) | extra
            return wire.encode(self._header("params", k, c, **extras), tensors)
        except wire.WireError as err:  # e.g. non-finite values: say so, send nothing, keep going
            log.error("%s round %d: not sending parameters: %s", self.cfg.id, k, err)
            return None

    def _exchange_plan(self, k: int, c: int, stage: Stage) -> tuple[dict[str, str], set[str]]:
        """Whom this node sends to in consensus step ``c`` of round ``k``, and whom it hears.

        Every live neighbour both ways for P2PL's gossip; the out-neighbours and in-neighbours of
        a one-way topology for push-sum; for random gossip the one neighbour this node draws
        and the neighbours whose own (public, keyed) draw is this node."""
        targets = self._targets(k)
        if isinstance(stage, PushSum):
            sends = {p: a for p, a in targets.items() if self.peer_cfg[p].sends}
            return sends, {p for p in targets if self.peer_cfg[p].hears}
        assert isinstance(stage, Gossip)  # a node has no server step
        if stage.peers == "one-random":
            mine = self._draw(k, c, self.cfg.index, sorted(self.peer_index[p] for p in targets))
            sends = {p: a for p, a in targets.items() if self.peer_index[p] == mine}
            hears = set()
            for p in targets:
                theirs = sorted(self.peer_cfg[p].neighbours)  # its links, as the simulator has them
                if self._draw(k, c, self.peer_index[p], theirs) == self.cfg.index:
                    hears.add(p)
            return sends, hears
        return targets, set(targets)

    def _draw(self, k: int, c: int, device: int, candidates: list[int]) -> int:
        indptr = np.array([0, len(candidates)], dtype=np.int64)
        return int(peer_choice(self.cfg.seed, k, c, np.array([device]), indptr, np.asarray(candidates))[0])

    def _consensus_step(
        self, k: int, c: int, own: torch.Tensor, loss: float, stage: Stage
    ) -> tuple[torch.Tensor, list[str]]:
        cfg = self.cfg
        targets, hears = self._exchange_plan(k, c, stage)
        extra: dict[str, Any] = {}
        if isinstance(stage, PushSum):
            share = float(push_sum_shares(np.array([self.push_weight]), np.array([len(targets)]))[0])
            extra["weight"] = share
        message = self._encode_params(k, c, own, loss, **extra) if targets else None
        for peer in set(targets) | hears:
            # It spoke to us lately (it is back): do not skip it because of an old failure.
            if self.client.is_down(peer) and self.mailbox.latest_round(peer) >= k - 1:
                self.client.reset_backoff(peer)
        accepted = self.broadcast(targets, message) if message is not None else {}
        # Wait for those that took ours (or, on one-way or one-peer steps, those due to send to
        # us that are not known down); a peer that refused ours (already past round k, down, or
        # cut) will not send a round-k message we could still use -- but take one that is here.
        # A neighbour silent for network.max_missed_rounds rounds is not waited for until it
        # speaks again, so one staller cannot slow every round.
        due = {p for p in hears if accepted.get(p, not self.client.is_down(p))}
        waiting = {p for p in due if not self._skipped(p, k)}
        got = self._wait_params(k, c, waiting)
        for peer in hears:
            if peer not in got and (m := self.mailbox.get("params", k, c, peer)) is not None:
                got[peer] = m
        if c == 0:
            self._count_missed(f"round {k}", {p: self.peers[p] for p in hears}, got)
        rows: dict[str, _Row] = {}
        for peer in sorted(got, key=lambda p: self.peer_index[p]):
            try:
                row = self._read_row(peer, got[peer], isinstance(stage, PushSum))
            except Exception as err:  # nothing a neighbour says may crash the node
                log.warning("%s round %d: dropped %s for the round: %s", cfg.id, k, peer, err)
                continue
            if row is not None:
                rows[peer] = row
        if isinstance(stage, PushSum):
            return self._push_sum_mix(k, own, rows, extra.get("weight", self.push_weight), stage)
        return self._mix(k, own, rows, stage)

    def _decompress(self, peer: str, msg: wire.Message) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A neighbour's compressed message as the row this node uses and its sent mask (choco:
        the message updates this node's copy of that neighbour, which is the row used)."""
        assert self.compressor is not None and msg.tensors is not None
        arrays = {name: t.unsqueeze(0) for name, t in msg.tensors.items()}
        decoded = self.compressor.decode(arrays, [self.peer_index[peer]], msg.round, msg.step)
        if self.compressor.compression.method != "choco":
            return decoded.values[0], None if decoded.mask is None else decoded.mask[0]
        assert decoded.indices is not None
        q = decoded.values.gather(1, decoded.indices)
        self.copies[peer] = apply_sparse(self.copies[peer], decoded.indices, q, add=True)
        return self.copies[peer][0], None

    def _skipped(self, peer: str, k: int = 0) -> bool:
        """True while ``peer`` is not waited for: it sent nothing for network.max_missed_rounds
        rounds (or sync steps) in a row. It is waited for again once it speaks: parameters for
        round k - 1 or later, even late ones (a restarted node one round behind catches up once
        it is waited for). One more miss then skips it again, so a staller costs at most one
        round deadline now and then."""
        limit = self.cfg.network.max_missed_rounds
        if self._missed[peer] < limit:
            return False
        heard = self.mailbox.params_heard(peer)
        if heard > self._skip_mark.get(peer, -1) and heard >= k - 1:
            log.info("%s round %d: %s speaks again; waiting for it again", self.cfg.id, k, peer)
            self._missed[peer] = limit - 1
            return False
        return True

    def _count_missed(self, when: str, targets: Mapping[str, str], got: Mapping[str, wire.Message]) -> None:
        limit = self.cfg.network.max_missed_rounds
        for peer in targets:
            if peer in got:
                self._missed[peer] = 0
                continue
            self._missed[peer] += 1
            if self._missed[peer] == limit:
                self._skip_mark[peer] = self.mailbox.params_heard(peer)
                log.warning("%s %s: %s sent nothing %d times in a row; not waiting for it until it speaks",
                            self.cfg.id, when, peer, limit)  # fmt: skip

    def _read_row(self, peer: str, msg: wire.Message, push_sum: bool = False) -> _Row | None:
        """A neighbour's parameters with its metadata validated (None, logged, if it is invalid):
        degree in [1, network size - 1]; data size a positive integer (the weights count it
        within [own / r, own * r], r = consensus.max_size_ratio: ``graph.weights.bounded_claims``);
        for push-sum a weight share that is finite, > 0 and at most the network size (the whole
        network's weight: honest shares never exceed it)."""
        ex = msg.header.extras
        degree, size = ex.get("degree"), ex.get("data_size")
        max_degree = self.cfg.network.devices - 1 if self.cfg.network.devices else 2**20
        weight = 0.0
        if push_sum:
            claimed = push_sum_share(ex.get("weight"), self.cfg.network.devices)
            if claimed is None:
                log.warning("%s: %s claims push-sum weight %r (must be in (0, number of devices]); dropped "
                            "for the round", self.cfg.id, peer, ex.get("weight"))  # fmt: skip
                return None
            weight = claimed
        if not isinstance(degree, int) or not 1 <= degree <= max_degree:
            log.warning("%s: %s claims degree %r (must be 1..%d); dropped for the round",
                        self.cfg.id, peer, degree, max_degree)  # fmt: skip
            return None
        if not isinstance(size, int) or size < 1:
            log.warning("%s: %s claims data size %r (must be a positive integer); dropped for the round",
                        self.cfg.id, peer, size)  # fmt: skip
            return None
        if self.compressor is not None:
            flat, sent = self._decompress(peer, msg)
            return _Row(flat, degree, float(size), weight, sent)
        return _Row(self._flat(msg), degree, float(size), weight)

    def _mix(
        self, k: int, own: torch.Tensor, rows: Mapping[str, _Row], stage: Stage | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """One consensus step: this device's row of W over the live neighbours (equal weights
        for random gossip), then the shared gossip step (``core.cooperate.gossip``: the
        aggregation rule, and the safety net that retries without out-of-bounds neighbours and
        keeps the own row if that is not enough)."""
        cfg = self.cfg
        live = list(rows)
        stage = stage or (self.cooperation.stages[0] if self.cooperation.stages else Gossip())
        assert isinstance(stage, Gossip)
        if stage.peers == "one-random":
            self_w = 1.0 / (1 + len(live))
            weights = [self_w] * len(live)
        else:
            max_degree = max(cfg.network.max_degree or len(self.peers), len(live))
            self_w, row = row_weights(
                cfg.consensus.weights,
                cfg.index,
                len(live),
                [self.peer_index[p] for p in live],
                [rows[p].degree for p in live],
                float(self.data_size),
                [rows[p].data_size for p in live],
                max_degree,
                cfg.consensus.max_size_ratio,
            )
            weights = [row[self.peer_index[p]] for p in live]
        return self._mix_weighted(k, own, rows, self_w, weights, stage)

    def _mix_weighted(
        self, k: int, own: torch.Tensor, rows: Mapping[str, _Row], self_w: float, weights: list[float], stage: Gossip
    ) -> tuple[torch.Tensor, list[str]]:
        live = list(rows)
        suspects = [p for p in live if not self._sane(rows[p].flat, own)]
        if suspects:
            log.warning("%s round %d: parameters of %s are out of bounds", self.cfg.id, k, suspects)
        if self.compressor is None:
            mixed = mix_row(own, [rows[p].flat for p in live], self_w, weights, stage)
        else:
            pool = torch.stack([rows[p].flat for p in live]) if live else own.new_zeros(0, own.shape[-1])
            masks = [rows[p].sent for p in live]
            sent = torch.stack([m for m in masks if m is not None]) if live and masks[0] is not None else None
            hood = one_row(self_w, weights)
            mixed = compressed_gossip(own.reshape(1, -1), pool, sent, hood, stage, self.compressor)[0]
        return mixed, [p for p in live if p not in suspects]

    def _push_sum_mix(
        self, k: int, own: torch.Tensor, rows: Mapping[str, _Row], own_share: float, stage: PushSum
    ) -> tuple[torch.Tensor, list[str]]:
        """Push-sum: the share-weighted mean of this row and the rows heard; the new push-sum
        weight is the sum of the shares (``core.neighbours.push_sum_row``)."""
        live = list(rows)
        self_w, weights, self.push_weight = push_sum_row(own_share, [rows[p].weight for p in live])
        return self._mix_weighted(k, own, rows, self_w, weights, stage.as_gossip())

    def _wait_params(self, k: int, c: int, waiting: set[str]) -> dict[str, wire.Message]:
        """Wait for the round-k step-c parameters of ``waiting`` until the round deadline; a silent
        neighbour is probed with ``hello`` and dropped if it is down or says it is past round k
        (a claimed round only ever stops the wait: it never moves this node's round)."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.network.round_timeout
        probe_at = time.monotonic() + _PROBE_AFTER_S
        got: dict[str, wire.Message] = {}
        while True:
            got |= self.mailbox.wait_for("params", k, c, waiting - set(got), min(deadline, probe_at))
            silent = waiting - set(got)
            if not silent or time.monotonic() >= deadline:
                if silent:
                    log.warning("%s round %d: no parameters from %s before the deadline", cfg.id, k, sorted(silent))
                return got
            if time.monotonic() >= probe_at:
                probe_at = time.monotonic() + _PROBE_EVERY_S
                for peer in sorted(silent):
                    reply = self.client.fetch(peer, self.peers[peer], self._hello(), timeout=2.0)
                    if reply is None or reply.round > k:
                        why = "unreachable" if reply is None else f"at round {reply.round}"
                        log.info("%s round %d: not waiting for %s (%s)", cfg.id, k, peer, why)
                        waiting = waiting - {peer}

    # ------------------------------------------------------------------ measurements

    def _evaluate(self) -> tuple[float, float]:
        acc, loss = evaluate(
            self.model, self.spec, self.params.to(self.device), self.x_test, self.y_test,
            sample_chunk=self.cfg.eval.test_batch,
        )  # fmt: skip
        return float(acc[0]), float(loss[0])

    def _checkpoint(self, k: int) -> None:
        if not self.cfg.checkpoint_every:
            return
        meta = {
            "fingerprint": self.cfg.fingerprint(),
            "sync": None if self.sync is None else self.sync.__dict__,
            "sync_bytes": self.sync_bytes,
            "id": self.cfg.id,
            "index": self.cfg.index,
        }
        held = self._held[1] if self._held is not None and self.sync is not None else None
        state = self.trainer.state_tensors() | self._compression_state()
        if any(isinstance(stage, PushSum) for stage in self.cooperation.stages):
            state = state | {PUSH_SUM_WEIGHT: torch.tensor([self.push_weight], dtype=torch.float64)}
        ckpt = NodeCheckpoint(k, self.params[0], state, held, torch.get_rng_state(), self.history, meta)
        checkpoint.save(self.dir, ckpt)

    def _write_status(self, error: str = "") -> None:
        h = self.history
        status: dict[str, Any] = {
            "id": self.cfg.id,
            "index": self.cfg.index,
            "pid": os.getpid(),
            "state": self.state,
            "round": len(h.round_time_s),  # rounds finished
            "rounds": self.cfg.rounds,
            "accuracy": h.accuracy[-1] if h.accuracy else None,
            "loss": h.loss[-1] if h.loss else None,
            "data_size": self.data_size,
            "sync": None if self.sync is None else self.sync.__dict__,
            "sync_bytes": self.sync_bytes,
            "elapsed_s": time.time() - self._started,
            # the last round's measured split (what the system model predicts: p2pl.system)
            "compute_s": h.compute_s[-1] if h.compute_s else None,
            "comm_s": h.comm_s[-1] if h.comm_s else None,
            "transport": {
                "server": self.server.stats(),
                "client": self.client.stats(),
                "mailbox": self.mailbox.stats(),
            },
        }
        if error:
            status["error"] = error
        atomic.write_text(self.dir / STATUS, json.dumps(status, indent=1) + "\n")
        atomic.write_text(self.dir / METRICS, self._metrics_csv())

    def _metrics_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["round", "device", "accuracy", "loss"])
        h = self.history
        for r, acc, loss in zip(h.eval_rounds, h.accuracy, h.loss, strict=True):
            writer.writerow([r, self.cfg.index, f"{acc:.6g}", f"{loss:.6g}"])
        return buf.getvalue()


def resume_target(start: int, peer_rounds: list[int], rounds: int) -> int:
    """The round a resuming node may skip ahead to: one that a strict majority of its answering
    neighbours report having reached (a lone liar among honest neighbours cannot move it), and
    never past the last round, so the node always trains and reports the final round itself.
    Claims cannot be verified, so this only ever skips rounds the node missed while down."""
    if not peer_rounds:
        return start
    ordered = sorted(peer_rounds, reverse=True)
    agreed = ordered[len(ordered) // 2]  # more than half of them report at least this round
    return max(start, min(agreed, rounds))


def run_node(cfg: NodeConfig, *, fresh: bool = False) -> NodeHistory:
    """Build and run one node to completion."""
    return NodeRuntime(cfg, fresh=fresh).run()


def read_status(directory: str | Path) -> Mapping[str, Any] | None:
    """A node's last status (None if it has written none yet, or it is unreadable: a status file
    is only progress information, so a damaged one never stops anything)."""
    path = Path(directory) / STATUS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return data
