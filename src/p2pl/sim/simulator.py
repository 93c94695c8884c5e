"""The simulator's round loop, over the local backend (this process) or the Ray backend.

Each round: local training (``core.train``), optional evaluation after local training, the
algorithm's cooperation step (``algorithms``), evaluation of every device on the common test
set, and a resumable checkpoint. Same config and seed give the same numbers on either backend.

Where the devices live is a :class:`Backend`: :class:`LocalBackend` holds all ``N`` rows in this
process (one batch); :class:`p2pl.sim.ray_backend.RayBackend` splits them over Ray actors. The
loop below is the same for both, so checkpoints, resume and the result files do not depend on
the backend (a run checkpointed by one backend resumes on the other).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from p2pl import atomic
from p2pl.algorithms.base import RoundLinks
from p2pl.config import ExperimentConfig, dumps_config
from p2pl.core.consensus import consensus_distance
from p2pl.core.device import resolve_device
from p2pl.core.evaluate import evaluate
from p2pl.core.rng import numpy_generator
from p2pl.core.rounds import NetworkCooperation, train_with_rollback
from p2pl.core.train import VectorizedTrainer, choose_strategy
from p2pl.errors import P2PLError, choose
from p2pl.experiment import Experiment, build_experiment, config_fingerprint
from p2pl.graph.links import RoundNetwork
from p2pl.metrics import History
from p2pl.results import ResultFiles, write_results
from p2pl.results import summary as make_summary
from p2pl.sim import checkpoint
from p2pl.sim.backend import Backend, Started
from p2pl.system.model import SystemModel, record_round_cost
from p2pl.tracking import check_tracking, open_tracking

ProgressFn = Callable[[int, int, dict[str, float]], None]
T = TypeVar("T")
BACKENDS = ("local", "ray")
PHASES = ("train", "exchange", "evaluate")


@dataclass
class RunResult:
    summary: dict[str, Any]
    params: torch.Tensor  # final [N, P]
    history: History
    experiment: Experiment
    # wall seconds spent per phase over the rounds run here (train / exchange / evaluate)
    phase_time_s: dict[str, float] = field(default_factory=dict)


class LocalBackend:
    """All devices in this process, as one batch (the single-process engine).

    Parameters, optimizer state and the data live on the run's ``device`` (moved there once);
    the cooperation step runs on the CPU copy where it is not the CPU (see ``exchange``).
    """

    def __init__(self, exp: Experiment, strategy: str = "auto") -> None:
        self.exp = exp
        self.trainer = exp.trainer(strategy)
        self.strategy = getattr(self.trainer, "strategy", "reference")
        self.cooperation = NetworkCooperation(
            exp.algorithm.cooperation(exp.setting), exp.setting.facts(), exp.cfg.seed, num_params=exp.spec.total
        )
        self.device = _engine_device(exp.cfg)
        self.x_test, self.y_test = exp.dataset.x_test, exp.dataset.y_test
        if self.device.type != "cpu":
            assert isinstance(self.trainer, VectorizedTrainer)  # _engine_device refused the reference one
            self.trainer.to(self.device)
            self.x_test, self.y_test = self.x_test.to(self.device), self.y_test.to(self.device)
        self._params = torch.empty(0)
        self._step_bytes: np.ndarray | None = None  # D-PSGD: what the mixes during training sent

    def start(self) -> Started:
        params, start = self.exp.start_params()
        self._params = params.to(self.device)
        self.cooperation.start_compression(params.cpu())
        return Started(start.steps, float(np.mean(start.bytes_sent)))

    def restore(self, params: torch.Tensor, optimizer: dict[str, torch.Tensor]) -> None:
        self._params = params.to(self.device)
        self.trainer.load_state_tensors(optimizer)
        self.cooperation.load_state_tensors(optimizer)

    def train(self, round_index: int, work: np.ndarray | None, links: RoundLinks | None = None) -> np.ndarray:
        # Under attack a neighbour's parameters can make training blow up: roll such rows back.
        guard = self.exp.setting.adversary.active
        ratio = self.exp.cfg.consensus.max_norm_ratio
        mix = self._mix_each_step(round_index, links)
        stats, _ = train_with_rollback(self.trainer, self._params, round_index, work, guard, ratio, after_step=mix)
        return stats.mean_loss.double().numpy()

    def _mix_each_step(self, round_index: int, links: RoundLinks | None) -> Callable[[int], None] | None:
        """D-PSGD's hook: the cooperation after local step j, written into the rows in place."""
        coop = self.cooperation.coop
        self._step_bytes = None
        if not coop.every_local_step or links is None or not links.cooperate or not coop.stages:
            return None
        self._step_bytes = np.zeros(self._params.shape[0], dtype=np.int64)

        def mix(j: int) -> None:
            rows = self._params if self.device.type == "cpu" else self._params.cpu()
            first = j * len(coop.stages)
            mixed, sent = self.cooperation.run(rows, links.live_edges, links.active, round_index, first)
            self._params.copy_(mixed)
            assert self._step_bytes is not None
            self._step_bytes += sent

        return mix

    def evaluate(self, devices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        exp = self.exp
        params = self._params if devices is None else self._params[torch.from_numpy(devices).to(self.device)]
        acc, loss = evaluate(
            exp.model, exp.spec, params, self.x_test, self.y_test,
            sample_chunk=exp.cfg.eval.test_batch, strategy=self.strategy if self.strategy != "reference" else "auto",
        )  # fmt: skip
        return _scatter_evaluated(devices, self.exp.num_devices, acc.numpy(), loss.numpy())

    def exchange(self, links: RoundLinks, round_index: int) -> np.ndarray:
        if self.cooperation.coop.every_local_step:  # mixed during training
            sent, self._step_bytes = self._step_bytes, None
            return sent if sent is not None else np.zeros(self._params.shape[0], dtype=np.int64)
        if not links.cooperate:
            return np.zeros(self._params.shape[0], dtype=np.int64)
        # The cooperation runs on the CPU (scipy CSR products, numpy sorts): on an accelerator it
        # takes a CPU copy of the rows, which then moves back.
        params = self._params if self.device.type == "cpu" else self._params.cpu()
        mixed, sent = self.cooperation.run(params, links.live_edges, links.active, round_index)
        self._params = mixed.to(self.device)
        return sent

    def consensus_distance(self) -> float:
        return consensus_distance(self._params)

    def params(self) -> torch.Tensor:
        return self._params.cpu()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The optimizer state and the cooperation's per-device state (push-sum weights,
        compression), so a resumed run continues it."""
        return {k: v.cpu() for k, v in self.trainer.state_tensors().items()} | self.cooperation.state_tensors()

    def guarded(self, step: Callable[[], T]) -> T:
        return step()

    def facts(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def _engine_device(cfg: ExperimentConfig) -> torch.device:
    """The run's torch device; the reference engine (one torch.optim per device) stays on the CPU."""
    if cfg.engine == "reference":
        if cfg.device not in ("auto", "cpu"):
            raise P2PLError("the reference engine runs on the CPU; set device = 'cpu' or engine = 'vectorized'")
        return torch.device("cpu")
    return resolve_device(cfg.device)


