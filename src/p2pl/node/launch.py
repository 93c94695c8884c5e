"""``p2pl launch``: a whole P2PL network of ``p2pl node`` processes on this machine.

:func:`prepare_launch` turns an experiment config into everything the nodes need, using the
simulator's own recipe (``sim.experiment.build_experiment``) so the nodes train exactly the
simulator's experiment: each device's samples in the order of the simulator's index array
(which keys its shuffles), the common test set, a fresh CA and one certificate per device, and
one ``node.toml`` per device naming its graph neighbours at distinct loopback ports. Layout::

    DIR/config.toml            the experiment config
    DIR/launch.json            ids, ports, topology (for tools and humans)
    DIR/data/test.npz, DIR/data/<id>.npz
    DIR/pki/ca.key, ca.crt     the run's CA (its key never goes into a node directory)
    DIR/nodes/<id>/            node.toml, certs/, node.log, status.json, metrics.csv,
                               checkpoint.safetensors, stdout.log, stderr.log

:class:`Launcher` starts and watches the processes (progress from each node's atomically
written ``status.json``), can kill and restart one (fault tests), stops every process it started
on Ctrl-C, and :meth:`Launcher.collect` merges the nodes' checkpoints into the simulator's
result files (``metrics.csv``, ``rounds.csv``, ``devices.csv``, ``summary.json``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import tomli_w
import torch

from p2pl import atomic
from p2pl.algorithms import make_algorithm
from p2pl.config import ExperimentConfig, config_to_dict, dumps_config
from p2pl.core.consensus import consensus_distance
from p2pl.errors import P2PLError
from p2pl.metrics import History
from p2pl.node import certs, checkpoint
from p2pl.node.adversary import NETWORK_ATTACKS, ROW_ATTACKS
from p2pl.node.checkpoint import NodeCheckpoint
from p2pl.node.config import NODE_ALGORITHMS
from p2pl.node.runtime import read_status

__all__ = ["LaunchPlan", "Launcher", "check_launchable", "device_ids", "free_ports", "prepare_launch"]

ProgressFn = Callable[[int, int, dict[str, float]], None]
_NODE_MAIN = "import sys; from p2pl.cli import main; sys.exit(main(sys.argv[1:]))"


def device_ids(n: int) -> list[str]:
    """``dev-000`` ... : zero-padded so that sorting ids sorts device indices."""
    width = max(3, len(str(n - 1)))
    return [f"dev-{i:0{width}d}" for i in range(n)]


def check_launchable(cfg: ExperimentConfig) -> None:
    """Refuse what the node runtime does not do (it would silently differ from the simulator)."""
    if cfg.algorithm not in NODE_ALGORITHMS:
        raise P2PLError(
            f"p2pl launch runs the algorithms with no server ({', '.join(NODE_ALGORITHMS)}), not "
            f'{cfg.algorithm!r}; set algorithm = "p2pl"'
        )
    links = cfg.links
    if links.model != "static" or links.dropout or links.straggler_prob or links.mobility_speed:
        raise P2PLError(
            "p2pl launch runs over real links: the simulated link faults (links.model, dropout, stragglers, "
            "mobility) do not apply; remove them, or inject faults with the node config's [faults]"
        )
    if cfg.devices < 2:
        raise P2PLError(f"p2pl launch needs at least 2 devices, got {cfg.devices}")
    attack = cfg.adversary.attack
    playable = [*NETWORK_ATTACKS, *ROW_ATTACKS, "label-flip"]
    if attack != "none" and attack not in playable:
        raise P2PLError(
            f"adversary.attack = {attack!r} needs the rows a device hears before it sends and runs in the "
            f"simulator only; p2pl launch plays {', '.join(playable)}"
        )


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free TCP ports (held open together while choosing, so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LaunchPlan:
    out_dir: Path
    cfg: ExperimentConfig
    ids: list[str]
    ports: list[int]
    node_dirs: list[Path]
    configs: list[Path]
    data_sizes: np.ndarray
    histograms: np.ndarray
    edges: np.ndarray
    honest: np.ndarray  # bool [N]: devices that are not attackers
    topology: str
    dataset: str
    num_params: int
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def num_devices(self) -> int:
        return len(self.ids)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _diameter(edges: np.ndarray, n: int) -> int:
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(edges.tolist())
    return max((nx.diameter(graph.subgraph(c)) for c in nx.connected_components(graph) if len(c) > 1), default=1)


def prepare_launch(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    base_port: int = 0,
    network: Mapping[str, Any] | None = None,
    node_extra: Mapping[int, Mapping[str, Any]] | None = None,
) -> LaunchPlan:
    """Write data, certificates and one node config per device into ``out_dir`` (see module doc).

    ``network`` overrides ``[network]`` keys of every node (e.g. ``round_timeout``);
    ``node_extra`` deep-merges extra keys into one device's node config (e.g. ``[faults]``).
    """
    from p2pl.experiment import build_experiment  # the simulator's recipe, so the numbers agree

    check_launchable(cfg)
    exp = build_experiment(cfg)
    out = Path(out_dir).resolve()
    n = exp.num_devices
    ids = device_ids(n)
    ports = [base_port + i for i in range(n)] if base_port else free_ports(n, host)
    edges = np.asarray(exp.topology.edges, dtype=np.int64).reshape(-1, 2)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges.tolist():
        neighbours[u].append(v)
        neighbours[v].append(u)
    max_degree = max((len(nb) for nb in neighbours), default=0)
    # One-way links (a directed topology): who sends to whom. Undirected links run both ways.
    arcs = edges if exp.topology.arcs is None else exp.topology.arcs
    sends = {(int(u), int(v)) for u, v in np.asarray(arcs).tolist()}
    if exp.topology.arcs is None:
        sends |= {(v, u) for u, v in sends}
    honest = exp.honest()

    atomic.write_text(out / "config.toml", dumps_config(cfg))
    ds = exp.dataset
    _write_npz(out / "data" / "test.npz", ds.x_test.numpy(), ds.y_test.numpy())
    for i, part in enumerate(exp.parts):
        # The simulator's order of device i's samples: it keys the node's shuffles.
        rows = torch.from_numpy(np.asarray(part, dtype=np.int64))
        _write_npz(out / "data" / f"{ids[i]}.npz", ds.x_train[rows].numpy(), ds.y_train[rows].numpy())
    pki = out / "pki"
    certs.init_ca(pki, name=f"p2pl-launch-{out.name}"[:64], force=True)

    if cfg.sync.steps > 0:
        sync = {"enabled": cfg.sync.enabled, "mode": cfg.sync.mode, "max_steps": cfg.sync.steps,
                "patience": cfg.sync.steps}  # fmt: skip
    else:
        # Unchanged for diameter steps means the flood has covered the whole component.
        sync = {"enabled": cfg.sync.enabled, "mode": cfg.sync.mode, "max_steps": 0,
                "patience": max(1, _diameter(edges, n))}  # fmt: skip
    net = {"max_degree": max_degree, "start_timeout": 60.0 + 2.0 * n, "devices": n,
           "max_data_size": int(exp.setting.data_sizes.max())}  # fmt: skip
    net |= dict(network or {})
    node_dirs, configs = [], []
    for i in range(n):
        node_dir = out / "nodes" / ids[i]
        certs.issue_device_cert(pki, ids[i], node_dir / "certs", hosts=[host, "localhost"])
        node: dict[str, Any] = {
            "id": ids[i],
            "index": i,
            "rounds": cfg.rounds,
            "seed": cfg.seed,
            "threads": 1,
            "listen": f"{host}:{ports[i]}",
            "dir": ".",
            "checkpoint_every": 1,
            "data": {
                "train": os.path.relpath(out / "data" / f"{ids[i]}.npz", node_dir),
                "test": os.path.relpath(out / "data" / "test.npz", node_dir),
                "num_classes": ds.num_classes,
            },
            "model": config_to_dict(cfg.model),
            "training": config_to_dict(cfg.training),
            "consensus": config_to_dict(cfg.consensus),
            "compression": config_to_dict(cfg.compression),
            "sync": dict(sync),
            "network": dict(net),
            "tls": {"cert_dir": "certs"},
            "eval": {"every": cfg.eval.every, "test_batch": cfg.eval.test_batch},
            "peers": [_peer(ids[j], j, f"{host}:{ports[j]}", (i, j) in sends, (j, i) in sends,
                            sorted(neighbours[j]) if cfg.algorithm == "gossip" else [])
                      for j in sorted(neighbours[i])],
            "algorithm": cfg.algorithm,
        }  # fmt: skip
        if not honest[i] and (cfg.adversary.attack in NETWORK_ATTACKS or cfg.adversary.attack in ROW_ATTACKS):
            # label-flip needs nothing here: the attacker's data file already holds flipped labels.
            node["adversary"] = {"attack": cfg.adversary.attack, "scale": cfg.adversary.scale}
        if node_extra and i in node_extra:
            _merge(node, node_extra[i])
        path = node_dir / "node.toml"
        atomic.write_text(path, tomli_w.dumps(node))
        node_dirs.append(node_dir)
        configs.append(path)
    plan = LaunchPlan(
        out_dir=out,
        cfg=cfg,
        ids=ids,
        ports=ports,
        node_dirs=node_dirs,
        configs=configs,
        data_sizes=exp.setting.data_sizes,
        histograms=exp.label_histograms(),
        edges=edges,
        honest=honest,
        topology=exp.topology.name,
        dataset=ds.name,
        num_params=exp.spec.total,
    )
    info = {"devices": ids, "ports": ports, "topology": plan.topology, "edges": edges.tolist(), "sync": sync}
    atomic.write_text(out / "launch.json", json.dumps(info, indent=1) + "\n")
    return plan


def _peer(peer_id: str, index: int, address: str, sends: bool, hears: bool, neighbours: list[int]) -> dict[str, Any]:
    """One ``[[peers]]`` entry; the one-way flags and the peer's neighbour list only where needed."""
    peer: dict[str, Any] = {"id": peer_id, "index": index, "address": address}
    if not (sends and hears):
        peer |= {"sends": sends, "hears": hears}
    if neighbours:
        peer["neighbours"] = neighbours
    return peer


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.ascontiguousarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
    atomic.write_bytes(path, buf.getvalue())


