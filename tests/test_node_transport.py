"""The mutual-TLS transport on real 127.0.0.1 sockets, plus the mailbox it feeds."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("cryptography")

from safetensors.torch import save as st_save

from p2pl.errors import P2PLError
from p2pl.node import certs, transport, wire
from p2pl.node.framing import (
    FRAME,
    OP_SEND,
    SMALL_MESSAGE_BYTES,
    ST_CONTINUE,
    ST_OK,
    ST_REJECTED,
    FramedReader,
    tls_context,
)
from p2pl.node.mailbox import (
    ACCEPTED,
    BAD_STEP,
    DUPLICATE,
    QUOTA,
    STALE,
    TOO_FAR_AHEAD,
    UNEXPECTED_KIND,
    UNKNOWN_SENDER,
    Mailbox,
)
from p2pl.node.transport import PeerClient, PeerServer
from p2pl.node.wire import SYNC_DONE_STEP, MessageHeader, ModelSpec

pytestmark = pytest.mark.integration

MAX = 64 * 1024  # server-side message limit in these tests
TIMEOUT = 3.0


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g)}


SPEC = ModelSpec.from_tensors(_params())


def _msg(sender: str, round: int = 0, step: int = 0, seed: int = 0, kind: str = "params") -> bytes:
    header = MessageHeader(kind, sender, round, step, SPEC.fingerprint)
    return wire.encode(header, _params(seed) if kind in wire.PAYLOAD_KINDS else None)


def _raw(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sI", b"P2PL", len(h)) + h + payload


def _header_dict(sender: str, payload: bytes, **kw) -> dict:
    d = {
        "version": wire.WIRE_VERSION,
        "kind": "params",
        "sender": sender,
        "round": 0,
        "step": 0,
        "fingerprint": SPEC.fingerprint,
        "payload_size": len(payload),
        "extras": {},
    }
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, certs.TlsConfig]:
    root = tmp_path_factory.mktemp("pki")
    certs.init_ca(root / "ca")
    certs.init_ca(root / "evil-ca")
    out: dict[str, certs.TlsConfig] = {}
    for dev in ("dev-a", "dev-b", "dev-c"):
        certs.issue_device_cert(root / "ca", dev, root / "devs")
        out[dev] = certs.load_tls_config(root / "devs", dev)
    # same device name as a legitimate device, but from another CA
    certs.issue_device_cert(root / "evil-ca", "dev-a", root / "evil")
    out["evil-a"] = certs.load_tls_config(root / "evil", "dev-a")
    PKI_CA[:] = [out["dev-a"].ca_cert]
    return out


class Net:
    """Starts servers/clients and stops them all at teardown."""

    def __init__(self, pki: dict[str, certs.TlsConfig]) -> None:
        self.pki = pki
        self.servers: list[PeerServer] = []
        self.clients: list[PeerClient] = []

    def server(self, dev: str, *, addr: str = "127.0.0.1:0", **kw) -> tuple[PeerServer, Mailbox]:
        mailbox = kw.pop("mailbox", None)
        mailbox = Mailbox() if mailbox is None else mailbox  # (an empty Mailbox is falsy)
        tls = kw.pop("tls", self.pki.get(dev))
        srv = PeerServer(dev, addr, tls, mailbox, SPEC, kw.pop("max_message_bytes", MAX), **kw)
        srv.start()
        self.servers.append(srv)
        return srv, mailbox

    def client(self, dev: str, *, tls: certs.TlsConfig | str | None = "default", **kw) -> PeerClient:
        kw.setdefault("backoff_initial", 0.3)
        kw.setdefault("backoff_max", 2.0)
        kw.setdefault("max_message_bytes", 4 * MAX)
        cl = PeerClient(dev, self.pki[dev] if tls == "default" else tls, **kw)  # type: ignore[arg-type]
        self.clients.append(cl)
        return cl

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for s in self.servers:
            s.stop(grace=None)


@pytest.fixture
def net(pki) -> Iterator[Net]:
    n = Net(pki)
    yield n
    n.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RawPeer:
    """Speaks the frame protocol by hand over one TLS connection, to send what PeerClient never would."""

    def __init__(self, address: str, tls: certs.TlsConfig | None, server_name: str = "dev-b") -> None:
        host, port = address.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        if tls is None:  # a client with no certificate at all
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cadata=next(iter(PKI_CA)).decode())
        else:
            ctx = tls_context(tls, server=False)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        self.reader = FramedReader(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, bytes]:
        status, length = self.reader.read_frame(time.monotonic() + TIMEOUT)
        return status, bytes(self.reader.read(length, time.monotonic() + TIMEOUT))

    def head(self, message: bytes) -> tuple[int, bytes]:
        """Announce a large message and send only its head; the server's answer to that."""
        (header_len,) = struct.unpack_from("<I", message, 4)
        self.send(FRAME.pack(OP_SEND, len(message)) + message[: 8 + header_len])
        return self.answer()

    def close(self) -> None:
        self.sock.close()