def _scatter_evaluated(
    devices: np.ndarray | None, num_devices: int, acc: np.ndarray, loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """[N] arrays from the evaluated devices' results; NaN marks a device not evaluated."""
    if devices is None:
        return acc, loss
    full_acc, full_loss = np.full(num_devices, np.nan), np.full(num_devices, np.nan)
    full_acc[devices], full_loss[devices] = acc, loss
    return full_acc, full_loss


def eval_devices(cfg: ExperimentConfig, round_index: int, num_devices: int) -> np.ndarray | None:
    """The devices evaluated in this round: all (None) on the last round or when ``eval.devices``
    is 0 or covers every device; otherwise ``eval.devices`` of them, drawn from (seed, round)
    like every other random choice, in increasing order."""
    k = cfg.eval.devices
    if k <= 0 or k >= num_devices or round_index >= cfg.rounds:
        return None
    rng = numpy_generator(cfg.seed, "eval-devices", round_index)
    return np.sort(rng.choice(num_devices, size=k, replace=False))


@dataclass
class RoundOutput:
    train_loss: np.ndarray
    bytes_sent: np.ndarray
    consensus_distance: float
    local_eval: tuple[np.ndarray, np.ndarray] | None
    eval: tuple[np.ndarray, np.ndarray] | None
    phase_time_s: dict[str, float]


def _round(backend: Backend, cfg: ExperimentConfig, k: int, net: RoundNetwork) -> RoundOutput:
    """One round on any backend: train, (evaluate), cooperate, measure, (evaluate)."""
    clock = {p: 0.0 for p in PHASES}
    t = time.perf_counter()
    work = None if net.work.min() >= 1.0 else net.work
    links = RoundLinks(net.live_edges, net.active, net.cooperate)
    train_loss = backend.train(k, work, links)  # D-PSGD mixes in here, after every local step
    clock["train"] += time.perf_counter() - t
    evaluate_now = _should_eval(cfg, k)
    local_eval = None
    devices = eval_devices(cfg, k, len(train_loss)) if evaluate_now else None
    if cfg.eval.after_local and evaluate_now:
        t = time.perf_counter()
        local_eval = backend.evaluate(devices)
        clock["evaluate"] += time.perf_counter() - t
    t = time.perf_counter()
    sent = backend.exchange(links, k)
    clock["exchange"] += time.perf_counter() - t
    distance = backend.consensus_distance()
    t = time.perf_counter()
    after = backend.evaluate(devices) if evaluate_now else None
    clock["evaluate"] += time.perf_counter() - t
    return RoundOutput(train_loss, sent, distance, local_eval, after, clock)


def make_backend(exp: Experiment, backend: str, strategy: str, address: str | None, shards: int) -> Backend:
    choose("backend", backend, BACKENDS)
    if backend == "local":
        if address is not None:
            raise P2PLError("--address needs --backend ray (the local backend runs in this process)")
        return LocalBackend(exp, strategy)
    if exp.cfg.engine != "vectorized":
        raise P2PLError(f"--backend ray runs the vectorized engine; drop engine = {exp.cfg.engine!r}")
    from p2pl.sim.ray_backend import RayBackend  # ray is an optional extra

    return RayBackend(exp, strategy=strategy, address=address, num_shards=shards)


def configure_threads(requested: int, num_devices: int, num_params: int, strategy: str = "auto") -> int:
    """Torch CPU threads for this run. Small batched ops lose more to thread hand-off than they
    gain, and per-device loops are all small ops (measured in BENCHMARKS.md: a 100-device MLP
    step 4x slower with 2 threads, a loop 6-10x), so those use one thread; large batched
    workloads (devices x parameters > 1e7) use every core."""
    if requested > 0:
        threads = requested
    elif "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    elif strategy in ("loop", "reference") or num_devices * num_params <= 10_000_000:
        threads = 1
    else:
        threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def _should_eval(cfg: ExperimentConfig, k: int) -> bool:
    return k % cfg.eval.every == 0 or k == cfg.rounds


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    resume: bool = True,
    strategy: str = "auto",
    stop_after: int | None = None,
    *,
    backend: str = "local",
    address: str | None = None,
    shards: int = 0,
) -> RunResult:
    """Run (or resume) one experiment; with ``out_dir``, write its results there atomically.

    ``stop_after`` ends the run after that round as if interrupted (tests of resuming use it).
    ``backend`` = ``local`` (this process) or ``ray`` (``shards`` Ray actors, 0 = one per CPU
    of the cluster; ``address`` of an existing cluster, or None to start/join a local one).
    """
    check_tracking(cfg)  # a missing tracking package fails before any work
    exp = build_experiment(cfg)
    chosen = "reference" if cfg.engine == "reference" else choose_strategy(exp.model, strategy, exp.dataset.input_shape)
    threads = configure_threads(cfg.threads, exp.num_devices, exp.spec.total, chosen)
    directory = Path(out_dir) if out_dir is not None else None
    fingerprint = config_fingerprint(cfg)
    ckpt = checkpoint.load(directory) if directory is not None and resume else None
    if ckpt is not None and ckpt.meta.get("fingerprint") != fingerprint:
        raise P2PLError(f"{directory} holds a run of a different config; use another --out directory or pass --fresh")
    devices = make_backend(exp, backend, strategy, address, shards)
    try:
        return _run(exp, devices, directory, ckpt, fingerprint, threads, progress, stop_after)
    finally:
        devices.close()


