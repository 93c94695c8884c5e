"""Benchmarks of the networked runtime (``p2pl node``), on this machine's loopback.

1. ``link``: parameter bytes per second across one link -- a PeerClient sending P2PL ``params``
   messages (safetensors + validated header, mutual TLS, full validation and mailbox on the
   receiver) to a PeerServer -- against a plain TCP socket copying the same bytes (with a 2-byte
   acknowledgement per message, as Send has). Reports MB/s and the ratio.
2. ``rounds``: wall time per round of N local ``p2pl node`` processes (``p2pl launch``) against
   the simulator on the same workload, and the final accuracies of both.

3. ``guard``: a parameters message whose safetensors header names 1,000,000 zero-size tensors:
   the time and memory wire.decode needs to refuse it, against safetensors decoding it.
4. ``sync``: max-norm sync bytes per device, ``sync.mode = "verified"`` (claims only) against
   ``"flood"`` (the paper's form: parameters travel), on the same launched network.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_node.py link
      OMP_NUM_THREADS=1 python benchmarks/bench_node.py guard
      OMP_NUM_THREADS=1 python benchmarks/bench_node.py sync --devices 8
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
            # Rounds of one width, so each message is the first one with the same size and a new
            # key: the receiver validates, decodes and stores every one (a duplicate would be
            # refused from its header alone).
            first = 10**6
            message = wire.encode(wire.MessageHeader("params", "dev-a", first, 0, spec.fingerprint), tensors)
            tag = b'"round":%d' % first
            limit = max(len(message) * 2, 1 << 20)
            reps = max(3, min(repeats, int(repeats * 2e6 / max(len(message), 1))))
            mailbox = Mailbox(max_rounds_ahead=first + reps + 1, params_message_bytes=limit)
            server = PeerServer("dev-b", "127.0.0.1:0", creds.get("dev-b"), mailbox, spec, limit, insecure=not tls)
            port = server.start()
            client = PeerClient("dev-a", creds.get("dev-a"), limit, insecure=not tls)
            address = f"127.0.0.1:{port}"
            assert client.send("dev-b", address, message)  # connect + handshake outside the timing
            times = []
            for _ in range(3):
                mailbox.prune(2 * first)
                t0 = time.perf_counter()
                for r in range(first + 1, first + 1 + reps):
                    assert client.send("dev-b", address, message.replace(tag, b'"round":%d' % r, 1))
                times.append(time.perf_counter() - t0)
            p2pl_s = min(times)
            tcp_s = min(_tcp_copy(message, reps) for _ in range(3))
            client.close()
            server.stop()
            mb = len(message) * reps / 1e6
            rows.append({
                "params": num_params, "message_bytes": len(message), "messages": reps,
                "p2pl_MBps": mb / p2pl_s, "tcp_MBps": mb / tcp_s, "ratio_tcp_over_p2pl": tcp_s and p2pl_s / tcp_s,
                "p2pl_ms_per_msg": 1e3 * p2pl_s / reps, "tcp_ms_per_msg": 1e3 * tcp_s / reps,
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


_DECODE_COST = """
import os, resource, sys, time
from safetensors.torch import load
payload = open(sys.argv[1], "rb").read()
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
t0 = time.perf_counter()
try:
    load(payload)
except Exception:
    pass
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss)
"""


def _safetensors_decode_cost(payload: bytes) -> tuple[float, float]:
    """Seconds and peak memory growth (MB) of safetensors decoding ``payload``, in a fresh process
    (its allocations are native: tracemalloc does not see them)."""
    import subprocess
    import sys

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(payload)
        fh.flush()
        out = subprocess.run([sys.executable, "-c", _DECODE_COST, fh.name], capture_output=True, text=True, check=True)
    seconds, peak_mb = (float(v) for v in out.stdout.split())
    return seconds, peak_mb


def bench_guard(tensors: int) -> dict[str, float]:
    """A params message whose safetensors header names ``tensors`` zero-size tensors: refused by
    wire.decode (size and layout checks) against what decoding it with safetensors costs."""
    import struct
    import tracemalloc

    spec = wire.ModelSpec.from_tensors(_tensors(4810))
    entry = '"t{:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    head = ("{" + ",".join(entry.format(i) for i in range(tensors)) + "}").encode()
    payload = struct.pack("<Q", len(head)) + head
    header = {"version": wire.WIRE_VERSION, "kind": "params", "sender": "dev-a", "round": 0, "step": 0,
              "fingerprint": spec.fingerprint, "payload_size": len(payload), "extras": {}}  # fmt: skip
    raw = json.dumps(header).encode()
    message = struct.pack("<4sI", wire.MAGIC, len(raw)) + raw + payload
    times = []
    tracemalloc.start()
    for _ in range(5):
        t0 = time.perf_counter()
        try:
            wire.decode(message, spec, max_bytes=len(message))
        except wire.WireError as err:
            reason = str(err)
        times.append(time.perf_counter() - t0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    st_s, st_mb = _safetensors_decode_cost(payload)
    refuse_s = min(times)
    return {"tensors": tensors, "message_MB": len(message) / 1e6, "refuse_ms": 1e3 * refuse_s,
            "refuse_peak_MB (tracemalloc)": peak / 1e6, "safetensors_decode_s": st_s,
            "safetensors_peak_rss_MB": st_mb, "ratio_decode_over_refuse": st_s / refuse_s,
            "reason": reason}  # type: ignore[dict-item]  # fmt: skip


def bench_sync(devices: int, overrides: list[str], out: Path) -> list[dict[str, object]]:
    """Max-norm sync bytes per device, verified against flood, on the same launched network."""
    from p2pl.config import load_config
    from p2pl.node.launch import Launcher, prepare_launch

    rows: list[dict[str, object]] = []
    for mode in ("verified", "flood"):
        cfg = load_config(None, [f"devices={devices}", "rounds=1", "output.progress=false",
                                 f"sync.mode='{mode}'", *overrides])  # fmt: skip
        plan = prepare_launch(cfg, out / mode)
        launcher = Launcher(plan, fresh=True)
        try:
            launcher.start()
            ok = launcher.wait(timeout=900)
        finally:
            launcher.stop()
        summary = launcher.collect()
        rows.append({"mode": mode, "ok": ok, "devices": devices, "model_bytes": 4 * plan.num_params,
                     "sync_steps": summary["sync_steps"], "sync_owners": summary["sync_owners"],
                     "sync_bytes_per_device": summary["sync_bytes_per_device"],
                     "bytes_per_device (sync + 1 round)": summary["bytes_sent_per_device"]})  # fmt: skip
    rows[0]["ratio_flood_over_verified"] = float(rows[1]["sync_bytes_per_device"]) / max(  # type: ignore[arg-type]
        1.0,
        float(rows[0]["sync_bytes_per_device"]),  # type: ignore[arg-type]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["link", "rounds", "guard", "sync"])
    parser.add_argument("--tensors", type=int, default=1_000_000, help="guard: zero-size tensors in the header")
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
    elif args.part == "guard":
        print(json.dumps(bench_guard(args.tensors), indent=1))
    elif args.part == "sync":
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(bench_sync(args.devices, args.overrides, args.out or Path(tmp)), indent=1))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = bench_rounds(args.devices, args.overrides, args.out or Path(tmp) / "launch")
        print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
