"""``p2pl launch`` and ``p2pl certs``: real node processes on loopback equal the simulator."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from p2pl.cli import main as cli
from p2pl.config import load_config
from p2pl.node import certs, checkpoint
from p2pl.node.config import load_node_config

OVERRIDES = [
    "devices=5", "rounds=3", "topology.radius=0.8", "consensus.weights='metropolis'",
    "model.hidden=[16]", "training.local_epochs=1", "output.progress=false",
]  # fmt: skip


ROBUST_UNDER_ATTACK = [
    ["consensus.aggregation='trimmed-mean'", "consensus.trim=0.25", "adversary.attack='gaussian'", "adversary.count=1"],
    ["consensus.aggregation='clipped'", "adversary.attack='sign-flip'", "adversary.count=1"],
]


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra", [[], *ROBUST_UNDER_ATTACK], ids=["mean", "trimmed-gaussian", "clipped-signflip"])
def test_launched_nodes_equal_the_simulator(tmp_path: Path, extra: list[str]) -> None:
    """No faults, same seeds: every node's parameters after K rounds equal the simulator's, for
    each aggregation rule, with and without an attacking node (one cooperation pipeline)."""
    from p2pl.sim.simulator import run_experiment

    out = tmp_path / "run"
    args = ["launch", "--out", str(out), "--quiet", "--timeout", "240"]
    for o in [*OVERRIDES, *extra]:
        args += ["--set", o]
    assert cli(args) == 0
    cfg = load_config(None, [*OVERRIDES, *extra])
    sim = run_experiment(cfg)
    ids = json.loads((out / "launch.json").read_text())["devices"]
    assert len(ids) == 5
    worst = 0.0
    for i, dev in enumerate(ids):
        ckpt = checkpoint.load(out / "nodes" / dev)
        assert ckpt is not None and ckpt.round == cfg.rounds
        worst = max(worst, float((ckpt.params - sim.params[i]).abs().max()))
        assert len(ckpt.history.mixed[-1]) == int((sim.experiment.topology.edges == i).any(1).sum())
    print(f"max |node - simulator| = {worst:.3g}")
    assert worst <= 1e-5
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algorithm", "devices", "rounds", "final", "sync_steps", "wall_time_s"):
        assert key in summary
    assert summary["sync_steps"] == sim.summary["sync_steps"]
    for stat in ("mean", "min", "max"):
        assert summary["final"]["accuracy"][stat] == pytest.approx(sim.summary["final"]["accuracy"][stat], abs=1e-3)
    assert summary["attackers"] == sim.summary["attackers"] == (1 if extra else 0)
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["round", "device", "accuracy", "loss"]
    assert {(int(r["round"]), int(r["device"])) for r in rows} == {(k, d) for k in range(4) for d in range(5)}
    assert (out / "rounds.csv").exists() and (out / "devices.csv").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm='fedavg'", "runs the algorithms with no server"),
        ("links.model='bernoulli'", "real links"),
        ("links.dropout=0.1", "real links"),
        ("adversary.attack='alie'", "simulator only"),
    ],
)
def test_launch_refuses_what_nodes_do_not_do(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
                                             message: str) -> None:  # fmt: skip
    assert cli(["launch", "--devices", "3", "--out", str(tmp_path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "nodes").exists()


def test_certs_cli_makes_a_ca_and_device_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "pki"
    assert cli(["certs", "init", "--dir", str(ca)]) == 0
    assert cli(["certs", "init", "--dir", str(ca)]) == 2  # never orphan existing certificates silently
    assert "--force" in capsys.readouterr().err
    out = tmp_path / "dev-07"
    assert cli(["certs", "issue", "dev-07", "--ca", str(ca), "--out", str(out), "--host", "10.0.0.7"]) == 0
    tls = certs.load_tls_config(out, "dev-07")
    assert tls.device_id == "dev-07" and not (out / "ca.key").exists()
    assert cli(["certs", "issue", "bad id", "--ca", str(ca), "--out", str(out)]) == 2
    assert cli(["certs", "issue", "dev-08", "--ca", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_node_cli_reports_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text('id = "dev-1"\nindex = 1\nrounds = 0\n[data]\ntrain = "a.npz"\ntest = "b.npz"\n')
    assert cli(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rounds must be a positive integer" in err and err.count("\n") == 1
    assert cli(["node", "--config", str(tmp_path / "missing.toml")]) == 2


def test_collect_reports_every_device_whatever_became_of_it(tmp_path: Path) -> None:
    """dev-000 finished, dev-001 died for good after round 1, dev-002 never started, dev-003's
    checkpoint is corrupt: results are written for all four, each with its status, and the
    run-level rounds go as far as any device got."""
    import numpy as np
    import torch

    from p2pl.node.checkpoint import NodeCheckpoint, NodeHistory
    from p2pl.node.launch import collect_results, prepare_launch

    cfg = load_config(None, [*OVERRIDES[:-1], "devices=4", "rounds=3", "output.progress=false"])
    plan = prepare_launch(cfg, tmp_path)

    def save(i: int, rounds: int) -> None:
        h = NodeHistory(list(range(rounds + 1)), [0.5 + 0.1 * r for r in range(rounds + 1)], [1.0] * (rounds + 1),
                        [0.7] * rounds, [100] * rounds, [0.1] * rounds, [["x"]] * rounds)  # fmt: skip
        ck = NodeCheckpoint(rounds, torch.full((plan.num_params,), float(i)), {}, None, torch.get_rng_state(), h,
                            {"sync": {"owner": "dev-000", "owner_index": 0, "norm": 1.0, "steps": 1}})  # fmt: skip
        checkpoint.save(plan.node_dirs[i], ck)

    save(0, 3)
    save(1, 1)
    save(3, 3)
    path = plan.node_dirs[3] / checkpoint.CHECKPOINT
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    summary = collect_results(plan, 1.0, {0: 0, 1: -9, 2: 1, 3: 0})
    assert summary["rounds_done"] == 3
    assert summary["devices_missing"] == {"dev-001": "failed", "dev-002": "missing", "dev-003": "corrupt"}
    with open(tmp_path / "devices.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["done", "failed", "missing", "corrupt"]
    with open(tmp_path / "metrics.csv") as fh:
        metrics = list(csv.DictReader(fh))
    last = {int(r["device"]): r["accuracy"] for r in metrics if r["round"] == "3"}
    assert last == {0: "0.8"}  # a device that never got there has no row (devices.csv says why)
    assert summary["final"]["accuracy"]["mean"] == pytest.approx(0.8)  # over the devices that got there
    with open(tmp_path / "rounds.csv") as fh:
        per_round = list(csv.DictReader(fh))
    assert [r["active_devices"] for r in per_round[1:]] == ["2", "1", "1"]
    assert np.isclose(float(per_round[1]["accuracy_mean"]), 0.6)
    # Damaged status files are progress hints only: the launcher's progress does not break.
    from p2pl.node.launch import Launcher

    statuses = ['{"round": 2, "accuracy": 0.7}', '{"round": "x", "accuracy": null}', "[1, 2]", '{"round": 3}']
    for d, text in zip(plan.node_dirs, statuses, strict=True):
        (d / "status.json").write_text(text)
    assert Launcher(plan)._progress() == (0, {})  # one status is not an object: as if missing
    (plan.node_dirs[2] / "status.json").write_text('{"round": 1, "accuracy": 0.5}')
    assert Launcher(plan)._progress() == (0, {"acc_mean": 0.6, "acc_min": 0.5})


ATTACKERS = {1: "sync-hijack", 2: "silent", 3: "data-size", 4: "hello-round", 5: "header-bomb", 6: "flood"}


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("compression", ["none", "quantize"])
def test_launched_network_survives_one_insider_of_each_kind(tmp_path: Path, compression: str) -> None:
    """8 real node processes on digits, six of them playing one network-level attack each
    (sync hijack, silent, data-size lie, far hello round, header bomb, flood): no honest node
    fails, the honest ones reach 0.9 accuracy, sync on an honest init, and results list every device.
    With 8-bit quantized messages too: the lies then meet the compressed layout's checks."""
    from p2pl.node.launch import Launcher, prepare_launch

    overrides = ["devices=8", "rounds=4", "topology.name='complete'", "model.hidden=[32]",
                 "training.local_epochs=2", "consensus.weights='data-size'", "output.progress=false",
                 f"compression.method='{compression}'", "compression.bits=8"]  # fmt: skip
    cfg = load_config(None, overrides)
    extra: dict[int, dict[str, object]] = {i: {"sync": {"step_timeout": 4.0}} for i in range(8)}
    for i, attack in ATTACKERS.items():
        extra[i]["adversary"] = {"attack": attack}
    plan = prepare_launch(cfg, tmp_path, network={"round_timeout": 4.0, "start_timeout": 60.0}, node_extra=extra)
    launcher = Launcher(plan)
    try:
        launcher.start()
        launcher.wait(timeout=480)
    finally:
        launcher.stop()
    summary = launcher.collect()
    honest = [i for i in range(8) if i not in ATTACKERS]
    assert all(launcher.exit_codes[i] == 0 for i in honest), launcher.exit_codes
    ckpts = {i: checkpoint.load(plan.node_dirs[i]) for i in range(8)}
    for i in honest:
        ck = ckpts[i]
        assert ck is not None and ck.round == cfg.rounds
        assert ck.meta["sync"]["owner_index"] != 1, "the sync hijacker won"
        assert ck.history.accuracy[-1] >= 0.9, (i, ck.history.accuracy)
        assert all("dev-002" not in row for row in ck.history.mixed)  # the silent one never spoke
    with open(tmp_path / "devices.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8
    assert summary["devices"] == 8
    logs = {i: (plan.node_dirs[i] / "node.log").read_text() for i in honest}
    assert any("false sync claim from dev-001" in text for text in logs.values())
    assert any("rejected send from dev-005" in text for text in logs.values())  # the bombs
    node_cfg = load_node_config(plan.node_dirs[0] / "node.toml")
    assert node_cfg.compression.method == compression  # the honest nodes really sent compressed rows


def test_launch_places_the_experiments_network_attackers_on_their_nodes(tmp_path: Path) -> None:
    from p2pl.errors import P2PLError
    from p2pl.node.config import load_node_config
    from p2pl.node.launch import check_launchable, prepare_launch

    base = [*OVERRIDES[:-1], "devices=4", "output.progress=false", "adversary.count=1"]
    plan = prepare_launch(load_config(None, [*base, "adversary.attack='silent'"]), tmp_path)
    attackers = [i for i in range(4) if not plan.honest[i]]
    assert len(attackers) == 1
    for i, path in enumerate(plan.configs):
        assert (load_node_config(path).adversary.attack == "silent") == (i in attackers)
    with pytest.raises(P2PLError, match="simulator only"):
        check_launchable(load_config(None, [*base, "adversary.attack='alie'"]))
    check_launchable(load_config(None, [*base, "adversary.attack='scale'"]))  # the simulator's transform
    check_launchable(load_config(None, [*base, "adversary.attack='label-flip'"]))  # poisoned data files


def test_node_cli_reports_a_tampered_checkpoint_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from p2pl.node.config import dumps_node_config
    from test_node_runtime import node_config, tiny_data

    tiny_data(tmp_path, 2)
    cfg = node_config(tmp_path, 0, 0, {})
    path = tmp_path / "node.toml"
    path.write_text(dumps_node_config(cfg))
    node_dir = Path(cfg.dir)
    node_dir.mkdir(parents=True, exist_ok=True)
    (node_dir / checkpoint.CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    assert cli(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "WITHOUT TLS" not in line]  # this test runs insecure
    assert len(lines) == 1 and "integrity hash" in lines[0] and "--fresh" in lines[0], err
    status = json.loads((node_dir / "status.json").read_text())
    assert status["state"] == "failed" and "integrity hash" in status["error"]


BASELINES = {
    "dpsgd": ["algorithm='dpsgd'", "topology.radius=0.8"],
    "gossip": ["algorithm='gossip'", "topology.radius=0.8"],
    "push-sum": ["algorithm='push-sum'", "topology.name='directed-random-geometric'", "topology.radius=0"],
}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_launched_baselines_equal_the_simulator(tmp_path: Path) -> None:
    """dpsgd, gossip and push-sum networks as ``p2pl launch`` writes them (node configs, data,
    certificates), side by side, over mutual TLS: every node's parameters after 3
    rounds equal the simulator's (a node exchanges after each local step for dpsgd, draws the
    simulator's peer for gossip, sends one way on a directed graph for push-sum). Push-sum runs
    as real node processes; dpsgd and gossip, meanwhile, as node runtimes on threads of this
    process (eight more processes would spend most of a minute starting Python and torch on a
    2-core machine)."""
    from p2pl.node.launch import Launcher, prepare_launch
    from p2pl.node.runtime import NodeRuntime
    from p2pl.sim.simulator import run_experiment
    from test_node_runtime import run_in_threads

    small = ["devices=4", "rounds=3", "model.hidden=[8]", "training.local_epochs=1", "output.progress=false",
             "partition.samples_per_device=16", "consensus.weights='metropolis'"]  # fmt: skip
    configs = {name: load_config(None, [*small, *extra]) for name, extra in BASELINES.items()}
    plans = {name: prepare_launch(cfg, tmp_path / name) for name, cfg in configs.items()}
    one_way = [p for c in plans["push-sum"].configs for p in load_node_config(c).peers if not (p.sends and p.hears)]
    assert one_way  # the directed graph's one-way links reach the node configs
    processes = Launcher(plans["push-sum"])
    processes.start()
    try:
        threaded = {
            name: [NodeRuntime(load_node_config(c)) for c in plans[name].configs] for name in ("dpsgd", "gossip")
        }
        assert not run_in_threads([rt for group in threaded.values() for rt in group], timeout=240)
        assert processes.wait(timeout=240)
    finally:
        processes.stop()
    for name, cfg in configs.items():
        sim = run_experiment(cfg)
        if name in threaded:
            final = [rt.params[0] for rt in threaded[name]]
        else:
            saved = [checkpoint.load(d) for d in plans[name].node_dirs]
            assert all(c is not None and c.round == cfg.rounds for c in saved)
            final = [c.params for c in saved if c is not None]
        worst = max(float((row - sim.params[i]).abs().max()) for i, row in enumerate(final))
        print(f"{name}: max |node - simulator| = {worst:.3g}")
        assert worst <= 1e-5
    summary = processes.collect()
    assert summary["algorithm"] == "push-sum" and not summary["devices_missing"]
