"""Atomic file writes: a reader (or a crash) never sees a half-written result file; checkpoint
files also carry an integrity hash, so a corrupt or edited one is refused on load."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write next to the target, fsync, then rename over it.

    A unique name opened with "xb" (not mkstemp, which forces mode 0600) keeps the user's umask
    permissions unless ``mode`` asks for specific ones (e.g. 0o600 for a private key).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------- checked safetensors files

_HASH_KEY = "sha256"


def _digest(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes (by name) and of the metadata."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(dict(metadata), sort_keys=True).encode())
    return h.hexdigest()


def write_safetensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Write tensors + string metadata as one safetensors file, atomically, with an integrity hash
    (``sha256`` in the metadata) that :func:`read_safetensors` checks."""
    from safetensors.torch import save

    meta = dict(metadata)
    meta[_HASH_KEY] = _digest(tensors, metadata)
    write_bytes(path, save(dict(tensors), metadata=meta))


def read_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a file written by :func:`write_safetensors`; raise ValueError if it is not readable
    safetensors, has no integrity hash, or its contents do not match it (corrupt or edited)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError("file is truncated")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > len(data) - 8:
        raise ValueError("file is truncated")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"not a safetensors file ({str(err).splitlines()[0][:120]})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or _HASH_KEY not in meta:
        raise ValueError("it has no integrity hash")
    expected = meta.pop(_HASH_KEY)
    if _digest(tensors, meta) != expected:
        raise ValueError("its contents do not match its integrity hash (corrupt or edited)")
    return tensors, meta
