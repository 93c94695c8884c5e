"""The Ray backend: the devices split into shards, one Ray actor per shard (``--backend ray``).

Each actor (:class:`ShardWorker`) runs the vectorized engine (``core.train``) over its shard's
devices: their parameter rows, optimizer state and index arrays into the one training set,
which reaches every node once through Ray's object store. Shards are graph regions
(:mod:`p2pl.sim.sharding`), so consensus moves only *halo* rows: each consensus step, a shard
publishes the rows of its devices that have live neighbours in another shard (one block per
receiving shard) and the receivers mix them in with ``core.consensus`` over an edge list that
indexes ``[own rows; halo rows]``. Max norm sync moves N norms to the driver (the flood runs
there on scalars, ``core.sync.max_norm_owner``) and then only the winning row(s) to the shards.
Evaluation runs in the shards; the driver gathers ``[N]`` accuracy / loss arrays.

Same numbers: a shard's batches depend only on (seed, round, epoch, device) (``core.schedule``),
and W is built once on the driver from the same rule, so parameters match the single-process
engine up to float summation order (~1e-7).

Faults: actors restart (``max_restarts``); after every completed round the driver holds a
snapshot of each shard's rows and optimizer state (objects it owns, so they outlive a dead
actor). When a call fails because an actor died, every shard is rolled back to the last
snapshot and the round is run again: the run ends with the same numbers as an undisturbed one.

Ray is an optional extra (``pip install 'p2pl[ray]'``); this module imports it only when a
backend is built. Ray itself moves Python objects with pickle between the driver and its own
workers; parameters travel as plain numpy arrays.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from p2pl.algorithms.base import RoundLinks
from p2pl.config import ExperimentConfig
from p2pl.core.adversary import Adversary, SendContext
from p2pl.core.compress import Compression, Compressor, compressed_gossip
from p2pl.core.cooperate import (
    Cooperation,
    GlobalMean,
    Gossip,
    Neighbourhoods,
    PushSum,
    finish,
    gossip,
    weighted_average,
)
from p2pl.core.evaluate import evaluate
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.core.rounds import StagePlanner, gossip_bytes, roll_back_training, train_with_rollback, upload_bytes
from p2pl.core.schedule import Partition
from p2pl.core.train import RoundStats, VectorizedTrainer, choose_strategy, round_schedule
from p2pl.errors import P2PLError
from p2pl.experiment import Experiment
from p2pl.models import build_model
from p2pl.sim.backend import Started
from p2pl.sim.ray_start import ACTOR_ARGS_NOTICE, start_ray, without_stderr_line
from p2pl.sim.sharding import Sharding, shard_devices

T = TypeVar("T")
MAX_RESTARTS = 4  # per actor
ACTOR_PREFIX = "p2pl-shard-"  # actor names: p2pl-shard-<run tag>-<shard>
MAX_RECOVERIES = 4  # per round
_ALIVE_TIMEOUT_S = 120.0  # how long a restarting actor may take to come back


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only, shared-memory) numpy array; callers never write it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read it
        return torch.from_numpy(np.asarray(array))


# ---------------------------------------------------------------------------------------------
# the consensus plan: who sends which rows to whom, and each shard's slice of W


@dataclass(frozen=True)
class ShardPlan:
    """One shard's part of a gossip step for one set of live links."""

    sources: tuple[int, ...]  # shards this shard receives halo blocks from, in concat order
    halo_rows: int  # total rows received
    send_to: tuple[int, ...]  # shards this shard sends a block to (ascending)
    send_rows: tuple[np.ndarray, ...]  # per target: local rows to send
    hoods: Neighbourhoods  # the shard's rows' neighbourhoods into [own rows; halo rows]


