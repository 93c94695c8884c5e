"""The byte protocol between two devices on one mutual-TLS connection, and the TLS contexts.

A connection carries one request at a time; each request and each response starts with a
9-byte frame ``(code: uint8, length: uint64, little-endian)`` followed by ``length`` bytes:

request ``(OP_SEND, n)`` + a :mod:`p2pl.node.wire` message of ``n`` bytes
    A message of at most SMALL_MESSAGE_BYTES follows its frame at once. A larger one sends only
    its *head* (the wire prefix and JSON header) and waits: the receiver authenticates the
    sender, asks its mailbox and checks the announced size against its model, and answers
    ``ST_CONTINUE`` (then the rest follows) or ``ST_REJECTED``. So a receiver never reads, let
    alone buffers, the body of a message it would refuse, and a refused large message costs
    the link nothing.
request ``(OP_FETCH, n)`` + a payload-free wire message (a pull request, e.g. ``sync-fetch``).
response ``(ST_OK, n)`` + ``n`` bytes
    For a send, ``n`` is 0. For a fetch, the reply message (``n == 0``: nothing to give).
response ``(ST_DUPLICATE, 0)``: the message was already held (a retry); as good as ST_OK.
response ``(ST_REJECTED, n)`` + a UTF-8 reason of at most MAX_REASON_BYTES.
response ``(ST_CONTINUE, 0)``: send the rest of the large message announced.

Either side closes the connection on anything else (an unknown code, a length over its limit,
a deadline passed); the other side then sees a closed connection, never a desynchronized one.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import tempfile
import time
from pathlib import Path

from p2pl.node.certs import TlsConfig

__all__ = [
    "FRAME",
    "MAX_REASON_BYTES",
    "OP_FETCH",
    "OP_SEND",
    "SMALL_MESSAGE_BYTES",
    "ST_CONTINUE",
    "ST_DUPLICATE",
    "ST_OK",
    "ST_REJECTED",
    "ConnectionClosed",
    "FramedReader",
    "split_address",
    "tls_context",
]

FRAME = struct.Struct("<BQ")
OP_SEND = 1
OP_FETCH = 2
ST_OK = 0
ST_DUPLICATE = 1
ST_REJECTED = 2
ST_CONTINUE = 3
#: A message up to this size follows its frame at once (one TLS record or a few: one round trip);
#: a larger one asks first. Both ends use this constant: it is part of the protocol.
SMALL_MESSAGE_BYTES = 64 * 1024
MAX_REASON_BYTES = 1024
#: Reads go through a buffer of this size, so a small message and its frame cost one read.
_READ_BUFFER_BYTES = 64 * 1024


class ConnectionClosed(ConnectionError):
    """The other side closed the connection (or it was cut) before a whole frame arrived."""


class FramedReader:
    """Exact reads from one socket through a small buffer, each against a deadline.

    Small reads (a frame, a small message) are served from one ``recv`` into the buffer; a large
    body is received straight into its destination, so it is copied once, by the socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray(_READ_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0

    def _recv(self, into: memoryview, deadline: float) -> int:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(remaining)
        n = self.sock.recv_into(into)
        if n == 0:
            raise ConnectionClosed("connection closed by the other side")
        return n

    def read_into(self, target: memoryview, deadline: float) -> None:
        """Fill ``target`` exactly (raise TimeoutError, ConnectionClosed or an OSError/SSLError)."""
        filled = min(self._end - self._start, len(target))
        if filled:
            target[:filled] = self._view[self._start : self._start + filled]
            self._start += filled
        while filled < len(target):
            if len(target) - filled >= len(self._buffer):  # large: straight into the destination
                filled += self._recv(target[filled:], deadline)
                continue
            self._start, self._end = 0, self._recv(self._view, deadline)
            take = min(self._end, len(target) - filled)
            target[filled : filled + take] = self._view[:take]
            self._start = take
            filled += take

    def read(self, size: int, deadline: float) -> bytearray:
        """``size`` bytes in a new writable buffer (tensors decoded from it can view it in place)."""
        out = bytearray(size)
        with memoryview(out) as view:
            self.read_into(view, deadline)
        return out

    def read_frame(self, deadline: float) -> tuple[int, int]:
        """The next ``(code, length)`` frame."""
        code, length = FRAME.unpack(self.read(FRAME.size, deadline))
        return int(code), int(length)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) into its parts; ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def tls_context(tls: TlsConfig, *, server: bool) -> ssl.SSLContext:
    """Mutual TLS 1.3 with the run's CA: this device's certificate, and the other side's required.

    A client context also checks that the server's certificate names the device it dials (the
    ``server_hostname`` given to ``wrap_socket``). Python's ``ssl`` loads a key only from a file:
    the PEM bytes pass through a private temporary directory that is removed at once.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=tls.ca_cert.decode("ascii"))
    with tempfile.TemporaryDirectory(prefix="p2pl-tls-") as tmp:  # created 0700
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(tls.cert)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(tls.key)
        ctx.load_cert_chain(cert, key)
    return ctx
