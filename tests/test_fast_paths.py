"""The speed paths give exactly the numbers of the plain computations they replace.

Chunks of devices in a bmm step, the optimizer applied in column blocks, the gossip mean's CSR
product over row blocks and threads, the equal-size shortcut of the epoch plan, and the
evaluation's scores (amax with argmax's tie rule, clamped exp): each is compared bit for bit
(``torch.equal``) with the straightforward version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from p2pl.config import ExperimentConfig, TrainingConfig
from p2pl.core import cooperate, evaluate, optim, sparse_mix, train
from p2pl.core.cooperate import Gossip, Neighbourhoods
from p2pl.core.evaluate import _scores
from p2pl.core.parallel import run_jobs as _run
from p2pl.core.schedule import Partition, epoch_plan, epoch_plans, shuffle_keys
from p2pl.experiment import build_experiment

WORKS: list[np.ndarray | None] = [None, np.array([1.0, 0.5, 0.0, 0.25, 1.0, 0.0, 0.75, 1.0, 0.1, 1.0]), None]


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_bmm_step_in_chunks_of_devices_is_bit_identical(
    optimizer: str, tiny_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    # unequal sizes and stragglers: steps where only some devices take part are chunked too
    cfg = tiny_config(
        "partition.scheme='dirichlet'", "partition.alpha=0.5", f"training.optimizer='{optimizer}'", "training.lr=0.01"
    )
    runs = []
    for chunk_devices in (0, 3):  # 0: every device in one chunk
        exp = build_experiment(cfg)
        trainer = exp.trainer("bmm")
        assert isinstance(trainer, train.VectorizedTrainer)
        if chunk_devices:
            monkeypatch.setattr(train, "CHUNK_FLOATS", chunk_devices * exp.spec.total)
            assert trainer.chunks(exp.num_devices)[0] == chunk_devices  # 4 chunks, over the free cores
        params = exp.device_inits()
        losses = [trainer.train(params, k, work).mean_loss for k, work in enumerate(WORKS, start=1)]
        runs.append((params, losses, trainer.state_tensors()))
        monkeypatch.undo()
    (params_a, losses_a, state_a), (params_b, losses_b, state_b) = runs
    assert torch.equal(params_a, params_b)
    # absent devices' losses are NaN (no steps): equal_nan, and no tolerance otherwise
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip(losses_a, losses_b, strict=True))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(params_a, build_experiment(cfg).device_inits())  # training moved them


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("rows", [None, "index", "slice"])
def test_optimizer_in_column_blocks_equals_one_step(name: str, rows: str | None) -> None:
    cfg = TrainingConfig(optimizer=name, lr=0.01, weight_decay=0.01)
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(6, 23, generator=gen)
    chosen = {None: None, "index": torch.tensor([0, 2, 5]), "slice": slice(1, 4)}[rows]
    width = 6 if chosen is None else 3
    grads = [torch.randn(width, 23, generator=gen) for _ in range(3)]
    whole, blocks = start.clone(), start.clone()
    state_whole, state_blocks = optim.init_state(cfg, 6, 23), optim.init_state(cfg, 6, 23)
    for g in grads:
        optim.step(cfg, whole, g.clone(), state_whole, chosen)
        update = optim.Update(cfg, blocks, state_blocks, chosen)
        for lo, hi in [(0, 7), (7, 8), (8, 23)]:
            update.columns(lo, hi, g[:, lo:hi].clone())
        update.finish()
    assert not torch.equal(blocks, start)
    assert torch.equal(whole, blocks)
    for key in state_whole.tensors:
        assert torch.equal(state_whole.tensors[key], state_blocks.tensors[key]), key


def test_csr_mean_over_row_blocks_and_threads_equals_one_product(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    n, width = 50, 37
    matrix = sp.random(n, n, density=0.2, format="csr", dtype=np.float64, random_state=1)
    dst = np.repeat(np.arange(n), np.diff(matrix.indptr))
    hoods = Neighbourhoods.from_edges(n, dst, matrix.indices, matrix.data, rng.random(n))
    own = torch.from_numpy(rng.standard_normal((n, width), dtype=np.float32))
    pool = torch.from_numpy(rng.standard_normal((n, width), dtype=np.float32))
    monkeypatch.setattr(sparse_mix, "BLOCK_FLOATS", 7 * width)  # 8 blocks of up to 7 rows
    blocked = sparse_mix.csr_mean(own, pool, hoods)
    again = sparse_mix.csr_mean(own, pool, hoods)  # the cached blocks
    product = torch.from_numpy(hoods.matrix(n) @ pool.numpy())
    expected = torch.addcmul(product, torch.from_numpy(hoods.self_weight).float().unsqueeze(1), own)
    assert torch.equal(blocked, expected)
    assert torch.equal(again, expected)


def test_equal_size_epoch_plan_follows_the_shuffle_keys() -> None:
    rng = np.random.default_rng(2)
    for sizes in ([6, 6, 6, 6], [6, 3, 6, 1]):  # the equal-size shortcut and the general sort
        parts = [rng.choice(100, size, replace=False) for size in sizes]
        partition = Partition(tuple(parts), (4, 9, 2, 7))
        plan = epoch_plan(partition, seed=5, round_index=3, epoch=1, batch_size=4)
        for row, (part, device) in enumerate(zip(parts, partition.device_ids, strict=True)):
            keys = shuffle_keys(5, 3, 1, np.full(len(part), device), np.arange(len(part)))
            expected = part[np.argsort(keys, kind="stable")]
            assert plan.order[row, : len(part)].tolist() == expected.tolist()
            assert plan.valid[row].tolist() == [1.0] * len(part) + [0.0] * (max(sizes) - len(part))


def _scores_by_argmax(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward version: max with indices, exp with no clamp."""
    n = logits.shape[0]
    best, pred = logits.max(1)
    target = logits.gather(1, y.view(1, 1, -1).expand(n, 1, -1)).squeeze(1)
    ce = (logits - best.unsqueeze(1)).exp().sum(1).log().add(best).sub(target)
    return (pred == y).sum(1, dtype=torch.float64), ce.sum(1, dtype=torch.float64)


