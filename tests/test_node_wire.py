"""Wire format: exact round trips and one test per validation failure."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from p2pl.errors import P2PLError
from p2pl.node import wire
from p2pl.node.wire import MessageHeader, ModelSpec, WireError


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(5, 3, generator=g),
        "layer.bias": torch.randn(5, generator=g),
        "out.weight": torch.randn(2, 5, generator=g),
    }


SPEC = ModelSpec.from_tensors(_params())


def _header(kind: str = "params", **kw) -> MessageHeader:
    base: dict = {"sender": "dev-1", "round": 3, "step": 0, "fingerprint": SPEC.fingerprint}
    base.update(kw)
    return MessageHeader(kind=kind, **base)


def _raw(header: dict, payload: bytes = b"", *, magic: bytes = b"P2PL") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sI", magic, len(h)) + h + payload


def _good_header_dict(payload: bytes, **kw) -> dict:
    d = {
        "version": wire.WIRE_VERSION,
        "kind": "params",
        "sender": "dev-1",
        "round": 1,
        "step": 0,
        "fingerprint": SPEC.fingerprint,
        "payload_size": len(payload),
        "extras": {},
    }
    d.update(kw)
    return d


def test_fingerprint_is_order_independent_and_sensitive():
    rows = [("a", (2, 3), "float32"), ("b", (3,), torch.float32)]
    fp = wire.fingerprint(rows)
    assert len(fp) == 64 and fp == wire.fingerprint(list(reversed(rows)))
    assert fp != wire.fingerprint([("a", (3, 2), "float32"), ("b", (3,), "float32")])
    assert fp != wire.fingerprint([("a", (2, 3), "float64"), ("b", (3,), "float32")])
    assert fp != wire.fingerprint([("a2", (2, 3), "float32"), ("b", (3,), "float32")])
    assert SPEC.fingerprint == wire.fingerprint((n, t.shape, t.dtype) for n, t in _params().items())
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    assert ModelSpec.from_module(model).names == ("0.weight", "0.bias", "1.weight", "1.bias")


def test_round_trip_is_exact():
    params = _params(1)
    data = wire.encode(_header(extras={"data_size": 600, "degree": 4, "norm": 2.5}), params)
    assert data[:4] == b"P2PL"
    msg = wire.decode(data, SPEC, max_bytes=1 << 20)
    assert msg.kind == "params" and msg.sender == "dev-1" and msg.round == 3 and msg.step == 0
    assert msg.header.extras == {"data_size": 600, "degree": 4, "norm": 2.5}
    assert msg.header.payload_size == len(data) - 8 - struct.unpack_from("<I", data, 4)[0]
    assert msg.nbytes == len(data)
    assert msg.tensors is not None and list(msg.tensors) == list(SPEC.names)
    for name, t in params.items():
        assert msg.tensors[name].dtype == torch.float32
        assert torch.equal(msg.tensors[name], t)  # bit-exact
    # decoding without a spec still checks the payload against the header fingerprint
    assert set(wire.decode(data, None).tensors or {}) == set(params)


def test_payload_free_kinds_round_trip():
    data = wire.encode(_header("sync-norm", step=2, extras={"norm": 7.25, "owner": "dev-9"}))
    msg = wire.decode(data, SPEC, max_bytes=10_000)
    assert msg.tensors is None and msg.header.payload_size == 0
    assert msg.header.extras == {"norm": 7.25, "owner": "dev-9"}
    assert wire.peek_header(data).kind == "sync-norm"


def test_wire_error_is_p2pl_error():
    assert issubclass(WireError, P2PLError)


def test_encode_refuses_wrong_model_and_nan():
    params = _params()
    with pytest.raises(WireError, match="fingerprint"):
        wire.encode(_header(), {**params, "extra": torch.zeros(1)})
    params["layer.bias"][0] = float("nan")
    with pytest.raises(WireError, match="non-finite"):
        wire.encode(_header(), params)
    with pytest.raises(WireError, match="must carry tensors"):
        wire.encode(_header("params"))
    with pytest.raises(WireError, match="must not carry"):
        wire.encode(_header("sync-norm"), _params())
    with pytest.raises(WireError, match="unknown header extra"):
        wire.encode(_header("hello", extras={"evil": 1}))


def _good_payload() -> bytes:
    return st_save(_params())


def _st_header(payload: bytes) -> tuple[int, dict]:
    n = struct.unpack_from("<Q", payload, 0)[0]
    return n, json.loads(payload[8 : 8 + n])


def _with_st_header(payload: bytes, header: bytes) -> bytes:
    """``payload`` with its safetensors header replaced by ``header`` padded to the same length."""
    n, _ = _st_header(payload)
    assert len(header) <= n
    return payload[:8] + header.ljust(n) + payload[8 + n :]


def _garbled(payload: bytes) -> bytes:
    return _with_st_header(payload, b"{not json")


def _overlapping(payload: bytes) -> bytes:
    _, head = _st_header(payload)
    first = min((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][0])
    other = next(k for k in head if k not in (first, "__metadata__"))
    size = head[other]["data_offsets"][1] - head[other]["data_offsets"][0]
    head[other]["data_offsets"] = [0, size]  # starts where the first tensor starts
    return _with_st_header(payload, json.dumps(head, separators=(",", ":")).encode())


# Each case: (bytes, expected substring of the reason).
def _cases() -> list[tuple[str, bytes, str]]:
    p = _good_payload()
    good = _good_header_dict(p)
    ok = _raw(good, p)
    hlen = struct.unpack_from("<I", ok, 4)[0]
    cases = [
        ("short", b"P2P", "shorter than"),
        ("bad magic", _raw(good, p, magic=b"XXXX"), "bad magic"),
        ("header too long", struct.pack("<4sI", b"P2PL", 10**6) + b"{}", "header length"),
        ("zero header", struct.pack("<4sI", b"P2PL", 0), "header length"),
        ("truncated header", ok[: 8 + hlen - 5], "truncated"),
        ("truncated payload", ok[:-3], "payload_size"),
        ("trailing bytes", ok + b"x", "payload_size"),
        ("not json", struct.pack("<4sI", b"P2PL", 5) + b"{nope", "not valid UTF-8 JSON"),
        ("not utf8", struct.pack("<4sI", b"P2PL", 2) + b"\xff\xfe", "not valid UTF-8 JSON"),
        ("not object", _raw([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
        ("missing key", _raw({k: v for k, v in good.items() if k != "step"}, p), "missing ['step']"),
        ("extra key", _raw({**good, "evil": 1}, p), "unexpected ['evil']"),
        (
            "duplicate key",
            (lambda h: struct.pack("<4sI", b"P2PL", len(h)) + h + p)(json.dumps(good).encode()[:-1] + b', "round": 2}'),
            "duplicate header key",
        ),
        ("version", _raw({**good, "version": 1}, p), "unsupported wire version"),
        ("kind", _raw({**good, "kind": "pickle"}, p), "unknown message kind"),
        ("sender", _raw({**good, "sender": "../etc"}, p), "bad sender"),
        ("negative round", _raw({**good, "round": -1}, p), "round must be"),
        ("bool step", _raw({**good, "step": True}, p), "step must be"),
        ("float round", _raw({**good, "round": 1.5}, p), "round must be"),
        ("fingerprint format", _raw({**good, "fingerprint": "abc"}, p), "64 lowercase hex"),
        ("extras type", _raw({**good, "extras": []}, p), "extras is not"),
        ("unknown extra", _raw({**good, "extras": {"x": 1}}, p), "unknown header extra"),
        ("nan extra", _raw({**good, "extras": {"norm": float("nan")}}, p), "NaN"),
        ("str degree", _raw({**good, "extras": {"degree": "4"}}, p), "degree must be an integer"),
        ("payload on sync-norm", _raw({**good, "kind": "sync-norm"}, p), "must not carry"),
        ("payload of the wrong size", _raw(_good_header_dict(b"\x00" * 40), b"\x00" * 40), "does not fit this model"),
        ("payload header too large", _raw(_good_header_dict(q := struct.pack("<Q", 10**6) + p[8:]), q), "exceeds the"),
        ("payload header not json", _raw(_good_header_dict(q := _garbled(p)), q), "payload header is not valid"),
        ("payload offsets overlap", _raw(_good_header_dict(q := _overlapping(p)), q), "do not tile"),
    ]
    return cases


@pytest.mark.parametrize("name,data,reason", _cases(), ids=[c[0] for c in _cases()])
def test_malformed_messages_refused(name, data, reason):
    with pytest.raises(WireError, match=reason.replace("[", r"\[").replace("]", r"\]")) as info:
        wire.decode(data, SPEC, max_bytes=1 << 20)
    assert "\n" not in str(info.value)


def _crafted(tensors: dict[str, torch.Tensor]) -> bytes:
    """A message whose header claims the right fingerprint but whose payload differs."""
    p = st_save(tensors)
    return _raw(_good_header_dict(p), p)


def test_oversized_refused_before_parsing():
    data = wire.encode(_header(), _params())
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.decode(data, SPEC, max_bytes=len(data) - 1)
    assert wire.decode(data, SPEC, max_bytes=len(data)).nbytes == len(data)


def test_wrong_fingerprint_refused():
    other = {"w": torch.zeros(2, 2)}
    data = wire.encode(_header(fingerprint=ModelSpec.from_tensors(other).fingerprint), other)
    with pytest.raises(WireError, match="different model architecture"):
        wire.decode(data, SPEC)


def test_wrong_shape_refused():
    t = _params()
    t["layer.weight"] = t["layer.weight"].T.contiguous()  # same bytes, other shape
    with pytest.raises(WireError, match=r"'layer.weight' has shape \[3, 5\], expected \(5, 3\)"):
        wire.decode(_crafted(t), SPEC)
    t = _params()
    t["layer.bias"] = torch.zeros(6)  # other size: refused before the payload is read
    with pytest.raises(WireError, match="does not fit this model"):
        wire.decode(_crafted(t), SPEC)


def test_wrong_dtype_refused():
    t = _params()
    t["out.weight"] = t["out.weight"].to(torch.int32)  # same size, other dtype
    with pytest.raises(WireError, match="has dtype I32, expected float32"):
        wire.decode(_crafted(t), SPEC)
    t["out.weight"] = t["out.weight"].double()
    with pytest.raises(WireError, match="does not fit this model"):
        wire.decode(_crafted(t), SPEC)


def test_missing_and_extra_tensors_refused():
    t = _params()
    del t["out.weight"]
    with pytest.raises(WireError, match="does not fit this model"):
        wire.decode(_crafted(t), SPEC)
    t = {**_params(), "evil": torch.zeros(0)}  # a zero-size extra keeps the data size
    with pytest.raises(WireError, match=r"unexpected \['evil'\]"):
        wire.decode(_crafted(t), SPEC)


def _header_bomb(tensors: int) -> bytes:
    """A params message whose safetensors header lists ``tensors`` zero-size tensors."""
    entry = '"t{:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    head = ("{" + ",".join(entry.format(i) for i in range(tensors)) + "}").encode()
    payload = struct.pack("<Q", len(head)) + head
    return _raw(_good_header_dict(payload), payload)


def test_header_bomb_refused_before_decoding_with_little_memory():
    """1M zero-size tensors in a payload header (tens of MB): refused from the first 8 payload
    bytes, allocating almost nothing (safetensors itself would build a million tensors)."""
    import tracemalloc

    bomb = _header_bomb(1_000_000)
    assert len(bomb) > 50_000_000
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="larger than any payload of this model"):
            wire.decode(bomb, SPEC, max_bytes=len(bomb))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"decoding a refused header bomb allocated {peak} bytes"


def test_many_tensor_header_that_fits_the_size_is_refused_by_layout():
    """A header bomb cut to this model's payload size: a wrong header, not a decode."""
    payload = st_save(_params())
    n, _ = _st_header(payload)
    head = b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(20)) + b"}"
    assert len(head) > SPEC.max_safetensors_header()
    bomb = struct.pack("<Q", len(head)) + head + payload[8 + n :]
    with pytest.raises(WireError, match=r"larger than any payload|exceeds the"):
        wire.decode(_raw(_good_header_dict(bomb), bomb), SPEC)
    entries = [b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(3)]
    small = _with_st_header(payload, b"{" + b",".join(entries) + b"}")
    with pytest.raises(WireError, match="tensor names differ"):
        wire.decode(_raw(_good_header_dict(small), small), SPEC)


