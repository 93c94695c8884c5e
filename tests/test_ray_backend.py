"""The Ray backend: same numbers as the single-process engine, survives a killed
actor, and runs on a two-node Ray cluster. Needs the optional ray extra."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pl.config import ExperimentConfig, load_config
from p2pl.errors import P2PLError
from p2pl.sim import checkpoint
from p2pl.sim.ray_start import start_ray
from p2pl.sim.simulator import RunResult, run_experiment

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.timeout(300)]

TOL = 1e-5

# Small, but exercising intermittent links, dropout, two consensus steps and the affinity blend.
BUSY = ["devices=30", "rounds=3", "topology.radius=0.4", 'links.model="bernoulli"', "links.p_up=0.7",
        "links.dropout=0.1", "consensus.steps=2", "consensus.affinity=0.8", 'consensus.weights="metropolis"',
        "training.local_epochs=2"]  # fmt: skip


def assert_same_run(ray_run: RunResult, local: RunResult) -> None:
    assert float((ray_run.params - local.params).abs().max()) <= TOL
    for a, b in zip(ray_run.history.accuracy, local.history.accuracy, strict=True):
        assert np.abs(a - b).max() <= 1e-2  # a test sample may flip at a 1e-7 logit tie; rarely
    for a, b in zip(ray_run.history.bytes_sent, local.history.bytes_sent, strict=True):
        assert np.array_equal(a, b)
    np.testing.assert_allclose(ray_run.history.consensus_distance, local.history.consensus_distance, rtol=1e-4)
    np.testing.assert_allclose(
        np.array(ray_run.history.train_loss), np.array(local.history.train_loss), rtol=1e-4, atol=1e-6
    )
    assert ray_run.summary["sync_steps"] == local.summary["sync_steps"]


class TestLocalRay:
    @pytest.fixture(scope="class", autouse=True)
    def local_ray(self) -> Iterator[None]:
        start_ray(ray, num_cpus=2)  # retried when a busy machine makes the raylet slow to start
        yield
        ray.shutdown()

    @pytest.fixture(scope="class")
    def busy(self) -> tuple[ExperimentConfig, RunResult]:
        cfg = load_config(None, BUSY)
        return cfg, run_experiment(cfg)

    @pytest.mark.parametrize("shards", [2, 3])
    def test_matches_single_process_engine(self, shards: int, busy: tuple[ExperimentConfig, RunResult]) -> None:
        cfg, local = busy
        result = run_experiment(cfg, backend="ray", shards=shards)
        assert_same_run(result, local)
        facts = result.summary["ray"]
        assert facts["shards"] == shards and sum(facts["shard_sizes"]) == 30
        # only boundary rows travel: less than every shard fetching every other shard's rows
        all_gather = (shards - 1) * 30 * cfg.rounds * cfg.consensus.steps
        assert 0 < facts["halo_rows_moved"] < all_gather
        assert facts["recoveries"] == 0

    @pytest.mark.parametrize(
        ("aggregation", "attack", "weights"),
        [("trimmed-mean", "alie", "metropolis"), ("redescending", "gaussian", "metropolis"),
         ("median", "data-size", "data-size"), ("mean", "silent", "metropolis")],
    )  # fmt: skip
    def test_robust_rules_and_attackers_match_single_process(self, aggregation: str, attack: str, weights: str) -> None:
        cfg = load_config(None, [*BUSY, f'consensus.aggregation="{aggregation}"', f'adversary.attack="{attack}"',
                                 "adversary.fraction=0.2", f'consensus.weights="{weights}"'])  # fmt: skip
        local = run_experiment(cfg)
        assert local.summary["attackers"] == 6
        assert_same_run(run_experiment(cfg, backend="ray", shards=3), local)

    def test_fedavg_and_checkpoint_resume_across_backends(self, tmp_path: Path) -> None:
        cfg = load_config(None, ['algorithm="fedavg"', "devices=12", "rounds=3", "links.dropout=0.2"])
        local = run_experiment(cfg)
        # interrupted on the local engine after round 1, resumed on Ray from the checkpoint
        run_experiment(cfg, tmp_path, stop_after=1)
        resumed = run_experiment(cfg, tmp_path, backend="ray", shards=2)
        assert resumed.summary["rounds_done"] == 3
        assert_same_run(resumed, local)
        assert (tmp_path / "metrics.csv").read_text().count("\n") == 1 + 4 * 12

    @pytest.mark.parametrize(
        "extra",
        [["algorithm='dpsgd'", "consensus.weights='metropolis'"], ["algorithm='gossip'"],
         ["algorithm='push-sum'", "topology.name='directed-random-geometric'", "topology.radius=0"]],
        ids=["dpsgd", "gossip", "push-sum"],
    )  # fmt: skip
    def test_baselines_match_single_process_and_resume_across_backends(self, extra: list[str], tmp_path: Path) -> None:
        cfg = load_config(None, ["devices=12", "rounds=3", "training.local_epochs=1", "links.dropout=0.1",
                                 "partition.samples_per_device=24", "topology.radius=0.5", *extra])  # fmt: skip
        local = run_experiment(cfg)
        if cfg.algorithm == "push-sum":  # its weights live on the driver: checkpointed, restored there
            run_experiment(cfg, tmp_path, stop_after=1)
            assert_same_run(run_experiment(cfg, tmp_path, backend="ray", shards=2), local)
        else:
            assert_same_run(run_experiment(cfg, backend="ray", shards=2), local)

    def test_evaluating_a_device_subset_matches_the_local_engine(self) -> None:
        cfg = load_config(None, ["devices=20", "rounds=3", "topology.radius=0.45", "eval.devices=6"])
        local, shards = run_experiment(cfg), run_experiment(cfg, backend="ray", shards=2)
        for a, b in zip(shards.history.accuracy, local.history.accuracy, strict=True):
            assert np.array_equal(np.isnan(a), np.isnan(b))  # the same devices evaluated
            assert np.abs(a[~np.isnan(a)] - b[~np.isnan(b)]).max() <= 1e-2
        assert [int((~np.isnan(a)).sum()) for a in shards.history.accuracy] == [6, 6, 6, 20]
        with pytest.raises(P2PLError, match="gives each Ray shard one GPU"):
            run_experiment(
                load_config(None, ["devices=4", "rounds=1", "topology.radius=1.5", "device='cuda'"]), backend="ray"
            )

    def test_killed_actor_is_restored_and_the_run_ends_the_same(self) -> None:
        cfg = load_config(None, ["devices=24", "rounds=4", "topology.radius=0.45"])
        undisturbed = run_experiment(cfg, backend="ray", shards=2)
        killed: list[str] = []

        def kill_one(k: int, total: int, metrics: dict[str, float]) -> None:
            if k == 2:  # between rounds 2 and 3: the actor loses its rows and optimizer state
                names = sorted(n for n in ray.util.list_named_actors() if n.startswith("p2pl-shard-"))
                ray.kill(ray.get_actor(names[-1]), no_restart=False)
                killed.append(names[-1])

        disturbed = run_experiment(cfg, backend="ray", shards=2, progress=kill_one)
        assert killed and disturbed.summary["ray"]["recoveries"] >= 1
        assert torch.equal(disturbed.params, undisturbed.params)  # restored exactly, same math
        assert float((disturbed.params - run_experiment(cfg).params).abs().max()) <= TOL

    def test_unsupported_inputs_are_one_line_errors(self) -> None:
        with pytest.raises(P2PLError, match="backend local"):
            run_experiment(load_config(None, ['algorithm="centralized"', "devices=4", "rounds=1"]), backend="ray")
        cfg = load_config(None, ["devices=4", "rounds=1", "topology.radius=1.5"])
        with pytest.raises(P2PLError, match="--backend ray"):
            run_experiment(cfg, address="127.0.0.1:1")
        with pytest.raises(P2PLError, match="unknown backend"):
            run_experiment(cfg, backend="dask")
        with pytest.raises(P2PLError, match="engine"):
            run_experiment(
                load_config(None, ["devices=4", "rounds=1", "topology.radius=1.5", 'engine="reference"']), backend="ray"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the `ray start --block` processes we started (they stop their own Ray processes);
    only their own process groups are ever signalled."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


_WAIT_FOR_TWO_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="WARNING")
deadline = time.monotonic() + 120
while sum(n["Alive"] for n in ray.nodes()) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
nodes = [n for n in ray.nodes() if n["Alive"]]
print(len(nodes), any("node2" in n["Resources"] for n in nodes))
"""