def consensus_plans(hoods: Neighbourhoods, sharding: Sharding) -> list[ShardPlan]:
    """Split every device's neighbourhood into per-shard neighbourhoods plus the halo traffic."""
    shard_of, local = sharding.shard_of, sharding.local_index
    dst, src = hoods.dst, hoods.src
    sd, ss = shard_of[dst], shard_of[src]
    cross = sd != ss
    # Each (receiving shard, sending shard, device) once: the halo rows.
    need = np.unique(np.stack([sd[cross], ss[cross], src[cross]], axis=1), axis=0).reshape(-1, 3)
    blocks: dict[tuple[int, int], np.ndarray] = {}  # (receiver, sender) -> sorted global ids
    for s, t in {(int(a), int(b)) for a, b in need[:, :2]}:
        rows = need[(need[:, 0] == s) & (need[:, 1] == t)]
        blocks[(s, t)] = rows[:, 2]
    plans = []
    for s in range(sharding.num_shards):
        own = sharding.shards[s]
        sources = tuple(sorted(t for (r, t) in blocks if r == s))
        offsets, at = {}, own.shape[0]
        for t in sources:
            offsets[t] = at
            at += blocks[(s, t)].shape[0]
        mine = np.flatnonzero(sd == s)  # keeps the global (dst, src) order of the entries
        e_src, e_ss = src[mine], ss[mine]
        ext = local[e_src].copy()
        for t in sources:
            sel = e_ss == t
            ext[sel] = offsets[t] + np.searchsorted(blocks[(s, t)], e_src[sel])
        targets = tuple(sorted(r for (r, t) in blocks if t == s))
        plans.append(
            ShardPlan(
                sources=sources,
                halo_rows=at - own.shape[0],
                send_to=targets,
                send_rows=tuple(local[blocks[(r, s)]] for r in targets),
                hoods=Neighbourhoods.from_edges(
                    own.shape[0], local[dst[mine]], ext, hoods.weight[mine], hoods.self_weight[own]
                ),
            )
        )
    return plans


# ---------------------------------------------------------------------------------------------
# one shard (a Ray actor; a plain class, so it also runs without Ray)