PKI_CA: list[bytes] = []  # the run's CA certificate, set by the pki fixture


# ------------------------------------------------------------------------------ happy paths


def test_params_round_trip_between_two_servers(net):
    srv_a, box_a = net.server("dev-a")
    srv_b, box_b = net.server("dev-b")
    cl_a, cl_b = net.client("dev-a"), net.client("dev-b")
    assert cl_a.send("dev-b", srv_b.address, _msg("dev-a", seed=1), TIMEOUT)
    assert cl_b.send("dev-a", srv_a.address, _msg("dev-b", seed=2), TIMEOUT)
    got_b = box_b.wait_for("params", 0, 0, {"dev-a"}, time.monotonic() + TIMEOUT)
    got_a = box_a.wait_for("params", 0, 0, {"dev-b"}, time.monotonic() + TIMEOUT)
    for got, sender, seed in ((got_b, "dev-a", 1), (got_a, "dev-b", 2)):
        msg = got[sender]
        assert msg.sender == sender and msg.tensors is not None
        for name, t in _params(seed).items():
            assert torch.equal(msg.tensors[name], t)
    # a retry of the same message is acknowledged but stored once
    assert cl_a.send("dev-b", srv_b.address, _msg("dev-a", seed=1), TIMEOUT)
    assert len(box_b) == 1 and box_b.rejected == {DUPLICATE: 1}
    assert srv_b.stats()["send.accepted"] == 1
    assert cl_a.stats()["send.ok"] == 2


def test_send_many_in_parallel(net):
    (srv_b, box_b), (srv_c, box_c) = net.server("dev-b"), net.server("dev-c")
    cl = net.client("dev-a")
    ok = cl.send_many({"dev-b": srv_b.address, "dev-c": srv_c.address}, _msg("dev-a", 2), TIMEOUT)
    assert ok == {"dev-b": True, "dev-c": True}
    for box in (box_b, box_c):
        box.set_round(2)
        assert set(box.wait_for("params", 2, 0, {"dev-a"}, time.monotonic() + 1)) == {"dev-a"}


def test_fetch_pulls_parameters(net):
    def on_fetch(req: wire.Message) -> bytes | None:
        assert req.kind == "sync-fetch" and req.sender == "dev-a"
        if req.step > 5:
            return None
        header = MessageHeader("sync-params", "dev-b", req.round, req.step, SPEC.fingerprint)
        return wire.encode(header, _params(7))

    srv_b, _ = net.server("dev-b", fetch_handler=on_fetch)
    cl = net.client("dev-a")
    msg = cl.fetch("dev-b", srv_b.address, _msg("dev-a", 0, 1, kind="sync-fetch"), TIMEOUT, SPEC)
    assert msg is not None and msg.kind == "sync-params" and msg.sender == "dev-b" and msg.step == 1
    assert msg.tensors is not None and torch.equal(msg.tensors["fc.bias"], _params(7)["fc.bias"])
    assert cl.fetch("dev-b", srv_b.address, _msg("dev-a", 0, 9, kind="sync-fetch"), TIMEOUT, SPEC) is None
    # impersonated fetch request is refused
    cl_c = net.client("dev-c")
    assert cl_c.fetch("dev-b", srv_b.address, _msg("dev-a", kind="sync-fetch"), TIMEOUT, SPEC) is None
    assert srv_b.stats()["fetch.rejected.auth"] == 1


def test_fetch_without_handler_returns_none(net):
    srv_b, _ = net.server("dev-b")
    cl = net.client("dev-a")
    assert cl.fetch("dev-b", srv_b.address, _msg("dev-a", kind="sync-fetch"), TIMEOUT, SPEC) is None
    assert not cl.is_down("dev-b")  # the peer answered; it is not down


# -------------------------------------------------------------------------------- security