def test_scores_keep_argmax_ties_nan_and_the_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, generator=gen) * 30  # confident: shifted logits far below -87
    y = torch.randint(0, 5, (40,), generator=gen)
    logits[0, :, 0] = 1.0  # a five-way tie: argmax says class 0
    logits[1, :, 1] = 2.0
    logits[1, 0, 1] = float("nan")  # NaN counts as the maximum
    logits[2, :, 2] = 0.5
    logits[2, y[2], 2] = 3.0
    hits, loss = _scores(logits.clone(), y)
    expected_hits, expected_loss = _scores_by_argmax(logits, y)
    assert torch.equal(hits, expected_hits)
    finite = torch.isfinite(expected_loss)
    assert torch.equal(loss[finite], expected_loss[finite])
    assert not bool(finite.all()) and not bool(torch.isfinite(loss[~finite]).any())  # NaN stays NaN


def test_only_the_bmm_strategy_steps_in_chunks(
    tiny_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = build_experiment(dataclasses.replace(tiny_config(), devices=10))
    bmm, vmap = exp.trainer("bmm"), exp.trainer("vmap")
    assert isinstance(bmm, train.VectorizedTrainer) and isinstance(vmap, train.VectorizedTrainer)
    monkeypatch.setattr(train, "free_cores", lambda device=None: 1)
    assert bmm.chunks(10_000) == (train.CHUNK_FLOATS // exp.spec.total, 1)
    assert bmm.chunks(100) == (100, 1)  # the default experiment: one chunk on one core
    monkeypatch.setattr(train, "free_cores", lambda device=None: 2)
    assert bmm.chunks(100) == (100, 2)  # too few devices to split
    assert bmm.chunks(600) == (217, 2)  # chunks of 217, over two free cores
    assert bmm.chunks(300) == (217, 2)  # cache-sized chunks, also over the free cores
    assert vmap.chunks(10_000) == (10_000, 1)


@pytest.mark.parametrize("devices", [2, 7])
def test_evaluation_split_over_workers_is_bit_identical(
    devices: int, tiny_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = build_experiment(tiny_config())
    params = exp.device_inits()[:devices]
    x, y = exp.dataset.x_test, exp.dataset.y_test
    one = evaluate.evaluate(exp.model, exp.spec, params, x, y)
    monkeypatch.setattr(evaluate, "MIN_SPLIT_WORK", 0)
    monkeypatch.setattr(evaluate, "free_cores", lambda device=None: 2)
    jobs: list[int] = []
    monkeypatch.setattr(
        evaluate, "run_jobs", lambda run, chunks, workers: (jobs.append(len(chunks)), _run(run, chunks, workers))
    )
    split = evaluate.evaluate(exp.model, exp.spec, params, x, y)
    assert jobs == [min(devices, 4)]  # two chunks per worker
    assert torch.equal(one[0], split[0]) and torch.equal(one[1], split[1])


def test_a_rounds_epoch_plans_computed_together_equal_each_epochs_own() -> None:
    rng = np.random.default_rng(4)
    parts = [rng.choice(100, size, replace=False) for size in (6, 3, 9, 1)]
    partition = Partition(tuple(parts), (4, 9, 2, 7))
    together = epoch_plans(partition, seed=5, round_index=3, epochs=[0, 1, 4], batch_size=4)
    for epoch, plan in zip([0, 1, 4], together, strict=True):
        alone = epoch_plan(partition, seed=5, round_index=3, epoch=epoch, batch_size=4)
        assert torch.equal(plan.order, alone.order) and torch.equal(plan.valid, alone.valid)
    assert not torch.equal(together[0].order, together[1].order)  # epochs shuffle differently


def _complete(n: int, weight: float, self_weight: float) -> Neighbourhoods:
    dst, src = np.nonzero(~np.eye(n, dtype=bool))
    return Neighbourhoods.from_edges(n, dst, src, np.full(len(dst), weight), np.full(n, self_weight))


def test_a_complete_graph_with_one_weight_per_row_mixes_by_one_column_sum():
    """Every receiver hears every other row with one weight: the column-sum form equals the dense
    product up to float32 rounding, for all rows and for a shard's subset of them; any other shape
    of W (a missing edge, two weights in a row, a repeated edge) takes the general product."""
    from p2pl.core.sparse_mix import everyone_mean

    n, width = 300, 50
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(n, width, generator=g)
    own = pool + 0.01 * torch.randn(n, width, generator=g)  # what a device holds need not be what it sent
    hoods = _complete(n, 1 / n, 1 / n)
    dense = torch.from_numpy(hoods.matrix(n).toarray())
    expected = dense @ pool + own / n
    got = everyone_mean(own, pool, hoods)
    assert got is not None and torch.allclose(got, expected, rtol=0, atol=2e-6)
    rows = np.array([5, 0, 299, 17])
    shard = everyone_mean(own[rows], pool, hoods.subset(rows))
    assert shard is not None and torch.equal(shard, got[rows])  # the same bits whatever the sharding
    assert torch.allclose(cooperate._mean(own, pool, hoods, Gossip()), expected, rtol=0, atol=2e-6)

    missing = Neighbourhoods.from_edges(n, hoods.dst[1:], hoods.src[1:], hoods.weight[1:], hoods.self_weight)
    uneven = hoods.with_weights(np.where(np.arange(len(hoods.src)) == 7, 0.5 / n, 1 / n), hoods.self_weight)
    repeated_src = hoods.src.copy()
    repeated_src[1] = repeated_src[0]  # degree n - 1, but one row twice and another never
    repeated = Neighbourhoods(hoods.indptr, repeated_src, hoods.weight, hoods.self_weight)
    for other in (missing, uneven, repeated):
        assert everyone_mean(own, pool, other) is None
        want = torch.from_numpy(other.matrix(n).toarray()) @ pool + own / n
        assert torch.allclose(cooperate._mean(own, pool, other, Gossip()), want, rtol=0, atol=2e-6)
