"""Insiders: a neighbour with a valid certificate lies. Honest nodes (in-process, on loopback)
never crash, keep their clock, and are not taken over; plus the unit-level checks behind it
(resume target, row bounds, rollback, checkpoint integrity, the node dir lock, certificate ids)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pl.core.params import init_device_params
from p2pl.errors import P2PLError
from p2pl.node import certs, checkpoint
from p2pl.node.adversary import AdversaryRuntime, build_runtime
from p2pl.node.checkpoint import NodeCheckpoint, NodeHistory
from p2pl.node.config import NodeConfig
from p2pl.node.launch import free_ports
from p2pl.node.runtime import NodeRuntime, resume_target
from test_node_runtime import node_config, run_in_threads, tiny_data, tiny_model_spec

# ------------------------------------------------------------------------------------ helpers


def _network(
    tmp_path: Path, n: int, edges: list[tuple[int, int]], extra: dict[str, Any], per_node: dict[int, dict[str, Any]]
) -> list[NodeConfig]:
    """Node configs of ``n`` tiny nodes on ``edges`` (insecure loopback), ``per_node`` merged in."""
    tiny_data(tmp_path, n)
    ports = free_ports(n)
    configs = []
    for i in range(n):
        peers = {j: ports[j] for e in edges for j in e if i in e and j != i}
        merged = {**extra, "network": {"devices": n, **extra.get("network", {})}}
        for key, value in per_node.get(i, {}).items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        configs.append(node_config(tmp_path, i, ports[i], peers, merged))
    return configs


class _Outgoing(NodeRuntime):
    """A parameter-level attacker for these tests: transforms the row it sends."""

    def __init__(self, cfg: NodeConfig, transform: Any) -> None:
        super().__init__(cfg)
        self.transform = transform

    def outgoing(self, row: torch.Tensor, round_index: int, step: int) -> torch.Tensor:
        return self.transform(row)


RING4 = [(0, 1), (1, 2), (2, 3), (3, 0)]
COMPLETE4 = [(i, j) for i in range(4) for j in range(i + 1, 4)]


# ------------------------------------------------------------------- max-norm sync hijack


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["verified", "flood"])
def test_sync_hijack_is_ignored_when_verified_and_wins_when_flooded(tmp_path: Path, mode: str) -> None:
    """dev-2 claims a norm 1e6 times its own. Verified: its claim is recomputed and ignored, the
    honest nodes agree on the honest max-norm init. Flood (the paper's form): it serves a scaled
    init that matches its claim, and every honest node adopts it -- why verified is the default."""
    attacker = 2
    cfgs = _network(tmp_path, 4, RING4, {"rounds": 1, "sync": {"mode": mode, "patience": 3}},
                    {attacker: {"adversary": {"attack": "sync-hijack"}}})  # fmt: skip
    runtimes = [build_runtime(c) for c in cfgs]
    assert isinstance(runtimes[attacker], AdversaryRuntime)
    assert not run_in_threads(runtimes)
    model, spec = tiny_model_spec(cfgs[0])
    inits = init_device_params(model, spec, cfgs[0].seed, range(4))
    norms = inits.double().norm(dim=1)
    honest = [i for i in range(4) if i != attacker]
    best_honest = max(honest, key=lambda i: (float(norms[i]), -i))
    for i in honest:
        sync = runtimes[i].sync
        assert sync is not None
        if mode == "verified":
            assert sync.owner_index == best_honest and sync.norm == pytest.approx(float(norms[best_honest]))
        else:
            assert sync.owner_index == attacker and sync.norm > 1e5 * float(norms[attacker])


# ---------------------------------------------------------------- consensus-time attacks


@pytest.mark.integration
@pytest.mark.parametrize("value", ["scale-1e6", "max-float"])
def test_exploding_neighbour_is_dropped_and_nobody_crashes(tmp_path: Path, value: str, caplog: Any) -> None:
    """dev-3 sends its parameters x1e6, or every value 3.4e38 (finite, so they pass the wire):
    honest nodes mix without it (logged), stay finite, and finish; nothing crashes."""
    transform = (lambda r: r * 1e6) if value == "scale-1e6" else (lambda r: torch.full_like(r, 3.4e38))
    cfgs = _network(tmp_path, 4, COMPLETE4, {"rounds": 3, "sync": {"enabled": False}}, {})
    runtimes: list[NodeRuntime] = [NodeRuntime(c) for c in cfgs[:3]] + [_Outgoing(cfgs[3], transform)]
    with caplog.at_level(logging.WARNING, logger="p2pl.node"):
        assert not run_in_threads(runtimes)
    for rt in runtimes[:3]:
        assert rt.state == "done" and bool(torch.isfinite(rt.params).all())
        assert all("dev-3" not in row and len(row) == 2 for row in rt.history.mixed), rt.history.mixed
        assert float(rt.params.double().norm()) < 1e3
    assert any("are out of bounds" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
@pytest.mark.parametrize("claim", [-1, 2**52])
def test_data_size_lies_are_bounded(tmp_path: Path, claim: int) -> None:
    """data-size weights; dev-3 claims a negative data size (invalid: dropped for the round) or
    2^52 samples (counted as at most max_size_ratio times the receiver's own): honest nodes never
    become copies of it."""
    extra = {"rounds": 2, "sync": {"enabled": False}, "consensus": {"weights": "data-size"}}
    cfgs = _network(tmp_path, 4, COMPLETE4, extra, {3: {"adversary": {"attack": "data-size", "scale": claim}}})
    runtimes = [build_runtime(c) for c in cfgs]
    assert not run_in_threads(runtimes)
    attacker = runtimes[3].params[0]
    for rt in runtimes[:3]:
        assert rt.state == "done"
        if claim < 0:
            assert all("dev-3" not in row for row in rt.history.mixed)
        else:
            assert all("dev-3" in row for row in rt.history.mixed)
            # Its weight is at most r / (r + 3) with r = 10: far from being copied.
            assert float((rt.params[0] - attacker).norm()) > 1e-3 * float(attacker.norm())


@pytest.mark.integration
def test_silent_neighbour_stops_being_waited_for(tmp_path: Path, caplog: Any) -> None:
    """dev-2 accepts everything and never sends: its neighbours wait for it (round deadline) for
    network.max_missed_rounds rounds, then stop waiting; they finish every round."""
    extra = {"rounds": 5, "sync": {"enabled": False},
             "network": {"round_timeout": 2.5, "max_missed_rounds": 2}}  # fmt: skip
    cfgs = _network(tmp_path, 3, [(0, 1), (1, 2), (0, 2)], extra, {2: {"adversary": {"attack": "silent"}}})
    runtimes = [build_runtime(c) for c in cfgs]
    with caplog.at_level(logging.INFO, logger="p2pl.node"):
        assert not run_in_threads(runtimes, timeout=180)
    for rt in runtimes[:2]:
        assert rt.state == "done" and len(rt.history.round_time_s) == 5
        assert all(row == [p for p in ("dev-0", "dev-1") if p != rt.cfg.id] for row in rt.history.mixed)
        # It waited for dev-2 until the deadline, or until a probe said dev-2 is past the round:
        waits = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith(f"{rt.cfg.id} round")
            and ("no parameters from ['dev-2']" in r.getMessage() or "not waiting for dev-2" in r.getMessage())
        ]
        assert len(waits) == 2, waits  # rounds 1 and 2 only
    assert any("sent nothing 2 times in a row" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_hello_with_a_far_round_moves_no_clock(tmp_path: Path) -> None:
    """dev-1 answers every hello with round 2^40: its neighbours may stop waiting for it, but they
    train and record every round themselves."""
    extra = {"rounds": 3, "sync": {"enabled": False}}
    cfgs = _network(tmp_path, 3, [(0, 1), (1, 2), (0, 2)], extra, {1: {"adversary": {"attack": "hello-round"}}})
    runtimes = [build_runtime(c) for c in cfgs]
    assert not run_in_threads(runtimes)
    for rt in (runtimes[0], runtimes[2]):
        assert rt.state == "done" and len(rt.history.train_loss) == 3
        assert all(math.isfinite(v) for v in rt.history.train_loss)  # trained in every round


def test_resume_target_needs_a_majority_and_stops_at_the_last_round() -> None:
    assert resume_target(3, [], 10) == 3
    assert resume_target(3, [2**40], 10) == 10  # a lone neighbour: never past the last round
    assert resume_target(3, [5, 5, 2**40], 10) == 5  # one liar among three
    assert resume_target(3, [5, 2**40], 10) == 5  # two: both must agree
    assert resume_target(3, [7, 6, 2**40, 2**40], 10) == 7  # three of four report at least 7
    assert resume_target(6, [5, 5, 5], 10) == 6  # never backwards


# ------------------------------------------------------------------------- training rollback


@pytest.mark.integration
def test_non_finite_training_is_rolled_back(tmp_path: Path) -> None:
    """A learning rate that blows the model up: each round is rolled back to the pre-train row
    (optimizer state too); the node finishes with finite parameters and reports NaN train loss."""
    extra = {"rounds": 2, "sync": {"enabled": False}, "training": {"lr": 1e30, "optimizer": "sgd"}}
    cfgs = _network(tmp_path, 2, [(0, 1)], extra, {})
    runtimes = [NodeRuntime(c) for c in cfgs]
    start = [init_device_params(*tiny_model_spec(c), c.seed, [c.index]) for c in cfgs]
    assert not run_in_threads(runtimes)
    for rt in runtimes:
        assert rt.state == "done" and bool(torch.isfinite(rt.params).all())
        assert all(math.isnan(v) for v in rt.history.train_loss)
        assert all(bool(torch.isfinite(t).all()) for t in rt.trainer.state_tensors().values())
    mean = (start[0] + start[1]) / 2  # only mixing moved them: both hold the mean of the inits
    assert torch.allclose(runtimes[0].params, mean, atol=1e-6)


# ---------------------------------------------------------------------- checkpoint integrity


def _ckpt(params: torch.Tensor) -> NodeCheckpoint:
    h = NodeHistory([0], [0.5], [1.0], [], [], [], [])
    return NodeCheckpoint(0, params, {"momentum": torch.zeros(1, 5)}, None, torch.get_rng_state(), h, {"x": 1})


def test_tampered_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _ckpt(torch.arange(5.0)))
    path = tmp_path / checkpoint.CHECKPOINT
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of a parameter flipped
    path.write_bytes(bytes(data))
    with pytest.raises(P2PLError, match="do not match its integrity hash") as err:
        checkpoint.load(tmp_path, 5)
    assert "\n" not in str(err.value) and "--fresh" in str(err.value)


def test_non_finite_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _ckpt(torch.tensor([0.0, float("nan"), 1.0, 2.0, 3.0])))
    with pytest.raises(P2PLError, match="non-finite values in params"):
        checkpoint.load(tmp_path, 5)


def test_simulator_checkpoint_is_checked_too(tmp_path: Path) -> None:
    from p2pl.metrics import History
    from p2pl.sim import checkpoint as sim_checkpoint

    ck = sim_checkpoint.Checkpoint(1, torch.ones(2, 3), {"m": torch.zeros(2, 3)}, History(), {"seed": 0})
    sim_checkpoint.save(tmp_path, ck)
    back = sim_checkpoint.load(tmp_path)
    assert back is not None and torch.equal(back.params, ck.params)
    path = tmp_path / sim_checkpoint.CHECKPOINT
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(P2PLError, match="integrity hash"):
        sim_checkpoint.load(tmp_path)


# ------------------------------------------------------------------------ identity and dirs


def test_two_nodes_cannot_share_a_directory(tmp_path: Path) -> None:
    cfgs = _network(tmp_path, 2, [(0, 1)], {"dir": "shared"}, {})
    first = NodeRuntime(cfgs[0])
    try:
        with pytest.raises(P2PLError, match="in use by another running node") as err:
            NodeRuntime(cfgs[1])
        assert "\n" not in str(err.value)
    finally:
        first.close()
    NodeRuntime(cfgs[1]).close()  # free again once the first one is gone


def test_certificate_ids_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    certs.init_ca(tmp_path / "ca")
    certs.issue_device_cert(tmp_path / "ca", "dev-01", tmp_path / "a")
    certs.issue_device_cert(tmp_path / "ca", "dev-01", tmp_path / "a")  # re-issuing the same id is fine
    with pytest.raises(P2PLError, match="differs only in case from 'dev-01'"):
        certs.issue_device_cert(tmp_path / "ca", "DEV-01", tmp_path / "b")
    assert not (tmp_path / "b" / "DEV-01.crt").exists()
    certs.init_ca(tmp_path / "ca", force=True)  # a new CA has issued nothing
    certs.issue_device_cert(tmp_path / "ca", "DEV-01", tmp_path / "b")


def test_node_config_refuses_peer_ids_differing_only_in_case(tmp_path: Path) -> None:
    from p2pl.node.config import node_config_from_dict

    data: dict[str, Any] = {"id": "dev-1", "index": 1, "data": {"train": "a.npz", "test": "b.npz"},
                            "peers": [{"id": "DEV-1", "index": 0, "address": "127.0.0.1:1"}]}  # fmt: skip
    with pytest.raises(P2PLError, match="only in case"):
        node_config_from_dict(data)
    data["peers"] = [{"id": "dev-0", "index": 0, "address": "127.0.0.1:1"},
                     {"id": "DEV-0", "index": 2, "address": "127.0.0.1:2"}]  # fmt: skip
    with pytest.raises(P2PLError, match="listed twice"):
        node_config_from_dict(data)


def test_claims_outside_the_network_are_refused(tmp_path: Path) -> None:
    """The claim checks on their own: outside [0, devices), a wrong owner id, a wrong norm."""
    from p2pl.node import wire

    cfgs = _network(tmp_path, 3, [(0, 1), (1, 2)], {}, {})
    rt = NodeRuntime(cfgs[0])
    try:

        def claim(norm: float, owner: str, index: int) -> wire.Message:
            extras = {"norm": norm, "owner": owner, "owner_index": index}
            return wire.Message(wire.MessageHeader("sync-norm", "dev-1", 0, 0, "0" * 64, extras=extras), None, 0)

        true2 = rt.init_norm(2)
        assert rt._read_claim("dev-1", claim(true2, "dev-2", 2)) is not None
        assert rt._read_claim("dev-1", claim(true2 * 1e6, "dev-2", 2)) is None  # false norm
        assert rt._read_claim("dev-1", claim(1.0, "dev-7", 7)) is None  # not in this network
        assert rt._read_claim("dev-1", claim(rt.init_norm(1), "dev-9", 1)) is None  # dev-1 is index 1
        assert set(rt._init_norms) == {1, 2}  # computed once per index claimed, none for index 7
    finally:
        rt.close()


def test_header_metadata_bounds(tmp_path: Path) -> None:
    from p2pl.node import wire

    cfgs = _network(tmp_path, 3, [(0, 1), (1, 2)], {}, {})
    rt = NodeRuntime(cfgs[1])
    try:
        tensors = rt._tensors(torch.zeros(rt.spec.total))

        def row(**extras: int) -> Any:
            return rt._read_row("dev-0", wire.Message(wire.MessageHeader("params", "dev-0", 1, 0, "0" * 64,
                                                                         extras=extras), tensors, 0))  # fmt: skip

        own = rt.data_size
        assert row(degree=1, data_size=own).data_size == own
        assert row(degree=1, data_size=2**52).data_size == 2**52  # valid; the weights bound its effect
        assert row(degree=2, data_size=1).degree == 2
        # data-size weights count a claim within [own / r, own * r] (consensus.max_size_ratio = 10)
        rt.cfg.consensus.weights = "data-size"
        own_row = torch.zeros(rt.spec.total)
        liar = rt._read_row(
            "dev-0",
            wire.Message(
                wire.MessageHeader("params", "dev-0", 1, 0, "0" * 64, extras={"degree": 1, "data_size": 2**52}),
                rt._tensors(torch.ones(rt.spec.total)),
                0,
            ),
        )
        assert liar is not None
        mixed, _ = rt._mix(1, own_row, {"dev-0": liar})
        assert torch.allclose(mixed, torch.full_like(own_row, 10 / 11))  # weight r / (1 + r), not ~1
        for bad in ({"degree": 0, "data_size": 5}, {"degree": 3, "data_size": 5}, {"degree": 1, "data_size": 0},
                    {"degree": 1}):  # fmt: skip
            assert row(**bad) is None, bad  # degree 3 > devices - 1
    finally:
        rt.close()


def test_row_attacks_send_what_the_simulator_sends_and_alie_stays_in_the_simulator(tmp_path: Path) -> None:
    cfgs = _network(tmp_path, 2, [(0, 1)], {"adversary": {"attack": "sign-flip", "scale": 2.0}}, {})
    rt = build_runtime(cfgs[0])
    try:
        row = torch.randn(rt.spec.total)
        assert torch.equal(rt.outgoing(row, 3, 0), row * -2.0)
    finally:
        rt.close()
    cfgs = _network(tmp_path / "alie", 2, [(0, 1)], {"adversary": {"attack": "alie"}}, {})
    with pytest.raises(P2PLError, match="simulator only"):
        build_runtime(cfgs[0])


def test_mix_is_rolled_back_when_even_the_clean_rows_explode(tmp_path: Path) -> None:
    cfgs = _network(tmp_path, 3, [(0, 1), (1, 2)], {}, {})
    rt = NodeRuntime(cfgs[1])
    try:
        from p2pl.node.runtime import _Row

        own = torch.ones(rt.spec.total)
        fine = _Row(own * 2, 1, float(rt.data_size))
        mixed, live = rt._mix(1, own, {"dev-0": fine, "dev-2": fine})
        assert live == ["dev-0", "dev-2"] and torch.allclose(mixed, own * 5 / 3)
        huge = _Row(torch.full_like(own, 3.4e38), 1, float(rt.data_size))
        mixed, live = rt._mix(1, own, {"dev-0": huge, "dev-2": huge})
        assert live == [] and torch.equal(mixed, own)  # nothing sane left: the pre-mix row
        mixed, live = rt._mix(1, own, {"dev-0": fine, "dev-2": huge})
        # the out-of-bounds neighbour's weight (1/3) goes to the device itself: 2/3 own + 1/3 fine
        assert live == ["dev-0"] and torch.allclose(mixed, own * 4 / 3)
    finally:
        rt.close()


@pytest.mark.integration
def test_flooding_neighbour_stays_under_the_mailbox_bound(tmp_path: Path) -> None:
    """A flooding neighbour (in-process): the honest node's mailbox never holds more than the
    documented per-sender bound, and the run finishes."""
    extra = {"rounds": 2, "sync": {"enabled": False}, "network": {"max_rounds_ahead": 2}}
    cfgs = _network(tmp_path, 2, [(0, 1)], extra, {1: {"adversary": {"attack": "flood", "scale": 60}}})
    runtimes = [build_runtime(c) for c in cfgs]
    peak = [0]
    honest = runtimes[0]
    original = honest.mailbox.put

    def put(msg: Any) -> str:
        verdict = original(msg)
        peak[0] = max(peak[0], honest.mailbox.stored_bytes("dev-1"))
        return verdict

    honest.mailbox.put = put  # type: ignore[method-assign]
    assert not run_in_threads(runtimes)
    assert honest.state == "done"
    assert 0 < peak[0] <= honest.mailbox.limits.bytes_per_sender
    rejected = honest.mailbox.rejected
    assert rejected.get("unexpected-kind", 0) > 0 and rejected.get("bad-step", 0) > 0
    assert np.isfinite(honest.params.numpy()).all()
