"""Wire format of the networked runtime: a validated header followed by safetensors bytes.

Nothing that arrives over the network is ever unpickled. A message is::

    offset  size         content
    0       4            magic  b"P2PL"
    4       4            header_len  (uint32, little-endian)
    8       header_len   header: UTF-8 JSON object (see below), at most MAX_HEADER_BYTES
    8+H     payload_size payload: safetensors bytes (little-endian tensors), or empty

and the total length is exactly ``8 + header_len + payload_size``. The JSON header has exactly
these keys (no more, no fewer; duplicate keys, NaN/Infinity and booleans-as-ints are refused)::

    {"version": 1,                      # WIRE_VERSION
     "kind": "params",                  # one of KINDS
     "sender": "dev-03",                # device id; must equal the sender's TLS certificate CN
     "round": 12,                       # int >= 0
     "step": 0,                         # int >= 0: consensus step or max-norm sync step
     "fingerprint": "9f86...",          # sha256 hex of the model's sorted (name, shape, dtype) list
     "payload_size": 31744,             # bytes of safetensors payload that follow the header
     "extras": {"norm": 3.5, "owner": "dev-01", "data_size": 600, "degree": 4}}

``extras`` holds small typed scalars, all optional (see EXTRA_FIELDS). Kinds in PAYLOAD_KINDS
must carry tensors; the others must not.

:func:`decode` validates everything *before* the caller touches a model: the total size, the
header, the payload size, the fingerprint against the receiver's :class:`ModelSpec`, then the
safetensors header (parsed by ``safetensors`` itself), every tensor name/shape/dtype against the
spec, and that every value is finite. Each failure raises :class:`WireError` with a one-line reason.
With a spec, the payload's size and its safetensors header (size, tensor names, dtypes, shapes,
offsets) are checked first (:func:`check_payload_layout`), so a header bomb is refused after
reading a few bytes, before safetensors builds anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

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
    "encode",
    "fingerprint",
    "peek_header",
]

MAGIC = b"P2PL"
WIRE_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
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
}

#: dtypes a model tensor may have on the wire (parameters are float32 by convention).
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,  # compressed messages: indices of models under 32,768 parameters
    "int8": torch.int8,  # compressed messages: quantized codes (p2pl.core.compress)
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
#: safetensors' dtype codes of the wire dtypes (its header names them so).
_ST_CODES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}
_ST_CODES |= {"int16": "I16", "int8": "I8", "uint8": "U8"}  # compressed messages' indices and codes
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


@dataclass(frozen=True)
class ModelSpec:
    """What a receiver expects: the exact tensors (in model order) and their fingerprint.

    Build it once per run from the local model, e.g. ``ModelSpec.from_module(model)`` or
    ``ModelSpec.from_tensors(dict(model.named_parameters()))``; every device of a run must use
    the same tensors, so all fingerprints agree.
    """

    tensors: tuple[TensorSpec, ...]
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise WireError("model spec has duplicate tensor names")
        for t in self.tensors:
            if t.dtype not in _DTYPES:
                raise WireError(f"tensor {t.name!r} has dtype {t.dtype} that cannot travel on the wire")
        fp = fingerprint((t.name, t.shape, t.dtype) for t in self.tensors)
        if self.fingerprint and self.fingerprint != fp:
            raise WireError("model spec fingerprint does not match its tensors")
        object.__setattr__(self, "fingerprint", fp)

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

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def numel(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    def data_bytes(self) -> int:
        """Bytes of the tensor data in a payload of this model."""
        return sum(math.prod(t.shape) * _DTYPES[t.dtype].itemsize for t in self.tensors)

    def max_safetensors_header(self) -> int:
        """A generous bound on the JSON header safetensors writes for this model (names, dtypes,
        shapes, offsets, padding); a payload claiming a larger header is refused unread."""
        return 256 + sum(len(t.name.encode()) + 96 + 24 * len(t.shape) for t in self.tensors)

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
    a ``{name: tensor}`` dict in the spec's order (fresh CPU tensors owned by the caller)."""

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
        raise WireError(f"unsupported wire version {version!r} (supported: {sorted(SUPPORTED_VERSIONS)})")
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