def test_payload_sizes_follow_the_model():
    payload = st_save(_params())
    assert SPEC.data_bytes() == 4 * (15 + 5 + 10)
    assert len(payload) <= SPEC.max_payload_bytes()
    assert len(wire.encode(_header(), _params())) <= SPEC.max_message_bytes()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_refused(bad):
    t = _params()
    t["layer.weight"][2, 1] = bad
    with pytest.raises(WireError, match="NaN or infinite"):
        wire.decode(_crafted(t), SPEC)
    with pytest.raises(WireError, match="NaN or infinite"):
        wire.decode(_crafted(t), None)


def test_decode_without_spec_checks_header_fingerprint():
    t = _params()
    t["layer.bias"] = torch.zeros(6)
    with pytest.raises(WireError, match="do not match the header fingerprint"):
        wire.decode(_crafted(t), None)


def test_model_spec_rejects_unsupported_dtype():
    with pytest.raises(WireError, match="cannot travel"):
        ModelSpec.from_tensors({"x": torch.zeros(2, dtype=torch.complex64)})


# ------------------------------------------------------------ fast path: format, views, layouts


def test_payload_is_standard_safetensors_with_aligned_data():
    from safetensors.torch import load as st_load

    data = wire.encode(_header(), _params())
    header_len = struct.unpack_from("<I", data, 4)[0]
    assert (wire.PREFIX_SIZE + header_len) % 8 == 0  # the payload starts 8-byte aligned
    payload = data[wire.PREFIX_SIZE + header_len :]
    assert (8 + struct.unpack_from("<Q", payload)[0]) % 8 == 0  # and so does its tensor data
    loaded = st_load(payload)
    assert set(loaded) == set(_params())
    for name, t in _params().items():
        assert torch.equal(loaded[name], t)


