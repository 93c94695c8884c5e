"""gRPC transport between devices: mutual TLS, raw-bytes messages, no protoc code generation.

Service ``p2pl.Peer`` (generic handlers; request and response are plain ``bytes``):

``Send(message) -> ack``
    ``message`` is a :mod:`p2pl.node.wire` message. The server authenticates the caller (its
    client certificate's CN must equal the header's ``sender``), validates it with
    :func:`wire.decode` against the run's :class:`~p2pl.node.wire.ModelSpec`, and puts it into
    its :class:`~p2pl.node.mailbox.Mailbox`. The ack is ``b"ok"``, ``b"ok: duplicate"`` (already
    had it -- a retry) or ``b"rejected: <reason>"``. Rejections are logged on logger
    ``p2pl.node.transport`` and counted; the server keeps serving.
``SendStream(chunks) -> ack``
    The same for a message larger than one chunk (:data:`~p2pl.node.chunks.CHUNK_BYTES`): its
    chunks (:mod:`p2pl.node.chunks`) are reassembled into one buffer of the size the header
    announced. The sender, the mailbox and the announced size are checked on the first chunk,
    before that buffer exists; gRPC itself refuses any single message over one chunk (plus
    GRPC_SLACK_BYTES), so a unary ``Send`` cannot make the server buffer a large message either.
    An admitted stream runs against a deadline and takes one of its sender's few stream slots
    (STREAM_GRACE_S, STREAM_MIN_BYTES_PER_S, MAX_STREAMS_PER_SENDER).
``Fetch(request) -> message``
    Pull: ``request`` is a payload-free wire message (e.g. kind ``sync-fetch``), authenticated
    and validated like Send; the runtime's ``fetch_handler(request_message)`` returns the encoded
    reply message (e.g. kind ``sync-params``) or None, sent back as empty bytes ("nothing to give").
    Errors are gRPC status codes (PERMISSION_DENIED, INVALID_ARGUMENT, UNIMPLEMENTED, INTERNAL).

Security model. Every device has a certificate from the run's CA (:mod:`p2pl.node.certs`). The
server requires and verifies client certificates (``require_client_auth=True``) and checks the
CN against the claimed sender, so a device cannot impersonate another. The client verifies that
the server it dials presents the certificate of the device it meant to reach: it sets
``grpc.ssl_target_name_override`` to the peer's device id, which issue_device_cert puts in the
certificate as a DNS SAN (``verify_server_identity=False`` falls back to ``"localhost"``, which
only proves "some device of this CA"). Insecure mode (``tls=None, insecure=True``) has no
authentication or encryption at all and trusts the header's sender: for tests and benchmarks on
a trusted host only; it must be requested explicitly.

Typical runtime use::

    tls = certs.load_tls_config(cert_dir, me)
    spec = wire.ModelSpec.from_module(model)
    mailbox = Mailbox(); mailbox.set_allowed_senders(neighbours)
    server = PeerServer(me, "0.0.0.0:7000", tls, mailbox, spec, fetch_handler=on_fetch)
    server.start()
    client = PeerClient(me, tls)
    msg = wire.encode(wire.MessageHeader("params", me, k, 0, spec.fingerprint), params)
    ok = client.send_many({peer: addr for peer, addr in neighbours.items()}, msg, timeout=10)
    got = mailbox.wait_for("params", k, 0, set(neighbours), time.monotonic() + 30)
    ...
    client.close(); server.stop()

Failure handling in the client: an unreachable peer makes :meth:`PeerClient.send` return False
(never raise) after ``attempts`` quick tries; the peer is then marked *down* for an exponential
backoff (``backoff_initial * 2**(failures-1)``, capped at ``backoff_max``) during which sends to
it return False immediately, so a dead neighbour costs one timeout, not one per round. The first
successful call after the backoff expires resets it: a peer that comes back is used again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from p2pl.errors import P2PLError
from p2pl.node.certs import TlsConfig, check_device_id
from p2pl.node.chunks import CHUNK_BYTES, CHUNK_PREFIX, Reassembler, check_chunk_bytes, split
from p2pl.node.mailbox import ACCEPTED, DUPLICATE, Mailbox
from p2pl.node.ratelog import LogBudget
from p2pl.node.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_HEADER_BYTES,
    PREFIX_SIZE,
    Message,
    MessageHeader,
    ModelSpec,
    WireError,
    check_announced,
    decode,
    decode_payload,
    peek_header,
)

__all__ = [
    "ACK_DUPLICATE",
    "ACK_OK",
    "ACK_REJECTED_PREFIX",
    "FETCH_METHOD",
    "GRPC_SLACK_BYTES",
    "SEND_METHOD",
    "SEND_STREAM_METHOD",
    "SERVICE_NAME",
    "FetchHandler",
    "PeerClient",
    "PeerServer",
    "TlsConfig",
]

log = logging.getLogger(__name__)

SERVICE_NAME = "p2pl.Peer"
SEND_METHOD = f"/{SERVICE_NAME}/Send"
SEND_STREAM_METHOD = f"/{SERVICE_NAME}/SendStream"
FETCH_METHOD = f"/{SERVICE_NAME}/Fetch"
ACK_OK = b"ok"
ACK_DUPLICATE = b"ok: duplicate"
ACK_REJECTED_PREFIX = b"rejected: "
#: gRPC's own size limit is max_message_bytes + this slack, so slightly oversized messages reach
#: wire.decode (rejected with a logged reason) while huge ones are cut off by gRPC itself.
GRPC_SLACK_BYTES = 64 * 1024
#: A chunked message must arrive within STREAM_GRACE_S plus its size at STREAM_MIN_BYTES_PER_S,
#: or the server cancels it, and a sender may have at most MAX_STREAMS_PER_SENDER admitted streams
#: in flight: a neighbour that stalls mid-stream cannot hold the server's threads.
STREAM_GRACE_S = 30.0
STREAM_MIN_BYTES_PER_S = 256 * 1024
MAX_STREAMS_PER_SENDER = 2
#: Fetch requests carry no tensors.
MAX_FETCH_REQUEST_BYTES = PREFIX_SIZE + MAX_HEADER_BYTES

#: ``fetch_handler(request) -> encoded reply message or None``; runs on a gRPC server thread.
FetchHandler = Callable[[Message], "bytes | None"]


def _check_security(device_id: str, tls: TlsConfig | None, insecure: bool, who: str) -> None:
    check_device_id(device_id)
    if tls is None:
        if not insecure:
            raise P2PLError(
                f"{who} needs TLS credentials (certs.load_tls_config); insecure=True is only for "
                "tests and benchmarks on a trusted host"
            )
        log.warning("%s for %s runs WITHOUT TLS: no authentication, no encryption", who, device_id)
    elif tls.device_id != device_id:
        raise P2PLError(f"TLS credentials are for device {tls.device_id!r}, not {device_id!r}")


def _check_limit(max_message_bytes: int) -> int:
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int):
        raise P2PLError(f"max_message_bytes must be an integer, got {max_message_bytes!r}")
    if not PREFIX_SIZE + MAX_HEADER_BYTES <= max_message_bytes <= 2**31 - 1 - GRPC_SLACK_BYTES:
        raise P2PLError(f"max_message_bytes {max_message_bytes} outside 4104..~2 GiB")
    return max_message_bytes


def _grpc_limit_options(max_message_bytes: int, max_receive_bytes: int | None = None) -> list[tuple[str, Any]]:
    limit = max_message_bytes + GRPC_SLACK_BYTES
    receive = limit if max_receive_bytes is None else max_receive_bytes + GRPC_SLACK_BYTES
    return [("grpc.max_receive_message_length", receive), ("grpc.max_send_message_length", limit)]


# --------------------------------------------------------------------------------------- server


class _Rejected(Exception):
    def __init__(self, category: str, reason: str, code: grpc.StatusCode) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason
        self.code = code


class PeerServer:
    """The receiving side of one device: serves ``Send`` into ``mailbox`` and ``Fetch`` via a callback.

    ``listen_addr`` is ``host:port`` (port 0 picks a free port; :meth:`start` returns it).
    ``spec`` is the run's model spec every incoming message must match. ``max_message_bytes``
    bounds a message (the gRPC limits are set slightly above it, see GRPC_SLACK_BYTES).
    """

    def __init__(
        self,
        device_id: str,
        listen_addr: str,
        tls: TlsConfig | None,
        mailbox: Mailbox,
        spec: ModelSpec,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        fetch_handler: FetchHandler | None = None,
        *,
        insecure: bool = False,
        max_workers: int = 8,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        _check_security(device_id, tls, insecure, "PeerServer")
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.device_id = device_id
        self.listen_addr = listen_addr
        self.tls = tls
        self.mailbox = mailbox
        self.spec = spec
        self.max_message_bytes = _check_limit(max_message_bytes)
        self._fetch_handler = fetch_handler
        self._max_workers = max(1, int(max_workers))
        self._server: grpc.Server | None = None
        self._port: int | None = None
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._streams: Counter[str] = Counter()  # admitted streams in flight, per sender
        self._log_budget = LogBudget()

    # --------------------------------------------------------------------------- lifecycle

    def start(self) -> int:
        """Bind and start serving; return the bound port."""
        if self._server is not None:
            raise P2PLError(f"server of {self.device_id} already started")
        # One gRPC message (a unary Send, or one chunk of a stream) is never larger than a chunk.
        receive = min(self.max_message_bytes, self.chunk_bytes + CHUNK_PREFIX.size)
        options = [*_grpc_limit_options(self.max_message_bytes, receive), ("grpc.so_reuseport", 0)]
        server = grpc.server(
            futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix=f"p2pl-{self.device_id}"),
            options=options,
            maximum_concurrent_rpcs=4 * self._max_workers,
            compression=grpc.Compression.NoCompression,
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Send": grpc.unary_unary_rpc_method_handler(self._handle_send),
                "SendStream": grpc.stream_unary_rpc_method_handler(self._handle_send_stream),
                "Fetch": grpc.unary_unary_rpc_method_handler(self._handle_fetch),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        try:
            if self.tls is None:
                port = server.add_insecure_port(self.listen_addr)
            else:
                creds = grpc.ssl_server_credentials(
                    [(self.tls.key, self.tls.cert)],
                    root_certificates=self.tls.ca_cert,
                    require_client_auth=True,
                )
                port = server.add_secure_port(self.listen_addr, creds)
        except RuntimeError as exc:
            raise P2PLError(f"cannot listen on {self.listen_addr}: {exc}") from None
        if not port:
            raise P2PLError(f"cannot listen on {self.listen_addr} (address in use or invalid)")
        server.start()
        self._server, self._port = server, int(port)
        log.info("%s listening on %s (port %d, tls=%s)", self.device_id, self.listen_addr, port, bool(self.tls))
        return self._port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds). Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()

    def __enter__(self) -> PeerServer:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise P2PLError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` of this server as seen from this host (a wildcard listen host becomes
        127.0.0.1); on a real network the runtime advertises its own reachable host instead."""
        host = self.listen_addr.rsplit(":", 1)[0]
        if host in ("", "0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def stats(self) -> dict[str, int]:
        """Counters: ``send.received``, ``send.accepted``, ``send.rejected.<category>``, ``fetch.*``,
        ``bytes.sent`` (the bytes of the fetch replies this server sent)."""
        with self._lock:
            return dict(self._counters)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    # ----------------------------------------------------------------------------- handlers

    def _authenticate(self, sender: str, context: grpc.ServicerContext) -> None:
        if self.tls is None:
            return  # insecure mode: trust the header (tests/benchmarks only)
        auth = context.auth_context() or {}
        cns = auth.get("x509_common_name") or []
        if not cns:
            raise _Rejected("auth", "no client certificate", grpc.StatusCode.UNAUTHENTICATED)
        cn = cns[0].decode("utf-8", "replace") if isinstance(cns[0], bytes) else str(cns[0])
        if cn != sender:
            raise _Rejected(
                "auth",
                f"header sender {sender!r} does not match certificate CN {cn!r}",
                grpc.StatusCode.PERMISSION_DENIED,
            )

    def _admit(
        self, header: MessageHeader, total: int, context: grpc.ServicerContext, limit: int, *, store: bool
    ) -> None:
        """Who sent it, then (for Send) whether the mailbox would keep it, then whether its size
        fits this model: all from the header, so nothing big is read for a refused message."""
        if total > limit:
            raise WireError(f"message of {total} bytes exceeds the limit of {limit} bytes")
        self._authenticate(header.sender, context)
        if store and (reason := self.mailbox.admit(header)) is not None:
            why = f"{reason} ({header.kind} round {header.round} step {header.step})"
            raise _Rejected(f"mailbox.{reason}", why, grpc.StatusCode.FAILED_PRECONDITION)
        check_announced(header, total, self.spec, limit)

    def _validate(self, data: bytes, context: grpc.ServicerContext, limit: int, *, store: bool) -> Message:
        """A whole message: its header admitted first, then the payload decoded."""
        try:
            header = peek_header(data, limit)
            self._admit(header, len(data), context, limit, store=store)
            return decode_payload(header, data, self.spec, limit)
        except WireError as exc:
            raise _Rejected("invalid", str(exc), grpc.StatusCode.INVALID_ARGUMENT) from None

    def _receive_stream(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> Message:
        """A chunked message: admitted on its first chunk, reassembled, then decoded in place.
        Once admitted it holds one of its sender's stream slots and runs against a deadline."""
        watchdog: threading.Timer | None = None
        sender: str | None = None
        too_slow = threading.Event()

        def cancel() -> None:
            too_slow.set()
            context.cancel()

        def admit(header: MessageHeader, total: int) -> None:
            nonlocal watchdog, sender
            self._admit(header, total, context, self.max_message_bytes, store=True)
            with self._lock:
                if self._streams[header.sender] >= MAX_STREAMS_PER_SENDER:
                    why = f"{header.sender} already has {MAX_STREAMS_PER_SENDER} streams in flight"
                    raise _Rejected("busy", why, grpc.StatusCode.RESOURCE_EXHAUSTED)
                self._streams[header.sender] += 1
            sender = header.sender
            watchdog = threading.Timer(STREAM_GRACE_S + total / STREAM_MIN_BYTES_PER_S, cancel)
            watchdog.daemon = True
            watchdog.start()

        try:
            assembler = Reassembler(admit, self.chunk_bytes)
            for chunk in chunks:
                assembler.add(chunk)
            buffer = assembler.finish()
            assert assembler.header is not None  # finish() refuses a stream without one
            return decode_payload(assembler.header, buffer, self.spec, self.max_message_bytes)
        except (WireError, grpc.RpcError) as exc:  # an RpcError: the stream was cancelled
            if too_slow.is_set():
                raise _Rejected("slow", "stream too slow: cancelled", grpc.StatusCode.CANCELLED) from None
            if isinstance(exc, WireError):
                raise _Rejected("invalid", str(exc), grpc.StatusCode.INVALID_ARGUMENT) from None
            raise _Rejected("stream", "stream cancelled by the sender", grpc.StatusCode.CANCELLED) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if sender is not None:
                with self._lock:
                    self._streams[sender] -= 1

    def _handle_send(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("send.received")
        return self._deliver(lambda: self._validate(request, context, self.max_message_bytes, store=True), context)

    def _handle_send_stream(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._count("send.received")
        return self._deliver(lambda: self._receive_stream(chunks, context), context)

    def _deliver(self, receive: Callable[[], Message], context: grpc.ServicerContext) -> bytes:
        """Receive and validate one message, store it in the mailbox, and say how that went."""
        try:
            msg = receive()
        except _Rejected as rej:
            if rej.category == f"mailbox.{DUPLICATE}":  # a retry of a message we already hold
                self._count("send.duplicate")
                return ACK_DUPLICATE
            return self._reject("send", rej.category, rej.reason, context)
        except Exception:  # a bug must not take the server down
            log.exception("%s: unexpected error while validating a message", self.device_id)
            return self._reject("send", "internal", "internal error", context)
        verdict = self.mailbox.put(msg)
        if verdict == ACCEPTED:
            self._count("send.accepted")
            return ACK_OK
        if verdict == DUPLICATE:
            self._count("send.duplicate")
            return ACK_DUPLICATE
        return self._reject(
            "send", f"mailbox.{verdict}", f"{verdict} ({msg.kind} round {msg.round} step {msg.step})", context
        )

    def _reject(self, rpc: str, category: str, reason: str, context: grpc.ServicerContext) -> bytes:
        self._count(f"{rpc}.rejected.{category}")
        peer = _peer_name(context)
        # Bounded per (caller, category): a flooding neighbour cannot fill the disk with our log.
        count = self._log_budget.allow((peer.split("@", 1)[0], rpc, category))
        if count:
            # Late or early round traffic is normal with deadlines and restarts; a bad message is not.
            routine = category in ("mailbox.stale", "mailbox.too-far-ahead", "mailbox.duplicate")
            level = logging.INFO if routine else logging.WARNING
            log.log(level, "%s rejected %s from %s: %s (#%d)", self.device_id, rpc, peer, reason, count)
        return ACK_REJECTED_PREFIX + reason.encode("utf-8", "replace")

    def _handle_fetch(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("fetch.received")
        try:
            req = self._validate(request, context, MAX_FETCH_REQUEST_BYTES, store=False)
        except _Rejected as rej:
            self._reject("fetch", rej.category, rej.reason, context)
            context.abort(rej.code, rej.reason)
            raise  # unreachable: abort raises
        handler = self._fetch_handler
        if handler is None:
            self._reject("fetch", "unimplemented", "no fetch handler registered", context)
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no fetch handler registered")
        try:
            reply = handler(req)  # type: ignore[misc]
        except Exception:
            log.exception("%s: fetch handler failed for %s", self.device_id, req.sender)
            self._count("fetch.rejected.internal")
            context.abort(grpc.StatusCode.INTERNAL, "fetch handler failed")
        if reply is None:
            self._count("fetch.empty")
            return b""
        if len(reply) > self.max_message_bytes:
            self._reject("fetch", "oversized", f"reply of {len(reply)} bytes exceeds the limit", context)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "reply exceeds the message limit")
        self._count("fetch.served")
        self._count("bytes.sent", len(reply))  # what this device really puts on the wire
        return bytes(reply)


def _peer_name(context: grpc.ServicerContext) -> str:
    try:
        auth = context.auth_context() or {}
        cns = auth.get("x509_common_name") or []
        cn = cns[0].decode("utf-8", "replace") if cns else "?"
        return f"{cn}@{context.peer()}"
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------- client


@dataclass
class _PeerState:
    address: str
    channel: grpc.Channel
    send: Any
    send_stream: Any
    fetch: Any
    failures: int = 0
    down_until: float = 0.0


_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class PeerClient:
    """The sending side of one device: one gRPC channel per peer, backoff, link filter.

    ``attempts``: tries per call before giving up (with ``retry_delay`` doubling between them);
    ``backoff_initial``/``backoff_max``: how long a peer that failed all attempts is skipped
    (doubling per consecutive failed call, capped). All methods are thread-safe;
    :meth:`send_many` sends to several peers in parallel.
    """

    def __init__(
        self,
        device_id: str,
        tls: TlsConfig | None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        insecure: bool = False,
        verify_server_identity: bool = True,
        attempts: int = 2,
        retry_delay: float = 0.05,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_parallel: int = 8,
        throttle_bps: float = 0.0,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        _check_security(device_id, tls, insecure, "PeerClient")
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        if attempts < 1 or retry_delay < 0 or backoff_initial < 0 or backoff_max < backoff_initial:
            raise P2PLError("PeerClient needs attempts >= 1 and 0 <= backoff_initial <= backoff_max")
        self.device_id = device_id
        self.tls = tls
        self.max_message_bytes = _check_limit(max_message_bytes)
        self.verify_server_identity = verify_server_identity
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._max_parallel = max(1, int(max_parallel))
        # Emulates a slow link: a send first holds this peer's link for len(message) * 8 / rate
        # seconds, so sends to different peers overlap (send_many) like separate links.
        self.throttle_bps = float(throttle_bps)
        self._peers: dict[str, _PeerState] = {}
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._link_filter: Callable[[str], bool] | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._closed = False

    # ------------------------------------------------------------------------------ config

    def set_link_filter(self, link_filter: Callable[[str], bool] | None) -> None:
        """Fault injection: sends/fetches to peers for which ``link_filter(peer_id)`` is False are
        dropped (the call returns False/None without touching the network). None removes it."""
        self._link_filter = link_filter

    def is_down(self, peer_id: str) -> bool:
        """True while ``peer_id`` is in backoff after failed calls."""
        with self._lock:
            st = self._peers.get(peer_id)
            return st is not None and time.monotonic() < st.down_until

    def backoff_remaining(self, peer_id: str) -> float:
        """Seconds until ``peer_id`` is tried again (0.0 when it is not in backoff)."""
        with self._lock:
            st = self._peers.get(peer_id)
            return max(0.0, st.down_until - time.monotonic()) if st is not None else 0.0

    def reset_backoff(self, peer_id: str | None = None) -> None:
        """Forget failures of one peer (or all), e.g. when the runtime learns a peer restarted."""
        with self._lock:
            for pid, st in self._peers.items():
                if peer_id is None or pid == peer_id:
                    st.failures, st.down_until = 0, 0.0

    def stats(self) -> dict[str, int]:
        """Counters: ``send.ok``, ``send.rejected``, ``send.unreachable``, ``send.skipped-down``,
        ``send.filtered``, ``send.too-large``, ``bytes.sent`` (acknowledged messages and answered
        fetch requests), ``fetch.*``."""
        with self._lock:
            return dict(self._counters)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    # ----------------------------------------------------------------------------- channels

    def _make_channel(self, peer_id: str, address: str) -> grpc.Channel:
        options: list[tuple[str, Any]] = [
            *_grpc_limit_options(self.max_message_bytes),
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", max(100, int(self.backoff_initial * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(100, int(self.backoff_initial * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(self.backoff_max * 1000))),
        ]
        # Parameters are incompressible floats: compressing them costs CPU and saves nothing.
        if self.tls is None:
            return grpc.insecure_channel(address, options=options, compression=grpc.Compression.NoCompression)
        target = peer_id if self.verify_server_identity else "localhost"
        options.append(("grpc.ssl_target_name_override", target))
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca_cert, private_key=self.tls.key, certificate_chain=self.tls.cert
        )
        return grpc.secure_channel(address, creds, options=options, compression=grpc.Compression.NoCompression)

    def _state(self, peer_id: str, address: str) -> tuple[_PeerState, grpc.Channel | None]:
        """The peer's state with a live channel; also returns an old channel to close (if any)."""
        with self._lock:
            if self._closed:
                raise P2PLError("PeerClient is closed")
            st = self._peers.get(peer_id)
            if st is not None and st.address == address:
                return st, None
            channel = self._make_channel(peer_id, address)
            new = _PeerState(
                address=address,
                channel=channel,
                send=channel.unary_unary(SEND_METHOD),
                send_stream=channel.stream_unary(SEND_STREAM_METHOD),
                fetch=channel.unary_unary(FETCH_METHOD),
                failures=st.failures if st is not None else 0,
                down_until=st.down_until if st is not None else 0.0,
            )
            self._peers[peer_id] = new
            return new, (st.channel if st is not None else None)

    def _drop_channel(self, peer_id: str, st: _PeerState) -> None:
        """Forget a channel that failed, so the next call after the backoff connects afresh."""
        with self._lock:
            if self._peers.get(peer_id) is st:
                fresh = self._make_channel(peer_id, st.address)
                st.channel.close()
                st.channel = fresh
                st.send = fresh.unary_unary(SEND_METHOD)
                st.send_stream = fresh.stream_unary(SEND_STREAM_METHOD)
                st.fetch = fresh.unary_unary(FETCH_METHOD)

    def _mark_up(self, st: _PeerState) -> None:
        with self._lock:
            st.failures, st.down_until = 0, 0.0

    def _mark_down(self, peer_id: str, st: _PeerState) -> float:
        with self._lock:
            st.failures += 1
            delay = min(self.backoff_initial * 2 ** (st.failures - 1), self.backoff_max)
            st.down_until = time.monotonic() + delay
        log.info("%s: peer %s unreachable, skipping it for %.2fs", self.device_id, peer_id, delay)
        return delay

    def _precheck(self, rpc: str, peer_id: str) -> bool:
        link_filter = self._link_filter
        if link_filter is not None and not link_filter(peer_id):
            self._count(f"{rpc}.filtered")
            return False
        if self.is_down(peer_id):
            self._count(f"{rpc}.skipped-down")
            return False
        return True

    def _call(self, rpc: str, peer_id: str, address: str, payload: bytes, timeout: float) -> bytes | None:
        """One logical call with retries; None if the peer was unreachable or refused the call."""
        st, old = self._state(peer_id, address)
        if old is not None:
            old.close()
        deadline = time.monotonic() + timeout
        last = ""
        for attempt in range(self.attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply: bytes
                if rpc == "fetch":
                    reply = st.fetch(payload, timeout=remaining)
                elif len(payload) <= self.chunk_bytes:
                    reply = st.send(payload, timeout=remaining)
                else:  # a fresh chunk iterator per attempt
                    reply = st.send_stream(split(payload, self.chunk_bytes), timeout=remaining)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code in _UNREACHABLE:
                    last = f"{code.name if code else '?'}: {str(details).splitlines()[0][:200]}"
                    self._drop_channel(peer_id, st)
                    if attempt + 1 < self.attempts:
                        time.sleep(max(0.0, min(self.retry_delay * 2**attempt, deadline - time.monotonic())))
                    continue
                # The peer answered with an error status: it is up, the call was refused.
                self._mark_up(st)
                self._count(f"{rpc}.rejected")
                log.warning(
                    "%s: %s to %s refused: %s: %s",
                    self.device_id,
                    rpc,
                    peer_id,
                    code.name if code else "?",
                    str(details).splitlines()[0][:200] if details else "",
                )
                return None
            self._mark_up(st)
            return reply
        self._count(f"{rpc}.unreachable")
        log.info("%s: %s to %s at %s failed: %s", self.device_id, rpc, peer_id, address, last or "timeout")
        self._mark_down(peer_id, st)
        return None

    # --------------------------------------------------------------------------------- calls

    def send(self, peer_id: str, address: str, message: bytes, timeout: float = 10.0) -> bool:
        """Deliver an encoded wire message to ``peer_id`` at ``address`` (``host:port``).

        Returns True only if the peer acknowledged it (``ok`` or ``ok: duplicate``); False if the
        link filter dropped it, the peer is in backoff or unreachable, or the peer rejected it
        (the reason is logged). Never raises for network problems.
        """
        if not self._precheck("send", peer_id):
            return False
        if len(message) > self.max_message_bytes:
            self._count("send.too-large")
            log.warning(
                "%s: not sending %d bytes to %s: over the %d-byte limit",
                self.device_id,
                len(message),
                peer_id,
                self.max_message_bytes,
            )
            return False
        if self.throttle_bps > 0:
            time.sleep(len(message) * 8 / self.throttle_bps)
        ack = self._call("send", peer_id, address, message, timeout)
        if ack is None:
            return False
        if ack in (ACK_OK, ACK_DUPLICATE):
            self._count("send.ok")
            self._count("bytes.sent", len(message))
            return True
        self._count("send.rejected")
        log.warning(
            "%s: %s rejected our message: %s",
            self.device_id,
            peer_id,
            ack.decode("utf-8", "replace")[:300],
        )
        return False

    def send_many(self, peers: Mapping[str, str], message: bytes, timeout: float = 10.0) -> dict[str, bool]:
        """Send the same message to ``{peer_id: address}`` in parallel; returns ``{peer_id: ok}``."""
        if len(peers) <= 1:
            return {p: self.send(p, a, message, timeout) for p, a in peers.items()}
        with self._lock:
            if self._pool is None:
                self._pool = futures.ThreadPoolExecutor(self._max_parallel, thread_name_prefix="p2pl-send")
            pool = self._pool
        futs = {p: pool.submit(self.send, p, a, message, timeout) for p, a in peers.items()}
        return {p: f.result() for p, f in futs.items()}

    def fetch(
        self,
        peer_id: str,
        address: str,
        request: bytes,
        timeout: float = 10.0,
        expected: ModelSpec | None = None,
    ) -> Message | None:
        """Pull a message from ``peer_id``: ``request`` is an encoded payload-free wire message
        (e.g. kind ``sync-fetch``); the reply is validated with ``wire.decode(reply, expected)``
        and must come from ``peer_id``. Returns None when unreachable, refused, empty or invalid."""
        if not self._precheck("fetch", peer_id):
            return None
        reply = self._call("fetch", peer_id, address, request, timeout)
        if reply is None:
            return None
        self._count("bytes.sent", len(request))
        if not reply:
            self._count("fetch.empty")
            return None
        try:
            msg = decode(reply, expected, self.max_message_bytes)
        except WireError as exc:
            self._count("fetch.invalid")
            log.warning("%s: invalid fetch reply from %s: %s", self.device_id, peer_id, exc)
            return None
        if msg.sender != peer_id:
            self._count("fetch.invalid")
            log.warning("%s: fetch reply from %s claims sender %s", self.device_id, peer_id, msg.sender)
            return None
        self._count("fetch.ok")
        return msg

    def close(self) -> None:
        """Close every channel and the send pool. Idempotent."""
        with self._lock:
            self._closed = True
            peers, self._peers = self._peers, {}
            pool, self._pool = self._pool, None
        for st in peers.values():
            st.channel.close()
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
