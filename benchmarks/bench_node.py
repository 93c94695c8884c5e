"""Benchmarks of the networked runtime (``p2pl node``), on this machine's loopback.

1. ``link``: parameter bytes per second across one link -- a PeerClient sending P2PL ``params``
   messages (safetensors + validated header, mutual TLS, full validation and mailbox on the
   receiver) to a PeerServer -- against a plain TCP socket copying the same bytes (with a 2-byte
   acknowledgement per message, as Send has). Reports MB/s and the ratio.
2. ``rounds``: wall time per round of N local ``p2pl node`` processes (``p2pl launch``) against
   the simulator on the same workload, and the final accuracies of both.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_node.py link
      OMP_NUM_THREADS=1 python benchmarks/bench_node.py rounds --devices 16 --set topology.name='ring'
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from p2pl.node import certs, wire
from p2pl.node.mailbox import Mailbox
from p2pl.node.transport import PeerClient, PeerServer


def _tensors(num_params: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(num_params, generator=g)}


def _tcp_copy(data: bytes, repeats: int) -> float:
    """Seconds to send ``data`` ``repeats`` times over a plain loopback TCP socket (ack each)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    size = len(data)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            buf = bytearray(size)
            view = memoryview(buf)
            for _ in range(repeats):
                got = 0
                while got < size:
                    n = conn.recv_into(view[got:], size - got)
                    if n == 0:
                        return
                    got += n
                conn.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    client = socket.create_connection(server.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    for _ in range(repeats):
        client.sendall(data)
        ack = b""
        while len(ack) < 2:
            ack += client.recv(2 - len(ack))
    elapsed = time.perf_counter() - t0
    client.close()
    thread.join()
    server.close()
    return elapsed


def bench_link(sizes: list[int], repeats: int, tls: bool) -> list[dict[str, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        creds = {}
        if tls:
            certs.init_ca(root / "ca")
            for dev in ("dev-a", "dev-b"):
                certs.issue_device_cert(root / "ca", dev, root / "certs")
            creds = {d: certs.load_tls_config(root / "certs", d) for d in ("dev-a", "dev-b")}
        for num_params in sizes:
            tensors = _tensors(num_params)
            spec = wire.ModelSpec.from_tensors(tensors)
            message = wire.encode(wire.MessageHeader("params", "dev-a", 0, 0, spec.fingerprint), tensors)
            limit = max(len(message) * 2, 1 << 20)
            mailbox = Mailbox(max_pending=10)
            server = PeerServer("dev-b", "127.0.0.1:0", creds.get("dev-b"), mailbox, spec, limit, insecure=not tls)
            port = server.start()
            client = PeerClient("dev-a", creds.get("dev-a"), limit, insecure=not tls)
            address = f"127.0.0.1:{port}"
            assert client.send("dev-b", address, message)  # connect + handshake outside the timing
            reps = max(3, min(repeats, int(repeats * 2e6 / max(len(message), 1))))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(reps):
                    assert client.send("dev-b", address, message)  # a duplicate: fully validated, acked
                times.append(time.perf_counter() - t0)
            grpc_s = min(times)
            tcp_s = min(_tcp_copy(message, reps) for _ in range(3))
            client.close()
            server.stop()
            mb = len(message) * reps / 1e6
            rows.append({
                "params": num_params, "message_bytes": len(message), "messages": reps,
                "grpc_MBps": mb / grpc_s, "tcp_MBps": mb / tcp_s, "ratio_tcp_over_grpc": tcp_s and grpc_s / tcp_s,
                "grpc_ms_per_msg": 1e3 * grpc_s / reps, "tcp_ms_per_msg": 1e3 * tcp_s / reps,
            })  # fmt: skip
    return rows


def bench_rounds(devices: int, overrides: list[str], out: Path) -> dict[str, object]:
    from p2pl.config import load_config
    from p2pl.node.launch import Launcher, prepare_launch
    from p2pl.sim.simulator import run_experiment

    cfg = load_config(None, [f"devices={devices}", "output.progress=false", *overrides])
    t0 = time.perf_counter()
    sim = run_experiment(cfg)
    sim_wall = time.perf_counter() - t0
    plan = prepare_launch(cfg, out)
    launcher = Launcher(plan, fresh=True)
    t0 = time.perf_counter()
    try:
        launcher.start()
        ok = launcher.wait(timeout=3600)
    finally:
        launcher.stop()
    node_wall = time.perf_counter() - t0
    summary = launcher.collect()
    diffs = []
    from p2pl.node import checkpoint

    for i, d in enumerate(plan.node_dirs):
        ckpt = checkpoint.load(d)
        assert ckpt is not None
        diffs.append(float((ckpt.params - sim.params[i]).abs().max()))
    per_round_node = [summary["round_time_s_mean"]]
    return {
        "ok": ok,
        "devices": devices,
        "rounds": cfg.rounds,
        "overrides": overrides,
        "sim_final_accuracy": sim.summary["final"]["accuracy"],
        "node_final_accuracy": summary["final"]["accuracy"],
        "max_abs_param_diff": max(diffs),
        "sim_round_s": sim.summary["round_time_s_mean"],
        "node_round_s (slowest node, mean)": per_round_node[0],
        "sim_wall_s": sim_wall,
        "node_wall_s (incl. process start)": node_wall,
        "node_sync_steps": summary["sync_steps"],
        "sim_sync_steps": sim.summary["sync_steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["link", "rounds"])
    parser.add_argument("--sizes", default="4810,100000,1000000", help="parameters per message (comma list)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--insecure", action="store_true", help="link: gRPC without TLS")
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part == "link":
        rows = bench_link([int(s) for s in args.sizes.split(",")], args.repeats, tls=not args.insecure)
        for row in rows:
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = bench_rounds(args.devices, args.overrides, args.out or Path(tmp) / "launch")
        print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