def _run(
    exp: Experiment,
    backend: Backend,
    directory: Path | None,
    ckpt: checkpoint.Checkpoint | None,
    fingerprint: str,
    threads: int,
    progress: ProgressFn | None,
    stop_after: int | None,
) -> RunResult:
    cfg = exp.cfg
    dynamics = exp.dynamics()
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        atomic.write_text(directory / "config.toml", dumps_config(cfg))

    if ckpt is not None:
        history = ckpt.history
        backend.guarded(lambda: backend.restore(ckpt.params, ckpt.optimizer))
        start_round = ckpt.round + 1
        sync_steps = int(ckpt.meta["sync_steps"])
        sync_bytes = float(ckpt.meta["sync_bytes_per_device"])
        dynamics.advance_to(ckpt.round + 1)
    else:

        def begin() -> tuple[Started, tuple[np.ndarray, np.ndarray]]:
            return backend.start(), backend.evaluate(eval_devices(cfg, 0, exp.num_devices))

        started, (acc, loss) = backend.guarded(begin)
        sync_steps, sync_bytes = started.sync_steps, started.sync_bytes_per_device
        history = History()
        history.eval_rounds.append(0)
        history.accuracy.append(acc)
        history.loss.append(loss)
        start_round = 1

    system = SystemModel.for_experiment(exp) if cfg.system.enabled else None
    phase_time = {p: 0.0 for p in PHASES}
    files = ResultFiles(directory, exp.honest()) if directory is not None else None
    if files is not None:
        files.update(history)  # round 0 (and, on resume, the rounds already run) before round 1
    tracking = open_tracking(cfg, directory)  # per-round observer: TensorBoard / MLflow if asked for
    last_round = cfg.rounds if stop_after is None else min(cfg.rounds, stop_after)
    for k in range(start_round, last_round + 1):
        t0 = time.perf_counter()
        net = dynamics.next_round()
        out = backend.guarded(partial(_round, backend, cfg, k, net))
        for phase, seconds in out.phase_time_s.items():
            phase_time[phase] += seconds
        if out.local_eval is not None:
            history.local_accuracy.append(out.local_eval[0])
            history.local_loss.append(out.local_eval[1])
        history.consensus_distance.append(out.consensus_distance)
        history.bytes_sent.append(out.bytes_sent)
        history.live_links.append(len(net.live_edges))
        history.active_devices.append(int(net.active.sum()))
        history.train_loss.append(out.train_loss)
        if out.eval is not None:
            history.eval_rounds.append(k)
            history.accuracy.append(out.eval[0])
            history.loss.append(out.eval[1])
        if system is not None:  # seconds and joules on the configured devices and radios
            record_round_cost(history, system.cost(net, out.bytes_sent))
        history.round_time_s.append(time.perf_counter() - t0)
        for phase, seconds in out.phase_time_s.items():
            getattr(history, f"{phase}_time_s").append(seconds)
        if (
            directory is not None
            and cfg.output.checkpoint_every
            and (k % cfg.output.checkpoint_every == 0 or k == last_round)
        ):
            meta = {"fingerprint": fingerprint, "sync_steps": sync_steps, "sync_bytes_per_device": sync_bytes}
            state = checkpoint.Checkpoint(k, backend.params(), backend.optimizer_state(), history, meta)
            checkpoint.save(directory, state)
        if files is not None:
            files.update(history)  # metrics.csv / rounds.csv as each round ends
        tracking.on_round(k, history)
        if progress is not None:
            last = history.accuracy[-1][exp.honest()] if exp.setting.adversary.active else history.accuracy[-1]
            progress(k, cfg.rounds, {"acc_mean": float(np.nanmean(last)), "acc_min": float(np.nanmin(last))})
    tracking.close()

    facts = {
        "algorithm": cfg.algorithm,
        "engine": cfg.engine,
        "training_strategy": backend.strategy,
        "devices": exp.num_devices,
        "threads": threads,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "dataset": exp.dataset.name,
        "model": cfg.model.factory or cfg.model.name,
        "parameters": exp.spec.total,
        "topology": exp.topology.name,
        "edges": len(exp.topology.edges),
        "weights": (exp.algorithm.own_weights or cfg.consensus.weights) if exp.algorithm.uses_graph else None,
        "sync": bool(cfg.sync.enabled and exp.algorithm.uses_graph),
        "sync_mode": cfg.sync.mode if cfg.sync.enabled and exp.algorithm.uses_graph else None,
        "aggregation": cfg.consensus.aggregation if exp.algorithm.uses_graph else None,
        "attack": exp.setting.adversary.attack if exp.setting.adversary.active else None,
        "compression": cfg.compression.method if exp.setting.compression is not None else None,
        "sync_steps": sync_steps,
        "sync_bytes_per_device": sync_bytes,
        "wall_time_s": float(sum(history.round_time_s)),
    }
    facts |= backend.facts()
    summary: dict[str, Any]
    if directory is not None:
        summary = write_results(
            directory, history, facts, exp.setting.data_sizes, exp.label_histograms(), exp.honest(), files=files
        )
    else:
        summary = make_summary(history, facts, exp.honest())
    return RunResult(summary, backend.params(), history, exp, phase_time)
