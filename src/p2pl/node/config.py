"""Configuration of one ``p2pl node`` process: who it is, whom it talks to, what it trains.

A node config is a TOML file with the same strictness as an experiment config (unknown keys and
wrong types are errors naming the key): it reuses :mod:`p2pl.config`'s section dataclasses for
the model, training and consensus, so a node trains exactly what the simulator would. Relative
paths are resolved against the config file's directory, so a node directory can be moved as a
whole. Example (what ``p2pl launch`` writes)::

    id = "dev-003"            # device id = certificate CN
    index = 3                 # global device index: keys its init and its data shuffles
    algorithm = "p2pl"        # p2pl | dpsgd | gossip | push-sum
    rounds = 20
    seed = 0
    listen = "127.0.0.1:7003"
    dir = "."                 # metrics.csv, node.log, status.json, checkpoint.safetensors

    [data]
    train = "../../data/dev-003.npz"   # arrays x, y: this device's samples, in order
    test = "../../data/test.npz"       # the common test set
    num_classes = 10

    [tls]
    cert_dir = "certs"        # ca.crt, dev-003.crt, dev-003.key

    [[peers]]
    id = "dev-002"
    index = 2
    address = "127.0.0.1:7002"
    # sends = false / hears = false: a one-way link (push-sum on a directed topology);
    # neighbours = [1, 3]: dev-002's own neighbours (gossip: when it sends here)

    [faults]                  # optional fault injection (tests, experiments)
    drop_links = [{peer = "dev-002", from_round = 3, to_round = 5}]
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from p2pl import config as experiment_config
from p2pl.config import (
    ATTACKS,
    NODE_ATTACKS,
    SYNC_MODES,
    AdversaryConfig,
    CompressionConfig,
    ConsensusConfig,
    ModelConfig,
    TrainingConfig,
    _from_dict,
    read_toml,
)
from p2pl.errors import P2PLError, choose
from p2pl.node.certs import check_device_id

__all__ = [
    "NODE_ALGORITHMS",
    "LinkFault",
    "NodeConfig",
    "NodeDataConfig",
    "NodeEvalConfig",
    "NodeFaultsConfig",
    "NodeNetworkConfig",
    "NodeSyncConfig",
    "NodeTlsConfig",
    "PeerConfig",
    "dumps_node_config",
    "load_node_config",
    "node_config_from_dict",
]


@dataclass
class PeerConfig:
    id: str = ""  # the neighbour's device id (its certificate CN)
    index: int = -1  # its global device index
    address: str = ""  # host:port it listens on
    # One-way links (push-sum on a directed topology): whether this node's radio reaches the
    # peer (it sends its parameters there) and whether the peer's reaches this node.
    sends: bool = True
    hears: bool = True
    # gossip: the peer's own neighbours' indices (launch writes them), so this node can compute
    # the neighbour the peer sends to in each round (a public, keyed draw) and wait for it.
    neighbours: list[int] = field(default_factory=list)


@dataclass
class NodeDataConfig:
    train: str = ""  # .npz with arrays x, y (or X/y, features/labels): this device's samples
    test: str = ""  # .npz with the common test set
    num_classes: int = 0  # 0: one more than the largest label seen in train and test


@dataclass
class NodeSyncConfig:
    enabled: bool = True  # max norm synchronization before training
    mode: str = "verified"  # verified: flood (norm, owner) claims and check them; flood: parameters travel
    max_steps: int = 0  # stop after this many flooding steps (0: only by patience)
    # Stop once the best (norm, owner) has not changed for this many steps. A value can stay put
    # for a while and still change (the flood front travels one hop per step), so this must be
    # at least the graph's diameter for every node to end with the global maximum; launch sets it.
    patience: int = 8
    step_timeout: float = 30.0  # seconds to wait for the neighbours' value in one step
    fetch_timeout: float = 60.0  # seconds to obtain the winning parameters


@dataclass
class NodeNetworkConfig:
    round_timeout: float = 60.0  # deadline for the neighbours' parameters in a round
    start_timeout: float = 60.0  # how long to wait for neighbours to come up before starting
    send_timeout: float = 10.0  # per message
    max_message_bytes: int = 64 * 1024 * 1024
    max_degree: int = 0  # max-degree weights: the graph's max degree (0: own degree)
    backoff_max: float = 5.0  # longest pause before an unreachable neighbour is tried again
    max_rounds_ahead: int = 8  # buffer at most this many rounds of a faster neighbour
    devices: int = 0  # size of the whole network (launch fills it): bounds claimed indices and degrees
    max_missed_rounds: int = 2  # stop waiting for a neighbour silent this many rounds (or sync steps), until it speaks
    # A trained or mixed row whose L2 norm exceeds this many times the row before it (or 1) is
    # rolled back: non-finite values and exploded parameters never leave a node.
    throttle_mbps: float = 0.0  # pace every send at this rate per link (emulates a slow radio); 0: off
    # dpsgd: the largest local dataset in the network (launch fills it): every device mixes after
    # each of the network's ceil(max_data_size / batch_size) local steps per epoch
    max_data_size: int = 0


@dataclass
class NodeTlsConfig:
    cert_dir: str = "certs"  # holds ca.crt, <id>.crt, <id>.key (p2pl certs issue)
    ca_cert: str = ""  # CA certificate to trust (default: cert_dir/ca.crt)
    insecure: bool = False  # no TLS at all: trusted test hosts only


@dataclass
class NodeEvalConfig:
    every: int = 1  # evaluate every k rounds (and always the last)
    test_batch: int = 4096


@dataclass
class LinkFault:
    peer: str = ""  # neighbour id whose link is cut (both directions, from this node's side)
    from_round: int = 1
    to_round: int = 1  # inclusive


@dataclass
class NodeFaultsConfig:
    drop_links: list[LinkFault] = field(default_factory=list)
    round_delay_s: float = 0.0  # a slow device: pause this long after local training each round


#: The algorithms a node runs: those over the device graph with no server.
NODE_ALGORITHMS = ("p2pl", "dpsgd", "gossip", "push-sum")


@dataclass
class NodeConfig:
    id: str = ""
    index: int = -1
    algorithm: str = "p2pl"  # p2pl | dpsgd | gossip | push-sum (docs/baselines.md)
    rounds: int = 10
    seed: int = 0
    threads: int = 1  # torch CPU threads of this process
    device: str = "auto"  # where this node trains and evaluates: auto (cuda if present) | cpu | cuda
    listen: str = "127.0.0.1:0"
    dir: str = "."  # output directory of this node
    checkpoint_every: int = 1  # rounds between checkpoints (0: never; resuming needs them)
    data: NodeDataConfig = field(default_factory=NodeDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)  # what its params messages carry
    sync: NodeSyncConfig = field(default_factory=NodeSyncConfig)
    # This node's own behaviour when it plays an attacker (tests, robustness experiments);
    # fraction / count / placement are for whole experiments and are ignored here.
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    network: NodeNetworkConfig = field(default_factory=NodeNetworkConfig)
    tls: NodeTlsConfig = field(default_factory=NodeTlsConfig)
    eval: NodeEvalConfig = field(default_factory=NodeEvalConfig)
    faults: NodeFaultsConfig = field(default_factory=NodeFaultsConfig)
    peers: list[PeerConfig] = field(default_factory=list)

    # ------------------------------------------------------------------------------ checks

    def validate(self) -> NodeConfig:
        check_device_id(self.id)
        if self.index < 0:
            raise P2PLError(f"node {self.id}: index must be its global device index >= 0, got {self.index}")
        for key, value in {
            "rounds": self.rounds,
            "eval.every": self.eval.every,
            "eval.test_batch": self.eval.test_batch,
            "sync.patience": self.sync.patience,
            "network.max_rounds_ahead": self.network.max_rounds_ahead,
            "network.max_missed_rounds": self.network.max_missed_rounds,
        }.items():
            if value <= 0:
                raise P2PLError(f"node config: {key} must be a positive integer, got {value}")
        for key, num in {
            "threads": self.threads,
            "checkpoint_every": self.checkpoint_every,
            "sync.max_steps": self.sync.max_steps,
            "network.max_degree": self.network.max_degree,
            "network.devices": self.network.devices,
            "network.throttle_mbps": self.network.throttle_mbps,
            "network.max_data_size": self.network.max_data_size,
        }.items():
            if num < 0:
                raise P2PLError(f"node config: {key} must be >= 0, got {num}")
        for key, sec in {
            "sync.step_timeout": self.sync.step_timeout,
            "sync.fetch_timeout": self.sync.fetch_timeout,
            "network.round_timeout": self.network.round_timeout,
            "network.start_timeout": self.network.start_timeout,
            "network.send_timeout": self.network.send_timeout,
            "network.backoff_max": self.network.backoff_max,
        }.items():
            if not sec > 0:
                raise P2PLError(f"node config: {key} must be > 0, got {sec}")
        choose("device", self.device, experiment_config.DEVICES)
        choose("algorithm (a node runs the graph algorithms)", self.algorithm, NODE_ALGORITHMS)
        self.training.validate()
        self.consensus.validate()
        self.compression.validate()
        self.adversary.validate(ATTACKS + NODE_ATTACKS)
        choose("sync.mode", self.sync.mode, SYNC_MODES)
        if self.network.devices and not self.index < self.network.devices:
            raise P2PLError(f"node config: index {self.index} is outside network.devices = {self.network.devices}")
        if not self.data.train or not self.data.test:
            raise P2PLError("node config: [data] needs train and test .npz files (p2pl launch writes them)")
        _check_address(self.listen, "listen")
        ids: set[str] = set()
        indices: set[int] = set()
        for i, peer in enumerate(self.peers):
            check_device_id(peer.id)
            _check_address(peer.address, f"peers[{i}].address")
            if peer.index < 0:
                raise P2PLError(f"node config: peers[{i}].index must be the peer's device index >= 0")
            if peer.id == self.id or peer.index == self.index:
                raise P2PLError(f"node config: peers[{i}] is this node itself; list only neighbours")
            if peer.id.lower() == self.id.lower():
                raise P2PLError(f"node config: peers[{i}] id {peer.id!r} differs from this node's only in case")
            if peer.id.lower() in {p.lower() for p in ids} or peer.index in indices:
                raise P2PLError(f"node config: peer {peer.id!r} (index {peer.index}) is listed twice")
            ids.add(peer.id)
            indices.add(peer.index)
            if not (peer.sends and peer.hears) and self.algorithm != "push-sum":
                raise P2PLError(
                    f"node config: peers[{i}] is a one-way link (sends/hears), which only algorithm = "
                    f"'push-sum' runs over; link both ways for {self.algorithm!r}"
                )
            if self.algorithm == "gossip" and self.index not in peer.neighbours:
                raise P2PLError(
                    f"node config: gossip needs peers[{i}].neighbours = that peer's neighbour indices "
                    f"(this node's {self.index} among them), to know when it sends here; p2pl launch writes them"
                )
        if self.algorithm == "dpsgd" and self.network.max_data_size < 1:
            raise P2PLError(
                "node config: dpsgd needs network.max_data_size = the network's largest local dataset "
                "(it sets how many local steps every device mixes after); p2pl launch writes it"
            )
        if not 0 <= self.faults.round_delay_s <= 3600:
            raise P2PLError(f"node config: faults.round_delay_s must be in [0, 3600], got {self.faults.round_delay_s}")
        for i, fault in enumerate(self.faults.drop_links):
            if fault.peer not in ids:
                raise P2PLError(f"node config: faults.drop_links[{i}].peer {fault.peer!r} is not a neighbour")
            if not 0 <= fault.from_round <= fault.to_round:
                raise P2PLError(f"node config: faults.drop_links[{i}] needs 0 <= from_round <= to_round")
        return self

    def link_cut(self, peer: str, round_index: int) -> bool:
        """True when the fault injector cuts the link to ``peer`` in this round (0 = sync)."""
        return any(f.peer == peer and f.from_round <= round_index <= f.to_round for f in self.faults.drop_links)

    def fingerprint(self) -> str:
        """Identifies the numbers this node produces (not where it writes or how long it waits)."""
        keep = {k: v for k, v in asdict(self).items() if k in ("id", "index", "seed", "model", "training", "consensus")}
        if self.algorithm != "p2pl":  # P2PL nodes keep the fingerprint their checkpoints already carry
            keep["algorithm"] = self.algorithm
        keep["sync"] = {"enabled": self.sync.enabled, "mode": self.sync.mode}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _check_address(address: str, key: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise P2PLError(f"node config: {key} must be host:port (e.g. 127.0.0.1:7000), got {address!r}")


def _table_list(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise P2PLError(f"node config: {key} must be a list of tables ([[{key}]]), got {value!r}")
    return value


def node_config_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> NodeConfig:
    """Strictly parse a node config dict; relative paths are resolved against ``base_dir``."""
    data = copy.deepcopy(data)
    # Lists of tables are parsed here: p2pl.config's strict parser handles scalar lists only.
    peers_raw = _table_list(data.pop("peers", []), "peers")
    faults = data.get("faults")
    drops_raw: list[dict[str, Any]] = []
    if isinstance(faults, dict) and "drop_links" in faults:
        drops_raw = _table_list(faults.pop("drop_links"), "faults.drop_links")
    cfg: NodeConfig = _from_dict(NodeConfig, data)
    cfg.peers = [_from_dict(PeerConfig, p, f"peers[{i}].") for i, p in enumerate(peers_raw)]
    cfg.faults.drop_links = [_from_dict(LinkFault, d, f"faults.drop_links[{i}].") for i, d in enumerate(drops_raw)]
    if base_dir is not None:
        cfg.dir = _resolve(base_dir, cfg.dir)
        cfg.data.train = _resolve(base_dir, cfg.data.train)
        cfg.data.test = _resolve(base_dir, cfg.data.test)
        cfg.tls.cert_dir = _resolve(base_dir, cfg.tls.cert_dir)
        if cfg.tls.ca_cert:
            cfg.tls.ca_cert = _resolve(base_dir, cfg.tls.ca_cert)
    return cfg.validate()


def _resolve(base: Path, path: str) -> str:
    return str(base / path) if path and not Path(path).is_absolute() else path


def load_node_config(path: str | Path, overrides: list[str] | None = None) -> NodeConfig:
    """Load and validate a node TOML file (``--set key=value`` overrides as for experiments)."""
    from p2pl.config import apply_overrides

    data = read_toml(path)
    apply_overrides(data, overrides or [])
    return node_config_from_dict(data, Path(path).resolve().parent)


def dumps_node_config(cfg: NodeConfig) -> str:
    return tomli_w.dumps(asdict(cfg))
