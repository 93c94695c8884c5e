"""The node wire path against plain TCP on one loopback link, side by side in one run.

"The p2pl path" is what a consensus step costs one link end to end: the sender encodes a
``params`` message (``wire.encode``) and sends it with ``PeerClient.send`` over its persistent
mutual-TLS connection as deployed (a message over 64 KiB sends its head first and its body once
admitted); the receiving ``PeerServer`` -- in another process, as a neighbour is -- authenticates
the sender (TLS CN == header sender), asks the mailbox, receives the message into a buffer of the
announced size, validates the payload (sizes, layout, finiteness) and stores the decoded
tensors, views over the received bytes, in its mailbox (which drops the previous round, as the
runtime does); only then does the sender get its acknowledgement. One message at a time.

It is measured next to, in the same run and interleaved (each repeat runs every path once):

* ``tcp``: a plain socket to a receiver process that reads the same bytes into a buffer and
  answers a 2-byte ack (the reporter's baseline);
* ``tls``: the same over Python's ``ssl`` with the same mutual-TLS certificates (what the
  encryption alone costs: the floor of any encrypted path in Python).

Wall time per message (sequential: send, wait for the ack) and CPU time per message of both
processes (less sensitive to other load on the machine) are reported, as medians of the repeats.

A breakdown of the p2pl work itself (in process): ``wire.encode``, ``wire.decode`` of the
received bytes, its finiteness pass, and what the previous encode/decode (``safetensors``
save/load, ``torch.isfinite``) cost for the same tensors.

Run:  python benchmarks/bench_wire.py                  # default MLP (4,810) and 1M parameters
      python benchmarks/bench_wire.py --repeats 7 --seconds 0.5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from p2pl.config import ModelConfig
from p2pl.models import build_model
from p2pl.node import certs, transport, wire
from p2pl.node.mailbox import Mailbox
from p2pl.node.transport import PeerClient, PeerServer

#: name -> (model config, input shape, classes): the default digits MLP and a ~1M-parameter MLP.
MODELS: dict[str, tuple[ModelConfig, tuple[int, ...], int]] = {
    "default": (ModelConfig("mlp", [64]), (64,), 10),
    "1M": (ModelConfig("mlp", [1024, 192]), (784,), 10),
}
PATHS = ("tcp", "tls", "p2pl")


def _tensors(name: str) -> dict[str, torch.Tensor]:
    cfg, shape, classes = MODELS[name]
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in build_model(cfg, shape, classes).named_parameters()}


# ------------------------------------------------------------------------- receivers (children)


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _socket_receiver(size: int, cert_dir: str | None, ready: Any) -> None:
    """Reads ``size``-byte messages and acks each (``cert_dir``: with mutual TLS)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    ready.put(server.getsockname()[1])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cert_dir is not None:
        d = Path(cert_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(d / "dev-b.crt", d / "dev-b.key")
        ctx.load_verify_locations(d / "ca.crt")
        ctx.verify_mode = ssl.CERT_REQUIRED
        conn = ctx.wrap_socket(conn, server_side=True)
    view = memoryview(bytearray(size))
    while _recv_exact(conn, view):
        conn.sendall(b"ok")


class _ConsumingMailbox(Mailbox):
    """Keeps only the newest round, as the runtime does once it has mixed a round."""

    def put(self, msg: wire.Message) -> str:
        verdict = super().put(msg)
        self.prune(msg.round)
        return verdict


def _p2pl_receiver(cert_dir: str, model: str, ready: Any, stop: Any) -> None:
    torch.set_num_threads(1)
    spec = wire.ModelSpec.from_tensors(_tensors(model))
    limit = spec.max_message_bytes()
    mailbox = _ConsumingMailbox(max_rounds_ahead=10**9, params_message_bytes=limit, allowed_senders=["dev-a"])
    tls = certs.load_tls_config(Path(cert_dir), "dev-b")
    server = PeerServer("dev-b", "127.0.0.1:0", tls, mailbox, spec, limit)
    ready.put(server.start())
    stop.get()
    print(json.dumps({"receiver": server.stats(), "mailbox": mailbox.stats()}), flush=True)
    server.stop(0)


# ----------------------------------------------------------------------------- senders (parent)


class Link:
    """One path to one receiver process; ``send_one()`` sends one message and waits for its ack."""

    def __init__(self, path: str, model: str, cert_dir: Path) -> None:
        self.path = path
        self.tensors = _tensors(model)
        self.spec = wire.ModelSpec.from_tensors(self.tensors)
        self.round = 0
        self.message = self._encode()
        ctx = mp.get_context("spawn")
        ready, self._stop = ctx.Queue(), ctx.Queue()
        limit = self.spec.max_message_bytes()
        if path in ("tcp", "tls"):
            args: tuple[Any, ...] = (len(self.message), str(cert_dir) if path == "tls" else None, ready)
            self.proc = ctx.Process(target=_socket_receiver, args=args)
        else:
            self.proc = ctx.Process(target=_p2pl_receiver, args=(str(cert_dir), model, ready, self._stop))
        self.proc.start()
        port = ready.get(timeout=120)
        self.send_one: Callable[[], None]
        if path in ("tcp", "tls"):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if path == "tls":
                tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                tls_ctx.load_cert_chain(cert_dir / "dev-a.crt", cert_dir / "dev-a.key")
                tls_ctx.load_verify_locations(cert_dir / "ca.crt")
                sock = tls_ctx.wrap_socket(sock, server_hostname="dev-b")
            self.sock = sock
            ack = memoryview(bytearray(2))

            def send_socket() -> None:
                sock.sendall(self.message)
                _recv_exact(sock, ack)

            self.send_one = send_socket
        else:
            self.client = PeerClient("dev-a", certs.load_tls_config(cert_dir, "dev-a"), limit)
            address = f"127.0.0.1:{port}"

            def send_p2pl() -> None:
                # Every message is encoded afresh: a new round each time, as in a run.
                if not self.client.send("dev-b", address, self._encode(), timeout=30):
                    raise RuntimeError(f"{path}: send refused: {self.client.stats()}")

            self.send_one = send_p2pl
        self.send_one()  # connect + handshake outside the timing

    def _encode(self) -> bytes:
        self.round += 1
        header = wire.MessageHeader("params", "dev-a", self.round, 0, self.spec.fingerprint,
                                    extras={"data_size": 600, "degree": 4})  # fmt: skip
        return wire.encode(header, self.tensors)

    def cpu_seconds(self) -> float:
        """CPU time of both ends so far: this process (all threads) and the receiver process.
        Unlike wall time, it barely grows when other processes load the machine."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        receiver = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        own = os.times()
        return own.user + own.system + receiver

    def time_per_message(self, seconds: float) -> tuple[float, float]:
        """Mean wall and CPU (both ends) seconds per message, over as many messages as fit in
        ``seconds`` (at least 3)."""
        count, t0, cpu0 = 0, time.perf_counter(), self.cpu_seconds()
        while True:
            self.send_one()
            count += 1
            elapsed = time.perf_counter() - t0
            if count >= 3 and elapsed >= seconds:
                return elapsed / count, (self.cpu_seconds() - cpu0) / count

    def close(self) -> None:
        if self.path in ("tcp", "tls"):
            self.sock.close()
        else:
            self.client.close()
            self._stop.put(None)
        self.proc.join(timeout=30)


def _ms(fn: Callable[[], object], seconds: float = 0.3) -> float:
    fn()
    count, t0 = 0, time.perf_counter()
    while count < 5 or time.perf_counter() - t0 < seconds:
        fn()
        count += 1
    return 1e3 * (time.perf_counter() - t0) / count


def breakdown(model: str) -> dict[str, float]:
    """ms of each piece of p2pl work for one message of ``model`` (this process, one thread)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = _tensors(model)
    spec = wire.ModelSpec.from_tensors(tensors)
    header = wire.MessageHeader("params", "dev-a", 1, 0, spec.fingerprint, extras={"data_size": 600, "degree": 4})
    message = wire.encode(header, tensors)
    payload = st_save(tensors)
    received = bytearray(message)  # as a reassembled stream arrives

    def old_encode() -> None:
        for t in tensors.values():
            bool(torch.isfinite(t).all())
        st_save(tensors)

    def old_decode() -> None:
        for t in st_load(bytes(payload)).values():
            bool(torch.isfinite(t).all())

    def finite() -> None:
        for t in tensors.values():
            wire._all_finite(t)

    class Forgetful(Mailbox):  # stores, then drops it, so the same message is new every time
        def put(self, msg: wire.Message) -> str:
            verdict = super().put(msg)
            self.prune(msg.round + 1)
            return verdict

    limit = spec.max_message_bytes()
    server = PeerServer("dev-b", "127.0.0.1:0", None, Forgetful(), spec, limit, insecure=True)
    local = transport._Connection(socket.socket(), "local", None)  # insecure: no certificate to check

    def receive() -> None:  # what the server does with the bytes of one message once received
        msg = server._validate(bytearray(message), local, limit, store=True)
        assert server.mailbox.put(msg) == "accepted"

    return {
        "encode_ms": _ms(lambda: wire.encode(header, tensors)),
        "receive_ms (server: header, mailbox, decode, store; no network)": _ms(receive),
        "decode_ms (bytes in, one copy)": _ms(lambda: wire.decode(message, spec)),
        "decode_ms (bytearray in, views)": _ms(lambda: wire.decode(received, spec)),
        "finite_check_ms": _ms(finite),
        "previous_encode_ms (isfinite + safetensors.save)": _ms(old_encode),
        "previous_decode_ms (copy + safetensors.load + isfinite)": _ms(old_decode),
    }


def bench(model: str, repeats: int, seconds: float, cert_dir: Path) -> dict[str, Any]:
    links = {path: Link(path, model, cert_dir) for path in PATHS}
    per_message: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu_per_message: dict[str, list[float]] = {path: [] for path in PATHS}
    try:
        for _ in range(repeats):
            for path in PATHS:  # interleaved: every repeat runs every path once
                wall, cpu = links[path].time_per_message(seconds)
                per_message[path].append(wall)
                cpu_per_message[path].append(cpu)
    finally:
        for link in links.values():
            link.close()
    size = len(links["p2pl"].message)
    ms = {path: 1e3 * statistics.median(v) for path, v in per_message.items()}
    mbps = {path: size / (m / 1e3) / 1e6 for path, m in ms.items()}
    row: dict[str, Any] = {"model": model, "params": links["p2pl"].spec.numel(), "message_bytes": size,
                           "repeats": repeats}  # fmt: skip
    row |= {f"{p}_ms_per_msg": round(m, 4) for p, m in ms.items()}
    row |= {f"{p}_MBps": round(v, 1) for p, v in mbps.items()}
    row |= {f"{p}_cpu_ms_per_msg (both ends)": round(1e3 * statistics.median(v), 4) for p, v in cpu_per_message.items()}
    row |= {f"p2pl_over_{p}_throughput": round(mbps["p2pl"] / mbps[p], 3) for p in PATHS[:-1]}
    row |= {k: round(v, 4) for k, v in breakdown(model).items()}
    return row


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (the median is reported)")
    parser.add_argument("--seconds", type=float, default=0.4, help="time per path per repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("load average:", _load(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        certs.init_ca(root / "ca")
        for dev in ("dev-a", "dev-b"):
            certs.issue_device_cert(root / "ca", dev, root / "certs")
        for model in args.models:
            row = bench(model, args.repeats, args.seconds, root / "certs")
            print(json.dumps(row, indent=1), flush=True)
    print("load average:", _load(), flush=True)


if __name__ == "__main__":
    main()
