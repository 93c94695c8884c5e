"""Strict readers for the on-disk formats of the real image datasets.

* IDX (MNIST, Fashion-MNIST): big-endian header ``00 00 <dtype> <ndim>``, ``ndim`` big-endian
  uint32 dimensions, then the raw values. We accept only the two layouts those datasets use:
  ``0x00000803`` (uint8 images ``[n, rows, cols]``) and ``0x00000801`` (uint8 labels ``[n]``).
* CIFAR-10 *binary* version: records of 1 label byte + 3072 pixel bytes (1024 red, 1024 green,
  1024 blue, each row-major 32x32). The python ("pickle") version is never read: unpickling a
  downloaded file can run arbitrary code.

Every problem is a one-line :class:`~p2pl.errors.P2PLError` naming the file and what is wrong.
Files ending in ``.gz`` are decompressed in memory first.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from p2pl.errors import P2PLError

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_IDX_KINDS = {IDX_IMAGES_MAGIC: "IDX images", IDX_LABELS_MAGIC: "IDX labels"}
_IDX_NDIM = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}

CIFAR_IMAGE_BYTES = 3 * 32 * 32
CIFAR_RECORD_BYTES = 1 + CIFAR_IMAGE_BYTES
CIFAR_NUM_CLASSES = 10


def one_line(err: BaseException) -> str:
    """An exception's message on one line (error messages must be one line)."""
    return " ".join(str(err).split()) or type(err).__name__


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in ``.gz``."""
    if not path.is_file():
        raise P2PLError(f"{path} not found")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise P2PLError(f"{path} could not be read: {one_line(err)}") from None


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file: uint8 images ``[n, rows, cols]`` or uint8 labels ``[n]``.

    ``expected_magic`` (``IDX_IMAGES_MAGIC`` or ``IDX_LABELS_MAGIC``) pins the kind; without it
    either is accepted. The byte count must match the header exactly: truncated files and
    trailing bytes are errors.
    """
    file = Path(path)
    data = _read_bytes(file)
    gz = " (after gunzip)" if file.suffix == ".gz" else ""
    if len(data) < 4:
        raise P2PLError(f"{file} is truncated: expected an IDX header of at least 4 bytes, got {len(data)}")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise P2PLError(
            f"{file} has magic 0x{magic:08x}, expected 0x{expected_magic:08x} ({_IDX_KINDS[expected_magic]})"
        )
    if magic not in _IDX_KINDS:
        raise P2PLError(
            f"{file} has magic 0x{magic:08x}, expected 0x{IDX_IMAGES_MAGIC:08x} (IDX images) "
            f"or 0x{IDX_LABELS_MAGIC:08x} (IDX labels)"
        )
    ndim = _IDX_NDIM[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise P2PLError(f"{file} is truncated: expected a {header}-byte IDX header, got {len(data)} bytes{gz}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) < expected:
        raise P2PLError(f"{file} is truncated: expected {expected} bytes, got {len(data)}{gz}")
    if len(data) > expected:
        raise P2PLError(
            f"{file} has {len(data) - expected} trailing bytes: expected {expected} bytes for "
            f"dimensions {list(dims)}, got {len(data)}{gz}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_cifar_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: (uint8 images ``[n, 3, 32, 32]``, uint8 labels ``[n]``).

    The size must be a positive multiple of 3073 bytes (the standard files hold 10000 records,
    but any count is accepted) and every label must be below 10.
    """
    file = Path(path)
    data = _read_bytes(file)
    if len(data) == 0:
        raise P2PLError(f"{file} is empty: expected records of {CIFAR_RECORD_BYTES} bytes")
    if len(data) % CIFAR_RECORD_BYTES:
        whole = len(data) // CIFAR_RECORD_BYTES
        raise P2PLError(
            f"{file} is truncated: its size {len(data)} is not a multiple of the {CIFAR_RECORD_BYTES}-byte "
            f"CIFAR-10 record (expected {whole * CIFAR_RECORD_BYTES} or {(whole + 1) * CIFAR_RECORD_BYTES} "
            "bytes); is this the binary version (cifar-10-batches-bin)?"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].copy()
    bad = np.flatnonzero(labels >= CIFAR_NUM_CLASSES)
    if bad.size:
        raise P2PLError(
            f"{file} has label {int(labels[bad[0]])} in record {int(bad[0])}, expected 0..9 "
            "(is this the CIFAR-10 binary version, not CIFAR-100?)"
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels
