"""The p2pl node runtime: config, checkpoints, the row mix, max-norm flooding, and faults
(kill -9 and restart, a cut link) with real node processes on loopback."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pl.config import load_config
from p2pl.core.params import ParamSpec, init_device_params
from p2pl.core.sync import max_norm_owner
from p2pl.errors import P2PLError
from p2pl.graph.weights import mixing_weights, row_weights
from p2pl.models import build_model
from p2pl.node import checkpoint
from p2pl.node.checkpoint import NodeCheckpoint, NodeHistory
from p2pl.node.config import NodeConfig, load_node_config, node_config_from_dict

# ---------------------------------------------------------------------------- shared helpers
# (test_node_security imports these)


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=x.astype(np.float32), y=y.astype(np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def tiny_data(root: Path, devices: int, per_device: int = 24, features: int = 6, classes: int = 3) -> None:
    """Random clustered data: root/train-<i>.npz per device and root/test.npz."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, features)) * 2
    for i in range(devices):
        y = rng.integers(0, classes, per_device)
        write_npz(root / f"train-{i}.npz", centers[y] + rng.normal(size=(per_device, features)), y)
    y = rng.integers(0, classes, 40)
    write_npz(root / "test.npz", centers[y] + rng.normal(size=(40, features)), y)


def node_config(
    root: Path, index: int, port: int, peers: dict[int, int], extra: dict[str, Any] | None = None
) -> NodeConfig:
    """Node ``dev-<index>`` on 127.0.0.1:port with neighbours {index: port}; tiny MLP, 1 epoch."""
    data: dict[str, Any] = {
        "id": f"dev-{index}",
        "index": index,
        "rounds": 1,
        "seed": 3,
        "listen": f"127.0.0.1:{port}",
        "dir": f"node-{index}",
        "data": {"train": f"train-{index}.npz", "test": "test.npz", "num_classes": 3},
        "model": {"hidden": [5]},
        "training": {"local_epochs": 1, "batch_size": 8},
        "network": {"start_timeout": 30.0, "round_timeout": 30.0, "backoff_max": 1.0},
        "tls": {"insecure": True},
        "peers": [{"id": f"dev-{j}", "index": j, "address": f"127.0.0.1:{p}"} for j, p in sorted(peers.items())],
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return node_config_from_dict(data, root)


def tiny_model_spec(cfg: NodeConfig, features: int = 6) -> tuple[torch.nn.Module, ParamSpec]:
    model = build_model(cfg.model, (features,), 3)
    return model, ParamSpec.of(model)


# ------------------------------------------------------------------------------------ config


def test_node_config_parses_peers_faults_and_resolves_paths(tmp_path: Path) -> None:
    text = """
id = "dev-1"
index = 1
listen = "127.0.0.1:7001"
dir = "out"
[data]
train = "d/train.npz"
test = "/abs/test.npz"
[[peers]]
id = "dev-0"
index = 0
address = "127.0.0.1:7000"
[[peers]]
id = "dev-2"
index = 2
address = "10.0.0.2:7002"
[faults]
drop_links = [{peer = "dev-2", from_round = 3, to_round = 5}]
"""
    path = tmp_path / "node.toml"
    path.write_text(text)
    cfg = load_node_config(path, ["network.round_timeout=5"])
    assert [p.id for p in cfg.peers] == ["dev-0", "dev-2"]
    assert cfg.network.round_timeout == 5.0
    assert cfg.dir == str(tmp_path / "out")
    assert cfg.data.train == str(tmp_path / "d/train.npz") and cfg.data.test == "/abs/test.npz"
    assert cfg.link_cut("dev-2", 4) and not cfg.link_cut("dev-2", 6) and not cfg.link_cut("dev-0", 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rounds": "ten"}, "rounds must be an integer"),
        ({"colour": 1}, "unknown config key 'colour'"),
        ({"network": {"round_timout": 1}}, "unknown config key 'network.round_timout'"),
        ({"peers": [{"id": "dev-0", "index": 0, "address": "nowhere"}]}, "host:port"),
        ({"peers": [{"id": "dev-1", "index": 1, "address": "127.0.0.1:1"}]}, "is this node itself"),
        ({"peers": [{"id": "dev-0", "index": 0, "address": "127.0.0.1:1", "port": 2}]}, "peers[0].port"),
        ({"faults": {"drop_links": [{"peer": "dev-7"}]}}, "not a neighbour"),
        ({"id": "bad id!"}, "bad device id"),
        ({"sync": {"patience": 0}}, "sync.patience must be a positive integer"),
    ],
)
def test_node_config_rejects_bad_input_with_one_line(change: dict[str, Any], message: str) -> None:
    data: dict[str, Any] = {"id": "dev-1", "index": 1, "data": {"train": "a.npz", "test": "b.npz"}}
    data.update(change)
    with pytest.raises(P2PLError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        node_config_from_dict(data)
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------- checkpoint


def test_checkpoint_roundtrip_and_shape_check(tmp_path: Path) -> None:
    h = NodeHistory([0, 1], [0.1, 0.5], [2.0, 1.0], [1.5], [1234], [0.2], [["dev-0", "dev-2"]])
    rng = torch.get_rng_state()
    ckpt = NodeCheckpoint(1, torch.arange(5.0), {"momentum_buffer": torch.ones(1, 5)}, torch.zeros(5), rng, h,
                          {"fingerprint": "abc", "sync": None})  # fmt: skip
    checkpoint.save(tmp_path, ckpt)
    back = checkpoint.load(tmp_path, 5)
    assert back is not None and back.round == 1 and back.meta["fingerprint"] == "abc"
    assert torch.equal(back.params, ckpt.params) and torch.equal(back.optimizer["momentum_buffer"], torch.ones(1, 5))
    assert torch.equal(back.rng_state, rng) and back.sync_params is not None
    assert back.history == h
    with pytest.raises(P2PLError, match="holds"):
        checkpoint.load(tmp_path, 6)
    (tmp_path / checkpoint.CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(P2PLError, match="unreadable"):
        checkpoint.load(tmp_path)
    assert checkpoint.load(tmp_path / "empty") is None


# -------------------------------------------------------------------------------------- mix


@pytest.mark.parametrize("rule", ["uniform", "metropolis", "data-size", "max-degree"])
def test_row_mix_over_live_neighbours_is_the_simulators_row(rule: str) -> None:
    """Device 0 of a 4-cycle hears only from device 1 (device 3 missed the deadline): its row is
    recomputed over what it heard, and the mix equals that row of W on the live graph."""
    from p2pl.node.runtime import mix_row

    g = torch.Generator().manual_seed(0)
    params = torch.randn(4, 30, generator=g)
    sizes = np.array([10.0, 30.0, 20.0, 40.0])
    live_edges = np.array([[0, 1], [1, 2], [2, 3]])  # link 0-3 is down this round
    w = mixing_weights(4, live_edges, rule, sizes).dense()
    degrees = np.bincount(live_edges.ravel(), minlength=4)
    self_w, row = row_weights(rule, 0, 1, [1], [int(degrees[1])], sizes[0], [sizes[1]], int(degrees.max()))
    mixed = mix_row(params[0], [params[1]], self_w, [row[1]])
    expected = torch.from_numpy(w[0]).float() @ params
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert abs(self_w + row[1] - 1.0) < 1e-12  # renormalized: the row still sums to one
    assert torch.equal(mix_row(params[0], [], 1.0, []), params[0])


# --------------------------------------------------------------- max norm sync (in-process)


def run_in_threads(runtimes: list[Any], timeout: float = 120.0) -> list[BaseException]:
    """Run node runtimes on threads of this process; the exceptions they raised."""
    errors: list[BaseException] = []

    def run(rt: Any) -> None:
        try:
            rt.run()
        except BaseException as exc:  # pragma: no cover - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rt,)) for rt in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["verified", "flood"])
def test_max_norm_sync_reaches_every_node_of_a_line(tmp_path: Path, mode: str) -> None:
    """5 nodes on a line, ordered so the max-norm init sits at one end: the claim floods 4 hops
    and the step count is the simulator's (core.sync). Verified: every node checks each claim and
    computes the winner's init itself; flood: the winner's parameters travel hop by hop."""
    from p2pl.node.launch import free_ports
    from p2pl.node.runtime import NodeRuntime

    n = 5
    tiny_data(tmp_path, n)
    probe = node_config(tmp_path, 0, 1, {})
    model, spec = tiny_model_spec(probe)
    inits = init_device_params(model, spec, probe.seed, range(n))
    order = np.argsort(inits.double().norm(dim=1).numpy())  # line position -> device index
    ports = dict(zip(range(n), free_ports(n), strict=True))
    edges = np.array([[int(order[p]), int(order[p + 1])] for p in range(n - 1)])
    neighbours = {i: {int(j): ports[int(j)] for e in edges for j in e if i in e and j != i} for i in range(n)}
    extra = {"sync": {"patience": n - 1, "mode": mode}, "rounds": 1, "network": {"devices": n}}
    runtimes = [NodeRuntime(node_config(tmp_path, i, ports[i], neighbours[i], extra)) for i in range(n)]
    assert not run_in_threads(runtimes)
    expected = max_norm_owner(inits.double().norm(dim=1), edges)
    owner = int(order[-1])
    assert all(int(o) == owner for o in expected.owner)
    for rt in runtimes:
        assert rt.sync is not None and rt.sync.adopted and rt.sync.owner == f"dev-{owner}"
        assert rt.sync.owner_index == owner and rt.sync.norm == pytest.approx(float(inits[owner].double().norm()))
        if mode == "flood":
            assert rt._held is not None and torch.equal(rt._held[1], inits[owner])
        else:  # nothing was fetched: every node holds only claims, and computed the init itself
            assert rt._held is None and rt.client.stats().get("fetch.invalid", 0) == 0
    assert max(rt.sync.steps for rt in runtimes if rt.sync) == expected.steps == n - 1


# ---------------------------------------------------------- faults with real node processes


ROUNDS = 24
FAULTS_OVERRIDES = [
    "devices=4", f"rounds={ROUNDS}", "topology.name='ring'", "model.hidden=[16]",
    "training.local_epochs=1", "output.progress=false",
]  # fmt: skip
CUT = (3, 5)  # rounds during which the link dev-000 <-> dev-001 is cut


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One launch of 4 nodes on a ring: dev-002 is killed with SIGKILL after round 2 and restarted,
    and the link dev-000 <-> dev-001 is cut (on both sides) in rounds 3-5. Each node pauses 0.6 s
    per round (an injected straggler delay) so that the others are still running when dev-002
    is back."""
    from p2pl.node.launch import Launcher, prepare_launch

    out = tmp_path_factory.mktemp("faults")
    cfg = load_config(None, FAULTS_OVERRIDES)
    slow = {"faults": {"round_delay_s": 0.6}}
    cut = {"from_round": CUT[0], "to_round": CUT[1]}
    extra = {i: dict(slow) for i in range(4)}
    extra[0] = {"faults": {"round_delay_s": 0.6, "drop_links": [{"peer": "dev-001", **cut}]}}
    extra[1] = {"faults": {"round_delay_s": 0.6, "drop_links": [{"peer": "dev-000", **cut}]}}
    plan = prepare_launch(cfg, out, network={"round_timeout": 30.0}, node_extra=extra)
    launcher = Launcher(plan)
    try:
        launcher.start()
        deadline = time.monotonic() + 120
        while True:
            status = launcher.statuses()[2]
            if status is not None and status.get("round", 0) >= 2:
                break
            assert time.monotonic() < deadline, "dev-002 never reached round 2"
            assert launcher.procs[2].poll() is None, "dev-002 died on its own"
            time.sleep(0.05)
        launcher.kill(2)  # SIGKILL: no clean-up, no last checkpoint
        killed_rc = launcher.exit_codes[2]
        time.sleep(1.0)
        launcher.start_node(2)
        ok = launcher.wait(timeout=240)
    finally:
        launcher.stop()
    summary = launcher.collect()
    from p2pl.sim.simulator import run_experiment

    sim = run_experiment(cfg)
    ckpts = {d.name: checkpoint.load(d) for d in plan.node_dirs}
    return {"ok": ok, "killed_rc": killed_rc, "summary": summary, "sim": sim.summary, "ckpts": ckpts, "out": out}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_kill9_node_resumes_from_checkpoint_and_run_completes(faulty_run: dict[str, Any]) -> None:
    assert faulty_run["killed_rc"] == -9
    assert faulty_run["ok"], "a node process failed"
    summary, ckpts = faulty_run["summary"], faulty_run["ckpts"]
    assert summary["rounds_done"] == ROUNDS and not summary["failed_devices"]
    assert all(c is not None and c.round == ROUNDS for c in ckpts.values())
    log = (faulty_run["out"] / "nodes" / "dev-002" / "node.log").read_text()
    assert "resumed after round" in log
    # Its neighbours carried on without it (a renormalized row over the one left) ...
    for name in ("dev-001", "dev-003"):
        mixed = ckpts[name].history.mixed
        assert any("dev-002" not in row for row in mixed[2:]), f"{name} never missed dev-002"
        # ... and mixed it in again once it was back: the last rounds all include it.
        assert all("dev-002" in row for row in mixed[-2:]), f"{name} did not mix dev-002 again: {mixed}"
    assert all(row for row in ckpts["dev-002"].history.mixed[-2:])
    # Metrics in the simulator's format, and within 2 points of the simulator's accuracy.
    rows = (faulty_run["out"] / "metrics.csv").read_text().splitlines()
    assert rows[0] == "round,device,accuracy,loss" and len(rows) == 1 + 4 * (ROUNDS + 1)
    node_acc = summary["final"]["accuracy"]["mean"]
    sim_acc = faulty_run["sim"]["final"]["accuracy"]["mean"]
    print(f"kill -9 run: node accuracy {node_acc:.4f}, simulator {sim_acc:.4f}")
    assert abs(node_acc - sim_acc) <= 0.02, (node_acc, sim_acc)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_cut_link_both_sides_carry_on_and_mix_again(faulty_run: dict[str, Any]) -> None:
    ckpts = faulty_run["ckpts"]
    for me, other in (("dev-000", "dev-001"), ("dev-001", "dev-000")):
        mixed = ckpts[me].history.mixed  # entry k-1 = round k
        assert len(mixed) == ROUNDS
        for k in range(CUT[0], CUT[1] + 1):
            assert other not in mixed[k - 1], f"{me} mixed with {other} in cut round {k}"
        assert other in mixed[CUT[0] - 2], f"{me} did not mix with {other} before the cut"
        assert all(other in mixed[k - 1] for k in range(CUT[1] + 1, ROUNDS + 1)), f"{me}: {mixed}"
    # dev-000's other neighbour kept it company through the cut.
    assert all("dev-003" in ckpts["dev-000"].history.mixed[k - 1] for k in range(CUT[0], CUT[1] + 1))
    status = json.loads((faulty_run["out"] / "nodes" / "dev-000" / "status.json").read_text())
    assert status["state"] == "done" and status["round"] == ROUNDS


def test_mailbox_wait_for_any_and_latest_round() -> None:
    """The two mailbox helpers the runtime relies on: "step s or the final value", and the
    highest round a neighbour was heard at (even when its message was too far ahead to keep)."""
    from p2pl.node import wire
    from p2pl.node.mailbox import TOO_FAR_AHEAD, Mailbox

    fp = "0" * 64

    def msg(sender: str, round_index: int, step: int) -> wire.Message:
        return wire.Message(wire.MessageHeader("sync-norm", sender, round_index, step, fp), None, 0)

    box = Mailbox(max_rounds_ahead=2, allowed_senders=["a", "b"])
    done = wire.SYNC_DONE_STEP
    box.put(msg("a", 0, 3))
    box.put(msg("b", 0, done))
    got = box.wait_for_any("sync-norm", 0, [3, done], ["a", "b"], time.monotonic() + 1)
    assert {s: m.step for s, m in got.items()} == {"a": 3, "b": done}
    t0 = time.monotonic()
    assert set(box.wait_for_any("sync-norm", 0, [4, 5], ["a", "b"], t0 + 0.05)) == set()
    assert box.put(msg("a", 7, 0)) == TOO_FAR_AHEAD
    # A claimed round is not believed: it proves only that "a" is past what we would keep.
    assert box.latest_round("a") == 3 and box.latest_round("b") == 0 and box.latest_round("c") == -1