class ShardWorker:
    """The devices of one shard: their parameter rows, optimizer state and local data indices."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        device_ids: np.ndarray,
        parts: list[np.ndarray],
        data: dict[str, Any] | list[Any],
        strategy: str,
        threads: int,
        attackers: np.ndarray | None = None,
        device: str = "cpu",
        compression: Compression | None = None,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        if isinstance(data, list):  # [object ref] from the Ray driver (see RayBackend.__init__)
            import ray

            data = ray.get(data[0])
        assert isinstance(data, dict)
        self.cfg = cfg
        self.device_ids = np.asarray(device_ids, dtype=np.int64)
        self.model = build_model(cfg.model, tuple(data["input_shape"]), int(data["num_classes"]))
        self.spec = ParamSpec.of(self.model)
        self.x_test, self.y_test = _tensor(data["x_test"]), _tensor(data["y_test"])
        partition = Partition(tuple(np.asarray(p, dtype=np.int64) for p in parts), tuple(self.device_ids.tolist()))
        self.trainer = VectorizedTrainer(
            self.model, self.spec, _tensor(data["x_train"]), _tensor(data["y_train"]), partition,
            cfg.training, cfg.seed, strategy,
        )  # fmt: skip
        # Training and evaluation run on ``device`` (a GPU Ray gave this actor); the rows stay on
        # the CPU between them, where the consensus plans and Ray's object store work.
        self.device = torch.device(device)
        if self.device.type != "cpu":
            self.trainer.to(self.device)
            self.x_test, self.y_test = self.x_test.to(self.device), self.y_test.to(self.device)
        self.params = torch.zeros(len(self.device_ids), self.spec.total)
        self.adversary = Adversary.of(cfg.adversary, np.zeros(0) if attackers is None else attackers, cfg.seed)
        self._plan: tuple[str, ShardPlan] | None = None
        self._before: torch.Tensor | None = None
        self._sent: torch.Tensor | None = None  # what this shard's devices send this step
        # D-PSGD: the round's local steps, run one at a time between the driver's exchanges
        self._steps: Generator[int, None, RoundStats] | None = None
        self._rows: torch.Tensor | None = None  # the rows those steps train (on ``device``)
        self._train_before: torch.Tensor | None = None
        # compressed gossip: this shard's devices' sender state, and what they published this step
        self.compressor = Compressor(compression, self.spec.total, cfg.seed) if compression else None
        self._published: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def ping(self) -> tuple[int, str]:
        """(pid, Ray node id) of this worker."""
        node = ""
        try:
            import ray

            node = ray.get_runtime_context().get_node_id()
        except Exception:  # not running under Ray
            node = "local"
        return os.getpid(), node

    def peak_rss_bytes(self) -> int:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def init_norms(self) -> np.ndarray:
        """Each device's own init (from its own seed); returns the rows' L2 norms (float64)."""
        self.params = init_device_params(self.model, self.spec, self.cfg.seed, self.device_ids.tolist())
        self._start_compression()
        return self.params.double().norm(dim=1).numpy()

    def _start_compression(self) -> None:
        if self.compressor is not None:
            self.compressor.start(self.params)

    def rows(self, local_rows: np.ndarray) -> np.ndarray:
        return self.params[torch.from_numpy(np.asarray(local_rows, dtype=np.int64))].numpy()

    def adopt(self, pick: np.ndarray, scale: np.ndarray, *blocks: np.ndarray) -> None:
        """Row i becomes row ``pick[i]`` of the concatenated ``blocks`` (the sync winners) x ``scale[i]``."""
        pool = torch.cat([_tensor(b) for b in blocks])
        self.params = pool[torch.from_numpy(np.asarray(pick, dtype=np.int64))].clone()
        if not np.all(scale == 1.0):
            self.params *= torch.from_numpy(np.asarray(scale, dtype=np.float32)).unsqueeze(1)
        self._start_compression()

    def train(self, round_index: int, work: np.ndarray | None) -> np.ndarray:
        rows = self.params.to(self.device)
        guard, ratio = self.adversary.active, self.cfg.consensus.max_norm_ratio
        stats, _ = train_with_rollback(self.trainer, rows, round_index, work, guard, ratio)
        self.params = rows.cpu()
        return stats.mean_loss.double().numpy()

    def train_begin(self, round_index: int, work: np.ndarray | None, span: list[tuple[int, int]]) -> None:
        """Start this round's local steps over the network's ``span`` (run by :meth:`train_step`)."""
        self._rows = self.params.to(self.device)
        self._train_before = self._rows.clone() if self.adversary.active else None
        self._steps = self.trainer.round_steps(self._rows, round_index, work, span)

    def train_step(self) -> None:
        """One local step of the round (the rows may have been mixed since the last one)."""
        assert self._steps is not None and self._rows is not None
        if self.params is not self._rows:
            self._rows.copy_(self.params)
        next(self._steps)
        self.params = self._rows.cpu()

    def train_end(self) -> np.ndarray:
        """Finish the round's local steps: the mean losses (and the guard of :meth:`train`)."""
        assert self._steps is not None and self._rows is not None
        if self.params is not self._rows:
            self._rows.copy_(self.params)
        try:
            next(self._steps)
            raise AssertionError("the driver ended the round before its last local step")  # a backend bug
        except StopIteration as done:
            stats: RoundStats = done.value
        roll_back_training(self.trainer, self._rows, self._train_before, self.cfg.consensus.max_norm_ratio)
        self.params = self._rows.cpu()
        self._steps = self._rows = self._train_before = None
        return stats.mean_loss.double().numpy()

    def evaluate(self, local_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        params = self.params if local_rows is None else self.params[torch.from_numpy(local_rows)]
        params = params.to(self.device)
        acc, loss = evaluate(
            self.model, self.spec, params, self.x_test, self.y_test, sample_chunk=self.cfg.eval.test_batch
        )
        return acc.numpy(), loss.numpy()

    # -- cooperation (the stages of core.cooperate, on [own rows; halo rows]) ----------------

    def load_plan(self, key: str, plan: ShardPlan) -> None:
        self._plan = (key, plan)

    def begin(self) -> None:
        """Remember the rows before cooperation (for the affinity blend and absent devices)."""
        self._before = self.params

    def publish(self) -> Any:
        """This step's boundary rows as sent, one block per receiving shard (Ray: one object each)."""
        assert self._plan is not None
        plan = self._plan[1]
        if self._published is not None:  # compressed: (what receivers use, sent mask) per block
            rows, mask = self._published
            blocks: tuple[Any, ...] = tuple(
                (rows[i].numpy(), None if mask is None else mask[i].numpy())
                for i in (torch.from_numpy(r) for r in plan.send_rows)
            )
        else:
            rows = self.params if self._sent is None else self._sent
            blocks = tuple(rows[torch.from_numpy(r)].numpy() for r in plan.send_rows)
        return blocks[0] if len(blocks) == 1 else blocks

    def compress(self, round_index: int, step: int, senders: np.ndarray) -> None:
        """Encode what this shard's devices send this step (``senders``: bool per row, those
        heard by somebody), updating their sender state; ``publish`` then carries the result."""
        assert self.compressor is not None
        rows = self.params if self._sent is None else self._sent
        self._published = self.compressor.publish(rows, self.device_ids, round_index, step, senders)

    def attack(self, round_index: int, step: int, *halos: np.ndarray) -> None:
        """What this shard's attackers send this step, from the true rows they hear."""
        assert self._plan is not None
        pool = torch.cat([self.params, *(_tensor(h) for h in halos)]) if halos else self.params
        bad = np.flatnonzero(self.adversary.mask(self.device_ids))
        ctx = SendContext(pool, self._plan[1].hoods.subset(bad), self.cfg.seed, round_index, step)
        self._sent = self.params.clone()
        index = torch.from_numpy(bad)
        self._sent[index] = self.adversary.send(self.params[index], self.device_ids[bad], ctx)

    def gossip(self, stage: Gossip, *halos: np.ndarray) -> None:
        """One gossip step over ``[own rows as sent; halo rows as sent]``."""
        assert self._plan is not None
        if self._published is not None:
            assert self.compressor is not None
            rows, mask = self._published
            pool = torch.cat([rows, *(_tensor(h[0]) for h in halos)])
            sent = None if mask is None else torch.cat([mask, *(_tensor(h[1]) for h in halos)])
            self.params = compressed_gossip(self.params, pool, sent, self._plan[1].hoods, stage, self.compressor)
            self._published = None
            self._sent = None
            return
        own_sent = self.params if self._sent is None else self._sent
        pool = torch.cat([own_sent, *(_tensor(h) for h in halos)]) if halos else own_sent
        self.params = gossip(self.params, pool, self._plan[1].hoods, stage)
        self._sent = None

    def upload(self, present: np.ndarray, sizes: np.ndarray, round_index: int, step: int) -> tuple[Any, float]:
        """Σ w_n θ_n (as sent) and Σ w_n over this shard's present devices (FedAvg's uploads)."""
        rows = np.flatnonzero(present)
        if rows.size == 0:
            return None, 0.0
        hoods = Neighbourhoods.from_edges(len(rows), np.zeros(0), np.zeros(0), np.zeros(0), np.ones(len(rows)))
        index = torch.from_numpy(rows)
        ctx = SendContext(self.params, hoods, self.cfg.seed, round_index, step)
        sent = self.adversary.send(self.params[index], self.device_ids[rows], ctx)
        w = torch.from_numpy(np.asarray(sizes, dtype=np.float64)[rows])
        return weighted_average(sent, w).numpy(), float(w.sum())

    def set_rows(self, present: np.ndarray, row: np.ndarray) -> None:
        rows = torch.from_numpy(np.flatnonzero(present))
        self.params = self.params.clone()  # the pre-cooperation rows stay intact for finish()
        self.params[rows] = _tensor(row).to(self.params.dtype)

    def finish(self, coop: Cooperation, active: np.ndarray) -> None:
        assert self._before is not None
        self.params = finish(coop, self.params, self._before, active)
        self._before = None

    # -- measurement and state ------------------------------------------------------------------

    def row_sum(self) -> np.ndarray:
        return self.params.double().sum(0).numpy()

    def squared_deviation(self, mean: np.ndarray) -> float:
        """Σ_n ||θ_n − mean||² over this shard (chunked: no float64 copy of all rows at once)."""
        centre = torch.from_numpy(np.asarray(mean, dtype=np.float64))
        total = 0.0
        for lo in range(0, self.params.shape[0], 1024):
            total += float(((self.params[lo : lo + 1024].double() - centre) ** 2).sum())
        return total

    def get_state(self) -> tuple[tuple[np.ndarray, dict[str, np.ndarray]], bool]:
        """(rows, optimizer state) copies, and a small 'done' flag (a second Ray object)."""
        opt = {k: v.cpu().clone().numpy() for k, v in self.trainer.state_tensors().items()}
        if self.compressor is not None:  # compression's per-device state rides with the optimizer's
            opt |= {k: v.clone().numpy() for k, v in self.compressor.state_tensors().items()}
        return (self.params.clone().numpy(), opt), True

    def set_state(self, state: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
        params, opt = state
        self.params = _tensor(params).clone()
        self.trainer.load_state_tensors({k: _tensor(v) for k, v in opt.items()})
        if self.compressor is not None:
            self.compressor.load_state_tensors({k: _tensor(v) for k, v in opt.items()})
        self._before = None
        self._sent = None
        self._published = None


# ---------------------------------------------------------------------------------------------
# the driver side


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise P2PLError("--backend ray needs the optional Ray extra; install it: pip install 'p2pl[ray]'") from None
    return ray


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def _check_reachable(address: str) -> None:
    """Fail fast on a wrong --address (Ray itself retries a dead address for minutes)."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise P2PLError(f"--address must be host:port of a Ray head node (ray start --head), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise P2PLError(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
            "'ray start --head' and pass its address, or drop --address for a local Ray"
        ) from None


def _shard_device(requested: str, gpus: float, shards: int) -> str:
    """Where each shard actor computes: one GPU per actor when the cluster has a GPU for every
    shard (``device`` = auto or cuda), else the CPU; an explicit cuda without them is an error."""
    if requested in ("auto", "cuda") and gpus >= shards:
        return "cuda"
    if requested == "auto" or requested == "cpu":
        return "cpu"
    if requested == "cuda":
        raise P2PLError(
            f"device = 'cuda' gives each Ray shard one GPU, but the cluster has {gpus:g} GPU(s) for {shards} "
            "shards; pass --shards with at most that many, or --set device=cpu"
        )
    raise P2PLError(f"--backend ray computes on cuda or cpu, not {requested!r}; use --set device=cpu")


class RayBackend:
    """The devices of an experiment on ``num_shards`` Ray actors (see the module doc)."""

    def __init__(
        self, exp: Experiment, strategy: str = "auto", address: str | None = None, num_shards: int = 0
    ) -> None:
        ray = self._ray = _import_ray()
        cfg = exp.cfg
        if exp.algorithm.num_devices(exp.cfg.devices) != exp.cfg.devices:
            raise P2PLError(
                f"--backend ray splits devices over actors; {exp.algorithm.name!r} trains one model, "
                "run it with --backend local"
            )
        if num_shards < 0:
            raise P2PLError(f"the number of Ray shards must be >= 0 (0 = one per CPU), got {num_shards}")
        self.exp = exp
        self.strategy = choose_strategy(exp.model, strategy, exp.dataset.input_shape)
        self._owns_ray = False
        if not ray.is_initialized():
            if address is not None:
                _check_reachable(address)
            start_ray(ray, address)  # retried if the raylet is slow to start; quiet on a normal run
            self._owns_ray = True
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        n = exp.num_devices
        k = min(n, num_shards if num_shards > 0 else max(1, int(cpus)))
        self.sharding = shard_devices(n, exp.topology.edges, k)
        # One CPU per actor, or an equal share when there are more shards than CPUs (Ray counts
        # resources in 1e-4 units, so round down or the last actor would never be placed).
        share = min(1.0, np.floor(cpus / k * 1e4) / 1e4)
        data = {
            "x_train": exp.dataset.x_train.numpy(), "y_train": exp.dataset.y_train.numpy(),
            "x_test": exp.dataset.x_test.numpy(), "y_test": exp.dataset.y_test.numpy(),
            "input_shape": tuple(exp.dataset.input_shape), "num_classes": exp.dataset.num_classes,
        }  # fmt: skip
        self._data_ref = ray.put(data)  # the training set goes to each node once, not per device
        device = _shard_device(cfg.device, float(ray.cluster_resources().get("GPU", 0.0)), k)
        actor_cls = ray.remote(
            num_cpus=share, num_gpus=1 if device == "cuda" else 0, max_restarts=MAX_RESTARTS, max_task_retries=0,
            scheduling_strategy="SPREAD",
        )(ShardWorker)  # fmt: skip
        threads = cfg.threads if cfg.threads > 0 else 1
        tag = uuid.uuid4().hex[:8]  # names let operators (and tests) find a run's actors
        # The data ref goes in a list so the actor fetches it itself: Ray keeps it alive through
        # our reference, and a restarted actor fetches it again.
        with without_stderr_line(ACTOR_ARGS_NOTICE):  # intended here: see p2pl.sim.ray_start
            self.actors = [
                actor_cls.options(name=f"{ACTOR_PREFIX}{tag}-{s}").remote(
                    cfg,
                    ids,
                    [exp.parts[d] for d in ids],
                    [self._data_ref],
                    self.strategy,
                    threads,
                    exp.setting.adversary.ids,
                    device,
                    exp.setting.compression,
                )
                for s, ids in enumerate(self.sharding.shards)
            ]
        self._errors: tuple[type[BaseException], ...] = (
            ray.exceptions.RayActorError,
            ray.exceptions.ObjectLostError,
            getattr(ray.exceptions, "ActorUnavailableError", ray.exceptions.RayActorError),
        )
        self._snapshot: list[Any] | None = None
        self._gathered: tuple[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
        self._plans: tuple[str, list[ShardPlan], list[Any]] | None = None
        self._coop = exp.algorithm.cooperation(exp.setting)
        self._facts = exp.setting.facts()
        # who hears whom per stage, and the push-sum weights: kept on the driver ([N] floats)
        self._planner = StagePlanner(self._coop, self._facts, cfg.seed, n)
        self._planner_snapshot: dict[str, torch.Tensor] = self._planner.state_tensors()
        self._step_bytes: np.ndarray | None = None  # D-PSGD: what the mixes during training sent
        self._loaded: list[str | None] = [None] * k
        self.recoveries = 0
        self.halo_rows_moved = 0
        self.nodes = self._wait_alive()

    # -- plumbing -------------------------------------------------------------------------------

    def _get(self, refs: Any) -> Any:
        return self._ray.get(refs)

    def _wait_alive(self) -> int:
        """Block until every actor answers (restarting ones come back); returns the node count."""
        deadline = time.monotonic() + _ALIVE_TIMEOUT_S
        while True:
            try:
                answers = self._get([a.ping.remote() for a in self.actors])
                return len({node for _, node in answers})
            except self._errors as err:
                if time.monotonic() > deadline:
                    raise P2PLError(
                        f"a Ray shard actor died and did not come back ({_first_line(err)}); "
                        "check the cluster (ray status) and rerun: the run resumes from its checkpoint"
                    ) from None
                time.sleep(0.2)

    def _scatter(self, values: list[np.ndarray], dtype: Any = np.float64) -> np.ndarray:
        out = np.empty(self.sharding.num_devices, dtype=dtype)
        for ids, part in zip(self.sharding.shards, values, strict=True):
            out[ids] = part
        return out

    def guarded(self, step: Callable[[], T]) -> T:
        """Run ``step`` and snapshot every shard; if an actor died, roll all shards back to the
        last snapshot and run ``step`` again (it is deterministic, so the numbers do not change)."""
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                out = step()
                self._take_snapshot()
                return out
            except self._errors as err:
                if attempt == MAX_RECOVERIES:
                    raise P2PLError(
                        f"Ray shard actors kept failing ({type(err).__name__}); check the cluster and "
                        "rerun: the run resumes from its last checkpoint"
                    ) from None
                self._recover()
        raise AssertionError("unreachable")

    def _take_snapshot(self) -> None:
        # Objects returned to the driver are owned by the driver, so they survive the actor.
        pairs = [a.get_state.options(num_returns=2).remote() for a in self.actors]
        self._get([done for _, done in pairs])  # tiny flags: the states exist, nothing is fetched
        self._snapshot = [state for state, _ in pairs]
        self._planner_snapshot = self._planner.state_tensors()

    def _recover(self) -> None:
        self.recoveries += 1
        self._loaded = [None] * len(self.actors)  # a restarted actor lost its consensus plan
        self._wait_alive()
        if self._snapshot is not None:
            self._get([a.set_state.remote(s) for a, s in zip(self.actors, self._snapshot, strict=True)])
        self._planner.load_state_tensors(self._planner_snapshot)  # the rerun advances push-sum again

    # -- Backend protocol -----------------------------------------------------------------------

    def start(self) -> Started:
        norms = torch.from_numpy(self._scatter(self._get([a.init_norms.remote() for a in self.actors])))
        start = self.exp.algorithm.start(norms, self.exp.setting)  # only N norms reach the driver
        owner, steps, sent = start.owner, start.steps, start.bytes_sent
        n = self.sharding.num_devices
        if not np.array_equal(owner, np.arange(n)):
            winners = np.unique(owner)  # usually one device: the global max-norm init
            blocks, position = [], np.empty(n, dtype=np.int64)
            at = 0
            for s, actor in enumerate(self.actors):
                mine = winners[self.sharding.shard_of[winners] == s]
                if mine.size:
                    blocks.append(actor.rows.remote(self.sharding.local_index[mine]))
                    position[mine] = at + np.arange(mine.size)
                    at += mine.size
            self._get([
                a.adopt.remote(position[owner[ids]], start.scale[ids], *blocks)
                for a, ids in zip(self.actors, self.sharding.shards, strict=True)
            ])  # fmt: skip
        return Started(steps, float(np.mean(sent)))

    def restore(self, params: torch.Tensor, optimizer: dict[str, torch.Tensor]) -> None:
        self._planner.load_state_tensors(optimizer)
        optimizer = {k: v for k, v in optimizer.items() if k not in self._planner.state_tensors()}
        refs = []
        for actor, ids in zip(self.actors, self.sharding.shards, strict=True):
            rows = torch.from_numpy(ids)
            state = (params[rows].numpy(), {k: v[rows].numpy() for k, v in optimizer.items()})
            refs.append(actor.set_state.remote(state))
        self._get(refs)

    def train(self, round_index: int, work: np.ndarray | None, links: RoundLinks | None = None) -> np.ndarray:
        pairs = list(zip(self.actors, self.sharding.shards, strict=True))
        self._step_bytes = None
        coop = self._coop
        if coop.every_local_step and links is not None and links.cooperate and coop.stages:
            return self._train_mixing(round_index, work, links)
        refs = [a.train.remote(round_index, None if work is None else work[ids]) for a, ids in pairs]
        return self._scatter(self._get(refs))

    def _train_mixing(self, round_index: int, work: np.ndarray | None, links: RoundLinks) -> np.ndarray:
        """D-PSGD: every shard walks the network's step schedule, and after each step the driver
        runs the cooperation over all shards, as the local backend does over all rows."""
        pairs = list(zip(self.actors, self.sharding.shards, strict=True))
        span = round_schedule(self.exp.setting.data_sizes, self.exp.cfg.training, work)
        self._get([a.train_begin.remote(round_index, None if work is None else work[ids], span) for a, ids in pairs])
        sent = np.zeros(self.sharding.num_devices, dtype=np.int64)
        for j in range(len(span)):
            self._get([a.train_step.remote() for a in self.actors])
            sent += self._cooperate(links, round_index, j * len(self._coop.stages))
        self._step_bytes = sent
        return self._scatter(self._get([a.train_end.remote() for a in self.actors]))

    def evaluate(self, devices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if devices is None:
            parts = self._get([a.evaluate.remote() for a in self.actors])
            return self._scatter([p[0] for p in parts]), self._scatter([p[1] for p in parts])
        chosen = np.zeros(self.sharding.num_devices, dtype=bool)
        chosen[devices] = True
        picks = [ids[chosen[ids]] for ids in self.sharding.shards]  # each shard's chosen devices
        local = [self.sharding.local_index[p] for p in picks]
        parts = self._get([a.evaluate.remote(rows) for a, rows in zip(self.actors, local, strict=True)])
        acc, loss = np.full(len(chosen), np.nan), np.full(len(chosen), np.nan)
        for ids, (a, lo) in zip(picks, parts, strict=True):
            acc[ids], loss[ids] = a, lo
        return acc, loss

    def exchange(self, links: RoundLinks, round_index: int) -> np.ndarray:
        """The algorithm's cooperation stages, shard by shard (see core.cooperate)."""
        n = self.sharding.num_devices
        if self._coop.every_local_step:  # mixed during training
            sent, self._step_bytes = self._step_bytes, None
            return sent if sent is not None else np.zeros(n, dtype=np.int64)
        if not links.cooperate or not self._coop.stages:
            return np.zeros(n, dtype=np.int64)
        return self._cooperate(links, round_index, 0)

    def _cooperate(self, links: RoundLinks, round_index: int, first_step: int) -> np.ndarray:
        n = self.sharding.num_devices
        sent = np.zeros(n, dtype=np.int64)
        self._get([a.begin.remote() for a in self.actors])
        for step, stage in enumerate(self._coop.stages, start=first_step):
            if isinstance(stage, (Gossip, PushSum)):
                hoods = self._planner.neighbourhoods(stage, links.live_edges, round_index, step)
                mix = stage.as_gossip() if isinstance(stage, PushSum) else stage
                self._gossip(mix, hoods, links.live_edges, round_index, step)
                sent += self._planner.bytes_sent(stage, links.live_edges, hoods)
            elif isinstance(stage, GlobalMean):
                self._global_mean(links, round_index, step)
                sent += upload_bytes(links.active, self._facts)
        pairs = zip(self.actors, self.sharding.shards, strict=True)
        self._get([a.finish.remote(self._coop, links.active[ids]) for a, ids in pairs])
        return sent

    def _global_mean(self, links: RoundLinks, round_index: int, step: int) -> None:
        if not links.active.any():
            return
        sizes = self.exp.setting.data_sizes
        pairs = zip(self.actors, self.sharding.shards, strict=True)
        parts = self._get([a.upload.remote(links.active[ids], sizes[ids], round_index, step) for a, ids in pairs])
        used = [(avg, total) for avg, total in parts if avg is not None]
        means = torch.stack([_tensor(avg) for avg, _ in used])
        average = weighted_average(means, torch.tensor([total for _, total in used], dtype=torch.float64))
        ref = self._ray.put(average.numpy())
        pairs = zip(self.actors, self.sharding.shards, strict=True)
        self._get([a.set_rows.remote(links.active[ids], ref) for a, ids in pairs])

    def _plans_for(self, hoods: Neighbourhoods) -> tuple[str, list[ShardPlan], list[Any]]:
        digest = hashlib.sha256()
        for part in (hoods.indptr, hoods.src, hoods.weight, hoods.self_weight):
            digest.update(np.ascontiguousarray(part).tobytes())
        key = digest.hexdigest()[:16]  # the plans stay put while who hears whom (and W) does
        if self._plans is None or self._plans[0] != key:
            plans = consensus_plans(hoods, self.sharding)
            self._plans = (key, plans, [self._ray.put(p) for p in plans])
        return self._plans

    def _halo_exchange(self, plans: list[ShardPlan]) -> list[list[Any]]:
        """Every shard publishes its boundary rows; returns each shard's halo blocks (refs)."""
        blocks: dict[tuple[int, int], Any] = {}  # (sender, receiver) -> object ref
        for t, actor in enumerate(self.actors):
            targets = plans[t].send_to
            if targets:
                refs = actor.publish.options(num_returns=len(targets)).remote()
                refs = [refs] if len(targets) == 1 else refs
                blocks |= {(t, s): r for s, r in zip(targets, refs, strict=True)}
        for s in range(len(self.actors)):
            self.halo_rows_moved += plans[s].halo_rows
        return [[blocks[(t, s)] for t in plans[s].sources] for s in range(len(self.actors))]

    def _gossip(
        self, stage: Gossip, hoods: Neighbourhoods, live_edges: np.ndarray, round_index: int, step: int
    ) -> None:
        key, plans, plan_refs = self._plans_for(hoods)
        loads = [a.load_plan.remote(key, plan_refs[s]) for s, a in enumerate(self.actors) if self._loaded[s] != key]
        self._get(loads)
        self._loaded = [key] * len(self.actors)
        compressing = self.exp.setting.compression is not None
        halos = self._halo_exchange(plans) if self._facts.adversary.rewrites_rows or not compressing else []
        if self._facts.adversary.rewrites_rows:
            # Attackers answer what they hear (ALIE): a second exchange carries the rows as sent.
            self._get([a.attack.remote(round_index, step, *h) for a, h in zip(self.actors, halos, strict=True)])
            halos = self._halo_exchange(plans)
        if compressing:
            # Each shard encodes what its devices send; the exchange then carries what receivers use.
            senders = gossip_bytes(self.sharding.num_devices, live_edges, self._facts) > 0
            pairs = zip(self.actors, self.sharding.shards, strict=True)
            self._get([a.compress.remote(round_index, step, senders[ids]) for a, ids in pairs])
            halos = self._halo_exchange(plans)
        self._get([a.gossip.remote(stage, *h) for a, h in zip(self.actors, halos, strict=True)])

    def consensus_distance(self) -> float:
        """(1/N) Σ ||θ_n − θ̄||² (as ``core.consensus.consensus_distance``) from per-shard sums."""
        n = self.sharding.num_devices
        mean = np.sum(self._get([a.row_sum.remote() for a in self.actors]), axis=0) / n
        ref = self._ray.put(mean)
        return float(sum(self._get([a.squared_deviation.remote(ref) for a in self.actors])) / n)

    def _gather(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._gathered is not None and self._gathered[0] == id(self._snapshot):
            return self._gathered[1]  # params() then optimizer_state() for one checkpoint: fetch once
        states = self._get(self._snapshot) if self._snapshot is not None else []
        if not states:
            states = [s for s, _ in self._get([a.get_state.remote() for a in self.actors])]
        n = self.sharding.num_devices
        first_params, first_opt = states[0]
        params = torch.empty(n, first_params.shape[1], dtype=torch.float32)
        opt = {k: torch.empty((n, *v.shape[1:]), dtype=_tensor(v).dtype) for k, v in first_opt.items()}
        for ids, (rows, state) in zip(self.sharding.shards, states, strict=True):
            index = torch.from_numpy(ids)
            params[index] = _tensor(rows)
            for k, v in state.items():
                opt[k][index] = _tensor(v)
        self._gathered = (id(self._snapshot), (params, opt))
        return params, opt

    def params(self) -> torch.Tensor:
        # The snapshot of the last completed step is exactly the current state.
        return self._gather()[0]

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The shards' optimizer state and the driver's per-device cooperation state."""
        return self._gather()[1] | self._planner_snapshot

    def peak_rss_bytes(self) -> list[int]:
        """Each actor's peak resident memory (for benchmarks)."""
        return [int(v) for v in self._get([a.peak_rss_bytes.remote() for a in self.actors])]

    def facts(self) -> dict[str, Any]:
        return {
            "backend": "ray",
            "ray": {
                "shards": self.sharding.num_shards,
                "shard_sizes": self.sharding.sizes.tolist(),
                "nodes": self.nodes,
                "cut_edges": self.sharding.cut_edges,
                "halo_rows_moved": self.halo_rows_moved,
                "recoveries": self.recoveries,
                "actor_peak_rss_mb": [round(b / 2**20, 1) for b in self.peak_rss_bytes()],
            },
        }

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()


__all__ = ["ACTOR_PREFIX", "RayBackend", "ShardPlan", "ShardWorker", "consensus_plans"]
