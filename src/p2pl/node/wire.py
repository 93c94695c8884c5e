"""Wire format of the networked runtime: a validated header followed by safetensors bytes.

Nothing that arrives over the network is ever unpickled. A message is::

    offset  size         content
    0       4            magic  b"P2PL"
    4       4            header_len  (uint32, little-endian)
    8       header_len   header: UTF-8 JSON object (see below), at most MAX_HEADER_BYTES
    8+H     payload_size payload: safetensors bytes (little-endian tensors), or empty

and the total length is exactly ``8 + header_len + payload_size``. Encoders pad the JSON header
with spaces to a multiple of 8 bytes (safetensors pads its own header the same way), so every
tensor's data lies aligned in the message and a receiver can view it in place. The JSON header
has exactly these keys (no more, no fewer; duplicate keys, NaN/Infinity and booleans-as-ints are
refused)::

    {"version": 2,                      # WIRE_VERSION (other versions are refused)
     "kind": "params",                  # one of KINDS
     "sender": "dev-03",                # device id; must equal the sender's TLS certificate CN
     "round": 12,                       # int >= 0
     "step": 0,                         # int >= 0: consensus step or max-norm sync step
     "fingerprint": "9f86...",          # sha256 hex of the sorted (name, shape, dtype) list
     "payload_size": 31744,             # bytes of safetensors payload that follow the header
     "extras": {"norm": 3.5, "owner": "dev-01", "data_size": 600, "degree": 4}}

``extras`` holds small typed scalars, all optional (see EXTRA_FIELDS). Kinds in PAYLOAD_KINDS
must carry tensors; the others must not. What a payload carries is described by a
:class:`ModelSpec`: a model's parameters, or any other fixed layout of named tensors (e.g. a
compressed message: int32 indices, float16 values, uint8 codes), built with
:meth:`ModelSpec.from_layout`.

:func:`decode` validates everything *before* the caller touches a model: the total size, the
header, the payload size, the fingerprint against the receiver's :class:`ModelSpec`, the payload's
size and its safetensors header (size, tensor names, dtypes, shapes, offsets:
:func:`check_payload_layout`, so a header bomb is refused after reading a few bytes), and that
every floating value is finite (one pass per tensor). The tensors it returns are views over the
received buffer: no copy. Each failure raises :class:`WireError` with a one-line reason.
The transport (:mod:`p2pl.node.transport`) admits a large message from its header alone and only
then receives it into a buffer whose size the header announced and the spec bounds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from p2pl.errors import P2PLError
from p2pl.node.certs import check_device_id

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "EXTRA_FIELDS",
    "KINDS",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "PAYLOAD_KINDS",
    "PREFIX_SIZE",
    "SYNC_DONE_STEP",
    "WIRE_VERSION",
    "Message",
    "MessageHeader",
    "ModelSpec",
    "TensorSpec",
    "WireError",
    "check_payload_layout",
    "decode",
    "decode_payload",
    "encode",
    "fingerprint",
    "peek_header",
]

MAGIC = b"P2PL"
#: 2: headers are padded so tensor data is 8-byte aligned, integer and 8-bit dtypes may travel.
#: Version 1 is refused.
WIRE_VERSION = 2
SUPPORTED_VERSIONS = frozenset({2})
_PREFIX = struct.Struct("<4sI")
PREFIX_SIZE = _PREFIX.size  # 8
MAX_HEADER_BYTES = 4096
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_MAX_INT = 2**53  # rounds, steps, sizes: anything a JSON double can carry exactly
#: Step number of a node's final max-norm announcement ("my claim will not change any more").
SYNC_DONE_STEP = 2**31

#: Message kinds. ``params``: parameters for consensus step ``step`` of round ``round``.
#: ``sync-norm``: max-norm synchronization step ``step``: announces extras ``norm`` and ``owner``
#: (the device whose parameters the sender currently holds). ``sync-fetch``: a Fetch request for
#: the parameters a peer holds for sync step ``step``. ``sync-params``: the reply to it.
#: ``hello``: liveness/metadata (e.g. ``data_size``, ``degree``) without a payload.
KINDS: tuple[str, ...] = ("params", "sync-norm", "sync-fetch", "sync-params", "hello")
PAYLOAD_KINDS = frozenset({"params", "sync-params"})

#: Optional scalar header fields and their JSON types. Extend here (and only here).
EXTRA_FIELDS: dict[str, type] = {
    "norm": float,  # L2 norm of the sender's parameters (max-norm sync)
    "owner": str,  # device id whose init the sender holds (max-norm sync tie-break)
    "owner_index": int,  # global device index of ``owner``: ties go to the lowest index, as in core.sync
    "data_size": int,  # |D_n| of the sender (data-size consensus weights)
    "degree": int,  # d_n of the sender (metropolis weights)
    "loss": float,  # sender's last training loss (logging only)
    "weight": float,  # push-sum: the share of its push-sum weight the sender sends with these parameters
}

#: dtypes a tensor may have on the wire: parameters are float32 by convention; compressed
#: messages also carry integer indices, 8-bit codes and half-precision values. Only floating
#: dtypes are checked for finiteness.
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
#: safetensors' dtype codes of the wire dtypes (its header names them so).
_ST_CODES = {
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
}
#: Without a receiver's spec, the largest payload header parsed (a model's is a few KiB).
_MAX_UNCHECKED_HEADER = 1 << 20
_NP_FLOATS: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
_ST_LEN = struct.Struct("<Q")
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEADER_KEYS = frozenset({"version", "kind", "sender", "round", "step", "fingerprint", "payload_size", "extras"})


class WireError(P2PLError):
    """A message failed validation; ``str(error)`` is a one-line reason safe to log."""


# --------------------------------------------------------------------------------- model spec


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot travel on the wire; use one of {', '.join(_DTYPES)}") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype name (e.g. ``"float32"``) of one model tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def fingerprint(named_shapes_dtypes: Iterable[tuple[str, Iterable[int], str | torch.dtype]]) -> str:
    """sha256 hex of the name-sorted list of ``(name, shape, dtype)``; identifies a model architecture.

    Sorting makes the fingerprint independent of dict order, so a receiver can recompute it from
    a safetensors payload alone. dtypes may be given as ``torch.dtype`` or as names like ``"float32"``.
    """
    rows: list[tuple[str, list[int], str]] = []
    for name, shape, dtype in named_shapes_dtypes:
        dname = dtype if isinstance(dtype, str) else _dtype_name(dtype)
        rows.append((str(name), [int(s) for s in shape], dname))
    rows.sort(key=lambda r: r[0])
    blob = json.dumps(rows, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()


Rows = tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype name) in spec order


@dataclass(frozen=True)
class _Layout:
    """The canonical payload of a tensor layout, as :func:`encode` writes it: computed once per
    layout, so encoding and checking a payload of a known layout parse no JSON at all."""

    fingerprint: str
    st_header: bytes  # 8-byte length + JSON header padded to 8 bytes
    order: tuple[int, ...]  # row indices in payload order (larger elements first)
    starts: tuple[int, ...]  # per row (spec order): where its data starts in the payload
    data_bytes: int
    float_runs: tuple[tuple[str, int, int], ...]  # (dtype name, payload offset, elements) to check
    max_st_header: int  # a generous bound on any encoder's safetensors header for these tensors

    @property
    def payload_bytes(self) -> int:
        return len(self.st_header) + self.data_bytes


def _layout(rows: Rows) -> _Layout:
    """The layout of ``rows``, cached for model-sized specs (a spec with more tensors than any
    model here has is computed afresh, so no input can make the cache hold much)."""
    return _cached_layout(rows) if len(rows) <= _CACHED_LAYOUT_TENSORS else _build_layout(rows)


_CACHED_LAYOUT_TENSORS = 1024


def _build_layout(rows: Rows) -> _Layout:
    sizes = [math.prod(shape) * _DTYPES[dname].itemsize for _, shape, dname in rows]
    order = tuple(sorted(range(len(rows)), key=lambda i: -_DTYPES[rows[i][2]].itemsize))  # stable
    entries: dict[str, dict[str, Any]] = {}
    offsets = [0] * len(rows)
    position = 0
    for i in order:
        name, shape, dname = rows[i]
        entries[name] = {
            "dtype": _ST_CODES[dname],
            "shape": list(shape),
            "data_offsets": [position, position + sizes[i]],
        }
        offsets[i] = position
        position += sizes[i]
    head = _pad8(json.dumps(entries, separators=(",", ":")).encode())
    st_header = _ST_LEN.pack(len(head)) + head
    runs: list[tuple[str, int, int]] = []
    for i in order:  # adjacent tensors of one float dtype are checked in one pass
        dname = rows[i][2]
        if not _DTYPES[dname].is_floating_point or not sizes[i]:
            continue
        begin, count = len(st_header) + offsets[i], sizes[i] // _DTYPES[dname].itemsize
        if runs and runs[-1][0] == dname and runs[-1][1] + runs[-1][2] * _DTYPES[dname].itemsize == begin:
            runs[-1] = (dname, runs[-1][1], runs[-1][2] + count)
        else:
            runs.append((dname, begin, count))
    return _Layout(
        fingerprint=fingerprint(rows),
        st_header=st_header,
        order=order,
        starts=tuple(len(st_header) + o for o in offsets),
        data_bytes=position,
        float_runs=tuple(runs),
        max_st_header=256 + sum(len(name.encode()) + 96 + 24 * len(shape) for name, shape, _ in rows),
    )


_cached_layout = functools.lru_cache(maxsize=16)(_build_layout)


@dataclass(frozen=True)
class ModelSpec:
    """What a receiver expects: the exact tensors (in model order) and their fingerprint.

    Build it once per run from the local model, e.g. ``ModelSpec.from_module(model)`` or
    ``ModelSpec.from_tensors(dict(model.named_parameters()))``; every device of a run must use
    the same tensors, so all fingerprints agree.
    """

    tensors: tuple[TensorSpec, ...]
    fingerprint: str = field(default="")
    layout: _Layout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise WireError("model spec has duplicate tensor names")
        for t in self.tensors:
            if t.dtype not in _DTYPES:
                raise WireError(f"tensor {t.name!r} has dtype {t.dtype} that cannot travel on the wire")
        layout = _layout(tuple((t.name, tuple(t.shape), t.dtype) for t in self.tensors))
        if self.fingerprint and self.fingerprint != layout.fingerprint:
            raise WireError("model spec fingerprint does not match its tensors")
        object.__setattr__(self, "fingerprint", layout.fingerprint)
        object.__setattr__(self, "layout", layout)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ModelSpec:
        """Spec of a ``{name: tensor}`` mapping (order kept)."""
        return cls(
            tuple(TensorSpec(name, tuple(int(s) for s in t.shape), _dtype_name(t.dtype)) for name, t in tensors.items())
        )

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ModelSpec:
        """Spec of ``module.named_parameters()`` (parameters only, no buffers)."""
        return cls.from_tensors(dict(module.named_parameters()))

    @classmethod
    def from_layout(cls, layout: Iterable[Any]) -> ModelSpec:
        """Spec of any fixed message layout, e.g. a compressed message's: ``layout`` yields
        ``(name, dtype, shape)`` tuples or objects with ``name``, ``dtype`` and ``shape``
        attributes; dtypes as ``torch.dtype`` or names like ``"int32"``. The receiver's spec then
        fixes every size before a byte is decoded, exactly as for parameters."""
        specs = []
        for item in layout:
            if isinstance(item, tuple):
                name, dtype, shape = item
            else:
                name, dtype, shape = item.name, item.dtype, item.shape
            dname = dtype if isinstance(dtype, str) else _dtype_name(dtype)
            specs.append(TensorSpec(str(name), tuple(int(s) for s in shape), dname))
        return cls(tuple(specs))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def numel(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    def data_bytes(self) -> int:
        """Bytes of the tensor data in a payload of this model."""
        return self.layout.data_bytes

    def max_safetensors_header(self) -> int:
        """A generous bound on the JSON header safetensors writes for this model (names, dtypes,
        shapes, offsets, padding); a payload claiming a larger header is refused unread."""
        return self.layout.max_st_header

    def max_payload_bytes(self) -> int:
        return _ST_LEN.size + self.max_safetensors_header() + self.data_bytes()

    def max_message_bytes(self) -> int:
        """The largest message a payload of this model can make (prefix + header + payload)."""
        return PREFIX_SIZE + MAX_HEADER_BYTES + self.max_payload_bytes()


# ----------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class MessageHeader:
    """The JSON header of a message. ``payload_size`` is filled in by :func:`encode`."""

    kind: str
    sender: str
    round: int
    step: int
    fingerprint: str
    payload_size: int = 0
    extras: Mapping[str, Any] = field(default_factory=dict)
    version: int = WIRE_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "sender": self.sender,
            "round": self.round,
            "step": self.step,
            "fingerprint": self.fingerprint,
            "payload_size": self.payload_size,
            "extras": dict(self.extras),
        }


@dataclass(frozen=True)
class Message:
    """A decoded, validated message. ``tensors`` is None for kinds without payload, otherwise
    a ``{name: tensor}`` dict in the spec's order: CPU views over the buffer :func:`decode` was
    given (or over its one copy of read-only bytes), which they keep alive."""

    header: MessageHeader
    tensors: dict[str, torch.Tensor] | None
    nbytes: int

    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def sender(self) -> str:
        return self.header.sender

    @property
    def round(self) -> int:
        return self.header.round

    @property
    def step(self) -> int:
        return self.header.step


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header(obj: object) -> MessageHeader:
    """Validate the decoded JSON header; return a MessageHeader or raise WireError."""
    if not isinstance(obj, dict):
        raise WireError("header is not a JSON object")
    keys = set(obj)
    if keys != _HEADER_KEYS:
        missing, extra = sorted(_HEADER_KEYS - keys), sorted(keys - _HEADER_KEYS)
        raise WireError(f"header keys wrong (missing {missing}, unexpected {extra})")
    version = obj["version"]
    if not _is_int(version) or version not in SUPPORTED_VERSIONS:
        raise WireError(
            f"unsupported wire version {str(version)[:20]}: this node speaks {sorted(SUPPORTED_VERSIONS)}; "
            "run the same p2pl version on every device"
        )
    kind = obj["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}")
    try:
        sender = check_device_id(obj["sender"])
    except P2PLError:
        raise WireError(f"bad sender id {str(obj['sender'])[:80]!r}") from None
    for key in ("round", "step", "payload_size"):
        v = obj[key]
        if not _is_int(v) or not 0 <= v < _MAX_INT:
            raise WireError(f"header field {key} must be a non-negative integer, got {str(v)[:40]!r}")
    fp = obj["fingerprint"]
    if not isinstance(fp, str) or not _HEX64.match(fp):
        raise WireError("header fingerprint is not 64 lowercase hex digits")
    extras = obj["extras"]
    if not isinstance(extras, dict):
        raise WireError("header extras is not a JSON object")
    checked: dict[str, Any] = {}
    for k, v in extras.items():
        want = EXTRA_FIELDS.get(k)
        if want is None:
            raise WireError(f"unknown header extra {k[:40]!r}")
        if want is float:
            if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
                raise WireError(f"header extra {k} must be a finite number")
            checked[k] = float(v)
        elif want is int:
            if not _is_int(v) or not -_MAX_INT < v < _MAX_INT:
                raise WireError(f"header extra {k} must be an integer")
            checked[k] = v
        else:
            if not isinstance(v, str) or len(v) > 256:
                raise WireError(f"header extra {k} must be a short string")
            if k == "owner":
                try:
                    check_device_id(v)
                except P2PLError:
                    raise WireError("header extra owner is not a device id") from None
            checked[k] = v
    has_payload = obj["payload_size"] > 0
    if kind in PAYLOAD_KINDS and not has_payload:
        raise WireError(f"a {kind} message must carry tensors")
    if kind not in PAYLOAD_KINDS and has_payload:
        raise WireError(f"a {kind} message must not carry tensors")
    return MessageHeader(
        kind=kind,
        sender=sender,
        round=obj["round"],
        step=obj["step"],
        fingerprint=fp,
        payload_size=obj["payload_size"],
        extras=checked,
        version=version,
    )


def _no_dup_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise WireError(f"duplicate header key {k[:40]!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise WireError(f"header contains {name}")


def read_header(data: bytes | bytearray | memoryview) -> tuple[MessageHeader, int]:
    """Parse and validate the prefix and JSON header at the start of ``data`` (cheap; no tensors
    are touched). ``data`` may be only the start of a message, e.g. the first chunk of a stream:
    returns the header and the total message size it announces (prefix + header + payload_size),
    so a receiver knows how much to accept before any payload arrives."""
    n = len(data)
    if n < PREFIX_SIZE:
        raise WireError(f"message of {n} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    magic, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise WireError("bad magic: not a p2pl message")
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise WireError(f"header length {header_len} outside 1..{MAX_HEADER_BYTES}")
    if PREFIX_SIZE + header_len > n:
        raise WireError("message truncated inside the header")
    raw = bytes(data[PREFIX_SIZE : PREFIX_SIZE + header_len])
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dup_keys, parse_constant=_reject_constant)
    except WireError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("header is not valid UTF-8 JSON") from None
    header = _check_header(obj)
    return header, PREFIX_SIZE + header_len + header.payload_size


def peek_header(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> MessageHeader:
    """Parse and validate only the prefix and JSON header of a whole message.

    Checks the total size against ``max_bytes`` and that it equals prefix + header + payload_size.
    The transport uses this to authenticate the sender before paying for a full :func:`decode`.
    """
    n = len(data)
    if n > max_bytes:
        raise WireError(f"message of {n} bytes exceeds the limit of {max_bytes} bytes")
    header, total = read_header(data)
    if total != n:
        received = n - (total - header.payload_size)
        raise WireError(f"payload_size {header.payload_size} does not match the {received} payload bytes received")
    return header


def check_announced(header: MessageHeader, total: int, expected: ModelSpec | None, max_bytes: int) -> None:
    """What a header alone proves wrong, before any payload is read or stored: a message of
    ``total`` bytes over ``max_bytes``, another model's fingerprint, or a payload larger than any
    payload of ``expected`` (so a receiver never buffers more than this model's size)."""
    if total > max_bytes:
        raise WireError(f"message of {total} bytes exceeds the limit of {max_bytes} bytes")
    if expected is None:
        return
    if header.fingerprint != expected.fingerprint:
        raise WireError(
            f"model fingerprint {header.fingerprint[:12]} does not match ours {expected.fingerprint[:12]} "
            "(different model architecture)"
        )
    if header.payload_size > expected.max_payload_bytes():
        raise WireError(f"payload of {header.payload_size} bytes is larger than any payload of this model")


def _all_finite(t: torch.Tensor) -> bool:
    """One pass, no temporaries beyond a bool mask (numpy's isfinite is ~30x faster than torch's
    on one CPU thread); bfloat16 has no numpy dtype."""
    if t.dtype == torch.bfloat16:
        return bool(torch.isfinite(t).all())
    return bool(np.isfinite(t.numpy()).all())


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The memory of a contiguous CPU tensor as a numpy array, without copying (little-endian
    hosts, as safetensors); bfloat16, which numpy lacks, as its 16-bit patterns."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _pad8(raw: bytes) -> bytes:
    """JSON padded with spaces to a multiple of 8 bytes, so what follows it stays 8-byte aligned."""
    return raw + b" " * (-len(raw) % 8)


def encode(header: MessageHeader, tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Serialize ``header`` + ``tensors`` into one message with a single copy of the tensor data.

    The payload is standard safetensors (``safetensors.torch.load`` reads it), written here
    directly: its JSON header, then each tensor's raw little-endian bytes, larger dtypes first so
    every tensor starts aligned to its element size; both JSON headers are padded to 8 bytes, so
    the receiver can view the tensors in place. ``header.payload_size`` is computed here (the
    given value is ignored). When tensors are given, their fingerprint must equal
    ``header.fingerprint`` (catches sending the wrong model). Non-finite values are refused.
    """
    parts: list[Any] = []  # bytes and numpy arrays: buffers b"".join copies once
    layout: _Layout | None = None
    names: list[str] = []
    cpu: list[torch.Tensor] = []
    if tensors:
        names = list(tensors)
        cpu = [tensors[name].detach().cpu().contiguous() for name in names]
        layout = _layout(
            tuple((name, tuple(t.shape), _dtype_name(t.dtype)) for name, t in zip(names, cpu, strict=True))
        )
        if layout.fingerprint != header.fingerprint:
            raise WireError("tensors do not match the header fingerprint (wrong model or spec)")
        parts = [layout.st_header, *(_raw_bytes(cpu[i]) for i in layout.order)]
    full = MessageHeader(
        kind=header.kind,
        sender=header.sender,
        round=header.round,
        step=header.step,
        fingerprint=header.fingerprint,
        payload_size=layout.payload_bytes if layout is not None else 0,
        extras=dict(header.extras),
        version=header.version,
    )
    raw = _pad8(json.dumps(full.to_json(), separators=(",", ":"), sort_keys=True, allow_nan=False).encode())
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    # Validate what we send with the same rules a receiver applies.
    _check_header(full.to_json())
    message = b"".join([_PREFIX.pack(MAGIC, len(raw)), raw, *parts])
    if layout is not None:  # one finiteness pass over the float data, where the layout put it
        start = PREFIX_SIZE + len(raw)
        if not all(_finite_run(message, start + begin, count, dname) for dname, begin, count in layout.float_runs):
            bad = next(n for n, t in zip(names, cpu, strict=True) if t.is_floating_point() and not _all_finite(t))
            raise WireError(f"refusing to send non-finite values in tensor {bad!r}")
    return message


def _check_entry(name: str, entry: object, spec: TensorSpec) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise WireError(f"payload entry for tensor {name[:40]!r} is malformed")
    if entry["dtype"] != _ST_CODES[spec.dtype]:
        raise WireError(f"tensor {name!r} has dtype {str(entry['dtype'])[:10]}, expected {spec.dtype}")
    if entry["shape"] != list(spec.shape):
        raise WireError(f"tensor {name!r} has shape {str(entry['shape'])[:60]}, expected {spec.shape}")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(v) for v in offsets)):
        raise WireError(f"tensor {name!r} has malformed data offsets")
    return int(offsets[0]), int(offsets[1])


def _payload_header(payload: bytes | bytearray | memoryview, limit: int) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header of ``payload`` (at most ``limit`` bytes, else refused unread)
    without ``__metadata__``, and where the tensor data starts."""
    n = len(payload)
    if n < _ST_LEN.size:
        raise WireError(f"payload of {n} bytes is too short for safetensors")
    (header_len,) = _ST_LEN.unpack_from(payload, 0)
    if header_len > limit:
        raise WireError(f"payload header of {header_len} bytes exceeds the limit of {limit} bytes")
    if _ST_LEN.size + header_len > n:
        raise WireError(f"payload header of {header_len} bytes is longer than the {n}-byte payload")
    raw = bytes(payload[_ST_LEN.size : _ST_LEN.size + header_len])
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dup_keys, parse_constant=_reject_constant)
    except WireError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("payload header is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise WireError("payload header is not a JSON object")
    obj.pop("__metadata__", None)
    return obj, _ST_LEN.size + header_len


def check_payload_layout(payload: bytes | bytearray | memoryview, expected: ModelSpec) -> dict[str, int]:
    """Check a safetensors payload's size and header against ``expected`` without decoding it;
    return where each tensor's data starts (bytes from the start of the payload).

    The tensor data of a model has a fixed size, and its safetensors header a small bounded one,
    so a payload of any other size, an oversized header, or one naming other tensors (or more of
    them) is refused after reading at most ``expected.max_safetensors_header()`` bytes.
    """
    n = len(payload)
    if n >= _ST_LEN.size:
        (header_len,) = _ST_LEN.unpack_from(payload, 0)
        data_bytes = expected.data_bytes()
        if header_len <= expected.max_safetensors_header() and n != _ST_LEN.size + header_len + data_bytes:
            raise WireError(
                f"payload of {n} bytes does not fit this model ({data_bytes} data bytes + a {header_len}-byte header)"
            )
    obj, data_start = _payload_header(payload, expected.max_safetensors_header())
    want = {t.name: t for t in expected.tensors}
    if set(obj) != set(want):
        missing, extra = sorted(set(want) - set(obj))[:3], sorted(set(obj) - set(want))[:3]
        raise WireError(f"tensor names differ from the model (missing {missing}, unexpected {extra})")
    spans = sorted((*_check_entry(name, obj[name], want[name]), name) for name in want)
    position = 0
    starts: dict[str, int] = {}
    for begin, end, name in spans:
        size = math.prod(want[name].shape) * _DTYPES[want[name].dtype].itemsize
        if begin != position or end - begin != size:
            raise WireError(f"tensor {name!r} has data offsets [{begin}, {end}] that do not tile the payload")
        starts[name] = data_start + begin
        position = end
    return starts


def _spec_of_payload(payload: bytes | bytearray | memoryview, header: MessageHeader) -> ModelSpec:
    """Without a receiver's spec (tools, debugging): the spec the payload's own header describes,
    which must match the message header's fingerprint. Its header may be at most 1 MiB."""
    obj, _ = _payload_header(payload, min(len(payload), _MAX_UNCHECKED_HEADER))
    codes = {code: name for name, code in _ST_CODES.items()}
    tensors = []
    for name, entry in obj.items():
        dtype = codes.get(entry.get("dtype") if isinstance(entry, dict) else None)  # type: ignore[arg-type]
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if dtype is None:
            raise WireError(f"tensor {name[:40]!r} has an unsupported or malformed dtype")
        if not (isinstance(shape, list) and all(_is_int(s) and 0 <= s < _MAX_INT for s in shape)):
            raise WireError(f"tensor {name[:40]!r} has a malformed shape")
        tensors.append(TensorSpec(name, tuple(shape), dtype))
    spec = ModelSpec(tuple(tensors))
    if spec.fingerprint != header.fingerprint:
        raise WireError("payload tensors do not match the header fingerprint")
    return spec


def decode(
    data: bytes | bytearray | memoryview, expected: ModelSpec | None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Message:
    """Validate and decode one message; raise WireError with a one-line reason on any problem.

    With ``expected`` the fingerprint and every tensor name/shape/dtype must match it exactly
    and tensors are returned in the spec's order. Without it (tools, debugging), the payload's
    own fingerprint must still match the header. Float values must be finite in every case.

    Decoding copies nothing when ``data`` is writable (a ``bytearray``, as the transport
    reassembles streams into): the tensors are views over it, and keep it alive. Read-only
    ``bytes`` are copied once (torch only shares writable memory).
    """
    return decode_payload(peek_header(data, max_bytes), data, expected, max_bytes)


def decode_payload(
    header: MessageHeader,
    data: bytes | bytearray | memoryview,
    expected: ModelSpec | None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Message:
    """:func:`decode` for a ``header`` that ``peek_header(data)`` already returned (the transport
    reads the header first, to authenticate the sender, and does not parse it twice)."""
    check_announced(header, len(data), expected, max_bytes)
    if header.payload_size == 0:
        return Message(header=header, tensors=None, nbytes=len(data))
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    start = len(buffer) - header.payload_size
    payload = memoryview(buffer)[start:]
    spec = expected if expected is not None else _spec_of_payload(payload, header)
    layout = spec.layout
    canonical = header.payload_size == layout.payload_bytes and payload[: len(layout.st_header)] == layout.st_header
    # A payload whose header is byte for byte the one we write for this spec has the canonical
    # layout; any other is parsed and checked entry by entry.
    starts = layout.starts if canonical else [check_payload_layout(payload, spec)[t.name] for t in spec.tensors]
    payload.release()
    tensors = {t.name: _view(buffer, start + begin, t) for t, begin in zip(spec.tensors, starts, strict=True)}
    if canonical:
        finite = all(_finite_run(buffer, start + begin, count, dname) for dname, begin, count in layout.float_runs)
    else:
        finite = all(_all_finite(v) for v in tensors.values() if v.is_floating_point())
    if not finite:
        bad = next(name for name, v in tensors.items() if v.is_floating_point() and not _all_finite(v))
        raise WireError(f"tensor {bad!r} contains NaN or infinite values")
    return Message(header=header, tensors=tensors, nbytes=len(data))


def _view(buffer: bytearray, begin: int, spec: TensorSpec) -> torch.Tensor:
    """Tensor ``spec`` at ``begin`` in ``buffer``: a view, or a copy where it is not aligned to its
    element size (a foreign encoder's padding) or empty (torch cannot view zero bytes)."""
    dtype = _DTYPES[spec.dtype]
    count = math.prod(spec.shape)
    if count == 0:
        return torch.empty(spec.shape, dtype=dtype)
    flat = len(spec.shape) == 1
    if begin % dtype.itemsize:
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count * dtype.itemsize, offset=begin)
        return raw.clone().view(dtype).view(spec.shape)
    view = torch.frombuffer(buffer, dtype=dtype, count=count, offset=begin)
    return view if flat else view.view(spec.shape)


def _finite_run(buffer: bytes | bytearray, begin: int, count: int, dtype: str) -> bool:
    """Whether ``count`` little-endian values of float ``dtype`` at ``begin`` are all finite (one
    pass; numpy reads unaligned data too). bfloat16, which numpy lacks: not all exponent bits set."""
    if dtype == "bfloat16":
        bits = np.frombuffer(buffer, dtype="<u2", count=count, offset=begin)
        return bool(((bits & 0x7F80) != 0x7F80).all())
    return bool(np.isfinite(np.frombuffer(buffer, dtype=_NP_FLOATS[dtype], count=count, offset=begin)).all())