class Launcher:
    """Starts, watches, kills/restarts and stops the node processes of one :class:`LaunchPlan`."""

    def __init__(self, plan: LaunchPlan, *, fresh: bool = False) -> None:
        self.plan = plan
        self.fresh = fresh
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.exit_codes: dict[int, int] = {}
        self._started_at: float | None = None
        self._ended_at: float | None = None

    def start(self) -> None:
        self._started_at = time.monotonic()
        for i in range(self.plan.num_devices):
            self.start_node(i, fresh=self.fresh)

    def start_node(self, i: int, fresh: bool = False) -> subprocess.Popen[bytes]:
        """Start (or restart: it resumes from its checkpoint) the process of device ``i``."""
        old = self.procs.get(i)
        if old is not None and old.poll() is None:
            raise P2PLError(f"node {self.plan.ids[i]} is still running (pid {old.pid})")
        node_dir = self.plan.node_dirs[i]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-c", _NODE_MAIN, "node", "--config", str(self.plan.configs[i])]
        if fresh:
            cmd.append("--fresh")
        with open(node_dir / "stdout.log", "ab") as out, open(node_dir / "stderr.log", "ab") as err:
            # Own session: a Ctrl-C in the terminal reaches the launcher only, which then stops
            # exactly the processes it started.
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=node_dir, env=env, start_new_session=True)
        self.procs[i] = proc
        self.exit_codes.pop(i, None)
        return proc

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to device ``i``'s process (fault tests) and reap it."""
        proc = self.procs[i]
        if proc.poll() is None:
            proc.send_signal(sig)
        self.exit_codes[i] = proc.wait()

    def statuses(self) -> list[Mapping[str, Any] | None]:
        return [read_status(d) for d in self.plan.node_dirs]

    def poll(self) -> dict[int, int]:
        """Exit codes of the processes that have ended."""
        for i, proc in self.procs.items():
            rc = proc.poll()
            if rc is not None:
                self.exit_codes[i] = rc
        return dict(self.exit_codes)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs.values())

    def wait(self, progress: ProgressFn | None = None, timeout: float | None = None, poll_s: float = 0.25) -> bool:
        """Block until every process has ended (feeding ``progress``); True if all exited 0.

        Raises P2PLError (after stopping everything) if ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        total = self.plan.cfg.rounds
        last = -1
        while self.running():
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise P2PLError(
                    f"the nodes did not finish within {timeout:.0f}s; see {self.plan.out_dir}/nodes/*/node.log"
                )
            if progress is not None:
                done, metrics = self._progress()
                if done != last or metrics:
                    progress(done, total, metrics)
                    last = done
            time.sleep(poll_s)
        self.poll()
        self._ended_at = time.monotonic()
        if progress is not None:
            done, metrics = self._progress()
            progress(done, total, metrics)
        return all(rc == 0 for rc in self.exit_codes.values()) and len(self.exit_codes) == self.plan.num_devices

    def _progress(self) -> tuple[int, dict[str, float]]:
        sts = [s for s in self.statuses() if s is not None]
        if len(sts) < self.plan.num_devices:
            return 0, {}
        rounds = [_number(s.get("round"), 0.0) for s in sts]
        accs = [a for s in sts if (a := _number(s.get("accuracy"), math.nan)) == a]
        metrics = {"acc_mean": float(np.mean(accs)), "acc_min": float(np.min(accs))} if accs else {}
        return int(min(rounds)), metrics

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process this launcher started: SIGTERM, then SIGKILL after ``grace`` seconds."""
        alive = [p for p in self.procs.values() if p.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        end = time.monotonic() + grace
        for proc in alive:
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self.poll()

    @property
    def wall_time_s(self) -> float:
        if self._started_at is None:
            return 0.0
        return (self._ended_at or time.monotonic()) - self._started_at

    def collect(self) -> dict[str, Any]:
        """Merge every node's checkpoint into the simulator's result files in ``out_dir``."""
        return collect_results(self.plan, self.wall_time_s, self.exit_codes)


def _attack_of(config: Path) -> str:
    """The attack a node config plays ("none" if it cannot be read: the node is reported anyway)."""
    from p2pl.config import read_toml

    try:
        section = read_toml(config).get("adversary") or {}
    except P2PLError:
        return "none"
    return str(section.get("attack", "none")) if isinstance(section, dict) else "none"


def _number(value: object, default: float) -> float:
    """A number from a node's status file, or ``default`` (status files are only progress hints)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


def _device_state(plan: LaunchPlan, i: int, exit_codes: Mapping[int, int]) -> tuple[NodeCheckpoint | None, str]:
    """Device ``i``'s checkpoint (None if it has none that can be trusted) and its status:
    ``done``, ``incomplete`` (stopped early), ``failed`` (exited with an error), ``missing`` (no
    checkpoint: never got going) or ``corrupt`` (its checkpoint is refused)."""
    try:
        ckpt = checkpoint.load(plan.node_dirs[i], plan.num_params)
    except P2PLError as err:
        logging.getLogger(__name__).warning("collect: %s", err)
        return None, "corrupt"
    if ckpt is None:
        return None, "missing"
    if exit_codes.get(i, 0) != 0:
        return ckpt, "failed"
    return ckpt, "done" if len(ckpt.history.round_time_s) >= plan.cfg.rounds else "incomplete"


def collect_results(
    plan: LaunchPlan, wall_time_s: float = 0.0, exit_codes: Mapping[int, int] | None = None
) -> dict[str, Any]:
    """Write ``metrics.csv``, ``rounds.csv``, ``devices.csv`` and ``summary.json`` from the nodes'
    checkpoints (full-precision histories), in the simulator's format; returns the summary.

    Every device is reported, whatever became of it: ``devices.csv`` has a ``status`` column and
    ``summary.json`` lists ``devices_missing`` (every device whose status is not ``done``). A
    device without a (trustworthy) checkpoint has NaN accuracy and loss; run-level numbers of a
    round are over the devices that reached it, up to the last round any device finished.
    """
    from p2pl.results import write_results

    cfg, n = plan.cfg, plan.num_devices
    states = [_device_state(plan, i, exit_codes or {}) for i in range(n)]
    ckpts = [c for c, _ in states]
    status = [s for _, s in states]
    done = [c for c in ckpts if c is not None]
    if not done:
        raise P2PLError("no node left a readable checkpoint: none of them got going; see nodes/*/node.log")
    rounds_done = max(len(c.history.round_time_s) for c in done)
    nan = float("nan")
    h = History()
    for r in sorted(set().union(*(c.history.eval_rounds for c in done))):
        at = [c.history.eval_rounds.index(r) if c is not None and r in c.history.eval_rounds else -1 for c in ckpts]
        h.eval_rounds.append(r)
        h.accuracy.append(np.array([c.history.accuracy[p] if c is not None and p >= 0 else nan
                                    for c, p in zip(ckpts, at, strict=True)]))  # fmt: skip
        h.loss.append(np.array([c.history.loss[p] if c is not None and p >= 0 else nan
                                for c, p in zip(ckpts, at, strict=True)]))  # fmt: skip
    final = torch.stack([c.params for c in done])
    for k in range(rounds_done):
        there = [c for c in done if len(c.history.round_time_s) > k]
        # Only the final parameters are kept, so only the last round's distance is known.
        h.consensus_distance.append(consensus_distance(final) if k == rounds_done - 1 else nan)
        h.bytes_sent.append(np.array([c.history.bytes_sent[k] if c is not None and len(c.history.bytes_sent) > k
                                      else 0 for c in ckpts], dtype=np.int64))  # fmt: skip
        h.train_loss.append(np.array([c.history.train_loss[k] if c is not None and len(c.history.train_loss) > k
                                      else nan for c in ckpts], dtype=np.float64))  # fmt: skip
        h.live_links.append(sum(len(c.history.mixed[k]) for c in there) // 2)
        h.active_devices.append(len(there))
        h.round_time_s.append(max(c.history.round_time_s[k] for c in there))
    syncs = [c.meta.get("sync") or {} for c in done]
    failed = sorted(plan.ids[i] for i, rc in (exit_codes or {}).items() if rc != 0)
    facts: dict[str, Any] = {
        "algorithm": cfg.algorithm,
        "engine": "node",
        "training_strategy": "node",
        "devices": n,
        "threads": 1,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "dataset": plan.dataset,
        "model": cfg.model.factory or cfg.model.name,
        "parameters": plan.num_params,
        "topology": plan.topology,
        "edges": len(plan.edges),
        "weights": make_algorithm(cfg.algorithm).own_weights or cfg.consensus.weights,
        "sync": bool(cfg.sync.enabled),
        "sync_mode": cfg.sync.mode,
        "sync_steps": max((int(s.get("steps", 0)) for s in syncs), default=0),
        "sync_bytes_per_device": float(np.mean([int(c.meta.get("sync_bytes", 0)) for c in done])),
        "wall_time_s": float(wall_time_s),
        "failed_devices": failed,
        "devices_missing": {plan.ids[i]: s for i, s in enumerate(status) if s != "done"},
        "sync_owners": sorted({str(s.get("owner")) for s in syncs if s}),
    }
    honest = plan.honest.copy()
    for i in range(n):
        honest[i] &= _attack_of(plan.configs[i]) == "none"  # node_extra may add attackers too
    return write_results(plan.out_dir, h, facts, plan.data_sizes, plan.histograms, honest, status)
