"""The vectorized engine against the reference engine (one nn.Module + torch.optim per device).

Issue #2: same config and seeds give the same parameters (max abs difference <= 1e-5) after two
rounds, for SGD, momentum and Adam, with unequal local dataset sizes (a dirichlet partition).
Also: the bmm / vmap / loop training strategies agree; fewer samples mean fewer steps and no
dropped sample; stragglers and absent devices take the right number of steps, and an absent
device's parameters and optimizer state stay untouched.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from p2pl.config import ExperimentConfig
from p2pl.core.reference import ReferenceTrainer
from p2pl.core.train import VectorizedTrainer, choose_strategy, step_limits
from p2pl.errors import P2PLError
from p2pl.experiment import Experiment, build_experiment
from p2pl.models import mlp
from p2pl.sim.simulator import run_experiment

TOL = 1e-5
OPTIMIZERS = {
    "sgd": ["training.optimizer='sgd'", "training.lr=0.1"],
    "momentum": ["training.optimizer='momentum'"],
    "adam": ["training.optimizer='adam'", "training.lr=0.01"],
}
DIRICHLET = ["partition.scheme='dirichlet'", "partition.alpha=0.5", "training.batch_size=16"]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_vectorized_equals_reference_after_two_rounds(
    optimizer: str, tiny_config: Callable[..., ExperimentConfig]
) -> None:
    cfg = tiny_config(*DIRICHLET, *OPTIMIZERS[optimizer], "training.local_epochs=2")
    vec = run_experiment(cfg)
    ref = run_experiment(replace(cfg, engine="reference"))
    sizes = vec.experiment.setting.data_sizes
    assert len(set(sizes.tolist())) > 3, "the dirichlet partition should give unequal sizes"
    assert vec.history.eval_rounds == [0, 1, 2]
    diff = float((vec.params - ref.params).abs().max())
    assert diff <= TOL, f"{optimizer}: engines differ by {diff}"
    # and training actually moved the parameters (the comparison is not vacuous)
    start = vec.experiment.start_params()[0]
    assert float((vec.params - start).abs().max()) > 1e-2
    assert np.allclose(vec.history.accuracy[-1], ref.history.accuracy[-1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# trainer level: strategies, step counts, stragglers, absent devices


def _experiment(tiny_config: Callable[..., ExperimentConfig], *overrides: str) -> Experiment:
    return build_experiment(tiny_config(*DIRICHLET, *overrides))


def _trainer(exp: Experiment, engine: str) -> VectorizedTrainer | ReferenceTrainer:
    if engine == "reference":
        return build_experiment(replace(exp.cfg, engine="reference")).trainer()
    return exp.trainer(engine)


def _rounds(
    exp: Experiment, engine: str, works: list[np.ndarray | None]
) -> tuple[torch.Tensor, list[torch.Tensor], VectorizedTrainer | ReferenceTrainer]:
    """Local training only (no consensus), one call per round, from every device's own init."""
    trainer = _trainer(exp, engine)
    params = exp.device_inits()
    steps = []
    for k, work in enumerate(works, start=1):
        steps.append(trainer.train(params, k, work).steps.clone())
    return params, steps, trainer


WORKS: list[np.ndarray | None] = [
    None,
    np.array([1.0, 0.5, 0.0, 0.25, 1.0, 0.0, 0.75, 1.0, 0.1, 1.0]),
]


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_bmm_vmap_loop_and_reference_agree(optimizer: str, tiny_config: Callable[..., ExperimentConfig]) -> None:
    exp = _experiment(tiny_config, *OPTIMIZERS[optimizer], "training.weight_decay=0.001")
    results = {s: _rounds(exp, s, WORKS) for s in ("bmm", "vmap", "loop", "reference")}
    ref_params, ref_steps, _ = results["reference"]
    for strategy, (params, steps, _) in results.items():
        diff = float((params - ref_params).abs().max())
        assert diff <= TOL, f"{strategy} differs from the reference engine by {diff}"
        for a, b in zip(steps, ref_steps, strict=True):
            assert torch.equal(a, b), strategy


def test_auto_strategy_choice() -> None:
    assert choose_strategy(mlp((1, 8, 8), 10, [8])) == "bmm"
    tanh = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.Tanh())
    assert choose_strategy(tanh) == "vmap"
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    assert choose_strategy(conv) == "loop"
    assert choose_strategy(conv, "vmap") == "vmap"
    with pytest.raises(P2PLError, match="plain MLP"):
        choose_strategy(conv, "bmm")
    with pytest.raises(P2PLError, match="unknown training strategy 'fast'"):
        choose_strategy(conv, "fast")


