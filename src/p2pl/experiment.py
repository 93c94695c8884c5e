"""Build everything an experiment needs from its config: data, partition, model, graph, engine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import networkx as nx
import numpy as np
import torch
from torch import nn

from p2pl.algorithms import Algorithm, make_algorithm
from p2pl.algorithms.base import Setting
from p2pl.config import ExperimentConfig, config_to_dict, dumps_config
from p2pl.core.adversary import Adversary, flip_labels, place_attackers
from p2pl.core.compress import Compression, check_compression, incompressible
from p2pl.core.optim import OPTIMIZERS
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.core.reference import ReferenceTrainer
from p2pl.core.schedule import Partition
from p2pl.core.sync import SyncOutcome
from p2pl.core.train import VectorizedTrainer
from p2pl.data.base import Dataset
from p2pl.data.partition import label_histograms, partition_from_assignment, partition_indices
from p2pl.data.registry import load_dataset_with_assignment
from p2pl.errors import P2PLError, choose
from p2pl.graph.links import NetworkDynamics
from p2pl.graph.topology import Topology, build_topology
from p2pl.graph.weights import WEIGHT_RULES
from p2pl.models import build_model

ENGINES = ("vectorized", "reference")


@dataclass
class Experiment:
    cfg: ExperimentConfig
    algorithm: Algorithm
    dataset: Dataset
    parts: list[np.ndarray]  # per device: indices into the training set
    model: nn.Module
    spec: ParamSpec
    topology: Topology
    setting: Setting

    @property
    def num_devices(self) -> int:
        return len(self.parts)

    def label_histograms(self) -> np.ndarray:
        return label_histograms(self.dataset.y_train.numpy(), self.parts, self.dataset.num_classes)

    def make_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.dataset.input_shape, self.dataset.num_classes)

    def device_inits(self) -> torch.Tensor:
        """Every device's own initialization, drawn from its own seed ([cfg.devices, P])."""
        return init_device_params(self.model, self.spec, self.cfg.seed, range(self.cfg.devices))

    def start_params(self) -> tuple[torch.Tensor, SyncOutcome]:
        """The algorithm's start over every device's own init: rows ``[num_devices, P]``."""
        inits = self.device_inits()
        start = self.algorithm.start(inits.double().norm(dim=1), self.setting)
        return adopt(inits, start), start

    def honest(self) -> np.ndarray:
        """bool [num_devices]: devices that are not attackers."""
        return ~self.setting.adversary.mask(np.arange(self.num_devices))

    def trainer(self, strategy: str = "auto") -> VectorizedTrainer | ReferenceTrainer:
        partition = Partition.full(self.parts)
        x, y = self.dataset.x_train, self.dataset.y_train
        if self.cfg.engine == "reference":
            return ReferenceTrainer(self.make_model, self.spec, x, y, partition, self.cfg.training, self.cfg.seed)
        return VectorizedTrainer(self.model, self.spec, x, y, partition, self.cfg.training, self.cfg.seed, strategy)

    def dynamics(self) -> NetworkDynamics:
        topo = self.cfg.topology
        # the topology's radius: an automatic one (topology.radius = 0) is resolved there
        radius = topo.range_m if topo.area_m > 0 else (self.topology.radius or topo.radius)
        area = topo.area_m if topo.area_m > 0 else None
        return NetworkDynamics(self.topology, self.cfg.links, self.cfg.consensus.every, self.cfg.seed, radius, area)


def adopt(inits: torch.Tensor, start: SyncOutcome) -> torch.Tensor:
    """Rows after the start: row i is ``inits[owner[i]] * scale[i]``."""
    rows = inits[torch.from_numpy(start.owner)].clone()
    if not np.all(start.scale == 1.0):
        rows *= torch.from_numpy(start.scale).to(rows.dtype).unsqueeze(1)
    return rows


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """Identifies a run's numbers: everything but where and how verbosely it is written."""
    neutral = replace(cfg, output=replace(cfg.output, dir="", progress=True, tensorboard=False, mlflow=False))
    return hashlib.sha256(dumps_config(neutral).encode()).hexdigest()[:16]


def _partition(cfg: ExperimentConfig, dataset: Dataset, assignment: np.ndarray | None) -> list[np.ndarray]:
    if assignment is not None:
        return partition_from_assignment(assignment, cfg.devices)
    return partition_indices(dataset.y_train.numpy(), cfg.devices, cfg.partition, cfg.seed)


