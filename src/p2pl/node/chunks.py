"""Large messages as a stream of bounded chunks, reassembled into one buffer of the announced size.

A wire message larger than one chunk travels as a gRPC stream (``SendStream``) of chunks, so
neither side ever holds a second whole copy of a large model in gRPC's buffers, and a receiver
can refuse a message after its first chunk. Each chunk is::

    offset  size  content
    0       8     position of these bytes in the message (uint64, little-endian)
    8       n     the message's bytes [position, position + n), 1 <= n <= chunk size

The receiver (:class:`Reassembler`) checks, in order:

* the first chunk starts at position 0 and holds the message's whole prefix and JSON header; the
  header is validated (:func:`p2pl.node.wire.read_header`) and handed to ``admit`` -- the
  transport authenticates the sender, asks the mailbox, and checks the announced size against
  the model -- *before* a buffer of the announced size is allocated;
* every further chunk starts exactly where the previous one ended (wrong order refused), is no
  larger than the chunk size, and does not run past the announced size (a chunk too many or too
  large is refused at once, nothing is written);
* the stream ends exactly at the announced size (a truncated stream is refused).

So the memory a stream can make a receiver hold is the announced size, which ``admit`` bounds by
the largest message of the receiver's model, plus one chunk in flight.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from p2pl.node.wire import MAX_HEADER_BYTES, PREFIX_SIZE, MessageHeader, WireError, read_header

__all__ = ["CHUNK_BYTES", "CHUNK_PREFIX", "MIN_CHUNK_BYTES", "Admit", "Reassembler", "check_chunk_bytes", "split"]

#: Message bytes per chunk. 1 MiB: large enough that the per-chunk Python and gRPC work is small
#: next to copying it, small enough that gRPC buffers little per call.
CHUNK_BYTES = 1 << 20
#: A first chunk must be able to hold a whole prefix + JSON header.
MIN_CHUNK_BYTES = PREFIX_SIZE + MAX_HEADER_BYTES
CHUNK_PREFIX = struct.Struct("<Q")

#: ``admit(header, total_bytes)`` raises to refuse a message from its header alone.
Admit = Callable[[MessageHeader, int], None]


def check_chunk_bytes(chunk_bytes: int) -> int:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < MIN_CHUNK_BYTES:
        raise WireError(f"chunk size must be an integer >= {MIN_CHUNK_BYTES} bytes, got {chunk_bytes!r}")
    return chunk_bytes


def split(message: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The chunks of ``message`` (one copy of each slice, made as gRPC asks for it)."""
    view = memoryview(message)
    for position in range(0, len(message), chunk_bytes):
        yield b"".join((CHUNK_PREFIX.pack(position), view[position : position + chunk_bytes]))


class Reassembler:
    """Receives the chunks of one message in order into a buffer of the size its header announces."""

    def __init__(self, admit: Admit, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._admit = admit
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.header: MessageHeader | None = None
        self._buffer: bytearray | None = None
        self._filled = 0

    @property
    def received(self) -> int:
        """Message bytes received so far."""
        return self._filled

    def add(self, chunk: bytes) -> None:
        """Take the next chunk; raise WireError (or whatever ``admit`` raises) to refuse the stream."""
        size = len(chunk) - CHUNK_PREFIX.size
        if size < 1:
            raise WireError(f"chunk of {len(chunk)} bytes carries no message bytes")
        if size > self.chunk_bytes:
            raise WireError(f"chunk of {size} bytes exceeds the {self.chunk_bytes}-byte chunk size")
        (position,) = CHUNK_PREFIX.unpack_from(chunk, 0)
        if position != self._filled:
            raise WireError(f"chunk for byte {position} out of order: expected byte {self._filled}")
        data = memoryview(chunk)[CHUNK_PREFIX.size :]
        if self._buffer is None:
            header, total = read_header(data)  # the whole header must be in the first chunk
            self._admit(header, total)
            self.header, self._buffer = header, bytearray(total)
        total = len(self._buffer)
        if position + size > total:
            raise WireError(
                f"chunk for bytes {position}..{position + size} runs past the announced {total} bytes "
                "(a chunk too many or too large)"
            )
        self._buffer[position : position + size] = data
        self._filled += size

    def finish(self) -> bytearray:
        """The whole message, once the stream has ended; refuses an empty or truncated stream."""
        if self._buffer is None:
            raise WireError("empty stream: no chunk arrived")
        if self._filled != len(self._buffer):
            raise WireError(f"stream ended after {self._filled} of the announced {len(self._buffer)} bytes")
        return self._buffer