def test_certificate_from_other_ca_is_refused(net):
    srv_b, box_b = net.server("dev-b")
    evil = net.client("dev-a", tls=net.pki["evil-a"], attempts=1)
    t0 = time.monotonic()
    assert evil.send("dev-b", srv_b.address, _msg("dev-a"), TIMEOUT) is False
    assert time.monotonic() - t0 < TIMEOUT
    assert len(box_b) == 0 and box_b.accepted == 0
    assert "send.received" not in srv_b.stats()  # the handshake failed before any handler ran


def test_client_without_certificate_is_refused(net, pki):
    srv_b, box_b = net.server("dev-b")
    with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS 1.3: the refusal arrives on first read
        peer = RawPeer(srv_b.address, None)
        peer.send(FRAME.pack(OP_SEND, len(_msg("dev-a"))) + _msg("dev-a"))
        peer.answer()
    assert len(box_b) == 0 and "send.received" not in srv_b.stats()
    assert srv_b.stats()["handshake.failed"] == 1


def test_a_peer_that_never_finishes_its_handshake_is_dropped(net, monkeypatch):
    """A TCP connection that never speaks TLS holds a server thread only for the handshake timeout."""
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", 0.3)
    srv_b, _ = net.server("dev-b")
    host, port = srv_b.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as silent:
        silent.settimeout(TIMEOUT)
        assert silent.recv(1) == b""  # closed by the server, long before our own timeout
    assert srv_b.stats()["handshake.failed"] == 1
    assert net.client("dev-a").send("dev-b", srv_b.address, _msg("dev-a"), TIMEOUT)


def test_a_sender_holds_few_connections_and_a_new_one_replaces_its_oldest_idle_one(net, pki):
    srv_b, box_b = net.server("dev-b")
    idle = [RawPeer(srv_b.address, pki["dev-a"]) for _ in range(transport.MAX_CONNECTIONS_PER_SENDER)]
    for peer in idle:  # each connection authenticated (a first answer proves the handshake is done)
        peer.send(FRAME.pack(OP_SEND, len(_msg("dev-a"))) + _msg("dev-a"))
        assert peer.answer()[0] in (ST_OK, 1)
    newest = RawPeer(srv_b.address, pki["dev-a"])
    message = _msg("dev-a", round=1)
    box_b.set_round(1)
    newest.send(FRAME.pack(OP_SEND, len(message)) + message)
    assert newest.answer() == (ST_OK, b"")
    idle[0].sock.settimeout(TIMEOUT)
    with pytest.raises((ssl.SSLError, ConnectionError)):  # the oldest idle one was closed
        idle[0].send(FRAME.pack(OP_SEND, len(message)) + message)
        idle[0].answer()
    for peer in [*idle, newest]:
        peer.close()


def test_sender_must_match_certificate(net, caplog):
    srv_b, box_b = net.server("dev-b")
    cl_c = net.client("dev-c")
    with caplog.at_level(logging.WARNING, logger="p2pl.node.transport"):
        assert cl_c.send("dev-b", srv_b.address, _msg("dev-a"), TIMEOUT) is False
    assert "header sender 'dev-a' does not match certificate CN 'dev-c'" in caplog.text
    assert len(box_b) == 0 and srv_b.stats()["send.rejected.auth"] == 1
    assert cl_c.send("dev-b", srv_b.address, _msg("dev-c"), TIMEOUT) is True  # still serving


def test_client_verifies_server_identity(net):
    srv_b, box_b = net.server("dev-b")
    cl = net.client("dev-a", attempts=1)
    # dev-b's server answers at that address, but we meant to reach dev-c
    assert cl.send("dev-c", srv_b.address, _msg("dev-a"), TIMEOUT) is False
    assert len(box_b) == 0


def test_insecure_mode_must_be_explicit(net):
    with pytest.raises(P2PLError, match="insecure=True"):
        PeerServer("dev-a", "127.0.0.1:0", None, Mailbox(), SPEC)
    with pytest.raises(P2PLError, match="insecure=True"):
        PeerClient("dev-a", None)
    with pytest.raises(P2PLError, match="not 'dev-b'"):
        PeerClient("dev-b", net.pki["dev-a"])
    srv, box = net.server("dev-b", tls=None, insecure=True)
    cl = net.client("dev-a", tls=None, insecure=True)
    assert cl.send("dev-b", srv.address, _msg("dev-a"), TIMEOUT)
    assert len(box) == 1


# ---------------------------------------------------------------------- invalid messages


def _nan_message() -> bytes:
    t = _params()
    t["fc.weight"][0, 0] = float("nan")
    p = st_save(t)
    return _raw(_header_dict("dev-a", p), p)


