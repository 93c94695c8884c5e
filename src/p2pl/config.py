"""Typed experiment configuration: dataclasses, TOML loading, ``--set`` overrides, saving.

Every section is a dataclass with defaults, so an empty TOML file is the default experiment.
Unknown keys are errors that name the key and the valid ones; values are type-checked.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from p2pl.errors import P2PLError, choose

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _require(values: dict[str, float], ok: typing.Callable[[float], bool], what: str, example: str) -> None:
    for key, value in values.items():
        if not ok(value):
            raise P2PLError(f"{key} must be {what}, got {value}; set e.g. --set {key}={example}")


@dataclass
class DataConfig:
    name: str = "digits"  # dataset registry name
    root: str = "data"  # directory holding file-based datasets
    download: bool = False  # never download unless asked
    test_fraction: float = 0.2  # held-out share for datasets without a standard test split
    path: str = ""  # a user's own data file or folder (npz, csv, image folder)
    label_column: str = "label"  # csv: the label column
    device_assignment: str = ""  # optional file assigning each training sample to a device


@dataclass
class PartitionConfig:
    scheme: str = "iid"  # iid | dirichlet | shards | quantity
    alpha: float = 0.5  # dirichlet concentration (label skew); smaller = more skewed
    shards_per_device: int = 2  # shards: label shards per device
    quantity_sigma: float = 1.0  # quantity: sigma of the log-normal local sizes
    min_size: int = 1  # every device gets at least this many samples
    # 0: devices split the training set (disjoint). k > 0: each device draws k samples of its own,
    # overlapping across devices, so more devices than samples fit (e.g. 10,000 on digits).
    samples_per_device: int = 0


@dataclass
class ModelConfig:
    name: str = "mlp"  # model registry name
    hidden: list[int] = field(default_factory=lambda: [64])  # mlp hidden widths
    factory: str = ""  # user model, "package.module:factory"


@dataclass
class TopologyConfig:
    name: str = "random-geometric"
    radius: float = 0.0  # random-geometric: link range in the unit square (0: automatic, connected)
    p: float = 0.1  # erdos-renyi: edge probability
    k: int = 4  # small-world: neighbours in the ring lattice; random-regular: degree
    rewire: float = 0.1  # small-world: rewiring probability
    m: int = 2  # barabasi-albert: edges per new node
    rows: int = 0  # grid/torus rows (0: most square)
    area_m: float = 0.0  # random-geometric in metres: side of the square area (0: unit square)
    range_m: float = 0.0  # random-geometric in metres: radio range
    # directed-random-geometric: each device's radio range is drawn uniformly in
    # [radius * (1 - range_spread), radius * (1 + range_spread)] (keyed by the seed)
    range_spread: float = 0.5
    path: str = ""  # edge-list file for name = "edge-list"
    allow_disconnected: bool = False


@dataclass
class LinksConfig:
    """Intermittent links, device dropout, stragglers and mobility (see p2pl.graph.links)."""

    model: str = "static"  # static | bernoulli | gilbert-elliott
    p_up: float = 1.0  # bernoulli: probability a link is up in a round
    ge_good_to_bad: float = 0.1  # gilbert-elliott: P(good -> bad) per round
    ge_bad_to_good: float = 0.3  # gilbert-elliott: P(bad -> good) per round
    ge_up_good: float = 1.0  # gilbert-elliott: P(link up | good)
    ge_up_bad: float = 0.0  # gilbert-elliott: P(link up | bad)
    dropout: float = 0.0  # probability a device is absent in a round
    straggler_prob: float = 0.0  # probability a present device straggles in a round
    straggler_work: float = 0.5  # share of its local epochs' steps a straggler finishes
    mobility_speed: float = 0.0  # random waypoint speed per round (area units); 0 = static
    mobility_pause: int = 0  # rounds a device pauses at each waypoint


#: the algorithms (p2pl.algorithms.ALGORITHMS builds them; named here so the CLI need not import torch)
ALGORITHM_NAMES = ("p2pl", "fedavg", "centralized", "local", "dpsgd", "gossip", "push-sum")
SYNC_MODES = ("verified", "flood")
AGGREGATIONS = ("mean", "trimmed-mean", "median", "clipped", "redescending")
ATTACKS = ("none", "sync-hijack", "scale", "sign-flip", "gaussian", "alie", "label-flip", "silent", "data-size")
#: Network-level misbehaviour that only a real node can play (p2pl.node.adversary).
NODE_ATTACKS = ("hello-round", "header-bomb", "flood")
PLACEMENTS = ("random", "degree")
DEVICES = ("auto", "cpu", "cuda", "mps")  # resolved by p2pl.core.device


@dataclass
class SyncConfig:
    enabled: bool = True  # max norm synchronization before training
    steps: int = 0  # 0: until no device changes (at most the diameter)
    # verified: devices flood only (norm, owner) claims and recompute the owner's public init to
    # check each claim, so no parameters travel; flood: the paper's form, parameters travel.
    mode: str = "verified"


@dataclass
class TrainingConfig:
    optimizer: str = "momentum"  # sgd | momentum | adam
    lr: float = 0.05
    momentum: float = 0.9  # used by "momentum"
    weight_decay: float = 0.0
    batch_size: int = 8
    local_epochs: int = 5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    eps: float = 1e-8  # adam

    def validate(self) -> None:
        """Shared by experiment and node configs: a node trains exactly what the simulator would."""
        _require({"training.batch_size": self.batch_size, "training.local_epochs": self.local_epochs},
                 lambda v: v > 0, "a positive integer", "1")  # fmt: skip
        _require({"training.lr": self.lr, "training.eps": self.eps}, lambda v: v > 0, "> 0", "0.1")
        _require({"training.weight_decay": self.weight_decay}, lambda v: v >= 0, ">= 0", "0")
        _require({"training.momentum": self.momentum}, lambda v: 0 <= v < 1, "in [0, 1)", "0.9")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise P2PLError(f"training.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class ConsensusConfig:
    weights: str = "uniform"  # metropolis | max-degree | uniform | data-size
    steps: int = 1  # consensus steps per round
    affinity: float = 1.0  # (1-a) own + a mix; 1 = plain P2PL (our reading of arXiv 2312.13602)
    every: int = 1  # sparse communication: cooperate every r rounds
    aggregation: str = "mean"  # mean | trimmed-mean | median | clipped | redescending (robust: docs/robustness.md)
    trim: float = 0.2  # trimmed-mean: share of the neighbourhood cut at each end (per coordinate)
    clip_quantile: float = 0.8  # clipped: clip radius = this quantile of the neighbours' distances
    radius_factor: float = 1.5  # redescending: full weight within this x the median neighbour distance
    # A neighbour's claimed data size counts within [own / r, own * r] (data-size weights), so no
    # one neighbour can steer a device's row of W by lying about its data.
    max_size_ratio: float = 10.0
    # A row whose norm grows past this multiple of its own (or of 1) in one mix or one round of
    # training is rolled back; in a mix, first retried without the out-of-bounds neighbours.
    max_norm_ratio: float = 1000.0

    def validate(self) -> None:
        _require({"consensus.steps": self.steps, "consensus.every": self.every}, lambda v: v > 0,
                 "a positive integer", "1")  # fmt: skip
        _require({"consensus.affinity": self.affinity}, lambda v: 0 < v <= 1, "in (0, 1]", "1.0")
        _require({"consensus.trim": self.trim}, lambda v: 0 <= v < 0.5, "in [0, 0.5)", "0.2")
        _require({"consensus.clip_quantile": self.clip_quantile}, lambda v: 0 < v <= 1, "in (0, 1]", "0.8")
        _require({"consensus.radius_factor": self.radius_factor}, lambda v: 0 < v < float("inf"), "> 0 and finite",
                 "1.5")  # fmt: skip
        _require({"consensus.max_size_ratio": self.max_size_ratio}, lambda v: v >= 1, ">= 1", "10")
        _require({"consensus.max_norm_ratio": self.max_norm_ratio}, lambda v: 1 < v < float("inf"), "> 1 and finite",
                 "1000")  # fmt: skip
        choose("consensus.aggregation", self.aggregation, AGGREGATIONS)


COMPRESSION_METHODS = ("none", "top-k", "random-k", "quantize", "choco")


@dataclass
class CompressionConfig:
    """What a device sends in a gossip step (p2pl.core.compress, docs/compression.md)."""

    method: str = "none"  # none | top-k | random-k | quantize | choco
    ratio: float = 0.01  # top-k / random-k / choco: share of the parameters sent per message
    bits: int = 0  # 8 | 4: quantized values; 32: float32 values; 0: 8 for quantize, 32 otherwise
    block_size: int = 256  # values per quantization scale
    granularity: str = "block"  # quantize: one scale per block | per model tensor ("tensor")
    gamma: float = 0.1  # choco: consensus step size
    unsent: str = "renormalize"  # top-k / random-k with the mean: renormalize | own (see docs/compression.md)

    def validate(self) -> None:
        choose("compression.method", self.method, COMPRESSION_METHODS)
        choose("compression.unsent", self.unsent, ("renormalize", "own"))
        choose("compression.granularity", self.granularity, ("block", "tensor"))
        _require({"compression.ratio": self.ratio}, lambda v: 0 < v <= 1, "in (0, 1]", "0.01")
        _require({"compression.gamma": self.gamma}, lambda v: 0 < v <= 1, "in (0, 1]", "0.5")
        _require({"compression.block_size": self.block_size}, lambda v: v > 0, "a positive integer", "256")
        _require({"compression.bits": self.bits}, lambda v: v in (0, 4, 8, 32), "8, 4 or 32 (0: the method's default)",
                 "8")  # fmt: skip
        if self.method == "quantize" and self.bits == 32:
            raise P2PLError(
                "compression.method = 'quantize' needs compression.bits = 8 or 4; set --set compression.bits=8"
            )


@dataclass
class AdversaryConfig:
    """Byzantine devices (simulated attackers): who they are and what they do."""

    attack: str = "none"  # none | sync-hijack | scale | sign-flip | gaussian | alie | label-flip | silent | data-size
    fraction: float = 0.0  # share of devices that attack (rounded down), or
    count: int = 0  # an exact number of attackers (wins over fraction when > 0)
    placement: str = "random"  # random | degree (the highest-degree devices)
    scale: float = 0.0  # the attack's strength; 0 = the attack's documented default

    def validate(self, attacks: tuple[str, ...] = ATTACKS) -> None:
        choose("adversary.attack", self.attack, attacks)
        choose("adversary.placement", self.placement, PLACEMENTS)
        _require({"adversary.fraction": self.fraction}, lambda v: 0 <= v < 1, "in [0, 1)", "0.1")
        _require({"adversary.count": self.count}, lambda v: v >= 0, ">= 0", "10")
        _require({"adversary.scale": self.scale}, lambda v: v == v and abs(v) < 1e30, "a finite number", "0")


SYSTEM_LINK_MODELS = ("fixed", "shannon")


@dataclass
class SystemConfig:
    """What rounds cost in seconds and joules on real devices and radios (docs/system-model.md).

    Off by default; when off nothing is computed and the result files are unchanged.
    """

    enabled: bool = False
    # a preset (mcu | rpi4 | phone | jetson-nano) or a .toml / .csv file with the profile fields
    device_profile: str = "rpi4"
    heterogeneity: float = 0.0  # sigma of a log-normal per-device spread of FLOP/s (0: identical)
    link_model: str = "fixed"  # fixed: link_rate_mbps on every link | shannon: from metre distances
    link_rate_mbps: float = 10.0  # fixed: device-to-device rate per link
    link_latency_ms: float = 0.0  # per device-to-device message
    shared_medium: bool = False  # neighbours contend for airtime (one channel per neighbourhood)
    bandwidth_mhz: float = 20.0  # shannon: channel bandwidth
    tx_power_dbm: float = 20.0  # shannon: radiated transmit power
    noise_dbm_hz: float = -174.0  # shannon: thermal noise density at room temperature
    noise_figure_db: float = 7.0  # shannon: receiver noise figure
    path_loss_exponent: float = 3.0  # shannon: log-distance exponent (2 free space, 2.7-3.5 urban)
    reference_loss_db: float = 40.05  # shannon: path loss at 1 m (free space at 2.4 GHz)
    max_rate_mbps: float = 0.0  # shannon: cap at the radio's fastest rate (0: no cap)
    edge_uplink_mbps: float = 10.0  # FedAvg: the edge server's uplink capacity, shared by uploaders
    edge_downlink_mbps: float = 50.0  # FedAvg: the server's broadcast of the averaged model
    edge_latency_ms: float = 20.0  # FedAvg: one-way latency device <-> server
    server_gflops: float = 100.0  # FedAvg: the server's throughput for averaging

    def validate(self) -> None:
        choose("system.link_model", self.link_model, SYSTEM_LINK_MODELS)
        positive = {
            "system.link_rate_mbps": self.link_rate_mbps,
            "system.bandwidth_mhz": self.bandwidth_mhz,
            "system.edge_uplink_mbps": self.edge_uplink_mbps,
            "system.edge_downlink_mbps": self.edge_downlink_mbps,
            "system.server_gflops": self.server_gflops,
            "system.path_loss_exponent": self.path_loss_exponent,
        }
        _require(positive, lambda v: 0 < v < float("inf"), "a positive finite number", "10")
        non_negative = {
            "system.heterogeneity": self.heterogeneity,
            "system.link_latency_ms": self.link_latency_ms,
            "system.edge_latency_ms": self.edge_latency_ms,
            "system.max_rate_mbps": self.max_rate_mbps,
        }
        _require(non_negative, lambda v: 0 <= v < float("inf"), ">= 0", "0")
        finite = {
            "system.tx_power_dbm": self.tx_power_dbm,
            "system.noise_dbm_hz": self.noise_dbm_hz,
            "system.noise_figure_db": self.noise_figure_db,
            "system.reference_loss_db": self.reference_loss_db,
        }
        _require(finite, lambda v: abs(v) < float("inf"), "a finite number", "20")
        if not self.device_profile:
            raise P2PLError("system.device_profile is empty; name a preset (e.g. rpi4) or a .toml / .csv file")


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every k rounds (and always the last)
    after_local: bool = False  # also evaluate after local training (oscillation)
    test_batch: int = 4096  # test samples per evaluation chunk
    # devices evaluated on rounds before the last (a subset drawn from seed and round; the last
    # round evaluates every device); 0 = all. For very large N, where evaluation dominates.
    devices: int = 0


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    checkpoint_every: int = 1  # rounds between resumable checkpoints (0: never)
    progress: bool = True
    tensorboard: bool = False  # TensorBoard event files of every round's metrics in DIR/tensorboard/
    mlflow: bool = False  # every round's metrics to MLflow (its tracking URI: MLFLOW_TRACKING_URI)


@dataclass
class ExperimentConfig:
    algorithm: str = "p2pl"  # p2pl | fedavg | centralized | local | dpsgd | gossip | push-sum
    devices: int = 100
    rounds: int = 50
    seed: int = 0
    engine: str = "vectorized"  # vectorized | reference
    threads: int = 0  # torch CPU threads; 0 = choose from the workload size
    device: str = "auto"  # where the vectorized engine computes: auto (cuda if present) | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    links: LinksConfig = field(default_factory=LinksConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> ExperimentConfig:
        """Check numbers and ranges (names are checked by the registries that use them)."""
        positive_ints: dict[str, float] = {
            "devices": self.devices,
            "rounds": self.rounds,
            "eval.every": self.eval.every,
            "eval.test_batch": self.eval.test_batch,
            "partition.shards_per_device": self.partition.shards_per_device,
        }
        _require(positive_ints, lambda v: v > 0, "a positive integer", "1")
        non_negative: dict[str, float] = {
            "sync.steps": self.sync.steps,
            "output.checkpoint_every": self.output.checkpoint_every,
            "partition.min_size": self.partition.min_size,
            "partition.samples_per_device": self.partition.samples_per_device,
            "threads": self.threads,
            "eval.devices": self.eval.devices,
        }
        _require(non_negative, lambda v: v >= 0, ">= 0", "0")
        positive_floats = {
            "partition.alpha": self.partition.alpha,
            "partition.quantity_sigma": self.partition.quantity_sigma,
        }
        _require(positive_floats, lambda v: v > 0, "> 0", "0.1")
        self.training.validate()
        self.consensus.validate()
        self.adversary.validate()
        self.compression.validate()
        self.system.validate()
        choose("sync.mode", self.sync.mode, SYNC_MODES)
        choose("device", self.device, DEVICES)
        if not 0 < self.data.test_fraction < 1:
            raise P2PLError(f"data.test_fraction must be in (0, 1), got {self.data.test_fraction}")
        if self.partition.samples_per_device > 0 and self.data.device_assignment:
            raise P2PLError(
                "partition.samples_per_device draws each device's samples, but data.device_assignment "
                "already assigns them; set one of the two only"
            )
        if any(h <= 0 for h in self.model.hidden):
            raise P2PLError(f"model.hidden widths must be positive, got {self.model.hidden}")
        return self


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with strict keys and types


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) a TOML value to the annotated field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise P2PLError(f"{key} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise P2PLError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise P2PLError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise P2PLError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise P2PLError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module, not input


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise P2PLError(f"unknown config key {prefix + unknown[0]!r} in {where}; valid keys: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise P2PLError(f"{key} must be a table ([{key}]), got {value!r}")
            kwargs[name] = _from_dict(tp, value, key + ".")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    cfg: ExperimentConfig = _from_dict(ExperimentConfig, data)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, falling back to a bare string."""
    if "=" not in text:
        raise P2PLError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise P2PLError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise P2PLError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise P2PLError(f"config file {str(file)!r} not found; pass an existing TOML file")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise P2PLError(f"config file {str(file)!r} is not valid TOML: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a TOML config (or the defaults), apply ``--set`` overrides, type-check and validate."""
    data = read_toml(path) if path else {}
    apply_overrides(data, overrides or [])
    return config_from_dict(data).validate()


def dumps_config(cfg: ExperimentConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))
