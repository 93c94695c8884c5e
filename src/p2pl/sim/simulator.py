"""The single-process simulator: all devices of an experiment as one batch, round by round.

Each round: local training (``core.train``), optional evaluation after local training, the
algorithm's cooperation step (``algorithms``), evaluation of every device on the common test
set, and a resumable checkpoint. Same config and seed give the same numbers on either engine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pl import atomic
from p2pl.algorithms.base import RoundLinks
from p2pl.config import ExperimentConfig, dumps_config
from p2pl.core.consensus import consensus_distance
from p2pl.core.evaluate import evaluate
from p2pl.errors import P2PLError
from p2pl.metrics import History
from p2pl.sim import checkpoint
from p2pl.sim.experiment import Experiment, build_experiment, config_fingerprint
from p2pl.sim.results import write_results

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class RunResult:
    summary: dict[str, Any]
    params: torch.Tensor  # final [N, P]
    history: History
    experiment: Experiment


def _evaluate(exp: Experiment, params: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    acc, loss = evaluate(
        exp.model, exp.spec, params, exp.dataset.x_test, exp.dataset.y_test, sample_chunk=exp.cfg.eval.test_batch
    )
    return acc.numpy(), loss.numpy()


def configure_threads(requested: int, num_devices: int, num_params: int) -> int:
    """Torch CPU threads for this run. Small batched ops lose more to thread hand-off than they
    gain (measured: a 100-device MLP step ran ~30x slower with 2 contended threads than with 1),
    so small workloads use one thread; large ones use them all."""
    if requested > 0:
        threads = requested
    elif "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    else:
        threads = 1 if num_devices * num_params <= 10_000_000 else (os.cpu_count() or 1)
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
) -> RunResult:
    """Run (or resume) one experiment; with ``out_dir``, write its results there atomically.

    ``stop_after`` ends the run after that round as if interrupted (tests of resuming use it).
    """
    exp = build_experiment(cfg)
    threads = configure_threads(cfg.threads, exp.num_devices, exp.spec.total)
    directory = Path(out_dir) if out_dir is not None else None
    fingerprint = config_fingerprint(cfg)
    trainer = exp.trainer(strategy)
    dynamics = exp.dynamics()
    n = exp.num_devices

    ckpt = checkpoint.load(directory) if directory is not None and resume else None
    if ckpt is not None and ckpt.meta.get("fingerprint") != fingerprint:
        raise P2PLError(
            f"{directory} holds a run of a different config; use another --out directory or pass --fresh"
        )
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        atomic.write_text(directory / "config.toml", dumps_config(cfg))

    if ckpt is not None:
        params, history = ckpt.params, ckpt.history
        trainer.load_state_tensors(ckpt.optimizer)
        start_round = ckpt.round + 1
        sync_steps = int(ckpt.meta["sync_steps"])
        sync_bytes = float(ckpt.meta["sync_bytes_per_device"])
        dynamics.advance_to(ckpt.round + 1)
    else:
        start = exp.algorithm.start(exp.device_inits(), exp.setting)
        params, sync_steps = start.params, start.sync_steps
        sync_bytes = float(np.mean(start.bytes_sent))
        history = History()
        acc, loss = _evaluate(exp, params)
        history.eval_rounds.append(0)
        history.accuracy.append(acc)
        history.loss.append(loss)
        start_round = 1

    last_round = cfg.rounds if stop_after is None else min(cfg.rounds, stop_after)
    for k in range(start_round, last_round + 1):
        t0 = time.perf_counter()
        net = dynamics.next_round()
        work = None if net.work.min() >= 1.0 else net.work
        stats = trainer.train(params, k, work)
        evaluate_now = _should_eval(cfg, k)
        if cfg.eval.after_local and evaluate_now:
            local_acc, local_loss = _evaluate(exp, params)
            history.local_accuracy.append(local_acc)
            history.local_loss.append(local_loss)
        links = RoundLinks(net.live_edges, net.active, net.cooperate)
        exchanged = exp.algorithm.exchange(params, links, exp.setting)
        params = exchanged.params
        history.consensus_distance.append(consensus_distance(params))
        history.bytes_sent.append(exchanged.bytes_sent)
        history.live_links.append(len(net.live_edges))
        history.active_devices.append(int(net.active.sum()))
        history.train_loss.append(stats.mean_loss.double().numpy())
        if evaluate_now:
            acc, loss = _evaluate(exp, params)
            history.eval_rounds.append(k)
            history.accuracy.append(acc)
            history.loss.append(loss)
        history.round_time_s.append(time.perf_counter() - t0)
        if directory is not None and cfg.output.checkpoint_every and (
            k % cfg.output.checkpoint_every == 0 or k == last_round
        ):
            meta = {"fingerprint": fingerprint, "sync_steps": sync_steps, "sync_bytes_per_device": sync_bytes}
            checkpoint.save(directory, checkpoint.Checkpoint(k, params, trainer.state_tensors(), history, meta))
        if progress is not None:
            last = history.accuracy[-1]
            progress(k, cfg.rounds, {"acc_mean": float(last.mean()), "acc_min": float(last.min())})

    facts = {
        "algorithm": cfg.algorithm,
        "engine": cfg.engine,
        "training_strategy": getattr(trainer, "strategy", "reference"),
        "devices": n,
        "threads": threads,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "dataset": exp.dataset.name,
        "model": cfg.model.factory or cfg.model.name,
        "parameters": exp.spec.total,
        "topology": exp.topology.name,
        "edges": int(len(exp.topology.edges)),
        "weights": cfg.consensus.weights if exp.algorithm.uses_graph else None,
        "sync": bool(cfg.sync.enabled and exp.algorithm.uses_graph),
        "sync_steps": sync_steps,
        "sync_bytes_per_device": sync_bytes,
        "wall_time_s": float(sum(history.round_time_s)),
    }
    summary: dict[str, Any]
    if directory is not None:
        summary = write_results(directory, history, facts, exp.setting.data_sizes, exp.label_histograms())
    else:
        from p2pl.sim.results import summary as make_summary

        summary = make_summary(history, facts)
    return RunResult(summary, params, history, exp)