def test_decode_views_the_received_buffer_and_equals_what_was_sent():
    params = _params()
    buffer = bytearray(wire.encode(_header(), params))
    msg = wire.decode(buffer, SPEC)
    assert msg.tensors is not None and list(msg.tensors) == list(SPEC.names)
    base = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    for name, sent in params.items():
        got = msg.tensors[name]
        assert torch.equal(got, sent) and got.dtype == sent.dtype
        assert base <= got.data_ptr() < base + len(buffer)  # no copy
    # read-only bytes are copied once, never shared or modified
    data = bytes(buffer)
    again = wire.decode(data, SPEC).tensors
    assert again is not None and all(torch.equal(again[n], t) for n, t in params.items())


def test_foreign_unaligned_payload_decodes_by_copy():
    """safetensors' own bytes after an unpadded header (another encoder): still exact."""
    params = _params()
    payload = st_save(params)
    h = json.dumps(_good_header_dict(payload)).encode()
    h += b" " * ((1 - wire.PREFIX_SIZE - len(h)) % 4)  # JSON may end in spaces; floats now misaligned
    data = struct.pack("<4sI", b"P2PL", len(h)) + h + payload
    assert (wire.PREFIX_SIZE + len(h)) % 4 == 1
    msg = wire.decode(data, SPEC)
    assert msg.tensors is not None and all(torch.equal(msg.tensors[n], t) for n, t in params.items())