class _Recorder:
    """Stands in for x_train and records which sample indices each step reads."""

    def __init__(self, real: torch.Tensor) -> None:
        self.real = real
        self.reads: list[torch.Tensor] = []

    @property
    def shape(self) -> torch.Size:
        return self.real.shape

    def __getitem__(self, idx: Any) -> torch.Tensor:
        self.reads.append(torch.as_tensor(idx).clone())
        return self.real[idx]

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        self.reads.append(index.clone())
        return self.real.index_select(dim, index)


@pytest.mark.parametrize("engine", ["bmm", "reference"])
def test_fewer_samples_fewer_steps_and_no_sample_dropped(
    engine: str, tiny_config: Callable[..., ExperimentConfig]
) -> None:
    epochs, b = 3, 16
    exp = _experiment(tiny_config, f"training.local_epochs={epochs}")
    trainer = _trainer(exp, engine)
    recorder = _Recorder(trainer.x_train)
    trainer.x_train = recorder  # type: ignore[assignment]
    used: list[int] = []
    if isinstance(trainer, VectorizedTrainer):
        # Every feature of sample i holds i: the samples a step trains on, however they were
        # gathered (step by step, or a whole epoch at once), are read off its inputs.
        shape = recorder.real.shape
        trainer.x_train = torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand(shape).contiguous()
        inner = trainer.loss_grad

        def spy(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> Any:
            used.extend(int(i) for i in x.flatten(2)[..., 0][mask.bool()].tolist())
            return inner(flat, x, y, mask)

        trainer.loss_grad = spy
    stats = trainer.train(exp.device_inits(), 1)
    sizes = exp.setting.data_sizes
    assert stats.steps.tolist() == [epochs * math.ceil(s / b) for s in sizes]
    if not used:
        used = [i for idx in recorder.reads for i in idx.tolist()]
    expected = Counter({int(i): epochs for part in exp.parts for i in part})
    assert Counter(used) == expected  # every local sample used once per epoch, nothing else


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_stragglers_and_absent_devices(optimizer: str, tiny_config: Callable[..., ExperimentConfig]) -> None:
    exp = _experiment(tiny_config, *OPTIMIZERS[optimizer], "training.local_epochs=2")
    trainer = exp.trainer()
    assert isinstance(trainer, VectorizedTrainer)
    params = exp.device_inits()
    trainer.train(params, 1)  # a full round first, so optimizer state is non-trivial
    state_before = {k: v.clone() for k, v in trainer.state_tensors().items()}
    params_before = params.clone()
    work = WORKS[1]
    assert work is not None
    stats = trainer.train(params, 2, work)

    sizes = exp.setting.data_sizes
    full = np.array([2 * math.ceil(s / 16) for s in sizes])
    expected = np.minimum(np.ceil(full * work - 1e-9), full).astype(int)
    assert stats.steps.tolist() == expected.tolist()
    assert torch.equal(step_limits(sizes, exp.cfg.training, work), torch.from_numpy(expected))
    absent = np.flatnonzero(work == 0)
    present = np.flatnonzero(work > 0)
    assert torch.equal(params[absent], params_before[absent])
    assert bool((params[present] != params_before[present]).any(1).all())
    assert torch.isnan(stats.mean_loss[absent]).all() and torch.isfinite(stats.mean_loss[present]).all()
    for key, value in trainer.state_tensors().items():
        assert torch.equal(value[absent], state_before[key][absent]), key
    if optimizer == "adam":
        step = trainer.state_tensors()["step"]
        assert step.tolist() == (full + expected).astype(float).tolist()


def test_optimizer_state_moves_between_engines(tiny_config: Callable[..., ExperimentConfig]) -> None:
    """state_tensors is engine-neutral: a checkpoint from one engine resumes in the other."""
    exp = _experiment(tiny_config, *OPTIMIZERS["adam"])
    vec = exp.trainer()
    ref = _trainer(exp, "reference")
    params = exp.device_inits()
    vec.train(params, 1, WORKS[1])
    ref.load_state_tensors(vec.state_tensors())
    for key, value in ref.state_tensors().items():
        assert torch.allclose(value, vec.state_tensors()[key]), key
    p_vec, p_ref = params.clone(), params.clone()
    vec.train(p_vec, 2)
    ref.train(p_ref, 2)
    assert float((p_vec - p_ref).abs().max()) <= TOL