def _crafted(**changes: torch.Tensor) -> bytes:
    t = {**_params(), **changes}
    p = st_save(t)
    return _raw(_header_dict("dev-a", p), p)


def _other_model() -> bytes:
    other = {"w": torch.zeros(3)}
    header = MessageHeader("params", "dev-a", 0, 0, ModelSpec.from_tensors(other).fingerprint)
    return wire.encode(header, other)


BAD_MESSAGES = {
    "malformed header": (lambda: struct.pack("<4sI", b"P2PL", 7) + b"{broken", "not valid UTF-8 JSON"),
    "oversized": (lambda: _msg("dev-a") + b"\x00" * MAX, "exceeds the limit"),
    "wrong size": (lambda: _crafted(**{"fc.bias": torch.zeros(5)}), "does not fit this model"),
    "wrong shape": (lambda: _crafted(**{"fc.weight": torch.zeros(3, 4)}), "has shape [3, 4], expected (4, 3)"),
    "wrong dtype": (lambda: _crafted(**{"fc.bias": torch.zeros(4, dtype=torch.int32)}), "dtype I32"),
    "wrong fingerprint": (_other_model, "different model architecture"),
    "nan values": (_nan_message, "NaN or infinite"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_invalid_message_refused_and_server_keeps_serving(net, caplog, case):
    make, reason = BAD_MESSAGES[case]
    srv_b, box_b = net.server("dev-b")
    cl = net.client("dev-a")
    with caplog.at_level(logging.WARNING, logger="p2pl.node"):
        assert cl.send("dev-b", srv_b.address, make(), TIMEOUT) is False
    server_lines = [r.getMessage() for r in caplog.records if r.name == "p2pl.node.transport"]
    assert any("dev-b rejected send" in line and reason in line for line in server_lines), server_lines
    assert len(box_b) == 0 and box_b.accepted == 0
    assert srv_b.stats()["send.rejected.invalid"] == 1
    assert not cl.is_down("dev-b")  # a refusal is not an outage
    assert cl.send("dev-b", srv_b.address, _msg("dev-a", seed=3), TIMEOUT) is True
    got = box_b.wait_for("params", 0, 0, {"dev-a"}, time.monotonic() + 1)
    assert got["dev-a"].tensors is not None
    assert torch.equal(got["dev-a"].tensors["fc.weight"], _params(3)["fc.weight"])


def test_replayed_old_round_refused(net, caplog):
    srv_b, box_b = net.server("dev-b")
    cl = net.client("dev-a")
    assert cl.send("dev-b", srv_b.address, _msg("dev-a", round=3), TIMEOUT)
    box_b.set_round(4)
    box_b.prune(4)
    with caplog.at_level(logging.INFO, logger="p2pl.node"):
        assert cl.send("dev-b", srv_b.address, _msg("dev-a", round=3), TIMEOUT) is False
    assert "stale" in caplog.text
    assert len(box_b) == 0 and box_b.rejected == {STALE: 1}
    assert srv_b.stats()["send.rejected.mailbox.stale"] == 1
    assert cl.send("dev-b", srv_b.address, _msg("dev-a", round=4), TIMEOUT) is True


def test_message_far_over_the_limit_is_refused_from_its_frame(net):
    srv_b, box_b = net.server("dev-b")
    cl = net.client("dev-a", max_message_bytes=8 * MAX)
    assert cl.send("dev-b", srv_b.address, _msg("dev-a") + b"\x00" * (4 * MAX), TIMEOUT) is False
    assert len(box_b) == 0
    assert cl.send("dev-b", srv_b.address, _msg("dev-a"), TIMEOUT) is True
    # the client itself refuses to send more than its own limit
    small = net.client("dev-c", max_message_bytes=MAX)
    assert small.send("dev-b", srv_b.address, b"\x00" * (MAX + 1), TIMEOUT) is False
    assert small.stats() == {"send.too-large": 1}


# ------------------------------------------------------------------ failures and backoff


def test_backoff_on_dead_peer_then_recovery(net):
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    cl = net.client("dev-a", attempts=2, backoff_initial=0.6, backoff_max=5.0)
    t0 = time.monotonic()
    assert cl.send("dev-b", addr, _msg("dev-a"), TIMEOUT) is False
    assert time.monotonic() - t0 < 1.5  # connection refused: fast, no full timeout
    assert cl.is_down("dev-b")
    t1 = time.monotonic()
    assert cl.send("dev-b", addr, _msg("dev-a"), TIMEOUT) is False  # skipped while down
    assert time.monotonic() - t1 < 0.05
    assert cl.stats()["send.skipped-down"] == 1 and cl.stats()["send.unreachable"] == 1

    srv_b, box_b = net.server("dev-b", addr=addr)
    assert srv_b.port == port
    assert cl.send("dev-b", addr, _msg("dev-a"), TIMEOUT) is False  # still in backoff
    while cl.is_down("dev-b"):
        time.sleep(0.05)
    assert cl.send("dev-b", addr, _msg("dev-a"), TIMEOUT) is True
    assert len(box_b) == 1


def test_backoff_doubles_and_is_capped(net):
    addr = f"127.0.0.1:{_free_port()}"
    cl = net.client("dev-a", attempts=1, backoff_initial=0.1, backoff_max=0.25)
    seen = []
    for _ in range(3):
        while cl.is_down("dev-b"):
            time.sleep(0.01)
        assert cl.send("dev-b", addr, _msg("dev-a"), TIMEOUT) is False
        seen.append(cl.backoff_remaining("dev-b"))
    assert 0.05 < seen[0] <= 0.1 and 0.15 < seen[1] <= 0.2 and 0.2 < seen[2] <= 0.25
    cl.reset_backoff("dev-b")
    assert not cl.is_down("dev-b") and cl.backoff_remaining("dev-b") == 0.0


def test_a_connection_the_server_closed_is_redialled_without_a_failure(net, monkeypatch):
    monkeypatch.setattr(transport, "IDLE_TIMEOUT_S", 0.2)
    srv_b, box_b = net.server("dev-b")
    cl = net.client("dev-a", attempts=1)
    assert cl.send("dev-b", srv_b.address, _msg("dev-a", step=0), TIMEOUT)
    time.sleep(0.5)  # the server drops the idle connection; the client still holds its end
    box_b.set_round(1)
    assert cl.send("dev-b", srv_b.address, _msg("dev-a", round=1), TIMEOUT)
    assert cl.stats() == {"send.ok": 2, "bytes.sent": 2 * len(_msg("dev-a"))} and not cl.is_down("dev-b")


def test_link_filter_drops_messages(net):
    srv_b, box_b = net.server("dev-b")
    cl = net.client("dev-a")
    cl.set_link_filter(lambda peer: peer != "dev-b")
    assert cl.send("dev-b", srv_b.address, _msg("dev-a"), TIMEOUT) is False
    assert cl.fetch("dev-b", srv_b.address, _msg("dev-a", kind="sync-fetch"), TIMEOUT) is None
    assert cl.stats() == {"send.filtered": 1, "fetch.filtered": 1}
    assert "send.received" not in srv_b.stats() and len(box_b) == 0
    assert not cl.is_down("dev-b")
    cl.set_link_filter(None)
    assert cl.send("dev-b", srv_b.address, _msg("dev-a"), TIMEOUT) is True


def test_port_in_use_is_a_clear_error(net):
    srv_b, _ = net.server("dev-b")
    with pytest.raises(P2PLError, match="cannot listen"):
        PeerServer("dev-c", srv_b.address, net.pki["dev-c"], Mailbox(), SPEC, MAX).start()


# ---------------------------------------------------------------------------------- mailbox


def _m(sender: str, round: int = 0, step: int = 0, kind: str = "params") -> wire.Message:
    return wire.decode(_msg(sender, round, step, kind=kind), SPEC)


def test_mailbox_wait_for_returns_partial_at_deadline():
    box = Mailbox()
    box.put(_m("a"))
    t0 = time.monotonic()
    got = box.wait_for("params", 0, 0, {"a", "b", "c"}, t0 + 0.3)
    elapsed = time.monotonic() - t0
    assert set(got) == {"a"} and 0.25 <= elapsed < 1.0
    assert box.wait_for("params", 0, 0, set(), t0) == {}


def test_mailbox_wait_for_wakes_on_arrival():
    box = Mailbox()
    box.put(_m("a"))
    threading.Timer(0.1, lambda: box.put(_m("b"))).start()
    t0 = time.monotonic()
    got = box.wait_for("params", 0, 0, {"a", "b"}, t0 + 5)
    assert set(got) == {"a", "b"} and time.monotonic() - t0 < 2


def test_mailbox_rules_and_counters():
    state = {"round": 2}
    box = Mailbox(lambda: state["round"], max_rounds_ahead=2, consensus_steps=2)
    assert box.put(_m("a", round=2)) == ACCEPTED
    assert box.put(_m("a", round=2)) == DUPLICATE
    assert box.put(_m("a", round=1)) == STALE
    assert box.put(_m("a", round=5)) == TOO_FAR_AHEAD
    assert box.put(_m("a", round=4, step=1)) == ACCEPTED
    assert box.put(_m("a", round=4, step=2)) == BAD_STEP  # only consensus.steps steps are read
    assert box.put(_m("a", round=2, kind="sync-norm")) == BAD_STEP  # sync claims live in round 0
    assert box.put(_m("a", round=2, kind="hello")) == UNEXPECTED_KIND  # answered, never stored
    box.set_allowed_senders({"a"})
    assert box.put(_m("z", round=2)) == UNKNOWN_SENDER
    assert box.accepted == 2
    assert box.rejected == {
        DUPLICATE: 1, STALE: 1, TOO_FAR_AHEAD: 1, UNKNOWN_SENDER: 1, BAD_STEP: 2, UNEXPECTED_KIND: 1,
    }  # fmt: skip
    assert box.stats()["pending"] == 2
    assert box.get("params", 4, 1, "a") is not None and box.get("params", 4, 0, "a") is None
    state["round"] = 4
    assert box.prune(4) == 1 and len(box) == 1
    assert box.put(_m("a", round=2)) == STALE


def test_mailbox_sync_claims_follow_the_sync_step():
    box = Mailbox(max_rounds_ahead=2, sync_steps_ahead=2)
    assert box.put(_m("a", step=0, kind="sync-norm")) == ACCEPTED
    assert box.put(_m("a", step=2, kind="sync-norm")) == ACCEPTED
    assert box.put(_m("a", step=3, kind="sync-norm")) == BAD_STEP  # beyond the sync window
    assert box.put(_m("a", step=SYNC_DONE_STEP, kind="sync-norm")) == ACCEPTED
    box.set_sync_step(2)  # older claims are dropped, newer ones fit
    assert box.get("sync-norm", 0, 0, "a") is None and len(box) == 2
    assert box.put(_m("a", step=4, kind="sync-norm")) == ACCEPTED
    box.set_round(1)  # training started: sync claims are gone
    assert len(box) == 0 and box.stored_bytes() == 0


def test_one_flooding_sender_stays_under_the_bound_and_cannot_crowd_out_others():
    """A sender that tries every key it could: the mailbox keeps at most its quota, under the
    documented bound, and an honest neighbour's message is still accepted."""
    size = len(_msg("a"))
    box = Mailbox(max_rounds_ahead=3, consensus_steps=2, sync_steps_ahead=4, params_message_bytes=size + 4096)
    verdicts = Counter()
    for r in range(0, 12):
        for step in range(4):
            verdicts[box.put(_m("evil", round=r, step=step))] += 1
    for step in [*range(12), SYNC_DONE_STEP]:
        verdicts[box.put(_m("evil", step=step, kind="sync-norm"))] += 1
    limits = box.limits
    assert verdicts[ACCEPTED] == (3 + 1) * 2 + (4 + 1) + 1  # every key in the windows, nothing else
    assert box.stored_bytes("evil") <= limits.bytes_per_sender <= limits.bound(1)
    assert len(box) <= limits.keys_per_sender
    assert box.put(_m("honest", round=0, step=0)) == ACCEPTED
    assert box.stored_bytes() <= limits.bound(2)


def test_mailbox_quota_in_bytes_per_sender():
    """A sender whose messages are larger than the mailbox was sized for hits its byte quota."""
    box = Mailbox(max_rounds_ahead=8, sync_steps_ahead=0, params_message_bytes=1)
    got = [box.put(_m("evil", round=r)) for r in range(9)]
    assert QUOTA in got and got.count(ACCEPTED) < 9
    assert box.stored_bytes("evil") <= box.limits.bytes_per_sender
    assert box.put(_m("honest", round=0)) in (ACCEPTED, QUOTA)  # its own quota, untouched by evil's
    assert box.stored_bytes("honest") <= box.limits.bytes_per_sender


def test_server_refuses_before_decoding_what_the_mailbox_would_not_keep(net, caplog):
    """Stale and unknown-sender messages are refused from the header: the payload is never decoded."""
    srv_b, box = net.server("dev-b", mailbox=Mailbox(allowed_senders={"dev-a"}))
    box.set_round(5)
    cl = net.client("dev-a")
    assert not cl.send("dev-b", srv_b.address, _msg("dev-a", round=1), timeout=TIMEOUT)
    cl_c = net.client("dev-c")
    assert not cl_c.send("dev-b", srv_b.address, _msg("dev-c", round=5), timeout=TIMEOUT)
    stats = srv_b.stats()
    assert stats["send.rejected.mailbox.stale"] == 1 and stats["send.rejected.mailbox.unknown-sender"] == 1
    assert cl.send("dev-b", srv_b.address, _msg("dev-a", round=5), timeout=TIMEOUT)
    assert cl.send("dev-b", srv_b.address, _msg("dev-a", round=5), timeout=TIMEOUT)  # a retry: ok, duplicate
    assert srv_b.stats()["send.duplicate"] == 1 and len(box) == 1


def test_rejections_are_logged_a_bounded_number_of_times(net, caplog):
    """60 stale messages from one neighbour: all counted, only the first 20 logged."""
    srv_b, box = net.server("dev-b")
    box.set_round(10)
    cl = net.client("dev-a")
    with caplog.at_level(logging.INFO, logger="p2pl.node"):
        for step in range(60):
            assert not cl.send("dev-b", srv_b.address, _msg("dev-a", round=1, step=step), TIMEOUT)
    lines = [r for r in caplog.records if r.name == "p2pl.node.transport" and "dev-b rejected send" in r.getMessage()]
    assert srv_b.stats()["send.rejected.mailbox.stale"] == 60
    assert len(lines) == 20 and lines[-1].getMessage().endswith("(#20)")


# ----------------------------------------------------------------------- large messages


def test_large_message_is_admitted_from_its_head_and_bad_ones_are_refused(net, pki):
    """A message over SMALL_MESSAGE_BYTES sends its head first; the server checks sender, mailbox and
    size before it asks for the body (a refused one never sends it), then validates the body.
    Truncated, forged and corrupted messages are refused and the mailbox stays clean."""
    g = torch.Generator().manual_seed(5)
    big = {"w": torch.randn(200, 100, generator=g), "b": torch.randn(200, generator=g)}  # 80 KB
    spec = ModelSpec.from_tensors(big)
    box = Mailbox()
    srv = PeerServer("dev-b", "127.0.0.1:0", pki["dev-b"], box, spec, spec.max_message_bytes())
    srv.start()
    net.servers.append(srv)
    cl = net.client("dev-a", max_message_bytes=spec.max_message_bytes())

    def message(round: int, sender: str = "dev-a", tensors: dict | None = None) -> bytes:
        return wire.encode(MessageHeader("params", sender, round, 0, spec.fingerprint), tensors or big)

    assert len(message(0)) > SMALL_MESSAGE_BYTES
    assert cl.send("dev-b", srv.address, message(0), TIMEOUT)
    got = box.get("params", 0, 0, "dev-a")
    assert got is not None and got.tensors is not None
    assert all(torch.equal(got.tensors[n], t) for n, t in big.items())

    raw = RawPeer(srv.address, pki["dev-a"])
    forged = raw.head(message(1, sender="dev-c"))
    assert forged[0] == ST_REJECTED and b"does not match certificate CN" in forged[1]
    box.set_round(2)
    stale = raw.head(message(1))  # refused from the head: the body is never sent
    assert stale[0] == ST_REJECTED and stale[1].startswith(b"stale")
    lying = message(2)
    raw.send(FRAME.pack(OP_SEND, len(lying) + 8) + lying[: 8 + struct.unpack_from("<I", lying, 4)[0]])
    assert raw.answer()[0] == ST_REJECTED  # the frame and the header disagree on the size
    corrupt = bytearray(message(2))
    corrupt[-4:] = struct.pack("<f", float("nan"))
    assert raw.head(bytes(corrupt)) == (ST_CONTINUE, b"")
    raw.send(bytes(corrupt[8 + struct.unpack_from("<I", corrupt, 4)[0] :]))
    status, reason = raw.answer()
    assert status == ST_REJECTED and b"NaN" in reason
    whole = message(2)  # the same connection is still in step
    assert raw.head(whole) == (ST_CONTINUE, b"")
    raw.send(whole[8 + struct.unpack_from("<I", whole, 4)[0] :])
    assert raw.answer() == (ST_OK, b"")
    truncated = message(3)
    box.set_round(3)
    assert raw.head(truncated) == (ST_CONTINUE, b"")
    raw.send(truncated[-2000:])  # part of the body, then the sender goes away
    raw.close()
    deadline = time.monotonic() + TIMEOUT
    while srv.stats().get("send.rejected.stream", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = srv.stats()
    assert stats["send.rejected.auth"] == 1 and stats["send.rejected.mailbox.stale"] == 1
    assert stats["send.rejected.invalid"] == 2 and stats["send.rejected.stream"] == 1
    assert stats["send.accepted"] == 2 and box.get("params", 3, 0, "dev-a") is None
    assert cl.send("dev-b", srv.address, message(3), TIMEOUT)  # still serving


@pytest.mark.parametrize("method,bits", [("top-k", 4), ("quantize", 8)])
def test_compressed_payload_round_trips_through_the_transport(net, pki, method, bits):
    """A compressed message (int32 indices, 4-bit codes in uint8 / int8 codes, float32 scales),
    large enough to be admitted from its head, arrives validated against the layout and decodes to
    what was sent."""
    from p2pl.core.compress import Compression, Compressor

    num_params = 100_000  # int32 indices
    compressor = Compressor(Compression(method, ratio=0.5, bits=bits, block_size=64), num_params, seed=0)
    row = torch.randn(1, num_params, generator=torch.Generator().manual_seed(1))
    compressor.start(torch.zeros(1, num_params))
    arrays = {name: a[0].contiguous() for name, a in compressor.encode(row, [0], 3, 0).items()}
    spec = wire.ModelSpec.from_layout(compressor.layout.arrays)
    assert {t.dtype for t in spec.tensors} >= {"float32"} and len(spec.tensors) >= 2
    box = Mailbox()
    box.set_round(3)
    srv = PeerServer("dev-b", "127.0.0.1:0", pki["dev-b"], box, spec, spec.max_message_bytes())
    srv.start()
    net.servers.append(srv)
    cl = net.client("dev-a", max_message_bytes=spec.max_message_bytes())
    message = wire.encode(MessageHeader("params", "dev-a", 3, 0, spec.fingerprint), arrays)
    assert len(message) > SMALL_MESSAGE_BYTES  # head first
    assert cl.send("dev-b", srv.address, message, TIMEOUT)
    got = box.get("params", 3, 0, "dev-a")
    assert got is not None and got.tensors is not None
    for name, sent in arrays.items():
        assert got.tensors[name].dtype == sent.dtype and torch.equal(got.tensors[name], sent)
    received = compressor.decode({n: t.unsqueeze(0) for n, t in got.tensors.items()}, [0], 3, 0)
    expected = compressor.decode({n: t.unsqueeze(0) for n, t in arrays.items()}, [0], 3, 0)
    assert torch.equal(received.values, expected.values)


def test_a_stalled_message_is_dropped_and_a_sender_holds_few_large_messages(net, pki, monkeypatch):
    """A neighbour that sends a large message's head and stalls holds one server thread only until
    the message's deadline, and at most MAX_STREAMS_PER_SENDER of them at once."""
    monkeypatch.setattr(transport, "STREAM_GRACE_S", 1.0)
    big = {"w": torch.zeros(200, 100), "b": torch.zeros(200)}
    spec = ModelSpec.from_tensors(big)
    box = Mailbox()
    srv = PeerServer("dev-b", "127.0.0.1:0", pki["dev-b"], box, spec, spec.max_message_bytes())
    srv.start()
    net.servers.append(srv)

    def message(round: int) -> bytes:
        return wire.encode(MessageHeader("params", "dev-a", round, 0, spec.fingerprint), big)

    stalled = [RawPeer(srv.address, pki["dev-a"]) for _ in range(2)]
    for r, peer in enumerate(stalled):  # admitted, then nothing: each holds a slot
        assert peer.head(message(r)) == (ST_CONTINUE, b"")
    third = RawPeer(srv.address, pki["dev-a"])
    status, reason = third.head(message(2))
    assert status == ST_REJECTED and reason.startswith(b"dev-a already has 2 streams in flight")
    for peer in stalled:  # dropped at the deadline, long before our own timeout
        peer.sock.settimeout(10)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            peer.answer()
        peer.close()
    assert third.head(message(3)) == (ST_CONTINUE, b"")  # slots freed
    whole = message(3)
    third.send(whole[8 + struct.unpack_from("<I", whole, 4)[0] :])
    assert third.answer() == (ST_OK, b"")
    third.close()
    stats = srv.stats()
    assert stats["send.rejected.busy"] == 1 and stats["send.rejected.slow"] == 2
    assert box.get("params", 3, 0, "dev-a") is not None and len(box) == 1