#: A compressed message's kind of layout: int32 indices, float16 values, odd-sized uint8 codes
#: (listed first, so the encoder must reorder to keep the others aligned), a float32 scale.
LAYOUT = [("codes", "uint8", (7,)), ("idx", torch.int32, (5,)), ("vals", "float16", (5,)), ("scale", "float32", ())]


def _layout_tensors() -> dict[str, torch.Tensor]:
    return {
        "codes": torch.tensor([0, 1, 2, 250, 255, 7, 9], dtype=torch.uint8),
        "idx": torch.tensor([3, -1, 2**31 - 1, 0, 17], dtype=torch.int32),
        "vals": torch.tensor([0.5, -1.25, 65504.0, 0.0, 3.0], dtype=torch.float16),
        "scale": torch.tensor(0.125),
    }


def test_generic_layout_round_trips_exactly():
    spec = ModelSpec.from_layout(LAYOUT)
    assert [(t.name, t.dtype, t.shape) for t in spec.tensors] == [
        ("codes", "uint8", (7,)), ("idx", "int32", (5,)), ("vals", "float16", (5,)), ("scale", "float32", ())
    ]  # fmt: skip
    assert spec.data_bytes() == 7 + 20 + 10 + 4
    data = bytearray(wire.encode(_header(fingerprint=spec.fingerprint), _layout_tensors()))
    msg = wire.decode(data, spec)
    assert msg.tensors is not None
    for name, sent in _layout_tensors().items():
        got = msg.tensors[name]
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)
        assert got.data_ptr() % got.element_size() == 0 or got.numel() <= 1
    assert len(data) <= spec.max_message_bytes()


