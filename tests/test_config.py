"""Typed configuration (p2pl.config): defaults, TOML files, --set overrides, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from p2pl.config import (
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    dumps_config,
    load_config,
    parse_override,
    read_toml,
)
from p2pl.errors import P2PLError


def test_defaults_are_the_default_experiment(tmp_path: Path) -> None:
    cfg = load_config()
    assert (cfg.algorithm, cfg.devices, cfg.rounds, cfg.engine) == ("p2pl", 100, 50, "vectorized")
    assert (cfg.data.name, cfg.partition.scheme, cfg.model.name, cfg.model.hidden) == ("digits", "iid", "mlp", [64])
    # radius 0: automatic (exactly 0.25 at the default 100 devices)
    assert (cfg.topology.name, cfg.topology.radius, cfg.consensus.weights) == ("random-geometric", 0.0, "uniform")
    assert cfg.sync.enabled and cfg.training.optimizer == "momentum" and cfg.training.lr == 0.05
    assert (cfg.training.batch_size, cfg.training.local_epochs) == (8, 5)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert load_config(empty) == cfg


def test_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text('devices = 20\n[training]\nlr = 0.1\noptimizer = "adam"\n[model]\nhidden = [32, 16]\n')
    cfg = load_config(
        path, ["training.lr=0.2", "topology.name=ring", "sync.enabled=false", "training.betas=[0.5, 0.6]"]
    )
    assert cfg.devices == 20
    assert cfg.training.lr == 0.2  # --set wins over the file
    assert cfg.training.optimizer == "adam"
    assert cfg.model.hidden == [32, 16]
    assert cfg.topology.name == "ring"  # a bare word is read as a string
    assert cfg.sync.enabled is False
    assert cfg.training.betas == [0.5, 0.6]


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["devices=7", "training.lr=0.3", "model.hidden=[5]", "topology.path='a b.txt'"])
    path = tmp_path / "config.toml"
    path.write_text(dumps_config(cfg))
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_ints_are_accepted_for_floats_and_integral_floats_for_ints() -> None:
    cfg = load_config(None, ["training.lr=1", "devices=12.0"])
    assert isinstance(cfg.training.lr, float) and cfg.training.lr == 1.0
    assert isinstance(cfg.devices, int) and cfg.devices == 12


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("devices=ten", "devices must be an integer, got 'ten'"),
        ("devices=2.5", "devices must be an integer, got 2.5"),
        ("training.lr='fast'", "training.lr must be a number, got 'fast'"),
        ("sync.enabled=1", "sync.enabled must be true or false"),
        ("model.hidden=64", r"model.hidden must be a list of int"),
        ("model.hidden=['a']", r"model.hidden\[0\] must be an integer"),
        ("training=3", r"training must be a table \(\[training\]\)"),
        ("training.lr.x=1", "training.lr must be a number"),
    ],
)
def test_type_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(P2PLError, match=message):
        load_config(None, [override])


def test_set_into_a_value_that_is_not_a_section() -> None:
    with pytest.raises(P2PLError, match="'lr' is not a section"):
        load_config(None, ["training.lr=0.1", "training.lr.x=1"])


def test_unknown_keys_name_the_key_and_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(P2PLError) as err:
        load_config(None, ["training.learning_rate=0.1"])
    msg = str(err.value)
    assert "training.learning_rate" in msg and "[training]" in msg
    for valid in ("optimizer", "lr", "momentum", "batch_size", "local_epochs"):
        assert valid in msg
    with pytest.raises(
        P2PLError, match="unknown config key 'devicez' in the top level; valid keys: algorithm, devices"
    ):
        load_config(None, ["devicez=3"])
    path = tmp_path / "typo.toml"
    path.write_text("[topolgy]\nname = 'ring'\n")
    with pytest.raises(P2PLError, match=r"unknown config key 'topolgy'.*topology"):
        load_config(path)


@pytest.mark.parametrize("text", ["devices", "=3", "training..lr=1", ".lr=1"])
def test_malformed_set(text: str) -> None:
    with pytest.raises(P2PLError, match=r"--set expects section.key=value"):
        parse_override(text)


def test_parse_override_reads_toml_values() -> None:
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=x=y") == (["a"], "x=y")


BAD_NUMBERS = [
    ("devices=0", "devices must be a positive integer"),
    ("rounds=-1", "rounds must be a positive integer"),
    ("training.batch_size=0", "training.batch_size must be a positive integer"),
    ("training.local_epochs=0", "training.local_epochs must be a positive integer"),
    ("consensus.steps=0", "consensus.steps must be a positive integer"),
    ("consensus.every=0", "consensus.every must be a positive integer"),
    ("eval.every=0", "eval.every must be a positive integer"),
    ("training.lr=0", "training.lr must be > 0"),
    ("training.lr=-0.1", "training.lr must be > 0"),
    ("training.lr=nan", "training.lr must be > 0"),
    ("partition.alpha=0", "partition.alpha must be > 0"),
    ("partition.alpha=-1", "partition.alpha must be > 0"),
    ("training.eps=0", "training.eps must be > 0"),
    ("training.weight_decay=-1", "training.weight_decay must be >= 0"),
    ("sync.steps=-1", "sync.steps must be >= 0"),
    ("training.momentum=1", r"training.momentum must be in \[0, 1\)"),
    ("training.betas=[0.9]", "training.betas must be two numbers"),
    ("consensus.affinity=0", r"consensus.affinity must be in \(0, 1\]"),
    ("consensus.affinity=1.5", r"consensus.affinity must be in \(0, 1\]"),
    ("consensus.radius_factor=0", "consensus.radius_factor must be > 0 and finite"),
    ("consensus.radius_factor=inf", "consensus.radius_factor must be > 0 and finite"),
    ("data.test_fraction=1", r"data.test_fraction must be in \(0, 1\)"),
    ("model.hidden=[8, 0]", "model.hidden widths must be positive"),
]


@pytest.mark.parametrize(("override", "message"), BAD_NUMBERS)
def test_bad_numbers(override: str, message: str) -> None:
    with pytest.raises(P2PLError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_missing_and_garbled_files(tmp_path: Path) -> None:
    with pytest.raises(P2PLError, match=r"config file .*nope.toml' not found; pass an existing TOML file"):
        load_config(tmp_path / "nope.toml")
    garbled = tmp_path / "garbled.toml"
    garbled.write_text("devices = [\n")
    with pytest.raises(P2PLError, match=r"garbled.toml' is not valid TOML") as err:
        read_toml(garbled)
    assert "\n" not in str(err.value)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(P2PLError, match="is not valid TOML"):
        load_config(binary)
    with pytest.raises(P2PLError, match="not found"):
        load_config(tmp_path)  # a directory is not a config file


def test_config_is_a_plain_dataclass() -> None:
    cfg = ExperimentConfig()
    assert dataclasses.is_dataclass(cfg)
    assert dataclasses.replace(cfg, devices=3).validate().devices == 3
