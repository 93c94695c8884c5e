"""Model registry (p2pl.models): each model trains a few steps identically in both engines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from p2pl.config import ModelConfig, TrainingConfig
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.core.reference import ReferenceTrainer
from p2pl.core.schedule import Partition
from p2pl.core.train import VectorizedTrainer
from p2pl.errors import P2PLError
from p2pl.models import MODELS, build_model

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "lenet": (1, 28, 28), "resnet": (3, 32, 32)}
SIZES = [7, 4, 5]  # unequal local data: short last batches, devices idle while others finish


def _tiny_data(shape: tuple[int, ...], classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(42)
    n = sum(SIZES)
    return torch.rand(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _partition() -> Partition:
    return Partition.full(np.split(np.arange(sum(SIZES)), np.cumsum(SIZES)[:-1]))


@pytest.mark.parametrize("name", MODELS)
def test_model_trains_identically_in_both_engines(name: str) -> None:
    shape = SHAPES[name]
    cfg = ModelConfig(name=name, hidden=[16])
    model = build_model(cfg, shape, 10)
    spec = ParamSpec.of(model)
    x, y = _tiny_data(shape)
    train = TrainingConfig(optimizer="momentum", lr=0.05, batch_size=3, local_epochs=1)
    inits = init_device_params(model, spec, seed=1, devices=range(len(SIZES)))

    ref = ReferenceTrainer(lambda: build_model(cfg, shape, 10), spec, x, y, _partition(), train, seed=3)
    p_ref = inits.clone()
    ref_stats = ref.train(p_ref, 1)
    assert ref_stats.steps.tolist() == [math.ceil(s / 3) for s in SIZES]
    assert float((p_ref - inits).abs().max()) > 1e-4  # it trained

    strategies = ["auto", "vmap"]  # auto: bmm for the MLP, vmap or the loop for CNNs by feature-map size
    for strategy in strategies:
        vec = VectorizedTrainer(model, spec, x, y, _partition(), train, seed=3, strategy=strategy)
        p_vec = inits.clone()
        stats = vec.train(p_vec, 1)
        assert torch.equal(stats.steps, ref_stats.steps)
        diff = float((p_vec - p_ref).abs().max())
        assert diff <= 1e-5, f"{name}/{vec.strategy}: engines differ by {diff}"
        assert torch.allclose(stats.mean_loss, ref_stats.mean_loss, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_models_have_no_buffers_and_give_logits(name: str) -> None:
    model = build_model(ModelConfig(name=name), SHAPES[name], 7)
    assert not list(model.buffers())
    assert model(torch.zeros(2, *SHAPES[name])).shape == (2, 7)


def test_cnn_fits_digits_and_image_sizes() -> None:
    for shape in [(1, 8, 8), (1, 28, 28), (3, 32, 32)]:
        assert build_model(ModelConfig(name="cnn"), shape, 10)(torch.zeros(1, *shape)).shape == (1, 10)


def test_mlp_hidden_widths() -> None:
    model = build_model(ModelConfig(name="mlp", hidden=[5, 6]), (1, 8, 8), 10)
    assert ParamSpec.of(model).shapes == ((5, 64), (5,), (6, 5), (6,), (10, 6), (10,))


@pytest.mark.parametrize("name", ["cnn", "lenet", "resnet"])
def test_image_models_refuse_flat_input(name: str) -> None:
    with pytest.raises(P2PLError, match=f"model '{name}' needs image-shaped input.*mlp"):
        build_model(ModelConfig(name=name), (20,), 3)


def test_unknown_model_lists_the_valid_ones() -> None:
    with pytest.raises(P2PLError, match="unknown model 'vgg'; choose one of: cnn, lenet, mlp, resnet"):
        build_model(ModelConfig(name="vgg"), (1, 8, 8), 10)


def test_user_factory(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.syspath_prepend(str(request.path.parent))
    model = build_model(ModelConfig(name="ignored", factory="user_models:small_tanh_mlp"), (1, 8, 8), 10)
    assert any(isinstance(m, nn.Tanh) for m in model.modules())


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("user_models", "must look like 'package.module:function'"),
        (":small_tanh_mlp", "must look like 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'.*PYTHONPATH"),
        ("user_models:missing", "has no callable 'missing'"),
        ("user_models:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
        ("user_models:not_a_model", "returned str, not a torch nn.Module"),
        ("user_models:with_batchnorm", "buffers.*GroupNorm"),
    ],
)
def test_bad_factory_is_a_clear_error(
    factory: str, message: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.syspath_prepend(str(request.path.parent))
    with pytest.raises(P2PLError, match=message):
        build_model(ModelConfig(factory=factory), (1, 8, 8), 10)


def test_device_inits_are_seeded_per_device_and_leave_global_rng_alone() -> None:
    model = build_model(ModelConfig(), (1, 8, 8), 10)
    spec = ParamSpec.of(model)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = init_device_params(model, spec, seed=0, devices=range(4))
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(a, init_device_params(model, spec, seed=0, devices=range(4)))
    assert not torch.equal(a, init_device_params(model, spec, seed=1, devices=range(4)))
    assert len({tuple(row[:5].tolist()) for row in a}) == 4  # devices do not share an init
    # a shard holding devices [2, 3] draws exactly their rows
    assert torch.equal(init_device_params(model, spec, seed=0, devices=[2, 3]), a[2:])


def test_param_spec_round_trip() -> None:
    model = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10)
    spec = ParamSpec.of(model)
    assert spec.total == sum(p.numel() for p in model.parameters())
    assert spec.nbytes == 4 * spec.total
    flat = torch.randn(3, spec.total)
    assert torch.equal(spec.flatten(spec.unflatten(flat)), flat)
    spec.load_module(model, flat[1])
    assert torch.equal(spec.module_vector(model), flat[1])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_evaluate_matches_each_device_model_in_any_chunking(name: str) -> None:
    from p2pl.core.evaluate import evaluate

    shape = SHAPES[name]
    model = build_model(ModelConfig(name=name), shape, 10)
    spec = ParamSpec.of(model)
    params = init_device_params(model, spec, seed=4, devices=range(3))
    x, y = _tiny_data(shape)
    expected_acc, expected_loss = [], []
    with torch.no_grad():
        for row in params:
            spec.load_module(model, row)
            logits = model(x)
            expected_acc.append(float((logits.argmax(1) == y).double().mean()))
            expected_loss.append(float(torch.nn.functional.cross_entropy(logits, y)))
    for sample_chunk, device_chunk in [(4096, 0), (5, 2), (1, 1)]:
        acc, loss = evaluate(model, spec, params, x, y, sample_chunk=sample_chunk, device_chunk=device_chunk)
        assert acc.tolist() == pytest.approx(expected_acc, abs=1e-12)
        assert loss.tolist() == pytest.approx(expected_loss, abs=1e-5)
