"""Node-level security: a running node refuses bad peers and bad messages, logs each refusal,
keeps running, and its parameters are exactly what the legitimate messages alone produce."""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from p2pl.core.params import init_device_params
from p2pl.core.schedule import Partition
from p2pl.core.train import VectorizedTrainer
from p2pl.node import certs, wire
from p2pl.node.launch import free_ports
from p2pl.node.mailbox import Mailbox
from p2pl.node.runtime import NodeRuntime, load_node_data, mix_row
from p2pl.node.transport import PeerClient, PeerServer
from test_node_runtime import node_config, tiny_data, tiny_model_spec

pytestmark = pytest.mark.integration

LIMIT = 32 * 1024  # the node's message size limit in this test


def _raw(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sI", b"P2PL", len(h)) + h + payload


def _wait(cond, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_node_refuses_and_logs_bad_peers_and_messages(tmp_path: Path) -> None:
    tiny_data(tmp_path, 2)
    pki = tmp_path / "pki"
    certs.init_ca(pki / "ca")
    certs.init_ca(pki / "evil")
    for dev in ("dev-0", "dev-1", "dev-9"):
        certs.issue_device_cert(pki / "ca", dev, pki / "good")
    certs.issue_device_cert(pki / "evil", "dev-1", pki / "bad")
    tls = {d: certs.load_tls_config(pki / "good", d) for d in ("dev-0", "dev-1", "dev-9")}
    evil = certs.load_tls_config(pki / "bad", "dev-1")

    port0, port1 = free_ports(2)
    extra = {
        "rounds": 2,
        "sync": {"enabled": False},
        "tls": {"insecure": False, "cert_dir": str(pki / "good")},
        "network": {"max_message_bytes": LIMIT, "round_timeout": 60.0},
    }
    cfg = node_config(tmp_path, 0, port0, {1: port1}, extra)
    runtime = NodeRuntime(cfg)
    spec = runtime.wire_spec

    # The honest neighbour dev-1, played by the test: it answers hello and collects dev-0's messages.
    inbox = Mailbox(max_rounds_ahead=100)

    def hello(req: wire.Message) -> bytes:
        return wire.encode(wire.MessageHeader("hello", "dev-1", 0, 0, spec.fingerprint))

    server1 = PeerServer("dev-1", f"127.0.0.1:{port1}", tls["dev-1"], inbox, spec, fetch_handler=hello)
    server1.start()
    honest = PeerClient("dev-1", tls["dev-1"])
    stranger = PeerClient("dev-9", tls["dev-9"])
    impostor = PeerClient("dev-1", evil)
    address = f"127.0.0.1:{port0}"

    _, pspec = tiny_model_spec(cfg)
    g = torch.Generator().manual_seed(7)
    theta = {k: torch.randn(1, pspec.total, generator=g)[0] for k in (1, 2)}  # dev-1's honest params

    def message(round_index: int, flat: torch.Tensor, sender: str = "dev-1") -> bytes:
        header = wire.MessageHeader(
            "params", sender, round_index, 0, spec.fingerprint, extras={"degree": 1, "data_size": 24}
        )
        return wire.encode(header, runtime._tensors(flat))

    def header(payload: bytes, **kw: object) -> dict:
        h = {"version": wire.WIRE_VERSION, "kind": "params", "sender": "dev-1", "round": 1, "step": 0,
             "fingerprint": spec.fingerprint, "payload_size": len(payload), "extras": {}}  # fmt: skip
        h.update(kw)
        return h

    errors: list[BaseException] = []

    def run() -> None:
        try:
            runtime.run()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    node = threading.Thread(target=run)
    node.start()
    try:
        _wait(lambda: inbox.get("params", 1, 0, "dev-0") is not None, "dev-0's round-1 parameters")
        # dev-0 now waits for dev-1's round-1 parameters. The attacks:
        assert not impostor.send("dev-0", address, message(1, theta[1] * 100)), "a foreign-CA certificate"
        assert not stranger.send("dev-0", address, message(1, theta[1] * 100, "dev-9")), "not a neighbour"
        assert not stranger.send("dev-0", address, message(1, theta[1] * 100)), "dev-9 claiming to be dev-1"
        names = list(spec.names)
        good = {n: t.contiguous() for n, t in runtime._tensors(theta[1] * 100).items()}
        wrong_shape = dict(good, **{names[0]: torch.zeros(2, 2)})
        nan = dict(good, **{names[0]: torch.full_like(good[names[0]], float("nan"))})
        attacks = {
            "malformed header": b"P2PL" + struct.pack("<I", 9) + b"{not json",
            "oversized": b"P2PL" + b"\0" * (LIMIT + 100),
            "wrong shape": _raw(header(p := st_save(wrong_shape)), p),
            "nan": _raw(header(p := st_save(nan)), p),
        }
        for count, (what, data) in enumerate(attacks.items(), start=1):  # dev-1's own certificate
            assert not honest.send("dev-0", address, data), what
            assert honest.stats()["send.rejected"] == count, what  # refused with a reason, not unreachable
        # The honest message, then a replay of it with other values (a duplicate: first one wins).
        assert honest.send("dev-0", address, message(1, theta[1]))
        assert honest.send("dev-0", address, message(1, theta[1] * 100))  # acked as duplicate, not used
        _wait(lambda: inbox.get("params", 2, 0, "dev-0") is not None, "dev-0's round-2 parameters")
        # Round 2: an old-round replay is stale; then the honest round-2 message.
        assert not honest.send("dev-0", address, message(1, theta[1] * 100))
        assert honest.send("dev-0", address, message(2, theta[2]))
        node.join(60)
    finally:
        for c in (honest, stranger, impostor):
            c.close()
        server1.stop()
        node.join(5)
    assert not errors and runtime.state == "done"

    # The node's parameters are exactly those of training + mixing with the honest messages alone.
    data = load_node_data(cfg)
    model, pspec = tiny_model_spec(cfg)
    params = init_device_params(model, pspec, cfg.seed, [0])
    part = Partition((np.arange(len(data.y_train)),), (0,))
    trainer = VectorizedTrainer(model, pspec, data.x_train, data.y_train, part, cfg.training, cfg.seed)
    for k in (1, 2):
        trainer.train(params, k)
        sent = inbox.get("params", k, 0, "dev-0")
        assert sent is not None and torch.equal(runtime._flat(sent), params[0])
        params = mix_row(params[0], [theta[k]], 0.5, [0.5]).reshape(1, -1)  # uniform row, one neighbour
    assert torch.allclose(runtime.params, params, atol=1e-6)
    assert runtime.history.mixed == [["dev-1"], ["dev-1"]]

    stats = runtime.server.stats()
    assert stats["send.accepted"] == 2
    assert stats.get("send.rejected.invalid", 0) >= 4  # malformed, oversized, shape, NaN
    assert stats.get("send.rejected.auth", 0) >= 1  # dev-9 as dev-1
    assert stats.get("send.rejected.mailbox.unknown-sender", 0) >= 1
    assert stats.get("send.rejected.mailbox.stale", 0) >= 1
    assert stats.get("send.duplicate", 0) >= 1
    log = (Path(cfg.dir) / "node.log").read_text()
    for reason in ("header is not valid UTF-8 JSON", "exceeds the limit", "does not fit this model", "NaN",
                   "does not match", "unknown-sender", "stale"):  # fmt: skip
        assert reason in log, reason