@pytest.mark.timeout(400)
def test_two_node_cluster_runs_an_experiment_end_to_end(tmp_path: Path) -> None:
    """`ray start --head` + `ray start --address` (a second node with its own resources) on this
    machine; `p2pl run --backend ray --address` in a fresh process runs an experiment across both.
    (Drivers run in their own processes: a process that already ran a local Ray instance keeps
    some of its state.)"""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # A short private temp dir (Ray's socket paths must stay short): nothing shared with other
    # Ray sessions on this machine, and no `ray stop` (which would stop every Ray process here).
    temp_dir = tempfile.mkdtemp(prefix="p2r", dir="/tmp")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            ["ray", "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
             *common], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        _wait_for(lambda: _port_open(port), 90, "the Ray head node")
        procs.append(subprocess.Popen(
            ["ray", "start", f"--address={address}", '--resources={"node2": 1}', *common],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        wait = subprocess.run([sys.executable, "-c", _WAIT_FOR_TWO_NODES, address], env=env,
                              capture_output=True, text=True, timeout=200, check=False)  # fmt: skip
        assert wait.stdout.split()[-2:] == ["2", "True"], wait.stderr[-2000:]

        out = tmp_path / "run"
        sets = ["devices=20", "rounds=2", "topology.radius=0.5"]
        cmd = ["p2pl", "run", "--backend", "ray", "--address", address, "--shards", "2", "--out", str(out),
               "--quiet", *(a for s in sets for a in ("--set", s))]  # fmt: skip
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        # SPREAD placement over two 1-CPU nodes: one shard per node, node2 included
        assert summary["ray"]["nodes"] == 2 and summary["rounds_done"] == 2
        final = checkpoint.load(out)
        assert final is not None
        local = run_experiment(load_config(None, sets))
        assert float((final.params - local.params).abs().max()) <= TOL
    finally:
        _stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
