"""The ``p2pl node`` runtime: one device of P2PL in one process, talking to its neighbours over gRPC.

The math is the simulator's, run over a batch of one (docs/design.md, "Shape of the code"): the device's own
init (``core.params.init_device_params`` keyed by its global index), local epochs with
``core.train.VectorizedTrainer`` over its own samples (the shuffle keys depend only on the seed,
round, epoch, device index and sample position, so a node holding only its data walks the
simulator's batches), its row of W from ``graph.weights.row_weights``, and the mix as a
``core.consensus.MixingOperator`` over [self; neighbours]. With no faults a node's parameters
equal the simulator's device row up to float rounding.

What the network adds, with no coordinator anywhere:

* **Start-up.** The node serves first, then says ``hello`` (a Fetch) to each neighbour until it
  answers or ``network.start_timeout`` passes; the reply carries the neighbour's current round.
* **Max norm synchronization.** Each step it floods its best ``(norm, owner)`` pair to its
  neighbours (``sync-norm``, round 0, step s) and adopts the best it hears (larger norm, ties to
  the lower device index -- ``core.sync``'s rule). When the pair has not changed for
  ``sync.patience`` steps it announces its final pair (step SYNC_DONE_STEP, so slower neighbours
  need not wait for steps it will never send) and fetches the winner's parameters once from a
  neighbour that reported the pair. Every node serves the parameters it holds on Fetch, so the
  winner's parameters travel hop by hop; a served payload must have the announced norm.
* **Rounds.** Train, send the parameters (``params``, round k, consensus step c) to every
  neighbour, wait until each neighbour that accepted ours has answered or the deadline passes,
  then mix with those that arrived: the row of W is recomputed over the live neighbours, so a
  missing one is renormalized away. Late and replayed messages are dropped by the mailbox
  (stale round) and duplicates cannot replace what was accepted.
* **Faults.** An unreachable neighbour is skipped with exponential backoff (PeerClient) and
  mixed in again as soon as it answers. While waiting, a silent neighbour is probed with
  ``hello``: one that is down, or already past this round, is not waited for. A checkpoint is
  written atomically after every round; a restarted node resumes from it, tells its neighbours
  (``hello`` resets their backoff) and catches up: neighbours that are ahead reject its
  stale-round messages, so it does not wait for them and trains through the missed rounds fast.
* **Security.** Mutual TLS with the run's CA; every message is validated by the transport
  (``wire.decode``) before the runtime sees it; rejections are logged to ``node.log``.

Files in the node's directory: ``node.log``, ``status.json`` (state and round, rewritten
atomically after each round), ``metrics.csv`` (round, device, accuracy, loss),
``checkpoint.safetensors``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pl import atomic
from p2pl.core.consensus import MixingOperator
from p2pl.core.evaluate import evaluate
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.core.schedule import Partition
from p2pl.core.train import VectorizedTrainer
from p2pl.data.base import Dataset
from p2pl.errors import P2PLError
from p2pl.graph.weights import MixingWeights, row_weights
from p2pl.models import build_model
from p2pl.node import checkpoint, wire
from p2pl.node.certs import TlsConfig, load_tls_config
from p2pl.node.checkpoint import NodeCheckpoint, NodeHistory
from p2pl.node.config import NodeConfig
from p2pl.node.mailbox import Mailbox
from p2pl.node.transport import PeerClient, PeerServer

__all__ = [
    "SYNC_DONE_STEP",
    "NodeRuntime",
    "SyncOutcome",
    "load_node_data",
    "mix_row",
    "run_node",
]

log = logging.getLogger(__name__)

#: Step number of a node's final max-norm announcement ("my pair will not change any more").
SYNC_DONE_STEP = 2**31
STATUS = "status.json"
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
    own: torch.Tensor, neighbours: list[torch.Tensor], self_weight: float, weights: list[float]
) -> torch.Tensor:
    """One consensus step of one device: ``W_nn θ_n + Σ_m W_nm θ_m`` as the simulator computes it
    (a MixingOperator over the stack [self; neighbours], row 0)."""
    if not neighbours:
        return own * self_weight if self_weight != 1.0 else own.clone()
    n = len(neighbours)
    stack = torch.stack([own, *neighbours])
    w = MixingWeights(
        n + 1,
        np.zeros(n, dtype=np.int64),
        np.arange(1, n + 1, dtype=np.int64),
        np.asarray(weights, dtype=np.float64),
        np.asarray([self_weight] + [1.0] * n, dtype=np.float64),
    )
    return MixingOperator.of(w, "dense").apply(stack)[0]


def _better(a: tuple[float, int], b: tuple[float, int]) -> bool:
    """Max norm synchronization order: larger norm wins, ties go to the lower device index."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