def test_generic_layout_checks_finiteness_of_floats_only():
    spec = ModelSpec.from_layout(LAYOUT)
    header = _header(fingerprint=spec.fingerprint)
    t = _layout_tensors()
    t["idx"][0] = -(2**31)  # any integer is a valid index as far as the wire can tell
    assert wire.decode(wire.encode(header, t), spec).tensors is not None
    t["vals"][1] = float("inf")
    with pytest.raises(WireError, match="refusing to send non-finite values in tensor 'vals'"):
        wire.encode(header, t)
    payload = st_save(t)  # crafted by hand: the receiver refuses it too
    with pytest.raises(WireError, match="tensor 'vals' contains NaN or infinite values"):
        wire.decode(_raw(_good_header_dict(payload, fingerprint=spec.fingerprint), payload), spec)


def test_generic_layout_refuses_other_dtypes_and_sizes():
    spec = ModelSpec.from_layout(LAYOUT)
    t = _layout_tensors()
    wide = {**t, "idx": t["idx"].to(torch.int64)}  # int64 indices where int32 were agreed
    p = st_save(wide)
    with pytest.raises(WireError, match=r"does not fit this model|has dtype"):
        wire.decode(_raw(_good_header_dict(p, fingerprint=spec.fingerprint), p), spec)
    with pytest.raises(WireError, match="do not match the header fingerprint"):
        wire.encode(_header(fingerprint=spec.fingerprint), wide)
    longer = {**t, "codes": torch.zeros(8, dtype=torch.uint8)}
    p = st_save(longer)
    with pytest.raises(WireError, match="does not fit this model"):
        wire.decode(_raw(_good_header_dict(p, fingerprint=spec.fingerprint), p), spec)


def test_old_wire_version_is_refused_with_a_clear_reason():
    p = _good_payload()
    with pytest.raises(WireError, match=r"unsupported wire version 1: this node speaks \[2\]"):
        wire.decode(_raw(_good_header_dict(p, version=1), p), SPEC)


def test_decode_without_spec_bounds_the_payload_header_it_parses():
    """Tools (and payload-free replies) decode without a spec: a header bomb is still refused
    from its length alone, before parsing."""
    bomb = _header_bomb(20_000)
    with pytest.raises(WireError, match=r"payload header of \d+ bytes exceeds the limit of 1048576 bytes"):
        wire.decode(bomb, None, max_bytes=len(bomb))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_finiteness_is_checked_for_every_float_dtype(dtype):
    t = {"a": torch.linspace(-3, 3, 9, dtype=dtype), "b": torch.ones(2, 2, dtype=dtype)}
    spec = ModelSpec.from_tensors(t)
    header = _header(fingerprint=spec.fingerprint)
    msg = wire.decode(wire.encode(header, t), spec)
    assert msg.tensors is not None and all(torch.equal(msg.tensors[n], v) for n, v in t.items())
    for bad in (float("nan"), float("inf"), float("-inf")):
        worse = {"a": t["a"].clone(), "b": t["b"].clone()}
        worse["b"][1, 0] = bad
        with pytest.raises(WireError, match="non-finite values in tensor 'b'"):
            wire.encode(header, worse)
        payload = st_save(worse)  # another encoder's layout: parsed and checked per tensor
        with pytest.raises(WireError, match="tensor 'b' contains NaN or infinite values"):
            wire.decode(_raw(_good_header_dict(payload, fingerprint=spec.fingerprint), payload), spec)
        canonical = bytearray(wire.encode(header, t))  # ours: checked in one pass per float run
        at = len(canonical) - spec.layout.payload_bytes + spec.layout.starts[1] + 2 * dtype.itemsize
        canonical[at : at + dtype.itemsize] = torch.tensor([bad], dtype=dtype).view(torch.uint8).numpy().tobytes()
        with pytest.raises(WireError, match="tensor 'b' contains NaN or infinite values"):
            wire.decode(canonical, spec)