def peek_header(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> MessageHeader:
    """Parse and validate only the prefix and JSON header (cheap; no tensors are touched).

    Checks the total size against ``max_bytes`` and that it equals prefix + header + payload_size.
    The transport uses this to authenticate the sender before paying for a full :func:`decode`.
    """
    n = len(data)
    if n > max_bytes:
        raise WireError(f"message of {n} bytes exceeds the limit of {max_bytes} bytes")
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
    expected_total = PREFIX_SIZE + header_len + header.payload_size
    if expected_total != n:
        raise WireError(
            f"payload_size {header.payload_size} does not match the {n - PREFIX_SIZE - header_len} "
            "payload bytes received"
        )
    return header


def encode(header: MessageHeader, tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Serialize ``header`` + ``tensors`` (safetensors, little-endian) into one message.

    ``header.payload_size`` is computed here (the given value is ignored). When tensors are
    given, their fingerprint must equal ``header.fingerprint`` (catches sending the wrong model).
    Tensors are detached and copied to CPU; non-finite values are refused here already.
    """
    if tensors:
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        fp = fingerprint((name, t.shape, t.dtype) for name, t in cpu.items())
        if fp != header.fingerprint:
            raise WireError("tensors do not match the header fingerprint (wrong model or spec)")
        for name, t in cpu.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise WireError(f"refusing to send non-finite values in tensor {name!r}")
        try:
            payload = _st_save(cpu)
        except Exception as exc:  # safetensors raises plain RuntimeError/ValueError
            raise WireError(f"cannot serialize tensors: {str(exc).splitlines()[0]}") from None
    else:
        payload = b""
    full = MessageHeader(
        kind=header.kind,
        sender=header.sender,
        round=header.round,
        step=header.step,
        fingerprint=header.fingerprint,
        payload_size=len(payload),
        extras=dict(header.extras),
        version=header.version,
    )
    # Validate what we send with the same rules a receiver applies.
    _check_header(json.loads(json.dumps(full.to_json())))
    raw = json.dumps(full.to_json(), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, len(raw)) + raw + payload


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


def check_payload_layout(payload: bytes | memoryview, expected: ModelSpec) -> None:
    """Check a safetensors payload's size and header against ``expected`` without decoding it.

    The tensor data of a model has a fixed size, and its safetensors header a small bounded one,
    so a payload of any other size, an oversized header, or one naming other tensors (or more of
    them) is refused after reading at most ``expected.max_safetensors_header()`` bytes.
    """
    n = len(payload)
    if n < _ST_LEN.size:
        raise WireError(f"payload of {n} bytes is too short for safetensors")
    (header_len,) = _ST_LEN.unpack_from(payload, 0)
    limit = expected.max_safetensors_header()
    if header_len > limit:
        raise WireError(f"payload header of {header_len} bytes exceeds the {limit} bytes this model needs")
    data_bytes = expected.data_bytes()
    if n != _ST_LEN.size + header_len + data_bytes:
        raise WireError(
            f"payload of {n} bytes does not fit this model ({data_bytes} data bytes + a {header_len}-byte header)"
        )
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
    want = {t.name: t for t in expected.tensors}
    if set(obj) != set(want):
        missing, extra = sorted(set(want) - set(obj))[:3], sorted(set(obj) - set(want))[:3]
        raise WireError(f"tensor names differ from the model (missing {missing}, unexpected {extra})")
    spans = sorted((*_check_entry(name, obj[name], want[name]), name) for name in want)
    position = 0
    for begin, end, name in spans:
        size = math.prod(want[name].shape) * _DTYPES[want[name].dtype].itemsize
        if begin != position or end - begin != size:
            raise WireError(f"tensor {name!r} has data offsets [{begin}, {end}] that do not tile the payload")
        position = end


def decode(data: bytes, expected: ModelSpec | None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Validate and decode one message; raise WireError with a one-line reason on any problem.

    With ``expected`` the fingerprint and every tensor name/shape/dtype must match it exactly
    and tensors are returned in the spec's order. Without it (tools, debugging), the payload's
    own fingerprint must still match the header. Values must be finite in every case.
    """
    header = peek_header(data, max_bytes)
    if expected is not None and header.fingerprint != expected.fingerprint:
        raise WireError(
            f"model fingerprint {header.fingerprint[:12]} does not match ours {expected.fingerprint[:12]} "
            "(different model architecture)"
        )
    if expected is not None and header.payload_size > expected.max_payload_bytes():
        raise WireError(f"payload of {header.payload_size} bytes is larger than any payload of this model")
    if header.payload_size == 0:
        return Message(header=header, tensors=None, nbytes=len(data))
    if expected is not None:
        check_payload_layout(memoryview(data)[len(data) - header.payload_size :], expected)
    payload = bytes(data[len(data) - header.payload_size :])
    try:
        loaded = _st_load(payload)
    except Exception as exc:  # safetensors raises SafetensorError / ValueError on garbage
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise WireError(f"payload is not valid safetensors: {first}") from None
    if expected is not None:
        names = set(loaded)
        want = set(expected.names)
        if names != want:
            missing, extra = sorted(want - names)[:3], sorted(names - want)[:3]
            raise WireError(f"tensor names differ from the model (missing {missing}, unexpected {extra})")
        tensors: dict[str, torch.Tensor] = {}
        for spec in expected.tensors:
            t = loaded[spec.name]
            if tuple(t.shape) != spec.shape:
                raise WireError(f"tensor {spec.name!r} has shape {tuple(t.shape)}, expected {spec.shape}")
            got = _DTYPE_NAMES.get(t.dtype, str(t.dtype))
            if got != spec.dtype:
                raise WireError(f"tensor {spec.name!r} has dtype {got}, expected {spec.dtype}")
            tensors[spec.name] = t
    else:
        for name, t in loaded.items():
            if t.dtype not in _DTYPE_NAMES:
                raise WireError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        tensors = dict(loaded)
        fp = fingerprint((name, t.shape, t.dtype) for name, t in tensors.items())
        if fp != header.fingerprint:
            raise WireError("payload tensors do not match the header fingerprint")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WireError(f"tensor {name!r} contains NaN or infinite values")
    return Message(header=header, tensors=tensors, nbytes=len(data))
