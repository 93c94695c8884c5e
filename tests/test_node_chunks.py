"""Chunked streaming of large wire messages: reassembly, and every way a stream is refused."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch

from p2pl.node import wire
from p2pl.node.chunks import CHUNK_PREFIX, MIN_CHUNK_BYTES, Reassembler, check_chunk_bytes, split
from p2pl.node.wire import MessageHeader, ModelSpec, WireError

CHUNK = MIN_CHUNK_BYTES  # small chunks, so a small model takes many


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 50, generator=g), "b": torch.randn(64, generator=g)}


SPEC = ModelSpec.from_tensors(_params())


def _message(round: int = 1, seed: int = 0) -> bytes:
    return wire.encode(MessageHeader("params", "dev-1", round, 0, SPEC.fingerprint), _params(seed))


def _admit_for(spec: ModelSpec, seen: list[tuple[MessageHeader, int]] | None = None):
    def admit(header: MessageHeader, total: int) -> None:
        wire.check_announced(header, total, spec, spec.max_message_bytes())
        if seen is not None:
            seen.append((header, total))

    return admit


def _chunk(position: int, data: bytes) -> bytes:
    return CHUNK_PREFIX.pack(position) + data


def _reassemble(chunks, chunk_bytes: int = CHUNK, spec: ModelSpec = SPEC) -> bytearray:
    assembler = Reassembler(_admit_for(spec), chunk_bytes)
    for c in chunks:
        assembler.add(c)
    return assembler.finish()


@pytest.mark.parametrize("chunk_bytes", [CHUNK, CHUNK + 1, 1 << 20])
def test_split_and_reassemble_round_trip_into_views(chunk_bytes):
    message = _message()
    chunks = list(split(message, chunk_bytes))
    assert len(chunks) == -(-len(message) // chunk_bytes)
    assert all(len(c) - CHUNK_PREFIX.size <= chunk_bytes for c in chunks)
    seen: list[tuple[MessageHeader, int]] = []
    assembler = Reassembler(_admit_for(SPEC, seen), chunk_bytes)
    for c in chunks:
        assembler.add(c)
    buffer = assembler.finish()
    assert buffer == message and seen[0][1] == len(message) and len(seen) == 1  # admitted once, at the start
    msg = wire.decode(buffer, SPEC)
    assert msg.tensors is not None
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    for name, sent in _params().items():
        got = msg.tensors[name]
        assert torch.equal(got, sent)
        assert start <= got.data_ptr() < start + len(buffer)  # a view over the received bytes


def test_a_chunk_too_many_is_refused():
    chunks = list(split(_message(), CHUNK))
    total = len(_message())
    with pytest.raises(WireError, match=f"runs past the announced {total} bytes"):
        _reassemble([*chunks, _chunk(total, b"\x00" * 16)])


def test_a_chunk_running_past_the_announced_size_is_refused_before_writing():
    message = _message()
    chunks = list(split(message, CHUNK))
    last = chunks[-1]
    position = CHUNK_PREFIX.unpack_from(last)[0]
    assembler = Reassembler(_admit_for(SPEC), CHUNK)
    for c in chunks[:-1]:
        assembler.add(c)
    with pytest.raises(WireError, match="a chunk too many or too large"):
        assembler.add(_chunk(position, last[CHUNK_PREFIX.size :] + b"\x00"))
    assert assembler.received == position  # nothing of the refused chunk was taken


def test_a_chunk_larger_than_the_chunk_size_is_refused():
    message = _message()
    with pytest.raises(WireError, match=f"exceeds the {CHUNK}-byte chunk size"):
        _reassemble([_chunk(0, message[: CHUNK + 1])])


def test_chunks_out_of_order_are_refused():
    chunks = list(split(_message(), CHUNK))
    assert len(chunks) >= 3
    with pytest.raises(WireError, match=f"chunk for byte {2 * CHUNK} out of order: expected byte {CHUNK}"):
        _reassemble([chunks[0], chunks[2], chunks[1]])
    with pytest.raises(WireError, match="out of order: expected byte 0"):
        _reassemble([chunks[1]])
    with pytest.raises(WireError, match="out of order"):  # a repeated chunk
        _reassemble([chunks[0], chunks[0]])


def test_truncated_and_empty_streams_are_refused():
    chunks = list(split(_message(), CHUNK))
    with pytest.raises(WireError, match=f"stream ended after {2 * CHUNK} of the announced {len(_message())} bytes"):
        _reassemble(chunks[:2])
    with pytest.raises(WireError, match="empty stream"):
        _reassemble([])
    with pytest.raises(WireError, match="carries no message bytes"):
        _reassemble([CHUNK_PREFIX.pack(0)])


def test_first_chunk_must_hold_the_whole_header():
    with pytest.raises(WireError, match="truncated inside the header"):
        _reassemble([_chunk(0, _message()[:20])])


def test_a_header_announcing_more_than_the_model_is_refused_before_allocating():
    """A forged header claiming a 1 GB payload: refused on the first chunk, with almost no memory."""
    payload_size = 10**9
    header = {"extras": {}, "fingerprint": SPEC.fingerprint, "kind": "params", "payload_size": payload_size,
              "round": 1, "sender": "dev-1", "step": 0, "version": wire.WIRE_VERSION}  # fmt: skip
    raw = json.dumps(header).encode()
    first = wire._PREFIX.pack(wire.MAGIC, len(raw)) + raw
    assembler = Reassembler(_admit_for(SPEC), CHUNK)
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match=r"exceeds the limit|larger than any payload"):
            assembler.add(_chunk(0, first))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"refusing a forged stream header allocated {peak} bytes"
    assert assembler.header is None


def test_admit_sees_the_header_before_any_payload():
    refused: list[str] = []

    def admit(header: MessageHeader, total: int) -> None:
        refused.append(header.sender)
        raise WireError(f"{header.sender} is not a neighbour")

    assembler = Reassembler(admit, CHUNK)
    with pytest.raises(WireError, match="dev-1 is not a neighbour"):
        assembler.add(next(split(_message(), CHUNK)))
    assert refused == ["dev-1"] and assembler.received == 0


def test_chunk_size_must_hold_a_header():
    assert check_chunk_bytes(MIN_CHUNK_BYTES) == MIN_CHUNK_BYTES
    with pytest.raises(WireError, match="chunk size must be"):
        check_chunk_bytes(MIN_CHUNK_BYTES - 1)
    with pytest.raises(WireError, match="chunk size must be"):
        Reassembler(_admit_for(SPEC), True)  # type: ignore[arg-type]
