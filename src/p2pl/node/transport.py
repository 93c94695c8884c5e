"""Transport between devices: framed wire messages over mutual-TLS sockets, no RPC framework.

Each device runs a :class:`PeerServer` (its listening socket) and a :class:`PeerClient` (one
persistent TLS connection per neighbour). The byte protocol is :mod:`p2pl.node.framing`:

``send(message)``
    ``message`` is a :mod:`p2pl.node.wire` message. The server authenticates the caller (its
    client certificate's CN must equal the header's ``sender``), asks its
    :class:`~p2pl.node.mailbox.Mailbox` whether it would keep the message, checks the announced
    size against the run's :class:`~p2pl.node.wire.ModelSpec`, validates the payload and stores
    it. The answer is ok, duplicate (already had it -- a retry) or rejected with a reason.
    Rejections are logged on logger ``p2pl.node.transport`` (bounded per sender and reason) and
    counted; the server keeps serving.
``fetch(request)``
    Pull: ``request`` is a payload-free wire message (e.g. kind ``sync-fetch``), authenticated and
    validated like a send; the runtime's ``fetch_handler(request_message)`` returns the encoded
    reply message (e.g. kind ``sync-params``) or None ("nothing to give").

What a neighbour can make a server hold is bounded before it is allocated: a message over
SMALL_MESSAGE_BYTES is admitted from its header alone (sender, mailbox, announced size against
the model), and only then is a buffer of the announced size allocated and filled, against a
deadline (STREAM_GRACE_S plus its size at STREAM_MIN_BYTES_PER_S); a sender has at most
MAX_STREAMS_PER_SENDER such messages in flight and MAX_CONNECTIONS_PER_SENDER connections
(a newer connection replaces its oldest idle one); a TLS handshake must finish within
HANDSHAKE_TIMEOUT_S, and at most MAX_HANDSHAKES run at once, so peers without a certificate
cannot hold the server's threads; an idle connection is closed after IDLE_TIMEOUT_S.

Security model. Every device has a certificate from the run's CA (:mod:`p2pl.node.certs`). The
server requires and verifies client certificates (TLS 1.3) and checks the CN against the claimed
sender, so a device cannot impersonate another. The client verifies that the server it dials
presents the certificate of the device it meant to reach: the peer's device id, which
issue_device_cert puts in the certificate as a DNS SAN (``verify_server_identity=False`` checks
``"localhost"`` instead, which only proves "some device of this CA"). Insecure mode
(``tls=None, insecure=True``) has no authentication or encryption at all and trusts the header's
sender: for tests and benchmarks on a trusted host only; it must be requested explicitly.

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
successful call after the backoff expires resets it: a peer that comes back is used again. A
refusal is an answer, not an outage: it never puts a peer into backoff.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from p2pl.errors import P2PLError
from p2pl.node.certs import TlsConfig, check_device_id
from p2pl.node.framing import (
    FRAME,
    MAX_REASON_BYTES,
    OP_FETCH,
    OP_SEND,
    SMALL_MESSAGE_BYTES,
    ST_CONTINUE,
    ST_DUPLICATE,
    ST_OK,
    ST_REJECTED,
    ConnectionClosed,
    FramedReader,
    split_address,
    tls_context,
)
from p2pl.node.mailbox import ACCEPTED, DUPLICATE, Mailbox
from p2pl.node.ratelog import LogBudget
from p2pl.node.wire import (
    _PREFIX,
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
    read_header,
)

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "IDLE_TIMEOUT_S",
    "MAX_CONNECTIONS_PER_SENDER",
    "MAX_STREAMS_PER_SENDER",
    "FetchHandler",
    "PeerClient",
    "PeerServer",
    "TlsConfig",
]

log = logging.getLogger(__name__)

#: A message over SMALL_MESSAGE_BYTES must arrive within STREAM_GRACE_S plus its size at
#: STREAM_MIN_BYTES_PER_S, or the server drops it and the connection; a sender may have at most
#: MAX_STREAMS_PER_SENDER of them admitted at once: a neighbour that stalls mid-message cannot
#: hold the server's memory or threads.
STREAM_GRACE_S = 30.0
STREAM_MIN_BYTES_PER_S = 256 * 1024
MAX_STREAMS_PER_SENDER = 2
#: Authenticated connections per sender (the client keeps one per peer; a reconnect after a
#: failure may briefly overlap the old one).
MAX_CONNECTIONS_PER_SENDER = 4
HANDSHAKE_TIMEOUT_S = 10.0
MAX_HANDSHAKES = 32
IDLE_TIMEOUT_S = 300.0
#: Fetch requests carry no tensors.
MAX_FETCH_REQUEST_BYTES = PREFIX_SIZE + MAX_HEADER_BYTES
_NETWORK_ERRORS = (OSError, ssl.SSLError, ConnectionClosed, TimeoutError, EOFError)

#: ``fetch_handler(request) -> encoded reply message or None``; runs on a server thread.
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
    if not PREFIX_SIZE + MAX_HEADER_BYTES <= max_message_bytes <= 2**31 - 1:
        raise P2PLError(f"max_message_bytes {max_message_bytes} outside 4104..~2 GiB")
    return max_message_bytes


def _head_size(message: bytes) -> int:
    """Bytes of a wire message's prefix + JSON header (what a large message sends first)."""
    if len(message) < PREFIX_SIZE:
        return len(message)
    _, header_len = _PREFIX.unpack_from(message, 0)
    return min(len(message), PREFIX_SIZE + min(int(header_len), MAX_HEADER_BYTES))


