"""The simulator's round loop, over the in-process engine or the Ray backend.

Each round: local training (``core.train``), optional evaluation after local training, the
algorithm's cooperation step (``algorithms``), evaluation of every device on the common test
set, and a resumable checkpoint. Same config and seed give the same numbers on either engine.

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
from p2pl.core.evaluate import evaluate
from p2pl.core.train import choose_strategy
from p2pl.errors import P2PLError, choose
from p2pl.experiment import Experiment, build_experiment, config_fingerprint
from p2pl.graph.links import RoundNetwork
from p2pl.metrics import History
from p2pl.results import summary as make_summary
from p2pl.results import write_results
from p2pl.sim import checkpoint
from p2pl.sim.backend import Backend, Started
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
    """All devices in this process, as one batch (the single-process engine)."""

    def __init__(self, exp: Experiment, strategy: str = "auto") -> None:
        self.exp = exp
        self.trainer = exp.trainer(strategy)
        self.strategy = getattr(self.trainer, "strategy", "reference")
        self._params = torch.empty(0)

    def start(self) -> Started:
        start = self.exp.algorithm.start(self.exp.device_inits(), self.exp.setting)
        self._params = start.params
        return Started(start.sync_steps, float(np.mean(start.bytes_sent)))

    def restore(self, params: torch.Tensor, optimizer: dict[str, torch.Tensor]) -> None:
        self._params = params
        self.trainer.load_state_tensors(optimizer)

    def train(self, round_index: int, work: np.ndarray | None) -> np.ndarray:
        stats = self.trainer.train(self._params, round_index, work)
        return stats.mean_loss.double().numpy()

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        exp = self.exp
        acc, loss = evaluate(
            exp.model, exp.spec, self._params, exp.dataset.x_test, exp.dataset.y_test,
            sample_chunk=exp.cfg.eval.test_batch,
        )  # fmt: skip
        return acc.numpy(), loss.numpy()

    def exchange(self, links: RoundLinks) -> np.ndarray:
        exchanged = self.exp.algorithm.exchange(self._params, links, self.exp.setting)
        self._params = exchanged.params
        return exchanged.bytes_sent

    def consensus_distance(self) -> float:
        return consensus_distance(self._params)

    def params(self) -> torch.Tensor:
        return self._params

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return self.trainer.state_tensors()

    def guarded(self, step: Callable[[], T]) -> T:
        return step()

    def facts(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


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
    train_loss = backend.train(k, work)
    clock["train"] += time.perf_counter() - t
    evaluate_now = _should_eval(cfg, k)
    local_eval = None
    if cfg.eval.after_local and evaluate_now:
        t = time.perf_counter()
        local_eval = backend.evaluate()
        clock["evaluate"] += time.perf_counter() - t
    t = time.perf_counter()
    sent = backend.exchange(RoundLinks(net.live_edges, net.active, net.cooperate))
    clock["exchange"] += time.perf_counter() - t
    distance = backend.consensus_distance()
    t = time.perf_counter()
    after = backend.evaluate() if evaluate_now else None
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
    engine = make_backend(exp, backend, strategy, address, shards)
    try:
        return _run(exp, engine, directory, ckpt, fingerprint, threads, progress, stop_after)
    finally:
        engine.close()


def _run(
    exp: Experiment,
    engine: Backend,
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
        engine.guarded(lambda: engine.restore(ckpt.params, ckpt.optimizer))
        start_round = ckpt.round + 1
        sync_steps = int(ckpt.meta["sync_steps"])
        sync_bytes = float(ckpt.meta["sync_bytes_per_device"])
        dynamics.advance_to(ckpt.round + 1)
    else:

        def begin() -> tuple[Started, tuple[np.ndarray, np.ndarray]]:
            return engine.start(), engine.evaluate()

        started, (acc, loss) = engine.guarded(begin)
        sync_steps, sync_bytes = started.sync_steps, started.sync_bytes_per_device
        history = History()
        history.eval_rounds.append(0)
        history.accuracy.append(acc)
        history.loss.append(loss)
        start_round = 1

    phase_time = {p: 0.0 for p in PHASES}
    tracking = open_tracking(cfg, directory)  # per-round observer: TensorBoard / MLflow if asked for
    last_round = cfg.rounds if stop_after is None else min(cfg.rounds, stop_after)
    for k in range(start_round, last_round + 1):
        t0 = time.perf_counter()
        net = dynamics.next_round()
        out = engine.guarded(partial(_round, engine, cfg, k, net))
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
        history.round_time_s.append(time.perf_counter() - t0)
        if (
            directory is not None
            and cfg.output.checkpoint_every
            and (k % cfg.output.checkpoint_every == 0 or k == last_round)
        ):
            meta = {"fingerprint": fingerprint, "sync_steps": sync_steps, "sync_bytes_per_device": sync_bytes}
            state = checkpoint.Checkpoint(k, engine.params(), engine.optimizer_state(), history, meta)
            checkpoint.save(directory, state)
        tracking.on_round(k, history)
        if progress is not None:
            last = history.accuracy[-1]
            progress(k, cfg.rounds, {"acc_mean": float(last.mean()), "acc_min": float(last.min())})
    tracking.close()

    facts = {
        "algorithm": cfg.algorithm,
        "engine": cfg.engine,
        "training_strategy": engine.strategy,
        "devices": exp.num_devices,
        "threads": threads,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "dataset": exp.dataset.name,
        "model": cfg.model.factory or cfg.model.name,
        "parameters": exp.spec.total,
        "topology": exp.topology.name,
        "edges": len(exp.topology.edges),
        "weights": cfg.consensus.weights if exp.algorithm.uses_graph else None,
        "sync": bool(cfg.sync.enabled and exp.algorithm.uses_graph),
        "sync_steps": sync_steps,
        "sync_bytes_per_device": sync_bytes,
        "wall_time_s": float(sum(history.round_time_s)),
    }
    facts |= engine.facts()
    summary: dict[str, Any]
    if directory is not None:
        summary = write_results(directory, history, facts, exp.setting.data_sizes, exp.label_histograms())
    else:
        summary = make_summary(history, facts)
    return RunResult(summary, engine.params(), history, exp, phase_time)