@dataclass(frozen=True)
class SyncOutcome:
    owner: str
    owner_index: int
    norm: float
    steps: int  # the last step in which this node's pair changed (the simulator's sync_steps)
    adopted: bool  # False if the winner's parameters could not be fetched (own init kept)


# --------------------------------------------------------------------------------------- runtime


class NodeRuntime:
    """One device: build with a validated :class:`NodeConfig`, then :meth:`run` (blocking)."""

    def __init__(self, cfg: NodeConfig, *, fresh: bool = False) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.data = load_node_data(cfg)
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes)
        self.spec = ParamSpec.of(self.model)
        self.wire_spec = wire.ModelSpec.from_module(self.model)
        partition = Partition(indices=(np.arange(len(self.data.y_train), dtype=np.int64),), device_ids=(cfg.index,))
        self.trainer = VectorizedTrainer(
            self.model, self.spec, self.data.x_train, self.data.y_train, partition, cfg.training, cfg.seed
        )
        self.peers: dict[str, str] = {p.id: p.address for p in cfg.peers}
        self.peer_index: dict[str, int] = {p.id: p.index for p in cfg.peers}
        self.data_size = len(self.data.y_train)
        self.tls: TlsConfig | None = None
        if not cfg.tls.insecure:
            ca = Path(cfg.tls.ca_cert) if cfg.tls.ca_cert else None
            self.tls = load_tls_config(Path(cfg.tls.cert_dir), cfg.id, ca)
        if fresh:
            (self.dir / checkpoint.CHECKPOINT).unlink(missing_ok=True)
        self.round_now = 0  # read by the server threads (fetch handler, link filter)
        self.mailbox = Mailbox(max_rounds_ahead=cfg.network.max_rounds_ahead, allowed_senders=self.peers)
        self.server = PeerServer(
            cfg.id,
            cfg.listen,
            self.tls,
            self.mailbox,
            self.wire_spec,
            cfg.network.max_message_bytes,
            fetch_handler=self._on_fetch,
            insecure=cfg.tls.insecure,
        )
        self.client = PeerClient(
            cfg.id,
            self.tls,
            cfg.network.max_message_bytes,
            insecure=cfg.tls.insecure,
            backoff_initial=min(0.25, cfg.network.backoff_max),
            backoff_max=cfg.network.backoff_max,
            throttle_bps=cfg.network.throttle_mbps * 1e6,
        )
        self.client.set_link_filter(lambda peer: not cfg.link_cut(peer, self.round_now))
        # (owner id, owner index, norm, flat params): the parameters this node serves on Fetch.
        self._held: tuple[str, int, float, torch.Tensor] | None = None
        self.params = torch.empty(0)
        self.history = NodeHistory()
        self.sync: SyncOutcome | None = None
        self.sync_bytes = 0
        self.state = "starting"
        self._log_handler: logging.Handler | None = None
        self._started = time.time()

    # ------------------------------------------------------------------------ messages

    def _header(self, kind: str, round_index: int, step: int, **extras: Any) -> wire.MessageHeader:
        return wire.MessageHeader(kind, self.cfg.id, round_index, step, self.wire_spec.fingerprint, extras=extras)

    def _tensors(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in self.spec.unflatten(flat).items()}

    def _flat(self, msg: wire.Message) -> torch.Tensor:
        assert msg.tensors is not None  # PAYLOAD_KINDS always carry tensors (checked by wire)
        return self.spec.flatten(msg.tensors).to(torch.float32)

    def _hello(self) -> bytes:
        return wire.encode(self._header("hello", self.round_now, 0, data_size=self.data_size, degree=len(self.peers)))

    def _on_fetch(self, req: wire.Message) -> bytes | None:
        """Fetch handler (a gRPC server thread): ``hello`` and ``sync-fetch`` from neighbours only."""
        if req.sender not in self.peers or self.cfg.link_cut(req.sender, self.round_now):
            log.info("%s: ignored %s fetch from %s", self.cfg.id, req.kind, req.sender)
            return None
        if req.kind == "hello":
            # A neighbour says it is (back) up: stop skipping it, so it is mixed in again now.
            self.client.reset_backoff(req.sender)
            return self._hello()
        if req.kind == "sync-fetch":
            held = self._held
            if held is None or req.header.extras.get("owner") != held[0]:
                return None  # not (yet) holding that owner's parameters: the caller retries
            owner, owner_index, norm, flat = held
            header = self._header("sync-params", 0, 0, owner=owner, owner_index=owner_index, norm=norm)
            return wire.encode(header, self._tensors(flat))
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

    def close(self) -> None:
        self.client.close()
        self.server.stop(0.5)
        if self._log_handler is not None:
            logging.getLogger("p2pl").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def run(self) -> NodeHistory:
        """Start serving, synchronize (or resume), run every round; returns the history."""
        self._attach_log()
        try:
            return self._run()
        except BaseException as exc:
            self.state = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            log.error("%s: failed: %s", self.cfg.id, str(exc) or type(exc).__name__)
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
            if peer_rounds and min(peer_rounds.values()) > start:
                start = self._skip_to(start, min(peer_rounds.values()))
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
        torch.set_rng_state(ckpt.rng_state)
        self.history = ckpt.history
        meta = ckpt.meta
        self.sync = SyncOutcome(**meta["sync"]) if meta.get("sync") else None
        self.sync_bytes = int(meta.get("sync_bytes", 0))
        if ckpt.sync_params is not None and self.sync is not None:
            self._held = (self.sync.owner, self.sync.owner_index, self.sync.norm, ckpt.sync_params.clone())
        return ckpt.round + 1

    def _skip_to(self, start: int, target: int) -> int:
        """Catch up after a restart: join the neighbours' current round. The rounds missed while
        down are recorded as absent -- no training, no mixing, exactly how the simulator treats a
        device that dropped out -- so the node does not fall ever further behind."""
        log.info("%s: was absent in rounds %d-%d; joining the neighbours at round %d",
                 self.cfg.id, start, target - 1, target)  # fmt: skip
        h = self.history
        for k in range(start, min(target, self.cfg.rounds + 1)):
            if k % self.cfg.eval.every == 0 or k == self.cfg.rounds:
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
        init = init_device_params(self.model, self.spec, cfg.seed, [cfg.index])
        norm = float(init[0].double().norm())
        self._held = (cfg.id, cfg.index, norm, init[0].clone())
        if cfg.sync.enabled:
            self.state = "sync"
            self._write_status()
            before = self._bytes_sent()
            self.sync = self._synchronize()
            self.sync_bytes = self._bytes_sent() - before
            assert self._held is not None
            self.params = self._held[3].reshape(1, -1).clone()
        else:
            self.params = init.clone()
        acc, loss = self._evaluate()
        self.history.eval_rounds.append(0)
        self.history.accuracy.append(acc)
        self.history.loss.append(loss)
        self._checkpoint(0)
        return 1

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

    def _synchronize(self) -> SyncOutcome:
        cfg = self.cfg
        assert self._held is not None
        best_id, best_index, best_norm = self._held[0], self._held[1], self._held[2]
        reporters: dict[str, list[str]] = {}  # owner -> neighbours that announced it (fetch sources)
        unchanged, last_change, step = 0, 0, 0
        while not (cfg.sync.max_steps and step >= cfg.sync.max_steps):
            header = self._header("sync-norm", 0, step, norm=best_norm, owner=best_id, owner_index=best_index)
            targets = self._targets(0)
            self.client.send_many(targets, wire.encode(header), timeout=cfg.network.send_timeout)
            waiting = {p for p in targets if not self.client.is_down(p)}
            deadline = time.monotonic() + cfg.sync.step_timeout
            got = self.mailbox.wait_for_any("sync-norm", 0, [step, SYNC_DONE_STEP], waiting, deadline)
            changed = False
            for peer in sorted(got):
                ex = got[peer].header.extras
                if not {"norm", "owner", "owner_index"} <= set(ex):
                    log.warning("%s: sync message from %s lacks norm/owner; ignored", cfg.id, peer)
                    continue
                reporters.setdefault(str(ex["owner"]), []).append(peer)
                if _better((float(ex["norm"]), int(ex["owner_index"])), (best_norm, best_index)):
                    best_norm, best_index, best_id = float(ex["norm"]), int(ex["owner_index"]), str(ex["owner"])
                    changed = True
            step += 1
            if changed:
                unchanged, last_change = 0, step
            else:
                unchanged += 1
            if unchanged >= cfg.sync.patience:
                break
        final = self._header("sync-norm", 0, SYNC_DONE_STEP, norm=best_norm, owner=best_id, owner_index=best_index)
        self.client.send_many(self._targets(0), wire.encode(final), timeout=cfg.network.send_timeout)
        adopted = best_id == cfg.id or self._fetch_winner(best_id, best_index, best_norm, reporters.get(best_id, []))
        if not adopted:
            best_id, best_index, best_norm = self._held[0], self._held[1], self._held[2]
        log.info("%s: max norm sync done after %d steps: owner %s (norm %.6g)", cfg.id, step, best_id, best_norm)
        return SyncOutcome(best_id, best_index, best_norm, last_change, adopted)

    def _fetch_winner(self, owner: str, owner_index: int, norm: float, sources: list[str]) -> bool:
        """Fetch the winning parameters from a neighbour that announced them (it may itself still be
        fetching them, so retry until sync.fetch_timeout); adopt and serve them from now on."""
        request = wire.encode(self._header("sync-fetch", 0, 0, owner=owner, owner_index=owner_index))
        deadline = time.monotonic() + self.cfg.sync.fetch_timeout
        while time.monotonic() < deadline:
            for peer in dict.fromkeys(sources):
                reply = self.client.fetch(peer, self.peers[peer], request, timeout=5.0, expected=self.wire_spec)
                if reply is None or reply.kind != "sync-params" or reply.header.extras.get("owner") != owner:
                    continue
                flat = self._flat(reply)
                got = float(flat.double().norm())
                if not math.isclose(got, norm, rel_tol=1e-9, abs_tol=1e-12):
                    log.warning("%s: %s served parameters of norm %.9g for %s, announced %.9g; refused",
                                self.cfg.id, peer, got, owner, norm)  # fmt: skip
                    continue
                self._held = (owner, owner_index, norm, flat)
                return True
            time.sleep(0.05)
        log.warning("%s: could not fetch the max-norm parameters of %s; keeping own init", self.cfg.id, owner)
        return False

    # -------------------------------------------------------------------------- rounds

    def _targets(self, round_index: int) -> dict[str, str]:
        return {p: a for p, a in self.peers.items() if not self.cfg.link_cut(p, round_index)}

    def _bytes_sent(self) -> int:
        return int(self.client.stats().get("bytes.sent", 0))

    def _round(self, k: int) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.round_now = k
        self.mailbox.set_round(k)
        self.state = "training"
        sent_before = self._bytes_sent()
        stats = self.trainer.train(self.params, k)
        if cfg.faults.round_delay_s:
            time.sleep(cfg.faults.round_delay_s)  # injected straggler
        t_comm = time.perf_counter()
        compute_s = t_comm - t0
        mixed: list[str] = []
        if k % cfg.consensus.every == 0 and self.peers:
            before = self.params[0].clone()
            own = self.params[0]
            for c in range(cfg.consensus.steps):
                own, live = self._consensus_step(k, c, own, float(stats.mean_loss[0]))
                if c == 0:
                    mixed = live
            if cfg.consensus.affinity < 1.0:
                own = torch.lerp(before, own, cfg.consensus.affinity)  # as core.consensus does
            self.params = own.reshape(1, -1).clone()
        comm_s = time.perf_counter() - t_comm
        if k % cfg.eval.every == 0 or k == cfg.rounds:
            acc, loss = self._evaluate()
            self.history.eval_rounds.append(k)
            self.history.accuracy.append(acc)
            self.history.loss.append(loss)
        self.history.train_loss.append(float(stats.mean_loss[0]))
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

    def _consensus_step(self, k: int, c: int, own: torch.Tensor, loss: float) -> tuple[torch.Tensor, list[str]]:
        cfg = self.cfg
        extras: dict[str, Any] = {"data_size": self.data_size, "degree": len(self.peers)}
        if math.isfinite(loss):
            extras["loss"] = loss
        message = wire.encode(self._header("params", k, c, **extras), self._tensors(own))
        targets = self._targets(k)
        for peer in targets:
            # It spoke to us lately (it is back): do not skip it because of an old failure.
            if self.client.is_down(peer) and self.mailbox.latest_round(peer) >= k - 1:
                self.client.reset_backoff(peer)
        accepted = self.client.send_many(targets, message, timeout=cfg.network.send_timeout)
        # Wait for those that took ours; a peer that refused it (already past round k, down, or
        # cut) will not send a round-k message we could still use -- but take one that is here.
        got = self._wait_params(k, c, {p for p, ok in accepted.items() if ok})
        for peer in targets:
            if peer not in got and (m := self.mailbox.get("params", k, c, peer)) is not None:
                got[peer] = m
        live = sorted(got, key=lambda p: self.peer_index[p])
        degrees = [int(got[p].header.extras.get("degree", len(live))) for p in live]
        sizes = [float(got[p].header.extras.get("data_size", 1)) for p in live]
        max_degree = max(cfg.network.max_degree or len(self.peers), len(live))
        self_w, row = row_weights(
            cfg.consensus.weights,
            cfg.index,
            len(live),
            [self.peer_index[p] for p in live],
            degrees,
            float(self.data_size),
            sizes,
            max_degree,
        )
        mixed = mix_row(own, [self._flat(got[p]) for p in live], self_w, [row[self.peer_index[p]] for p in live])
        return mixed, live

    def _wait_params(self, k: int, c: int, waiting: set[str]) -> dict[str, wire.Message]:
        """Wait for the round-k step-c parameters of ``waiting`` until the round deadline; a silent
        neighbour is probed with ``hello`` and dropped if it is down or already past round k."""
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
            self.model, self.spec, self.params, self.data.x_test, self.data.y_test,
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
        held = self._held[3] if self._held is not None and self.sync is not None else None
        ckpt = NodeCheckpoint(
            k, self.params[0], self.trainer.state_tensors(), held, torch.get_rng_state(), self.history, meta
        )
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


def run_node(cfg: NodeConfig, *, fresh: bool = False) -> NodeHistory:
    """Build and run one node to completion."""
    return NodeRuntime(cfg, fresh=fresh).run()


def read_status(directory: str | Path) -> Mapping[str, Any] | None:
    """A node's last status (None if it has written none yet)."""
    path = Path(directory) / STATUS
    try:
        data: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data