# --------------------------------------------------------------------------------------- server


class _Rejected(Exception):
    """A refusal with its counter category; ``keep``: the connection is still in step."""

    def __init__(self, category: str, reason: str, *, keep: bool = True) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason
        self.keep = keep


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str  # "cn@ip:port", for logs
    cn: str | None  # the authenticated device id (None in insecure mode)
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def cut(self) -> None:
        """Shut the socket down under whatever thread reads it (that read then fails at once)."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class PeerServer:
    """The receiving side of one device: serves sends into ``mailbox`` and fetches via a callback.

    ``listen_addr`` is ``host:port`` (port 0 picks a free port; :meth:`start` returns it).
    ``spec`` is the run's model spec every incoming message must match; ``max_message_bytes``
    bounds one message; ``max_connections`` bounds the connections (one thread each).
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
        max_connections: int = 128,
    ) -> None:
        _check_security(device_id, tls, insecure, "PeerServer")
        self.device_id = device_id
        self.listen_addr = listen_addr
        self.tls = tls
        self.mailbox = mailbox
        self.spec = spec
        self.max_message_bytes = _check_limit(max_message_bytes)
        self.max_connections = max(1, int(max_connections))
        self._fetch_handler = fetch_handler
        self._context = tls_context(tls, server=True) if tls is not None else None
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._handshakes = 0
        self._threads: set[threading.Thread] = set()
        self._counters: Counter[str] = Counter()
        self._streams: Counter[str] = Counter()  # admitted large messages in flight, per sender
        self._log_budget = LogBudget()

    # --------------------------------------------------------------------------- lifecycle

    def start(self) -> int:
        """Bind and start serving; return the bound port."""
        if self._listener is not None:
            raise P2PLError(f"server of {self.device_id} already started")
        try:
            host, port = split_address(self.listen_addr)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.create_server((host, port), family=family, backlog=128)
        except (OSError, ValueError) as exc:
            raise P2PLError(f"cannot listen on {self.listen_addr}: {exc}") from None
        self._listener, self._port = listener, int(listener.getsockname()[1])
        self._stopping.clear()
        self._spawn(self._accept_loop, listener, name=f"p2pl-{self.device_id}-accept")
        log.info("%s listening on %s (port %d, tls=%s)", self.device_id, self.listen_addr, self._port, bool(self.tls))
        return self._port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving: close the listener and every connection; wait up to ``grace`` seconds for
        the connection threads to finish what they were doing. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        listener.close()
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for conn in connections:
            conn.cut()
        if grace:
            deadline = time.monotonic() + grace
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> PeerServer:
        if self._listener is None:
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
        """Counters: ``send.received``, ``send.accepted``, ``send.duplicate``,
        ``send.rejected.<category>``, ``fetch.*``, ``bytes.sent`` (the bytes of the fetch replies
        this server sent), ``connections.refused``, ``handshake.failed``."""
        with self._lock:
            return dict(self._counters)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    # ------------------------------------------------------------------------- connections

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                raw, addr = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: let others finish
                continue
            with self._lock:
                full = len(self._connections) + self._handshakes >= self.max_connections
                if not full and self._handshakes < MAX_HANDSHAKES:
                    self._handshakes += 1
                    admitted = True
                else:
                    admitted = False
            if not admitted:
                self._count("connections.refused")
                raw.close()
                continue
            self._spawn(self._serve_connection, raw, addr, name=f"p2pl-{self.device_id}-conn")

    def _handshake(self, raw: socket.socket, addr: tuple[str, int]) -> _Connection | None:
        """TLS with a client certificate, within HANDSHAKE_TIMEOUT_S; None if it failed."""
        where = f"{addr[0]}:{addr[1]}"
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is None:
                return _Connection(raw, f"?@{where}", None)
            raw.settimeout(HANDSHAKE_TIMEOUT_S)
            sock = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            sock.do_handshake()
            cert: dict[str, Any] = dict(sock.getpeercert() or {})
            names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            cn = str(names[0]) if names else None
            if cn is None:
                raise ssl.SSLError("client certificate without a common name")
            return _Connection(sock, f"{cn}@{where}", cn)
        except _NETWORK_ERRORS as exc:
            self._count("handshake.failed")
            if self._log_budget.allow((addr[0], "handshake")):
                log.info("%s: TLS handshake with %s failed: %s", self.device_id, where, str(exc)[:200])
            raw.close()
            return None

    def _register(self, conn: _Connection) -> bool:
        """Track a new authenticated connection; over a sender's connection cap, its oldest idle
        one makes room (a restarted peer reconnects), or the new one is refused."""
        victim: _Connection | None = None
        with self._lock:
            if conn.cn is not None:
                same = [c for c in self._connections if c.cn == conn.cn]
                if len(same) >= MAX_CONNECTIONS_PER_SENDER:
                    idle = [c for c in same if not c.busy]
                    if not idle:
                        self._counters["connections.refused"] += 1
                        return False
                    victim = min(idle, key=lambda c: c.last_used)
                    self._connections.discard(victim)
            self._connections.add(conn)
        if victim is not None:
            victim.cut()
        return True

    def _serve_connection(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        try:
            conn = self._handshake(raw, addr)
        finally:
            with self._lock:
                self._handshakes -= 1
        if conn is None:
            return
        if not self._register(conn):
            conn.sock.close()
            return
        reader = FramedReader(conn.sock)
        try:
            while not self._stopping.is_set():
                conn.busy = False
                try:
                    op, length = reader.read_frame(time.monotonic() + IDLE_TIMEOUT_S)
                except _NETWORK_ERRORS:
                    return  # closed, idle too long, or cut by stop()/a newer connection
                conn.busy, conn.last_used = True, time.monotonic()
                if op == OP_SEND:
                    keep = self._serve_send(conn, reader, length)
                elif op == OP_FETCH:
                    keep = self._serve_fetch(conn, reader, length)
                else:
                    self._reject("protocol", "protocol", f"unknown request code {op}", conn)
                    keep = False
                if not keep:
                    return
        except Exception:  # a bug must not take the server down
            log.exception("%s: unexpected error serving %s", self.device_id, conn.peer)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.sock.close()

    # ----------------------------------------------------------------------------- requests

    def _authenticate(self, sender: str, conn: _Connection) -> None:
        if self.tls is None:
            return  # insecure mode: trust the header (tests/benchmarks only)
        if conn.cn != sender:
            raise _Rejected("auth", f"header sender {sender!r} does not match certificate CN {conn.cn!r}")

    def _admit(self, header: MessageHeader, total: int, conn: _Connection, limit: int, *, store: bool) -> None:
        """Who sent it, then (for a send) whether the mailbox would keep it, then whether its
        size fits this model: all from the header, so nothing big is read for a refused message."""
        if total > limit:
            raise WireError(f"message of {total} bytes exceeds the limit of {limit} bytes")
        self._authenticate(header.sender, conn)
        if store and (reason := self.mailbox.admit(header)) is not None:
            raise _Rejected(f"mailbox.{reason}", f"{reason} ({header.kind} round {header.round} step {header.step})")
        check_announced(header, total, self.spec, limit)

    def _validate(self, data: bytearray, conn: _Connection, limit: int, *, store: bool) -> Message:
        """A whole message: its header admitted first, then the payload decoded."""
        try:
            header = peek_header(data, limit)
            self._admit(header, len(data), conn, limit, store=store)
            return decode_payload(header, data, self.spec, limit)
        except WireError as exc:
            raise _Rejected("invalid", str(exc)) from None

    def _receive_large(self, conn: _Connection, reader: FramedReader, length: int, deadline: float) -> Message:
        """A message over SMALL_MESSAGE_BYTES: its head admitted, then (ST_CONTINUE) its body read
        into a buffer of the announced size, holding one of its sender's stream slots."""
        if length > self.max_message_bytes:  # the sender waits for our answer: still in step
            raise _Rejected("invalid", f"message of {length} bytes exceeds the limit of {self.max_message_bytes} bytes")
        prefix = reader.read(PREFIX_SIZE, deadline)
        _, header_len = _PREFIX.unpack_from(prefix, 0)
        if not 0 < header_len <= MAX_HEADER_BYTES or PREFIX_SIZE + header_len > length:
            raise _Rejected("invalid", f"header length {header_len} outside 1..{MAX_HEADER_BYTES}", keep=False)
        head = prefix + reader.read(int(header_len), deadline)
        try:
            header, total = read_header(head)
            if total != length:
                raise WireError(f"header announces {total} bytes, the frame {length}")
            self._admit(header, length, conn, self.max_message_bytes, store=True)
        except WireError as exc:
            raise _Rejected("invalid", str(exc)) from None
        with self._lock:
            if self._streams[header.sender] >= MAX_STREAMS_PER_SENDER:
                raise _Rejected("busy", f"{header.sender} already has {MAX_STREAMS_PER_SENDER} streams in flight")
            self._streams[header.sender] += 1
        try:
            conn.sock.sendall(FRAME.pack(ST_CONTINUE, 0))
            buffer = bytearray(length)
            buffer[: len(head)] = head
            with memoryview(buffer) as view:
                reader.read_into(view[len(head) :], deadline)
        finally:
            with self._lock:
                self._streams[header.sender] -= 1
        try:
            return decode_payload(header, buffer, self.spec, self.max_message_bytes)
        except WireError as exc:
            raise _Rejected("invalid", str(exc)) from None

    def _serve_send(self, conn: _Connection, reader: FramedReader, length: int) -> bool:
        """Receive, validate and store one message, and answer; False: close the connection."""
        self._count("send.received")
        deadline = time.monotonic() + STREAM_GRACE_S + length / STREAM_MIN_BYTES_PER_S
        try:
            if length <= SMALL_MESSAGE_BYTES:  # bounded whatever the limit: read it whole
                msg = self._validate(reader.read(length, deadline), conn, self.max_message_bytes, store=True)
            else:
                msg = self._receive_large(conn, reader, length, deadline)
        except _Rejected as rej:
            if rej.category == f"mailbox.{DUPLICATE}":  # a retry of a message we already hold
                self._count("send.duplicate")
                return self._answer(conn, ST_DUPLICATE)
            self._reject("send", rej.category, rej.reason, conn)
            return rej.keep and self._answer(conn, ST_REJECTED, rej.reason.encode("utf-8", "replace"))
        except TimeoutError:
            self._reject("send", "slow", "message too slow: connection dropped", conn)
            return False
        except _NETWORK_ERRORS:
            self._reject("send", "stream", "connection cut by the sender mid-message", conn)
            return False
        verdict = self.mailbox.put(msg)
        if verdict == ACCEPTED:
            self._count("send.accepted")
            return self._answer(conn, ST_OK)
        if verdict == DUPLICATE:
            self._count("send.duplicate")
            return self._answer(conn, ST_DUPLICATE)
        reason = f"{verdict} ({msg.kind} round {msg.round} step {msg.step})"
        self._reject("send", f"mailbox.{verdict}", reason, conn)
        return self._answer(conn, ST_REJECTED, reason.encode())

    def _serve_fetch(self, conn: _Connection, reader: FramedReader, length: int) -> bool:
        self._count("fetch.received")
        if length > MAX_FETCH_REQUEST_BYTES:  # not read: the connection is out of step
            self._reject("fetch", "invalid", f"fetch request of {length} bytes is too large", conn)
            return False
        try:
            data = reader.read(length, time.monotonic() + STREAM_GRACE_S)
        except _NETWORK_ERRORS:
            return False
        try:
            req = self._validate(data, conn, MAX_FETCH_REQUEST_BYTES, store=False)
        except _Rejected as rej:
            self._reject("fetch", rej.category, rej.reason, conn)
            return self._answer(conn, ST_REJECTED, rej.reason.encode("utf-8", "replace"))
        handler = self._fetch_handler
        if handler is None:
            self._reject("fetch", "unimplemented", "no fetch handler registered", conn)
            return self._answer(conn, ST_REJECTED, b"no fetch handler registered")
        try:
            reply = handler(req)
        except Exception:
            log.exception("%s: fetch handler failed for %s", self.device_id, req.sender)
            self._count("fetch.rejected.internal")
            return self._answer(conn, ST_REJECTED, b"fetch handler failed")
        if reply is None:
            self._count("fetch.empty")
            return self._answer(conn, ST_OK)
        if len(reply) > self.max_message_bytes:
            self._reject("fetch", "oversized", f"reply of {len(reply)} bytes exceeds the limit", conn)
            return self._answer(conn, ST_REJECTED, b"reply exceeds the message limit")
        self._count("fetch.served")
        self._count("bytes.sent", len(reply))  # what this device really puts on the wire
        return self._answer(conn, ST_OK, reply)

    def _answer(self, conn: _Connection, status: int, body: bytes = b"") -> bool:
        """Send one response; False when the connection failed meanwhile."""
        try:
            conn.sock.settimeout(STREAM_GRACE_S + len(body) / STREAM_MIN_BYTES_PER_S)
            if len(body) <= SMALL_MESSAGE_BYTES:
                conn.sock.sendall(FRAME.pack(status, len(body)) + body)
            else:  # a large fetch reply: no second copy of it
                conn.sock.sendall(FRAME.pack(status, len(body)))
                conn.sock.sendall(body)
        except _NETWORK_ERRORS:
            return False
        conn.last_used = time.monotonic()
        return True

    def _reject(self, rpc: str, category: str, reason: str, conn: _Connection) -> None:
        self._count(f"{rpc}.rejected.{category}")
        # Bounded per (caller, category): a flooding neighbour cannot fill the disk with our log.
        count = self._log_budget.allow((conn.peer.split("@", 1)[0], rpc, category))
        if count:
            # Late or early round traffic is normal with deadlines and restarts; a bad message is not.
            routine = category in ("mailbox.stale", "mailbox.too-far-ahead", "mailbox.duplicate")
            level = logging.INFO if routine else logging.WARNING
            log.log(level, "%s rejected %s from %s: %s (#%d)", self.device_id, rpc, conn.peer, reason, count)


# --------------------------------------------------------------------------------------- client


class _Refused(Exception):
    """The peer answered, but not with what we asked for (a refusal or a protocol violation)."""


@dataclass(eq=False)
class _PeerState:
    address: str
    failures: int = 0
    down_until: float = 0.0
    sock: socket.socket | None = None
    reader: FramedReader | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request at a time

    def disconnect(self) -> None:
        sock, self.sock, self.reader = self.sock, None, None
        if sock is not None:
            sock.close()


class PeerClient:
    """The sending side of one device: one connection per peer, backoff, link filter.

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
    ) -> None:
        _check_security(device_id, tls, insecure, "PeerClient")
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
        self._context = tls_context(tls, server=False) if tls is not None else None
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

    # --------------------------------------------------------------------------- connections

    def _state(self, peer_id: str, address: str) -> _PeerState:
        with self._lock:
            if self._closed:
                raise P2PLError("PeerClient is closed")
            st = old = self._peers.get(peer_id)
            if old is None or old.address != address:  # new peer, or it moved: keep its failures
                st = _PeerState(address, *((old.failures, old.down_until) if old is not None else ()))
                self._peers[peer_id] = st
            else:
                old = None
        if old is not None:
            with old.lock:
                old.disconnect()
        assert st is not None
        return st

    def _connect(self, peer_id: str, st: _PeerState, deadline: float) -> None:
        host, port = split_address(st.address)
        raw = socket.create_connection((host, port), timeout=max(1e-3, deadline - time.monotonic()))
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = raw
            if self._context is not None:
                name = peer_id if self.verify_server_identity else "localhost"
                sock = self._context.wrap_socket(raw, server_hostname=name, do_handshake_on_connect=False)
                sock.settimeout(max(1e-3, deadline - time.monotonic()))
                sock.do_handshake()
        except BaseException:
            raw.close()
            raise
        st.sock, st.reader = sock, FramedReader(sock)

    def _response(self, reader: FramedReader, deadline: float, limit: int) -> tuple[int, bytearray]:
        status, length = reader.read_frame(deadline)
        if status not in (ST_OK, ST_DUPLICATE, ST_REJECTED, ST_CONTINUE):
            raise _Refused(f"answered with unknown status {status}")
        if length > (MAX_REASON_BYTES if status == ST_REJECTED else limit if status == ST_OK else 0):
            raise _Refused(f"answered status {status} with {length} bytes")
        return status, reader.read(length, deadline)

    def _exchange(self, st: _PeerState, op: int, payload: bytes, deadline: float) -> tuple[int, bytearray]:
        """One request on the peer's connection and its final response."""
        assert st.sock is not None and st.reader is not None
        st.sock.settimeout(max(1e-3, deadline - time.monotonic()))
        limit = self.max_message_bytes if op == OP_FETCH else 0
        if len(payload) <= SMALL_MESSAGE_BYTES:
            st.sock.sendall(FRAME.pack(op, len(payload)) + payload)
        else:  # the head first; the body only once the peer has admitted it
            head = _head_size(payload)
            st.sock.sendall(FRAME.pack(op, len(payload)) + payload[:head])
            status, body = self._response(st.reader, deadline, limit)
            if status != ST_CONTINUE:
                return status, body
            st.sock.settimeout(max(1e-3, deadline - time.monotonic()))
            st.sock.sendall(memoryview(payload)[head:])
        status, body = self._response(st.reader, deadline, limit)
        if status == ST_CONTINUE:
            raise _Refused("answered CONTINUE to a whole message")
        return status, body

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

    def _call(
        self, rpc: str, peer_id: str, address: str, payload: bytes, timeout: float
    ) -> tuple[int, bytearray] | None:
        """One logical request with retries: the peer's ``(status, body)``, or None when it was
        unreachable or broke the protocol (logged, counted)."""
        st = self._state(peer_id, address)
        op = OP_FETCH if rpc == "fetch" else OP_SEND
        deadline = time.monotonic() + timeout
        last, attempt, fresh_retry = "timeout", 0, True
        while attempt < self.attempts:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not st.lock.acquire(timeout=remaining):
                break
            reused = st.sock is not None
            try:
                if st.sock is None:
                    self._connect(peer_id, st, deadline)
                answer = self._exchange(st, op, payload, deadline)
            except _Refused as exc:
                st.disconnect()  # whatever it sent, the connection is out of step now
                self._mark_up(st)
                self._count(f"{rpc}.invalid")
                log.warning("%s: %s to %s: peer broke the protocol: %s", self.device_id, rpc, peer_id, exc)
                return None
            except (*_NETWORK_ERRORS, ValueError) as exc:
                st.disconnect()
                last = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if reused and fresh_retry:  # the peer may have closed an idle connection: redial once
                    fresh_retry = False
                    continue
                attempt += 1
                if attempt < self.attempts:
                    time.sleep(max(0.0, min(self.retry_delay * 2 ** (attempt - 1), deadline - time.monotonic())))
                continue
            finally:
                st.lock.release()
            self._mark_up(st)
            return answer
        self._count(f"{rpc}.unreachable")
        log.info("%s: %s to %s at %s failed: %s", self.device_id, rpc, peer_id, address, last)
        self._mark_down(peer_id, st)
        return None

    # --------------------------------------------------------------------------------- calls

    def send(self, peer_id: str, address: str, message: bytes, timeout: float = 10.0) -> bool:
        """Deliver an encoded wire message to ``peer_id`` at ``address`` (``host:port``).

        Returns True only if the peer acknowledged it (ok, or duplicate: it already had it);
        False if the link filter dropped it, the peer is in backoff or unreachable, or the peer
        rejected it (the reason is logged). Never raises for network problems.
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
        answer = self._call("send", peer_id, address, message, timeout)
        if answer is None:
            return False
        status, body = answer
        if status in (ST_OK, ST_DUPLICATE):
            self._count("send.ok")
            self._count("bytes.sent", len(message))
            return True
        self._count("send.rejected")
        log.warning("%s: %s rejected our message: %s", self.device_id, peer_id, body.decode("utf-8", "replace"))
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
        answer = self._call("fetch", peer_id, address, request, timeout)
        if answer is None:
            return None
        status, reply = answer
        if status == ST_REJECTED:
            self._count("fetch.rejected")
            log.warning("%s: fetch from %s refused: %s", self.device_id, peer_id, reply.decode("utf-8", "replace"))
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
        """Close every connection and the send pool. Idempotent."""
        with self._lock:
            self._closed = True
            peers, self._peers = self._peers, {}
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for st in peers.values():
            with st.lock:
                st.disconnect()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
