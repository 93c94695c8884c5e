"""Batched evaluation: every strategy gives each device's own accuracy and loss, identical
devices are evaluated once, and the consensus distance keeps its float64 value."""

from __future__ import annotations

import pytest
import torch

from p2pl.config import ModelConfig
from p2pl.core.consensus import consensus_distance
from p2pl.core.evaluate import distinct_rows, evaluate
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.models import build_model

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8)}


def _data(shape: tuple[int, ...], n: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _one_by_one(model: torch.nn.Module, spec: ParamSpec, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    acc, loss = [], []
    with torch.no_grad():
        for row in params:
            spec.load_module(model, row)
            logits = model(x)
            acc.append(float((logits.argmax(1) == y).double().mean()))
            loss.append(float(torch.nn.functional.cross_entropy(logits, y)))
    return acc, loss


@pytest.mark.parametrize(
    ("name", "strategy"), [("mlp", "bmm"), ("mlp", "vmap"), ("mlp", "loop"), ("cnn", "vmap"), ("cnn", "loop")]
)
def test_every_strategy_matches_each_device_model(name: str, strategy: str) -> None:
    shape = SHAPES[name]
    model = build_model(ModelConfig(name=name, hidden=[16, 12]), shape, 10)
    spec = ParamSpec.of(model)
    params = init_device_params(model, spec, seed=3, devices=range(5))
    x, y = _data(shape)
    expected_acc, expected_loss = _one_by_one(model, spec, params, x, y)
    for sample_chunk, device_chunk in [(4096, 0), (7, 2), (1, 1)]:
        acc, loss = evaluate(model, spec, params, x, y, sample_chunk, device_chunk, strategy=strategy)
        assert acc.tolist() == pytest.approx(expected_acc, abs=1e-12)
        assert loss.tolist() == pytest.approx(expected_loss, rel=1e-5)


def test_a_single_linear_layer_is_evaluated_too() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    spec = ParamSpec.of(model)
    params = init_device_params(model, spec, seed=0, devices=range(3))
    x, y = _data((1, 8, 8))
    acc, loss = evaluate(model, spec, params, x, y, strategy="bmm")
    expected_acc, expected_loss = _one_by_one(model, spec, params, x, y)
    assert acc.tolist() == pytest.approx(expected_acc, abs=1e-12)
    assert loss.tolist() == pytest.approx(expected_loss, rel=1e-5)


def test_ties_between_classes_count_like_argmax() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    spec = ParamSpec.of(model)
    params = torch.zeros(2, spec.total)  # all logits 0: argmax says class 0 for every sample
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    acc, _ = evaluate(model, spec, params, x, y, strategy="bmm")
    assert acc.tolist() == [pytest.approx(2 / 6), pytest.approx(2 / 6)]


def test_distinct_rows_groups_only_exactly_equal_rows() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 50, generator=g)
    rows = base[torch.tensor([0, 1, 0, 2, 1, 3, 0])].clone()
    rows[6, 17] = torch.nextafter(rows[6, 17], torch.tensor(10.0))  # one ulp from row 0
    reps, inverse = distinct_rows(rows)
    assert torch.equal(rows[reps][inverse], rows)
    assert len(reps) == 5  # rows 0, 1, 2, 3 of base and the perturbed copy
    same = rows[:1].expand(6, -1)
    reps, inverse = distinct_rows(same)
    assert reps.tolist() == [0] and inverse.tolist() == [0] * 6
    reps, inverse = distinct_rows(base)  # all distinct: every row its own group
    assert reps.tolist() == inverse.tolist() == [0, 1, 2, 3]


def test_identical_devices_are_evaluated_once_and_scattered() -> None:
    model = build_model(ModelConfig(name="mlp", hidden=[16]), (1, 8, 8), 10)
    spec = ParamSpec.of(model)
    inits = init_device_params(model, spec, seed=5, devices=range(3))
    params = inits[torch.tensor([2, 0, 2, 1, 0, 2])]
    x, y = _data((1, 8, 8))
    calls = []
    original = spec.unflatten

    def counting(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(flat.shape[0])
        return original(flat)

    object.__setattr__(spec, "unflatten", counting)  # ParamSpec is frozen; count forwarded rows
    acc, loss = evaluate(model, spec, params, x, y, strategy="bmm")
    assert sum(calls) == 3  # three distinct models forwarded, not six
    object.__setattr__(spec, "unflatten", original)
    expected_acc, expected_loss = _one_by_one(model, spec, params, x, y)
    assert acc.tolist() == pytest.approx(expected_acc, abs=1e-12)
    assert loss.tolist() == pytest.approx(expected_loss, rel=1e-5)


def _float64_distance(params: torch.Tensor) -> float:
    p = params.double()
    return float(((p - p.mean(0)) ** 2).sum(1).mean())


@pytest.mark.parametrize("spread", [1.0, 1e-2, 1e-6])
def test_consensus_distance_within_1e_6_of_float64(spread: float) -> None:
    g = torch.Generator().manual_seed(2)
    base = 0.1 * torch.randn(300, generator=g)
    params = base + spread * torch.randn(700, 300, generator=g)
    assert consensus_distance(params) == pytest.approx(_float64_distance(params), rel=1e-6)
    params[5] += 3.0  # one outlier device
    assert consensus_distance(params) == pytest.approx(_float64_distance(params), rel=1e-6)


def test_consensus_distance_of_identical_devices_is_exactly_zero() -> None:
    row = 0.1 * torch.randn(1, 301, generator=torch.Generator().manual_seed(3))
    assert consensus_distance(row.expand(999, -1).contiguous()) == 0.0
    assert consensus_distance(row) == 0.0
