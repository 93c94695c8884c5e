"""Compressed cooperation: what a device sends in a gossip step, encoded in fewer bytes.

``compression.method`` picks one of

* ``quantize``: every coordinate, stochastically rounded to ``bits`` (8 or 4) signed levels with
  one absmax scale per block of ``block_size`` coordinates (``granularity = "block"``) or per
  model tensor (``"tensor"``). Rounding up with probability equal to the remainder makes the
  decoded row an unbiased estimate of the sent one. Receivers use the decoded row as the
  sender's row.
* ``top-k``: the ``k = ceil(ratio * P)`` coordinates whose value changed most since each was last
  sent (error feedback: the sender remembers what it last sent per coordinate, so a change that
  is not sent keeps accumulating until it is); indices and values travel.
* ``random-k``: ``k`` coordinates drawn from the key (seed, round, step, device): the receiver
  regenerates the indices, so only values travel.
* ``choco`` (Koloskova, Stich & Jaggi 2019, CHOCO-SGD's gossip): every device keeps public copies
  ``x̂`` of itself and its neighbours; it sends ``q = top-k(θ − x̂_self)``, everyone adds ``q`` to
  that sender's copy, and then ``θ_n ← θ_n + γ (agg(x̂_n, x̂_neighbours) − x̂_n)``.

For ``top-k`` and ``random-k`` a neighbour only pulls on what it sent (the aggregation rules take a
``sent`` mask, see :mod:`p2pl.core.cooperate`): with the mean, each coordinate is averaged over the
receiver and the neighbours that sent it (``unsent = "renormalize"``, the default) or the receiver's
own value stands in for the others (``"own"``); the robust sorting rules always do the latter.
The sparse methods' values are float32 when ``bits`` is 32 and are quantized like ``quantize``
(blocks over the sent values) when it is 8 or 4.

Every random choice (random-k's indices, stochastic rounding) comes from a generator keyed by
(seed, round, consensus step, device) (:func:`p2pl.core.rng.derive_seed`), so a real node encoding
its one row draws exactly what the simulator draws for that device's row.

The API all three runtimes use:

* :class:`Compression`: the settings (built from the ``[compression]`` config section);
* :func:`message_layout`: the exact arrays (names, dtypes, shapes) of one encoded message and its
  byte size, known before anything arrives, so a receiver checks a payload before decoding it;
* :class:`Compressor`: the per-device sender state (error-feedback memory or CHOCO's own copy) for
  stacked rows ``[R, P]``, with :meth:`Compressor.encode` / :meth:`Compressor.decode` over rows of
  arrays ``[R, ...]`` (a node: ``R = 1``), :meth:`Compressor.publish` (what receivers use: decoded
  rows and the sent mask), and :func:`compressed_gossip` (the gossip step around it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from p2pl.config import CompressionConfig
from p2pl.core.cooperate import Cooperation, Gossip, Neighbourhoods, gossip
from p2pl.core.rng import derive_seed
from p2pl.core.topk import top_k_indices
from p2pl.errors import P2PLError, choose

METHODS = ("none", "top-k", "random-k", "quantize", "choco")
GRANULARITIES = ("block", "tensor")
UNSENT = ("renormalize", "own")
VALUE_BITS = (32, 8, 4)
_PURPOSE = "compress"
_DTYPES = {
    "float32": torch.float32,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
#: models up to this many parameters send their indices as int16 (indices < 32,768), others int32
INT16_INDICES_MAX_PARAMS = 2**15


@dataclass(frozen=True)
class Compression:
    """What a device sends in a gossip step (see the module doc)."""

    method: str = "none"
    ratio: float = 0.01  # top-k / random-k / choco: share of the P coordinates sent
    bits: int = 0  # 8 or 4: quantized values; 32: float32 values; 0: 8 for quantize, 32 otherwise
    block_size: int = 256  # coordinates (or sent values) per quantization scale
    granularity: str = "block"  # quantize: one scale per block, or per model tensor ("tensor")
    gamma: float = 0.1  # choco: consensus step size
    segments: tuple[int, ...] = ()  # the model tensors' sizes (for granularity = "tensor")
    unsent: str = "renormalize"  # top-k / random-k with the mean: how a receiver treats unsent coordinates

    @classmethod
    def of(cls, cfg: CompressionConfig, segments: Sequence[int] = ()) -> Compression:
        """From the ``[compression]`` config section (``segments``: the model tensors' sizes)."""
        return cls(
            cfg.method, cfg.ratio, cfg.bits, cfg.block_size, cfg.granularity, cfg.gamma, tuple(segments), cfg.unsent
        )

    def __post_init__(self) -> None:
        choose("compression.method", self.method, METHODS)
        choose("compression.granularity", self.granularity, GRANULARITIES)
        choose("compression.unsent", self.unsent, UNSENT)
        if not 0 < self.ratio <= 1:
            raise P2PLError(
                f"compression.ratio must be in (0, 1], got {self.ratio}; set e.g. --set compression.ratio=0.01"
            )
        if self.bits not in (0, *VALUE_BITS):
            raise P2PLError(f"compression.bits must be 8, 4 or 32 (0: the method's default), got {self.bits}")
        if self.method == "quantize" and self.value_bits == 32:
            raise P2PLError("compression.method = 'quantize' needs compression.bits = 8 or 4")
        if self.block_size < 1:
            raise P2PLError(f"compression.block_size must be a positive integer, got {self.block_size}")
        if not 0 < self.gamma <= 1:
            raise P2PLError(
                f"compression.gamma must be in (0, 1], got {self.gamma}; set e.g. --set compression.gamma=0.5"
            )

    @property
    def active(self) -> bool:
        return self.method != "none"

    @property
    def sparse(self) -> bool:
        """Sends k coordinates (top-k, random-k, choco) rather than all of them."""
        return self.method in ("top-k", "random-k", "choco")

    @property
    def stateful(self) -> bool:
        """Keeps per-device state between steps (error-feedback memory, CHOCO's copies)."""
        return self.method in ("top-k", "choco")

    @property
    def value_bits(self) -> int:
        if self.bits:
            return self.bits
        return 8 if self.method == "quantize" else 32

    def kept(self, num_params: int) -> int:
        """Coordinates one message carries."""
        return min(num_params, max(1, math.ceil(self.ratio * num_params - 1e-9))) if self.sparse else num_params


@dataclass(frozen=True)
class ArraySpec:
    """One array of an encoded message: its name, dtype name and shape."""

    name: str
    dtype: str  # float32 | int32 | int16 | int8 | uint8
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class MessageLayout:
    """The exact arrays of one encoded message (in order) and their total size in bytes."""

    arrays: tuple[ArraySpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arrays)


def _groups(compression: Compression, n: int, over_params: bool) -> tuple[int, ...]:
    """The sizes of the consecutive quantization groups of ``n`` values: blocks, or model tensors
    (``over_params``: the values are the P parameters in model order, as ``quantize`` sends them)."""
    if compression.granularity == "tensor" and over_params and compression.segments:
        if sum(compression.segments) != n:
            raise P2PLError(f"compression segments cover {sum(compression.segments)} parameters, the model has {n}")
        return tuple(compression.segments)
    full, rest = divmod(n, compression.block_size)
    return (compression.block_size,) * full + ((rest,) if rest else ())


def _value_arrays(compression: Compression, n: int, over_params: bool) -> tuple[ArraySpec, ...]:
    bits = compression.value_bits
    if bits == 32:
        return (ArraySpec("values", "float32", (n,)),)
    groups = len(_groups(compression, n, over_params))
    codes = ArraySpec("codes", "int8", (n,)) if bits == 8 else ArraySpec("codes", "uint8", ((n + 1) // 2,))
    return codes, ArraySpec("scales", "float32", (groups,))


def message_layout(compression: Compression, num_params: int) -> MessageLayout:
    """The arrays of one encoded message for a model of ``num_params`` parameters.

    ``quantize``: ``codes`` (int8 [P], or uint8 [ceil(P/2)] holding two 4-bit codes each) and
    ``scales`` (float32, one per group). ``top-k`` / ``choco``: ``indices`` (int16 [k] when
    P <= 32,768, else int32; strictly increasing) and the values; ``random-k``: the values only
    (indices come from the key). Values are ``values`` (float32 [k]) at 32 bits, else ``codes`` +
    ``scales`` over blocks of the k values.
    ``none``: ``values`` float32 [P] (the plain row)."""
    c = compression
    if not c.active:
        return MessageLayout((ArraySpec("values", "float32", (num_params,)),))
    if c.method == "quantize":
        return MessageLayout(_value_arrays(c, num_params, over_params=True))
    k = c.kept(num_params)
    values = _value_arrays(c, k, over_params=False)
    if c.method == "random-k":
        return MessageLayout(values)
    return MessageLayout((ArraySpec("indices", index_dtype(num_params), (k,)), *values))


def index_dtype(num_params: int) -> str:
    """The narrowest signed integer type that holds every index of a model of ``num_params``."""
    return "int16" if num_params <= INT16_INDICES_MAX_PARAMS else "int32"


# ------------------------------------------------------------------------ keyed random draws


class KeyedDraws:
    """The random draws of the rows of ``device_ids`` in consensus step ``step`` of ``round_index``.

    Row ``d`` draws from Philox, a counter-based generator, with the 128-bit key
    (``derive_seed(seed, "compress", round, step)``, d) and the stream (0: random-k's indices,
    1: stochastic rounding) in its counter's top word: the same numbers whichever rows are drawn
    together, so a node's one row draws what the simulator draws for it. One bit generator is
    reused, its state set per row (building a generator per row cost 3x more)."""

    def __init__(self, seed: int, device_ids: Sequence[int] | np.ndarray, round_index: int, step: int) -> None:
        self.base = np.uint64(derive_seed(seed, _PURPOSE, round_index, step))
        self.device_ids = [int(d) for d in device_ids]
        self._bits = np.random.Philox(key=0)
        self._gen = np.random.Generator(self._bits)

    def _row(self, device: int, stream: int) -> np.random.Generator:
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.array([0, 0, 0, stream], dtype=np.uint64),
                "key": np.array([self.base, device], dtype=np.uint64),
            },
            "buffer": np.zeros(4, dtype=np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._gen

    def indices(self, num_params: int, k: int) -> torch.Tensor:
        """random-k: each row's k coordinates, sorted (int64 [R, k])."""
        r = len(self.device_ids)
        if k >= num_params:
            return torch.arange(num_params, dtype=torch.int64).expand(r, num_params).clone()
        out = np.empty((r, k), dtype=np.int64)
        for row, device in zip(out, self.device_ids, strict=True):
            row[:] = np.sort(self._row(device, 0).choice(num_params, size=k, replace=False))
        return torch.from_numpy(out)

    def uniforms(self, n: int) -> torch.Tensor:
        """Stochastic rounding: n uniforms in [0, 1) per row (float32 [R, n])."""
        out = np.empty((len(self.device_ids), n), dtype=np.float32)
        for row, device in zip(out, self.device_ids, strict=True):
            self._row(device, 1).random(dtype=np.float32, out=row)
        return torch.from_numpy(out)


# ------------------------------------------------------------------------------- quantization


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # symmetric signed levels: 127 at 8 bits, 7 at 4 bits


def _per_value(per_group: torch.Tensor, groups: tuple[int, ...]) -> torch.Tensor:
    """[R, G] -> [R, n]: each group's value repeated over its values."""
    size = groups[0] if groups else 0
    if all(g == size for g in groups[:-1]) and groups[-1] <= size:  # blocks: a broadcast view, one copy
        r, g = per_group.shape
        return per_group.unsqueeze(2).expand(r, g, size).reshape(r, g * size)[:, : sum(groups)]
    return torch.repeat_interleave(per_group, torch.tensor(groups), dim=1)


def quantize(
    values: torch.Tensor, groups: tuple[int, ...], bits: int, uniforms: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Stochastic rounding of ``values [R, n]`` to ``bits`` with one absmax scale per group of
    consecutive values (``groups``: their sizes): ``codes`` (int8 [R, n], or uint8 [R, ceil(n/2)]
    at 4 bits) and ``scales`` (float32 [R, G])."""
    r, n = values.shape
    levels = _levels(bits)
    values = values.float()
    parts = torch.split(values.abs(), list(groups), dim=1)
    absmax = torch.stack([part.amax(dim=1) for part in parts], dim=1) if parts else torch.zeros(r, 0)
    inverse = torch.where(absmax > 0, levels / absmax.clamp_min(1e-38), torch.zeros_like(absmax))
    codes = torch.floor(values * _per_value(inverse, groups) + uniforms).clamp_(-levels, levels)
    scales = absmax / levels
    if bits == 8:
        return {"codes": codes.to(torch.int8), "scales": scales}
    nibbles = (codes + 8).to(torch.uint8)  # -7..7 -> 1..15
    if n % 2:
        nibbles = torch.cat([nibbles, torch.full((r, 1), 8, dtype=torch.uint8)], dim=1)
    return {"codes": nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), "scales": scales}


def dequantize(codes: torch.Tensor, scales: torch.Tensor, groups: tuple[int, ...], bits: int) -> torch.Tensor:
    """float32 [R, n] from :func:`quantize`'s arrays (4-bit codes decode to -8..7 x scale)."""
    n = sum(groups)
    if bits == 8:
        levels = codes.to(torch.float32)
    else:
        packed = codes.to(torch.int16)
        both = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(codes.shape[0], -1)[:, :n]
        levels = (both - 8).to(torch.float32)
    return levels * _per_value(scales, groups)


# ------------------------------------------------------------------------------ the compressor


@dataclass(frozen=True)
class Decoded:
    """What receivers take from rows of messages: dense values and, for the sparse methods, the
    indices sent (``mask``: bool [R, P], True where a value was sent)."""

    values: torch.Tensor  # float32 [R, P] (zero where not sent)
    indices: torch.Tensor | None  # int64 [R, k], or None when every coordinate was sent
    mask: torch.Tensor | None


class Compressor:
    """Encodes and decodes the rows a set of devices sends, holding their sender state.

    ``state`` is ``[R, P]``: top-k's error-feedback memory (each coordinate as last sent) or
    choco's public copy ``x̂`` of each row; None for the stateless methods. Rows are identified by
    global device ids, which key every random draw."""

    def __init__(self, compression: Compression, num_params: int, seed: int) -> None:
        self.compression = compression
        self.num_params = num_params
        self.seed = seed
        self.layout = message_layout(compression, num_params)
        self.k = compression.kept(num_params)
        self.state: torch.Tensor | None = None
        bits = compression.value_bits
        self._value_groups = None if bits == 32 else _groups(compression, self.k, compression.method == "quantize")

    # -- state (checkpointed by the caller) --------------------------------------------------

    def start(self, rows: torch.Tensor) -> None:
        """The state at the start of training: top-k has 'sent' and choco's copies hold the rows
        every device starts from (a public function of the seed and the device ids)."""
        self.state = rows.detach().clone().float() if self.compression.stateful else None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.state is None else {"compress.state": self.state}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.compression.stateful:
            if "compress.state" not in tensors:
                raise P2PLError("the checkpoint holds no compression state; delete it to start the run afresh")
            self.state = tensors["compress.state"].clone().float()

    # -- encode / decode -----------------------------------------------------------------------

    def _values_arrays(self, values: torch.Tensor, draws: KeyedDraws) -> dict[str, torch.Tensor]:
        bits = self.compression.value_bits
        if bits == 32:
            return {"values": values.float().contiguous()}
        assert self._value_groups is not None
        return quantize(values, self._value_groups, bits, draws.uniforms(values.shape[1]))

    def _values_of(self, arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
        bits = self.compression.value_bits
        if bits == 32:
            return arrays["values"].float()
        assert self._value_groups is not None
        return dequantize(arrays["codes"], arrays["scales"].float(), self._value_groups, bits)

    def encode(
        self, rows: torch.Tensor, device_ids: Sequence[int] | np.ndarray, round_index: int, step: int,
        senders: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The messages of ``rows [R, P]`` (the rows as sent) as arrays ``[R, ...]`` laid out as
        :func:`message_layout` says; updates the sender state of the rows in ``senders`` (bool
        [R], default all: a device that sends nothing keeps its state)."""
        return self._encode(rows, device_ids, round_index, step, senders)[0]

    def _encode(
        self, rows: torch.Tensor, device_ids: Sequence[int] | np.ndarray, round_index: int, step: int,
        senders: np.ndarray | None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:  # fmt: skip
        """:meth:`encode`, and the indices sent (None when every coordinate is)."""
        c = self.compression
        rows = rows.detach().float()
        draws = KeyedDraws(self.seed, device_ids, round_index, step)
        if not c.active:
            return {"values": rows.contiguous()}, None
        if c.method == "quantize":
            return self._values_arrays(rows, draws), None
        if c.method == "random-k":
            indices = draws.indices(self.num_params, self.k)
            return self._values_arrays(rows.gather(1, indices), draws), indices
        assert self.state is not None, "Compressor.start was not called"
        base = self.state
        delta = rows - base
        indices = top_k_indices(delta, self.k)
        chosen = delta if c.method == "choco" else rows
        index_type = _DTYPES[index_dtype(self.num_params)]
        arrays = {"indices": indices.to(index_type), **self._values_arrays(chosen.gather(1, indices), draws)}
        sent = self._values_of(arrays)
        if senders is not None and not bool(np.all(senders)):
            quiet = torch.from_numpy(~np.asarray(senders, dtype=bool))  # sent nothing: state unchanged
            sent = torch.where(quiet.unsqueeze(1), 0.0 if c.method == "choco" else base.gather(1, indices), sent)
        self.state = apply_sparse(base, indices, sent, add=c.method == "choco", inplace=True)
        return arrays, indices

    def decode(
        self, arrays: Mapping[str, torch.Tensor], device_ids: Sequence[int] | np.ndarray, round_index: int, step: int
    ) -> Decoded:
        """Rows of messages (arrays ``[R, ...]``) back to dense values; stateless. Indices must be
        strictly increasing within [0, P) (a payload that breaks this raises P2PLError)."""
        c = self.compression
        p = self.num_params
        if not c.active:
            return Decoded(arrays["values"].float(), None, None)
        if c.method == "quantize":
            return Decoded(self._values_of(arrays), None, None)
        if c.method == "random-k":
            indices = KeyedDraws(self.seed, device_ids, round_index, step).indices(p, self.k)
        else:
            indices = arrays["indices"].to(torch.int64)
            check_indices(indices, p)
        return self._sparse(arrays, indices)

    def _sparse(self, arrays: Mapping[str, torch.Tensor], indices: torch.Tensor) -> Decoded:
        r, p = indices.shape[0], self.num_params
        values = torch.zeros(r, p, dtype=torch.float32).scatter_(1, indices, self._values_of(arrays))
        mask = torch.zeros(r, p, dtype=torch.bool).scatter_(1, indices, True)
        return Decoded(values, indices, mask)

    # -- what gossip uses ------------------------------------------------------------------

    def publish(
        self, rows: torch.Tensor, device_ids: Sequence[int] | np.ndarray, round_index: int, step: int,
        senders: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """What receivers use of the rows ``[R, P]`` these devices send: (rows, sent mask or None).
        choco: the senders' public copies after this step's update (every receiver adds the same
        q to its copy, so the copy is the same everywhere)."""
        arrays, indices = self._encode(rows, device_ids, round_index, step, senders)
        if self.compression.method == "choco":
            assert self.state is not None
            return self.state, None
        # what decode would give receivers, without drawing random-k's indices a second time
        decoded = self._sparse(arrays, indices) if indices is not None else self.decode(arrays, device_ids, 0, 0)
        return decoded.values, decoded.mask

    def own(self, rows: torch.Tensor) -> torch.Tensor:
        """The row a receiver aggregates around: its own parameters, or (choco) its public copy."""
        if self.compression.method == "choco":
            assert self.state is not None
            return self.state
        return rows

    def finish(self, rows: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The new rows from the aggregate: the aggregate itself, or (choco) ``θ + γ (mixed − x̂)``."""
        if self.compression.method == "choco":
            assert self.state is not None
            return rows + self.compression.gamma * (mixed - self.state)
        return mixed


def check_indices(indices: torch.Tensor, num_params: int) -> None:
    """Sent indices must be strictly increasing within [0, num_params) (no duplicates)."""
    if indices.numel() == 0:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= num_params:
        raise P2PLError(f"compressed message indices outside [0, {num_params})")
    if indices.shape[1] > 1 and not bool((indices[:, 1:] > indices[:, :-1]).all()):
        raise P2PLError("compressed message indices are not strictly increasing")


def apply_sparse(
    base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, add: bool, inplace: bool = False
) -> torch.Tensor:
    """``base`` with ``values`` written (or, ``add``, added) at ``indices`` per row (a new tensor
    unless ``inplace``). The one update of top-k's memory and of every choco copy, so senders and
    receivers agree."""
    out = base if inplace else base.clone()
    if add:
        return out.scatter_add_(1, indices, values)
    return out.scatter_(1, indices, values)


def compressed_gossip(
    rows: torch.Tensor,
    pool: torch.Tensor,
    sent: torch.Tensor | None,
    hoods: Neighbourhoods,
    stage: Gossip,
    compressor: Compressor,
) -> torch.Tensor:
    """One gossip step on what the neighbours published (:meth:`Compressor.publish`): the
    aggregation rule around each receiver's own row (choco: its copy), then
    :meth:`Compressor.finish`. Where a neighbour sent only some coordinates (top-k, random-k),
    the mean (and ``clipped``'s mean) takes each coordinate over the receiver and the neighbours
    that sent it (``unsent = "renormalize"``) or fills the others with the receiver's own value
    (``"own"``); the robust sorting rules always fill with the receiver's own value, so a lone
    sender of a coordinate never outweighs the receiver there."""
    if sent is not None and compressor.compression.unsent == "renormalize":
        stage = replace(stage, sent_only=True)
    mixed = gossip(compressor.own(rows), pool, hoods, stage, sent=sent)
    return compressor.finish(rows, mixed)


def incompressible(coop: Cooperation) -> str:
    """Why ``coop`` has nothing compression applies to ("" when it can be compressed): it needs
    gossip stages in which every device sends to all its live neighbours, once after local
    training (FedAvg's server mean, centralized and local have none)."""
    if not coop.stages:
        return "it does not communicate"
    if coop.every_local_step:
        return "it mixes after every local step"
    for stage in coop.stages:
        if not isinstance(stage, Gossip) or stage.peers != "all":
            return f"it cooperates by {type(stage).__name__}, not by gossip with every live neighbour"
    return ""


def check_compression(compression: Compression, *, lossy_links: str = "", incompressible: str = "") -> None:
    """Refuse settings where compression makes no sense: an algorithm without gossip to compress
    (``incompressible`` says why, see :func:`incompressible`), or choco where messages are lost
    by design (``lossy_links`` names why: CHOCO's copies stay equal only if every message arrives)."""
    if not compression.active:
        return
    if incompressible:
        raise P2PLError(
            f"compression.method = {compression.method!r} compresses P2PL's gossip, but this algorithm has none "
            f"({incompressible}): set compression.method = 'none' or algorithm = 'p2pl'"
        )
    if compression.method == "choco" and lossy_links:
        raise P2PLError(
            f"compression.method = 'choco' needs every message to arrive, but {lossy_links}; "
            "use top-k, random-k or quantize, or a static network"
        )


__all__ = [
    "GRANULARITIES",
    "METHODS",
    "UNSENT",
    "ArraySpec",
    "Compression",
    "Compressor",
    "Decoded",
    "KeyedDraws",
    "MessageLayout",
    "apply_sparse",
    "check_compression",
    "check_indices",
    "compressed_gossip",
    "dequantize",
    "incompressible",
    "index_dtype",
    "message_layout",
    "quantize",
]