def _poison_labels(
    dataset: Dataset, parts: list[np.ndarray], attackers: np.ndarray
) -> tuple[Dataset, list[np.ndarray]]:
    """Label-flipping attackers train on flipped copies of their own samples (appended to the
    training set, so honest devices and the shuffle keys are untouched)."""
    x, y = dataset.x_train, dataset.y_train
    extra_x, extra_y, parts = [], [], list(parts)
    at = len(y)
    for device in attackers.tolist():
        own = torch.from_numpy(parts[device])
        extra_x.append(x[own])
        extra_y.append(flip_labels(y[own], dataset.num_classes))
        parts[device] = np.arange(at, at + len(own), dtype=np.int64)
        at += len(own)
    poisoned = replace(dataset, x_train=torch.cat([x, *extra_x]), y_train=torch.cat([y, *extra_y]))
    return poisoned, parts


def lossy_links(cfg: ExperimentConfig) -> str:
    """Why messages are lost by design in this config's network ("" when none are)."""
    links = cfg.links
    if links.model != "static":
        return f"links.model = {links.model!r} takes links down"
    if links.dropout > 0:
        return "links.dropout takes devices away"
    if links.mobility_speed > 0:
        return "links.mobility_speed changes who neighbours whom"
    return ""


def _with_compression(cfg: ExperimentConfig, spec: ParamSpec, algorithm: Algorithm, setting: Setting) -> Setting:
    """``setting`` with the run's compression, refused where the algorithm has no gossip for it."""
    compression = Compression.of(cfg.compression, spec.numels)
    if not compression.active:
        return setting
    why = incompressible(algorithm.cooperation(setting))
    check_compression(compression, lossy_links=lossy_links(cfg), incompressible=why)
    return replace(setting, compression=compression)


def build_experiment(cfg: ExperimentConfig) -> Experiment:
    # Check every name before any expensive or graph-dependent work, so a typo is reported as one.
    choose("engine", cfg.engine, ENGINES)
    choose("optimizer", cfg.training.optimizer, OPTIMIZERS)
    algorithm = make_algorithm(cfg.algorithm)
    if algorithm.uses_graph:
        choose("weights", cfg.consensus.weights, WEIGHT_RULES)
    algorithm.check(cfg.consensus, cfg.engine)
    if cfg.topology.name == "directed-random-geometric" and not algorithm.directed:
        raise P2PLError(
            f"topology 'directed-random-geometric' has one-way links, which only algorithm = 'push-sum' "
            f"runs over; {cfg.algorithm!r} needs both directions: use topology 'random-geometric'"
        )
    torch.manual_seed(cfg.seed)  # only for code that ignores our explicit generators
    dataset, assignment = load_dataset_with_assignment(cfg.data, cfg.seed)
    device_parts = _partition(cfg, dataset, assignment)
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes)
    spec = ParamSpec.of(model)
    # centralized: one "device" holding the union of the devices' data
    single = algorithm.num_devices(cfg.devices) == 1
    parts = [np.sort(np.concatenate(device_parts))] if single else device_parts
    n = len(parts)
    if algorithm.uses_graph:
        topology = build_topology(cfg.topology, n, cfg.seed)
    else:
        # No device-to-device links; dropout / stragglers still apply through the dynamics.
        graph = nx.empty_graph(n)
        topology = Topology(name="none", graph=graph, positions=None)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    attackers = place_attackers(n, topology.edges, cfg.adversary, cfg.seed)
    adversary = Adversary.of(cfg.adversary, attackers, cfg.seed)
    if adversary.is_("label-flip"):
        dataset, parts = _poison_labels(dataset, parts, attackers)
    setting = Setting(
        data_sizes=sizes,
        base_edges=topology.edges,
        weights=cfg.consensus.weights,
        consensus=cfg.consensus,
        sync=cfg.sync,
        model_bytes=spec.nbytes,
        adversary=adversary,
        base_arcs=topology.arcs,
    )
    setting = _with_compression(cfg, spec, algorithm, setting)
    if n > 1 and not algorithm.uses_graph and cfg.links.mobility_speed > 0:
        raise P2PLError(f"links.mobility_speed applies to P2PL's device graph, not to {algorithm.name!r}")
    return Experiment(cfg, algorithm, dataset, parts, model, spec, topology, setting)


__all__ = ["ENGINES", "Experiment", "build_experiment", "config_fingerprint", "config_to_dict"]
